"""Two gloo workers, each stepping on half of a batch, make the same update as one process on all of it;
their normalisation statistics are averaged before evaluation."""

import os

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from helpers import spawn

from raytrain_ctr.config import TrainConfig
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.encode import FeatureEncoder
from raytrain_ctr.layers.experts import PartitionedNorm
from raytrain_ctr.layers.mlp import BatchNorm
from raytrain_ctr.methods import get_method
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.train.loop import build_stage_model, make_optimizers, train_step
from raytrain_ctr.train.sync import GradientSync, average_statistics, sum_sparse


def steps(data: str, rank: int, world: int, n_steps: int = 3) -> dict:
    ds = CTRDataset.load(data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    batch = FeatureEncoder(specs["target"]).encode(pq.read_table(ds.files("target", "train")[0]).slice(0, 512))
    m = get_method("all")
    torch.manual_seed(0)
    model, ctx = build_stage_model(m, m.stages[0], specs, ModelConfig(backbone="dcn", deep=(16,)), None)
    opts = make_optimizers(model, TrainConfig(lr=0.01, sparse_lr=0.05))
    sync = GradientSync(model)
    for s in range(n_steps):
        part = batch.select(slice(s * 128 + rank * 128 // world, s * 128 + (rank + 1) * 128 // world))
        train_step(model, ctx, {"target": part} if len(part) else {}, opts, sync)
    return {k: v.clone() for k, v in model.state_dict().items()}


def worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(steps(data, rank, world), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_workers_equal_one_process(tiny_data, tmp_path):
    spawn(worker, tiny_data, str(tmp_path))
    single = steps(tiny_data, 0, 1)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"workers disagree on {k}"
        assert torch.allclose(r0[k], single[k], atol=1e-5), f"{k} differs from the one-process update"


def statistics_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each worker's BatchNorm (and STAR's partitioned norm) sees its own batches; averaged, they agree."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = torch.nn.Sequential(BatchNorm(4), PartitionedNorm(4, ["source", "target"]))
    model.train()
    model[0](torch.randn(64, 4) * (rank + 1) + rank)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average_statistics(model)
    torch.save({"before": before, "after": model.state_dict()}, f"{out}/stats{rank}.pt")
    dist.destroy_process_group()


def test_normalisation_statistics_are_averaged_over_workers(tmp_path):
    spawn(statistics_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"stats{r}.pt") for r in (0, 1))
    for k in ("0.running_mean", "0.running_var"):
        assert not torch.allclose(r0["before"][k], r1["before"][k])
        assert torch.allclose(r0["after"][k], (r0["before"][k] + r1["before"][k]) / 2)
        assert torch.equal(r0["after"][k], r1["after"][k])
    assert torch.equal(r0["after"]["0.num_batches_tracked"], r0["before"]["0.num_batches_tracked"])
    assert any(k.startswith("1.running_") for k in r0["after"])


SHAPES = ((50, 4), (30, 2), (20, 3))  # tables of different widths


def sparse_grads(rank: int) -> list[torch.Tensor]:
    """Worker ``rank``'s row gradients: repeated rows, rows other workers touch too, and no row at all of the
    second table on worker 1."""
    g = torch.Generator().manual_seed(rank)
    out = []
    for t, (rows, width) in enumerate(SHAPES):
        n = 0 if (rank, t) == (1, 1) else 5 + 3 * rank + t
        idx = torch.randint(0, rows, (n,), generator=g)
        out.append(torch.sparse_coo_tensor(idx.unsqueeze(0), torch.randn(n, width, generator=g), (rows, width)))
    return out


def sum_sparse_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save([g.to_dense() for g in sum_sparse(sparse_grads(rank))], f"{out}/sum{rank}.pt")
    dist.destroy_process_group()


def test_sparse_gradients_of_every_table_are_summed_together(tmp_path):
    spawn(sum_sparse_worker, str(tmp_path), nprocs=3)
    expected = [sum(sparse_grads(r)[t].to_dense() for r in range(3)) for t in range(len(SHAPES))]
    for r in range(3):
        got = torch.load(tmp_path / f"sum{r}.pt")
        for t, (g, e) in enumerate(zip(got, expected)):
            assert torch.allclose(g, e, atol=1e-6), f"worker {r}, table {t}"
