"""The semantics probe of CDAnet §5.3 as a table: what does a translated latent feature mean?

For rows of the served domain (e.g. the target's test split, positives only as in §5.3),
the translation network's ``W_p z_p`` is compared with the latent features ``z`` of a pool
of the other domain's rows; the ``k`` nearest pool rows are listed beside the query row
(ids, and any other Parquet columns, e.g. MovieLens titles). A summary gives, per column
both domains have, how often a neighbour shares the query's value against chance (the
share of pool rows that do), which makes the translation inspectable without labels; and how many distinct pool rows
the neighbours are (few means a handful of "hub" rows are everyone's nearest).
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raytrain_ctr import pipeline
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.data.dataset import CTRDataset, filter_rows, join, resolve
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.methods import StageContext, get_method
from raytrain_ctr.methods.cdanet import CDAnet, other, translated_neighbours
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.loop import MODEL_FILE


def read_rows(ds: CTRDataset, domain: str, split: str, limit: int, positives: bool, seed: int) -> pa.Table:
    """Up to ``limit`` rows of a split, positives only if asked: files in a seeded order, read until
    there are enough rows (a split may be far larger than memory), then a seeded sample of them."""
    dom = ds.domain(domain)
    files = ds.files(domain, split)
    parts, rows = [], 0
    for i in np.random.default_rng(seed).permutation(len(files)):
        part = filter_rows(pq.read_table(files[i], filesystem=ds.filesystem), dom.where)
        if positives:
            part = part.filter(pc.equal(part.column(dom.spec.label), 1))
        parts.append(part)
        rows += part.num_rows
        if rows >= limit:
            break
    table = pa.concat_tables(parts, promote_options="default")
    if table.num_rows > limit:
        table = table.take(np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False)))
    return table


def default_columns(ds: CTRDataset, domain: str, table: pa.Table) -> list[str]:
    """The user id, the item-group categorical fields, and a ``title`` column if there is one."""
    spec = ds.domain(domain).spec
    cols = [spec.user_id] if spec.user_id else []
    cols += [f.name for f in spec.sparse_fields if f.group == "item" and f.type == "categorical"]
    return cols + (["title"] if "title" in table.column_names else [])


def probe(cfg: ExperimentConfig, k: int = 5, rows: int = 20, pool: int = 20_000, split: str = "test",
          positives: bool = True, columns: list[str] | None = None, metric: str = "euclidean",
          seed: int = 0, translate: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(neighbour table, summary) for the translation network of ``cfg`` (its artifact must exist)."""
    method = get_method(cfg.method, cfg.method_args)
    if not isinstance(method, CDAnet) or not method.args["translation"]:
        raise SpecError(f"probe: needs a CDAnet config with its translation network (method is '{cfg.method}')")
    stage = method.stage("translation")
    key = pipeline.stage_keys(cfg, method)[stage.name]
    directory = pipeline.committed(cfg, stage, key)  # verified against its manifest
    if directory is None:
        raise pipeline.PipelineError(f"probe: no translation network at {pipeline.stage_dir(cfg, stage, key)}; run "
                                     f"`raytrain-ctr run --config ... --stage translation` with the same config first")
    fs, path = resolve(join(directory, MODEL_FILE))
    ds = cfg.dataset()
    specs = ds.specs()
    model = stage.hooks.build(StageContext(stage, specs, replace(cfg.model, embedding_backend="local"), method.args))
    with fs.open_input_file(path) as f:
        model.load_state_dict(torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True))
    p = method.served
    q_table = read_rows(ds, p, split, rows, positives, seed)
    k_table = read_rows(ds, other(p), "train", pool, positives, seed)
    cols = columns or default_columns(ds, p, q_table)
    for t, dom in ((q_table, p), (k_table, other(p))):
        missing = [c for c in cols if c not in t.column_names]
        if missing and columns:
            raise SpecError(f"probe --columns: {missing} not in the Parquet of domain '{dom}' "
                            f"(columns: {t.column_names})")
    idx, dist = translated_neighbours(model, FeatureEncoder(specs[p]).encode(q_table),
                                      FeatureEncoder(specs[other(p)]).encode(k_table), k, metric, translate)
    qdf = q_table.select([c for c in cols if c in q_table.column_names]).to_pandas()
    kdf = k_table.select([c for c in cols if c in k_table.column_names]).to_pandas()
    out = []
    for i in range(len(qdf)):
        for r in range(idx.shape[1]):
            j = int(idx[i, r])
            out.append({"row": i, **{f"{p}.{c}": v for c, v in qdf.iloc[i].items()}, "rank": r + 1,
                        "distance": float(dist[i, r]), "pool_row": j,
                        **{f"{other(p)}.{c}": v for c, v in kdf.iloc[j].items()}})
    table = pd.DataFrame(out)
    summary = []
    for c in cols:
        if c in qdf and c in kdf:
            same = (table[f"{p}.{c}"] == table[f"{other(p)}.{c}"]).mean()
            chance = float(np.mean([(kdf[c] == v).mean() for v in qdf[c]]))
            summary.append({"column": c, "neighbours sharing it": same, "chance": chance})
    return table, pd.DataFrame(summary)
