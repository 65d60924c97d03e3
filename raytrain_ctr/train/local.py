"""The same stage trained in this process from tensors already in memory (no Ray).

It shares the model building, the optimisation step and the evaluation with the Ray
Train loop; it exists for unit tests and as the ceiling the benchmarks compare the full
Ray path against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from raytrain_ctr.batch import Batch
from raytrain_ctr.config import TrainConfig
from raytrain_ctr.methods import Method, Stage
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import DomainSpec
from raytrain_ctr.train.device import place, stage_device
from raytrain_ctr.train.loop import build_stage_model, evaluate, make_optimizers, train_step
from raytrain_ctr.train.step import EmbeddingL2
from raytrain_ctr.train.sync import GradientSync


@dataclass
class LocalResult:
    model: torch.nn.Module
    history: list[dict]
    best_valid_auc: float


def split_batches(batch: Batch, size: int, generator: torch.Generator | None = None) -> list[Batch]:
    order = torch.randperm(len(batch), generator=generator) if generator is not None else torch.arange(len(batch))
    return [batch.select(order[i: i + size]) for i in range(0, len(batch), size)]


def fit_local(method: Method, stage: Stage, specs: dict[str, DomainSpec], model_cfg: ModelConfig,
              tc: TrainConfig, train: dict[str, Batch], valid: Batch, upstream: str | dict[str, str] | None = None
              ) -> LocalResult:
    """Train a stage on in-memory batches (shuffled each epoch); validation AUC per epoch.
    ``upstream``: a path per input of the stage, or one path for all of them. With ``tc.use_gpu``, the model
    and every batch live on this process's GPU."""
    torch.manual_seed(tc.seed)
    device = stage_device(tc.use_gpu, in_ray_worker=False)
    model, ctx = build_stage_model(method, stage, specs, model_cfg, upstream)
    place(model, device)
    train, valid = {d: b.to(device) for d, b in train.items()}, valid.to(device)
    optimizers = make_optimizers(model, tc, ctx)
    sync = GradientSync(model, exclude=ctx.group_parameter_ids())
    embedding_l2 = EmbeddingL2(model, tc.embedding_l2) if tc.embedding_l2 else None
    total = sum(len(b) for b in train.values())
    sizes = {d: max(1, round(tc.batch_size * len(b) / total)) for d, b in train.items()}
    gen = torch.Generator().manual_seed(tc.seed)
    history, best = [], -1.0
    for epoch in range(tc.epochs):
        chunks = {d: split_batches(b, sizes[d], gen) for d, b in train.items()}
        t0 = time.perf_counter()
        for step in range(max(len(c) for c in chunks.values())):
            train_step(model, ctx, {d: c[step] for d, c in chunks.items() if step < len(c)}, optimizers, sync,
                       embedding_l2)
        seconds = time.perf_counter() - t0
        metrics = evaluate(model, ctx, split_batches(valid, 8192), valid.user is not None, split="valid")
        history.append({"epoch": epoch, "train_seconds": seconds, **metrics,
                        **stage.hooks.epoch_metrics(model, ctx)})
        best = max(best, metrics["auc"])
    return LocalResult(model, history, best)
