"""``raytrain-ctr export``: a finished stage's artifact → a serving package.

The stage's model is rebuilt on the local embedding backend (artifacts keep the local backend's
tensor names whichever backend trained them), loaded strictly from its ``model.pt``, and handed to
the stage's ``export`` hook, which names what the paper serves: CCTL's pure tower (§3.4),
E-CDCTR's complete model over the merged historical tables (§3.6.2), MKT's TEM with the MEM parts
it reads (§3.4), AutoFT's two copies routed by the argmax of the policies (§3.3); every other
method serves its model. That module becomes a ``torch.export`` program (:mod:`.program`) and a
package (:mod:`.package`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.config import ExperimentConfig
from raytrain_ctr.data.dataset import CTRDataset, DataError, filter_rows, join, resolve
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.methods import Method, Stage, StageContext, get_method
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import DomainSpec
from raytrain_ctr.train.state import StateMismatchError

EXAMPLE_ROWS = 64
SERVED_METRICS = ("best_epoch", "valid_auc", "test_auc", "test_logloss", "test_gauc", "test_rows")


def served_model(method: Method, stage: Stage, specs: dict[str, DomainSpec], model_cfg: ModelConfig,
                 state: dict[str, torch.Tensor], source: str = "model.pt") -> nn.Module:
    """What ``stage`` serves, in eval mode, from its trained ``state`` (tables on the local backend).
    The model is built on the ``meta`` device and takes ``state``'s tensors as they are (memory-mapped
    ones stay mapped: no copy of the tables is made)."""
    ctx = StageContext(stage, specs, replace(model_cfg, embedding_backend="local"), method.args)
    model = ctx.dry_build()
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise StateMismatchError(f"{source} does not fit stage '{stage.name}' of '{method.name}' as configured "
                                 f"(was it trained with another config?): {str(e).splitlines()[0]}") from None
    model.eval()
    return stage.hooks.export(model, ctx).eval()


def example_batch(dataset: CTRDataset, domain: str, split: str = "test", rows: int = EXAMPLE_ROWS) -> Batch:
    """The first rows of a domain's split, encoded: the shapes the program is traced with."""
    dom = dataset.domain(domain)
    for file in dataset.files(domain, split):
        table = filter_rows(pq.read_table(file, columns=dom.columns + list(dom.where), filesystem=dataset.filesystem),
                            dom.where)
        if table.num_rows >= 2:
            return FeatureEncoder(dom.spec).encode(table.slice(0, rows))
    raise DataError(f"domain '{domain}': its {split} split has fewer than two rows to export the model with")


def export_package(cfg: ExperimentConfig, out: str | Path, stage: str | None = None) -> Path:
    """The package of the run's last stage (or ``stage``), written to ``out``; the stage must have finished."""
    from raytrain_ctr.pipeline import PipelineError, committed, resolve_stages, stage_dir
    from raytrain_ctr.train.loop import METRICS_FILE, MODEL_FILE

    dataset = cfg.dataset()
    method = get_method(cfg.method, cfg.method_args)
    st = method.stage(stage) if stage else method.stages[-1]
    key = resolve_stages(cfg, method, dataset)[st.name].key
    directory = committed(cfg, st, key)  # verified against its manifest
    if directory is None:
        raise PipelineError(f"stage '{st.name}' of '{cfg.method}' has no finished artifact at "
                            f"{stage_dir(cfg, st, key)} (for this config, data and as_of); run it first: "
                            f"raytrain-ctr run --config ...")
    fs, art = resolve(directory)
    files = {name: join(art, name) for name in (MODEL_FILE, METRICS_FILE)}
    with fs.open_input_stream(files[METRICS_FILE]) as f:
        metrics = json.loads(f.read())
    with tempfile.TemporaryDirectory(prefix="raytrain-ctr-export-") as tmp:
        local = files[MODEL_FILE]
        if not isinstance(fs, pafs.LocalFileSystem):  # a local copy, to be memory-mapped
            local = str(Path(tmp) / MODEL_FILE)
            pafs.copy_files(files[MODEL_FILE], local, source_filesystem=fs)
        state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)  # tables paged in, not read
        return _package(cfg, dataset, method, st, key, directory, metrics, state, out)


def _package(cfg: ExperimentConfig, dataset: CTRDataset, method: Method, st: Stage, key: str, directory: str,
             metrics: dict, state: dict[str, torch.Tensor], out: str | Path) -> Path:
    from raytrain_ctr.pipeline import artifact_name
    from raytrain_ctr.serving.package import write_package
    from raytrain_ctr.serving.program import export_program
    from raytrain_ctr.train.loop import MODEL_FILE

    specs = dataset.specs()
    served = served_model(method, st, specs, cfg.model, state, source=join(directory, MODEL_FILE))
    program = export_program(served, example_batch(dataset, st.eval_domain))
    dom = dataset.domain(st.eval_domain)
    schema = pq.read_schema(dataset.files(st.eval_domain, "test")[0], filesystem=dataset.filesystem)
    manifest: dict[str, Any] = {
        "method": cfg.method, "method_args": method.args, "stage": st.name, "artifact": artifact_name(st, key),
        "artifact_dir": directory, "as_of": cfg.as_of, "data": cfg.data, "model": asdict(cfg.model),
        "metrics": {k: metrics[k] for k in SERVED_METRICS if k in metrics},
        "schema": {c: str(schema.field(c).type) for c in dom.spec.columns if c in schema.names},
    }
    return write_package(out, program, dom.spec, manifest)
