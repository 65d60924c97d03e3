"""Exact metrics equal brute force."""

import itertools

import numpy as np
import pytest

from raytrain_ctr.train.metrics import auc, gauc, logloss


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
