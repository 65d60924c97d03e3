"""Exact metrics equal brute force."""

import itertools

import numpy as np
import pytest

from raytrain_ctr.compare import activity_markdown
from raytrain_ctr.train.metrics import Activity, MetricsError, auc, by_activity, check_evaluable, gauc, logloss


def brute_auc(y, s) -> float:
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_one_class_is_nan():
    assert np.isnan(auc(np.ones(5), np.arange(5.0)))


def test_logloss_matches_definition():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.9, 0.2, 0.6, 0.99])
    expected = -np.mean([np.log(0.9), np.log(0.8), np.log(0.6), np.log(0.99)])
    assert logloss(y, p) == pytest.approx(expected)


def test_gauc_is_impression_weighted_and_skips_one_class_users():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 30, 600)
    y = rng.integers(0, 2, 600)
    s = rng.random(600) + 0.2 * y
    users[:5], y[:5] = 99, 1  # user 99 has only positives: no AUC, left out
    num = den = 0.0
    counted = 0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * brute_auc(y[m], s[m])
            den += m.sum()
            counted += 1
    value, n = gauc(y, s, users)
    assert n == counted == 30
    assert value == pytest.approx(num / den, abs=1e-12)


def test_activity_buckets_users_by_their_train_clicks():
    act = Activity(users=np.array([3, 7, 9]), clicks=np.array([9, 10, 30]), edges=(10, 30))
    assert act.names == ["0-9", "10-29", "30+"]
    assert act.bucket(np.array([3, 7, 9, 1, 100])).tolist() == [0, 1, 2, 0, 0]  # unseen users: 0 clicks
    users = np.array([3, 3, 7, 7, 9, 9, 1, 1])
    labels = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    probs = np.array([0.1, 0.9, 0.8, 0.2, 0.3, 0.6, 0.7, 0.4])
    out = by_activity(labels, probs, users, act)
    assert out["0-9"]["rows"] == 4 and out["0-9"]["users"] == 2 and out["0-9"]["auc"] == 1.0
    assert out["10-29"]["auc"] == 0.0 and out["30+"]["auc"] == 1.0
    assert out["0-9"]["auc"] == auc(labels[[0, 1, 6, 7]], probs[[0, 1, 6, 7]])
    runs = [{"entry": "a", "by_activity": out}, {"entry": "a", "by_activity": out}, {"entry": "b"}]
    table = activity_markdown(runs, ["a", "b"])
    assert "| a | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 | 0.0000 ± 0.0000" in table and "| b |" not in table
    assert "0-9: 2, 10-29: 1, 30+: 1" in table and activity_markdown([{"entry": "b"}], ["b"]) == ""


def test_splits_without_a_meaningful_figure_are_refused_by_cause():
    y, p = np.array([0.0, 1.0, 0.0]), np.array([0.2, 0.7, 0.1])
    check_evaluable(y, p, "target valid")  # fine
    with pytest.raises(MetricsError, match="the target valid split has no rows"):
        check_evaluable(y[:0], p[:0], "target valid")
    with pytest.raises(MetricsError, match="1 of 3 predictions on the target test split are NaN"):
        check_evaluable(y, np.array([0.2, np.nan, 0.1]), "target test")
    with pytest.raises(MetricsError, match="every row of the target test split has label 0: AUC needs both"):
        check_evaluable(np.zeros(3), p, "target test")


def test_a_stage_evaluating_a_one_class_split_stops(tiny_data):
    """The evaluation itself refuses (the Ray loop calls the same ``evaluate``): no −1 or nan result."""
    import torch
    from helpers import load

    from raytrain_ctr.config import TrainConfig
    from raytrain_ctr.data.dataset import CTRDataset
    from raytrain_ctr.methods import get_method
    from raytrain_ctr.models.backbones import ModelConfig
    from raytrain_ctr.train.local import fit_local

    ds = CTRDataset.load(tiny_data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    valid = load(ds, "target", "valid")
    negatives = valid.select(torch.nonzero(valid.label == 0).squeeze(1))
    m = get_method("target_only")
    with pytest.raises(MetricsError, match="every row of the valid split has label 0"):
        fit_local(m, m.stages[0], specs, ModelConfig(deep=(8,)), TrainConfig(epochs=1, batch_size=4096),
                  {"target": load(ds, "target", "train").select(slice(0, 2048))}, negatives)


def sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank evaluates its own rows (rank 2 has none) with ``evaluate_sharded``; rank r writes its figures
    and the peak number of rows it held."""
    import json
    import os

    import torch.distributed as dist

    from raytrain_ctr.train import metrics as M

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    y, s, u, activity = sharded_rows()
    cuts = [0, 7000, 12000, 12000, len(y)]  # unequal shards, one empty
    mine = slice(cuts[rank], cuts[rank + 1])
    held = []
    exchange = M.exchange

    def counted(dest, *arrays):
        got = exchange(dest, *arrays)
        held.append(len(got[0]))
        return got

    M.exchange = counted
    figures = M.evaluate_sharded(y[mine], s[mine], u[mine], "test", activity)
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"figures": figures, "held": held}, f)
    dist.destroy_process_group()


def sharded_rows():
    rng = np.random.default_rng(7)
    n = 20_000
    u = rng.geometric(1 / 600, n) % 3000 + 10**12  # skewed activity (no user holds a large share), large ids
    y = (rng.random(n) < 0.3).astype(np.float64)
    s = np.round(1 / (1 + np.exp(-(rng.normal(size=n) + y))), 3)  # many ties, across workers too
    clicks = np.bincount((u - 10**12).astype(np.int64), minlength=3000)
    activity = Activity(np.arange(3000) + 10**12, clicks, (5, 20))
    return y, s, u, activity


def test_sharded_evaluation_equals_the_gathered_figures(tmp_path):
    """AUC by a sample sort, GAUC by a user shuffle, per activity bucket too: equal to the one-process figures on
    every rank, while no rank holds much more than its share of the rows."""
    import json

    from helpers import spawn

    from raytrain_ctr.train.metrics import summarize

    spawn(sharded_worker, str(tmp_path), nprocs=4)
    y, s, u, activity = sharded_rows()
    expected = {**summarize(y, s, u), "by_activity": by_activity(y, s, u, activity)}
    for rank in range(4):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert set(got["figures"]) == set(expected) and set(got["figures"]["by_activity"]) == {"0-4", "5-19", "20+"}
        for k, v in expected.items():
            if k != "by_activity":
                assert got["figures"][k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
        for b, fig in expected["by_activity"].items():
            assert got["figures"]["by_activity"][b] == pytest.approx(fig, rel=1e-12, abs=1e-12), b
        assert max(got["held"]) < 0.35 * len(y)  # about a quarter each (the score sort and the user shuffle)
