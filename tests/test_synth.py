"""The planted-mechanism generator: deterministic, and its mechanisms are really there."""

import filecmp
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import Batch, FeatureEncoder
from raytrain_ctr.data.synth import generate, generate_shard, make_config
from raytrain_ctr.data.validate import validate
from raytrain_ctr.spec import SpecError
from raytrain_ctr.train.metrics import auc


def files_of(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_same_bytes_whatever_the_parallelism(tmp_path, ray_local):
    cfg = make_config("tiny", rows=30_000, rows_per_shard=7_000)
    generate(str(tmp_path / "serial"), cfg, parallelism=1)
    generate(str(tmp_path / "parallel"), cfg, parallelism=3)
    a, b = files_of(tmp_path / "serial"), files_of(tmp_path / "parallel")
    assert a == b and len([f for f in a if f.endswith(".parquet")]) == 3 * (5 + 1)
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "serial", tmp_path / "parallel", a, shallow=False)
    assert not mismatch and not errors
    other = make_config("tiny", rows=30_000, rows_per_shard=7_000, seed=1)
    generate(str(tmp_path / "seed1"), other, parallelism=1)
    assert not filecmp.cmp(tmp_path / "serial/source/train/part-00000.parquet",
                           tmp_path / "seed1/source/train/part-00000.parquet", shallow=False)


def read(ds: CTRDataset, domain: str, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in ds.files(domain, split)])


def test_layout_counts_and_planted_columns(tiny_data):
    ds = CTRDataset.load(tiny_data)
    summaries = {(s.domain, s.split): s for s in validate(ds)}
    src = sum(summaries["source", s].rows for s in ("train", "valid", "test"))
    tgt = sum(summaries["target", s].rows for s in ("train", "valid", "test"))
    assert (src, tgt) == (100_000, 10_000)
    assert abs(summaries["source", "train"].rows / src - 0.8) < 0.01
    # heterogeneous schemas: one field per domain only
    assert "src_channel" in ds.domain("source").spec.columns and "src_channel" not in ds.domain("target").spec.columns
    assert "tgt_position" in ds.domain("target").spec.columns
    s, t = read(ds, "source", "train"), read(ds, "target", "train")
    # planted noise: the requested share of source rows, none in the target, not a feature
    assert abs(np.mean(s["is_noise"].to_numpy()) - 0.2) < 0.01 and not t["is_noise"].to_numpy().any()
    assert "is_noise" not in ds.domain("source").spec.columns
    # overlap: about half the target users and most target items also occur in the source
    su, tu = set(s["user_id"].to_numpy()), set(t["user_id"].to_numpy())
    assert 0.3 < len(tu & su) / len(tu) < 0.7
    # six months; Zipf popularity: the top 1% of items take far more than 1% of rows
    months = (s["ts"].to_numpy() - s["ts"].to_numpy().min()) // (30 * 86400)
    assert set(months) == set(range(6))
    counts = np.sort(np.bincount(s["item_id"].to_numpy()))[::-1]
    assert counts[: len(counts) // 100].sum() / counts.sum() > 0.1


def test_noise_rows_follow_a_different_rule(tiny_data):
    """The clean rule predicts clean source rows well and noise rows badly."""
    s = read(CTRDataset.load(tiny_data), "source", "train").to_pandas()
    clean, noise = s[~s.is_noise], s[s.is_noise]
    assert "true_prob" not in CTRDataset.load(tiny_data).domain("source").spec.columns
    clean_auc = auc(clean.label, clean.true_prob)
    noise_auc = auc(noise.label, noise.true_prob)
    assert clean_auc > 0.8 and noise_auc < clean_auc - 0.25, (clean_auc, noise_auc)


def test_channel_noise_is_whole_channels_and_row_noise_is_not():
    """``noise_by: channel`` makes every row of two of the six channels noisy (a feature a selector can
    see); row noise is spread evenly over the channels; the labels of the clean rows are the same."""
    kw = {"rows": 20_000, "rows_per_shard": 20_000}
    by_channel = generate_shard(make_config("channel_noise", **kw), "source", 0).to_pandas()
    by_row = generate_shard(make_config("channel_noise", noise_by="row", **kw), "source", 0).to_pandas()
    share = by_channel.groupby("src_channel").is_noise.mean()
    assert share.loc[[1, 2]].eq(1).all() and share.loc[[3, 4, 5, 6]].eq(0).all()
    assert abs(by_channel.is_noise.mean() - 1 / 3) < 0.02
    assert by_row.groupby("src_channel").is_noise.mean().between(0.28, 0.39).all()
    clean = by_channel[~by_channel.is_noise]
    assert auc(clean.label, clean.true_prob) > 0.8
    both = ~by_channel.is_noise & ~by_row.is_noise  # clean either way: the same draws, the same labels
    assert both.sum() > 5_000 and by_channel.label[both].equals(by_row.label[both])
    assert not by_channel.label.equals(by_row.label)
    with pytest.raises(SpecError, match="noise_by"):
        make_config("homogeneous", noise_by="channel")
    with pytest.raises(SpecError, match="noise_by"):
        make_config("default", noise_by="user")


COMMON = ["user_id", "user_age", "user_gender", "item_id", "item_cat", "ctx_slot", "hist_items"]


class FM(torch.nn.Module):
    """A plain factorisation machine over the common fields: the 'simple model' of the check."""

    def __init__(self, spec, dim: int = 8):
        super().__init__()
        self.spec = spec
        self.v = torch.nn.ModuleDict({k: torch.nn.Embedding(t.num_embeddings, dim) for k, t in spec.tables.items()})
        self.w = torch.nn.ModuleDict({k: torch.nn.Embedding(t.num_embeddings, 1) for k, t in spec.tables.items()})
        for e in self.v.values():
            torch.nn.init.normal_(e.weight, std=0.05)
        for e in self.w.values():
            torch.nn.init.zeros_(e.weight)

    def forward(self, b: Batch) -> torch.Tensor:
        vs, lin = [], 0
        for f in COMMON:
            t, x = self.spec.field(f).table, b.sparse[f]
            if x.dim() == 2:
                m = (x > 0).float().unsqueeze(-1)
                n = m.sum(1).clamp(min=1)
                v, w = (self.v[t](x) * m).sum(1) / n, (self.w[t](x) * m).sum(1) / n
            else:
                v, w = self.v[t](x), self.w[t](x)
            vs.append(v)
            lin = lin + w[:, 0]
        V = torch.stack(vs, 1)
        return lin + 0.5 * (V.sum(1) ** 2 - (V**2).sum(1)).sum(1)


def fit_fm(train: list[Batch], valid: Batch, test: Batch, spec, epochs: int = 6) -> float:
    """Test AUC at the epoch with the best validation AUC."""
    torch.manual_seed(0)
    model = FM(spec)
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    best = (0.0, 0.0)
    for _ in range(epochs):
        for b in train:
            perm = torch.randperm(len(b))
            for i in range(0, len(b), 256):
                idx = perm[i: i + 256]
                sb = Batch(b.domain, {k: b.sparse[k][idx] for k in COMMON}, b.dense[idx], b.label[idx])
                loss = F.binary_cross_entropy_with_logits(model(sb), sb.label)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            v = auc(valid.label.numpy(), model(valid).numpy())
            t = auc(test.label.numpy(), model(test).numpy())
        best = max(best, (v, t))
    return best[1]


def test_planted_signal_learnable_and_transfer_pays(tiny_data):
    ds = CTRDataset.load(tiny_data)
    enc = {d: FeatureEncoder(ds.domain(d).spec) for d in ("source", "target")}
    tt, tv, te = (enc["target"].encode(read(ds, "target", s)) for s in ("train", "valid", "test"))
    st = enc["source"].encode(read(ds, "source", "train"))
    spec = ds.domain("target").spec
    target_only = fit_fm([tt], tv, te, spec)
    with_source = fit_fm([st, tt], tv, te, spec)
    assert target_only > 0.6
    assert with_source > target_only + 0.02, (target_only, with_source)


def test_entities_preset_has_two_entities_with_their_own_fields(tmp_path):
    out = str(tmp_path / "ent")
    generate(out, make_config("entities", rows=6_000, rows_per_shard=3_000), parallelism=1)
    ds = CTRDataset.load(out)
    specs = {d: ds.domain(d).spec for d in ("source", "target")}
    specific = {d: sorted(f.name for f in s.fields if f.scope == "specific") for d, s in specs.items()}
    assert specific == {"source": ["item_price", "src_channel"], "target": ["tgt_position", "tgt_style"]}
    shared = {d: sorted(f.name for f in s.fields if f.scope == "shared") for d, s in specs.items()}
    assert shared["source"] == shared["target"]
    assert {"hist_source", "hist_target", "item_topic"} <= set(shared["source"])
    s, t = (pq.read_table(ds.files(d, "train")).to_pandas() for d in ("source", "target"))
    assert not set(s.item_id) & set(t.item_id)  # disjoint items
    assert t.hist_target.map(len).max() <= 5 and (t.hist_target.map(len) == 0).any()  # shorter, maybe empty
    assert max(max(h, default=0) for h in t.hist_source) <= 4_000 < min(min(h, default=10**9) for h in t.hist_target)
    # the target's specific fields carry signal: the clean click probability moves with the style
    by_style = t.groupby("tgt_style").true_prob.mean()
    assert by_style.max() - by_style.min() > 0.1
