"""Exact AUC, LogLoss and GAUC over a whole evaluation set.

The figures are over the whole set, never averaged per batch or per worker, and no worker holds more than
its share of it (:func:`evaluate_sharded`, O(rows/N) memory per worker): AUC by a sample sort on the score
(each worker receives one range of scores, ties never split, and adds the negatives ranked below its range
on the other workers), GAUC by a shuffle on the user (each user's rows meet on one worker), LogLoss and the
counts by sums. The figures equal the one-process ones (:func:`summarize` over every row) up to the order
of floating-point sums.

GAUC (E-CDCTR eq. 4, MKT eq. 17) is the impression-weighted mean of per-user AUCs:
``sum_u n_u · AUC_u / sum_u n_u``. A user whose impressions are all of one class has no
AUC and is left out of both sums (the usual convention); ``gauc_users`` reports how many
users counted.

:class:`Activity` breaks the metrics down by user activity (MKT §4.2.2, Table 3): each user's
clicks in the evaluated domain's train split, bucketed by edges (``[10, 30]``: 0–9, 10–29, 30+).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from raytrain_ctr.train.device import collective_device


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given half credit. NaN if one class."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank within runs of equal scores
    boundaries = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1, len(s)]
    run_rank = (boundaries[:-1] + boundaries[1:] + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(run_rank, np.diff(boundaries))
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> tuple[float, int]:
    """Impression-weighted per-user AUC, and the number of users with both classes."""
    num, den, mixed = gauc_sums(labels, scores, users)
    return (float(num / den) if den else float("nan")), mixed


def gauc_sums(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> tuple[float, float, int]:
    """GAUC's numerator ``sum_u n_u · AUC_u`` and denominator ``sum_u n_u`` over the users with both classes,
    and their number (sums over disjoint sets of users add up)."""
    order = np.argsort(users, kind="mergesort")
    u, y, s = users[order], np.asarray(labels)[order], np.asarray(scores)[order]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    ends = np.r_[starts[1:], len(u)]
    pos = np.add.reduceat(y, starts) if len(u) else np.zeros(0)
    mixed = (pos > 0) & (pos < ends - starts)
    num = den = 0.0
    for a, b in zip(starts[mixed], ends[mixed]):
        n = b - a
        num += n * auc(y[a:b], s[a:b])
        den += n
    return float(num), float(den), int(mixed.sum())


class MetricsError(ValueError):
    """An evaluation that would give no meaningful figure (an empty or one-class split, NaN predictions)."""


def check_evaluable(labels: np.ndarray, probs: np.ndarray, split: str) -> None:
    """Refuse a split whose AUC is undefined or whose predictions are not finite, naming the cause."""
    if len(labels) == 0:
        raise MetricsError(f"the {split} split has no rows (after its domain filter and time window): nothing to "
                           f"evaluate")
    bad = int((~np.isfinite(probs)).sum())
    if bad:
        raise MetricsError(f"{bad} of {len(probs)} predictions on the {split} split are NaN or infinite: the model "
                           f"diverged (learning rate too high?) or an input is not finite")
    if labels.min() == labels.max():
        raise MetricsError(f"every row of the {split} split has label {labels[0]:g}: AUC needs both classes")


def summarize(labels: np.ndarray, probs: np.ndarray, users: np.ndarray | None = None) -> dict[str, float]:
    out = {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "rows": int(len(labels))}
    if users is not None:
        out["gauc"], out["gauc_users"] = gauc(labels, probs, users)
    return out


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _tensor(a: np.ndarray) -> torch.Tensor:
    """``a`` where this process group's collectives take it (the GPU under NCCL)."""
    return torch.as_tensor(a, device=collective_device())


def _sum(values: list[float] | np.ndarray) -> np.ndarray:
    """Sum over the workers (float64)."""
    t = _tensor(np.asarray(values, dtype=np.float64))
    if _world() > 1:
        dist.all_reduce(t)
    return t.cpu().numpy()


def exchange(dest: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Send row i of each array to worker ``dest[i]``; returns the rows this worker receives (``all_to_all``)."""
    world = _world()
    order = np.argsort(dest, kind="stable")
    send = _tensor(np.bincount(dest, minlength=world).astype(np.int64))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    out = []
    for a in arrays:
        src = _tensor(np.ascontiguousarray(a[order]))
        got = src.new_empty(int(recv.sum()))
        dist.all_to_all_single(got, src, recv.tolist(), send.tolist())
        out.append(got.cpu().numpy())
    return out


def _splitters(scores: np.ndarray, world: int, sample: int = 1024) -> np.ndarray:
    """``world - 1`` score bounds from every worker's quantiles, so each worker receives about rows/N scores."""
    mine = np.quantile(scores, np.linspace(0, 1, sample)) if len(scores) else np.full(sample, np.nan)
    mine = _tensor(mine.astype(np.float64))
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    pooled = torch.cat(parts).cpu().numpy()
    pooled = pooled[~np.isnan(pooled)]
    return np.quantile(pooled, np.arange(1, world) / world) if len(pooled) else np.zeros(world - 1)


def _rank_sums(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """``(positives, negatives, sum over positives of the negatives scored below them + half the tied ones)``."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1] if len(s) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(s)]
    neg_cum = np.r_[0.0, np.cumsum(1.0 - y)]
    pos_cum = np.r_[0.0, np.cumsum(y)]
    neg_before, neg_in = neg_cum[starts], neg_cum[ends] - neg_cum[starts]
    pos_in = pos_cum[ends] - pos_cum[starts]
    return float(y.sum()), float(len(y) - y.sum()), float((pos_in * (neg_before + 0.5 * neg_in)).sum())


def _members(code: np.ndarray, groups: int) -> list[np.ndarray]:
    """Row masks of each group: every row (0), then each activity bucket i (code i)."""
    return [code >= 0 if i == 0 else code == i for i in range(groups)]


def check_evaluable_sharded(labels: np.ndarray, probs: np.ndarray, split: str) -> None:
    """:func:`check_evaluable` over every worker's rows, from their counts."""
    n, pos, bad = _sum([len(labels), float(np.sum(labels)), float((~np.isfinite(probs)).sum())])
    if n == 0:
        check_evaluable(np.zeros(0), np.zeros(0), split)
    if bad:
        raise MetricsError(f"{int(bad)} of {int(n)} predictions on the {split} split are NaN or infinite: the model "
                           f"diverged (learning rate too high?) or an input is not finite")
    if pos in (0, n):
        raise MetricsError(f"every row of the {split} split has label {int(pos > 0)}: AUC needs both classes")


def evaluate_sharded(labels: np.ndarray, probs: np.ndarray, users: np.ndarray | None, split: str,
                     activity: Activity | None = None) -> dict:
    """:func:`summarize` (and, with ``activity``, ``by_activity``) of the rows of every worker together, each
    worker holding its own rows and about rows/N more at a time. Every worker calls it (collectives) and gets
    the same figures."""
    world = _world()
    check_evaluable_sharded(labels, probs, split)
    if world == 1:
        out = summarize(labels, probs, users)
        if activity is not None and users is not None:
            out["by_activity"] = by_activity(labels, probs, users, activity)
        return out
    groups = [np.ones(len(labels), dtype=bool)]  # every row, then each activity bucket's
    bucket = activity.bucket(users) if activity is not None and users is not None else None
    if bucket is not None:
        groups += [bucket == i for i in range(len(activity.names))]
    p = np.clip(probs, 1e-7, 1 - 1e-7)  # as logloss
    losses = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    rows, loss = _sum([[g.sum() for g in groups], [losses[g].sum() for g in groups]])

    # AUC: a sample sort on the score; add the negatives below this worker's score range
    dest = np.searchsorted(_splitters(probs, world), probs, side="right")
    groups_code = np.zeros(len(labels), dtype=np.int64) if bucket is None else bucket + 1
    s, y, code = exchange(dest, probs, labels.astype(np.float64), groups_code)
    mine = np.array([_rank_sums(s[m], y[m]) for m in _members(code, len(groups))])
    negs = [torch.empty(len(groups), dtype=torch.float64, device=collective_device()) for _ in range(world)]
    dist.all_gather(negs, _tensor(mine[:, 1].copy()))
    below = sum(negs[r].cpu().numpy() for r in range(dist.get_rank()))
    pos, neg, num = _sum([mine[:, 0], mine[:, 1], mine[:, 2] + mine[:, 0] * below])
    aucs = np.where((pos > 0) & (neg > 0), num / np.maximum(pos * neg, 1), np.nan)

    figures = [{"auc": float(aucs[i]), "logloss": float(loss[i] / rows[i]) if rows[i] else float("nan"),
                "rows": int(rows[i])} for i in range(len(groups))]
    if users is not None:  # GAUC: a shuffle on the user, so each user's rows meet on one worker
        mixed = (users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
        u, y, s, code = exchange((mixed % np.uint64(world)).astype(np.int64), users, labels.astype(np.float64),
                                 probs, groups_code)
        sums = [[*gauc_sums(y[m], s[m], u[m]), len(np.unique(u[m]))] for m in _members(code, len(groups))]
        num, den, counted, distinct = _sum(np.array(sums).T)
        for i, f in enumerate(figures):
            f["gauc"], f["gauc_users"] = (float(num[i] / den[i]) if den[i] else float("nan")), int(counted[i])
            f["users"] = int(distinct[i])
    out = {k: v for k, v in figures[0].items() if k != "users"}
    if bucket is not None:
        out["by_activity"] = {name: figures[i + 1] for i, name in enumerate(activity.names) if rows[i + 1]}
    return out


def to_numpy(chunks: list[torch.Tensor], dtype=np.float64) -> np.ndarray:
    return torch.cat(chunks).cpu().numpy().astype(dtype) if chunks else np.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class Activity:
    """Each user's clicks (sorted user keys, their counts) and the bucket edges; users never seen
    in the train split have 0 clicks."""

    users: np.ndarray
    clicks: np.ndarray
    edges: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        bounds = [0, *self.edges]
        return [f"{a}-{b - 1}" for a, b in zip(bounds, bounds[1:])] + [f"{bounds[-1]}+"]

    def bucket(self, users: np.ndarray) -> np.ndarray:
        """The bucket index of each row's user."""
        if len(self.users) == 0:
            return np.zeros(len(users), dtype=np.int64)
        i = np.minimum(np.searchsorted(self.users, users), len(self.users) - 1)
        clicks = np.where(self.users[i] == users, self.clicks[i], 0)
        return np.digitize(clicks, self.edges)


def by_activity(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, activity: Activity) -> dict[str, dict]:
    """:func:`summarize` per activity bucket (with the bucket's number of users), empty buckets left out."""
    b = activity.bucket(users)
    out = {}
    for i, name in enumerate(activity.names):
        rows = b == i
        if rows.any():
            out[name] = {**summarize(labels[rows], probs[rows], users[rows]), "users": int(len(np.unique(users[rows])))}
    return out
