"""Exact AUC, LogLoss and GAUC over a whole evaluation set.

Workers gather their predictions to every rank (:func:`gather`) before computing, so
the figures are over the whole set, never averaged per batch or per worker.

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
    return (float(num / den) if den else float("nan")), int(mixed.sum())


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


def gather(*arrays: np.ndarray) -> list[np.ndarray]:
    """Concatenate each array over all workers (every rank gets the whole set)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(arrays)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(arrays))]


def to_numpy(chunks: list[torch.Tensor], dtype=np.float64) -> np.ndarray:
    return torch.cat(chunks).numpy().astype(dtype) if chunks else np.zeros(0, dtype=dtype)


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
