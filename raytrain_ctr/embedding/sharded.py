"""The ``torchrec`` backend of the embedding interface: tables sharded across workers (DESIGN §5).

:class:`ShardedEmbeddingCollection` answers ``pooled(batch)`` by field name, exactly as the
``local`` backend does, from a TorchRec ``EmbeddingBagCollection`` fed a
``KeyedJaggedTensor``. Id 0 (padding/OOV) is left out of the jagged input, so a missing
value pools to zeros and row 0 is never read nor updated: the same semantics as the local
backend's zero row 0. Its ``state_dict`` uses the local backend's names
(``tables.{table}.weight``), so artifacts move between backends.

The unsharded tables live on the ``meta`` device: no worker ever holds a whole table.
Tables loaded before sharding (upstream weights) are kept aside and copied into the
shards; the others are initialised shard by shard from a seed per table and block of
rows, so the initial values do not depend on the plan.

:meth:`ShardedEmbeddingCollection.shard` replaces the collection by TorchRec's sharded
module under a hand-built plan (TorchRec's planner offers no row-wise plan on CPU): each
table is table-, row- or column-wise sharded or data-parallel, as configured, else by
size (row-wise from ``row_wise_from_rows`` rows, else table-wise on the least loaded
rank). The tables' optimizer is fused into the backward (``apply_optimizer_in_backward``;
without it TorchRec silently trains with SGD at lr 0.01). Frozen tables get SGD at lr 0:
bit-identical, no optimizer state. Outputs are read by feature name (``to_dict``), never
by position: the sharding reorders them.

TorchRec is imported only when this backend is used; models and methods never import it.
"""

from __future__ import annotations

import zlib

import torch

from raytrain_ctr.batch import Batch
from raytrain_ctr.embedding.base import Embedding
from raytrain_ctr.spec import FieldSpec, SpecError, TableSpec

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")
INSTALL_HINT = ("the torchrec backend needs TorchRec: on CPU `pip install fbgemm-gpu-cpu==1.8.0 tensordict "
                "torchmetrics pyre-extensions tqdm && pip install --no-deps torchrec==1.8.0`; on GPU "
                "`pip install torchrec` with the fbgemm-gpu build matching your torch (see README)")


def _torchrec():
    try:
        with torch.device("cpu"):  # its first import computes constants: not under a "meta" default device
            import torchrec
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SpecError(f"model.embedding_backend: {INSTALL_HINT} ({e})") from None
    return torchrec


def table_pooling(table: str, fields: list[FieldSpec]) -> str:
    """TorchRec pools per table: one mode for every pooled field of the table (a categorical field,
    like each position of an unpooled sequence, pools one id, where sum and mean agree)."""
    modes = {f.pooling for f in fields if f.type == "sequence" and f.pooling != "none"}
    if len(modes) > 1:
        raise SpecError(f"table '{table}': its sequence fields pool by {sorted(modes)}; the torchrec backend "
                        f"needs one pooling per table (give the fields separate tables)")
    return modes.pop() if modes else "sum"


def position(field: str, i: int) -> str:
    """The feature of position ``i`` of an unpooled sequence field (one id per row)."""
    return f"{field}@{i}"


class ShardedEmbeddingCollection(Embedding):
    """Embedding tables and the fields that read them, shardable across workers (torchrec backend).

    An unpooled sequence field (``pooling: none``) is fed as ``max_len`` features of one id each,
    one per position, so a single lookup (one collective, one fused update per step) serves pooled
    and unpooled fields of the same table alike.
    """

    optimizers = ("adagrad", "rowwise_adagrad")
    gpu_optimizers = ("adam",)
    fuses_optimizer = True  # once sharded, its tables are updated inside backward

    def __init__(self, tables: dict[str, TableSpec], fields: list[FieldSpec], init_std: float = 0.01):
        super().__init__(tables, fields)
        trec = _torchrec()
        # (feature, field, position): one feature per pooled field, one per position of an unpooled one
        self.features = [(position(f.name, i), f.name, i) for f in self.fields if f in self.sequence_fields
                         for i in range(f.max_len)] + [(f.name, f.name, None) for f in self.pooled_fields]
        self.plan: dict[str, tuple[str, int | None]] | None = None
        self._device = torch.device("cpu")
        self.frozen = False  # every table frozen: forward without autograd (set by ``shard``)
        self.init_std = init_std
        self._pending: dict[str, torch.Tensor] = {}  # whole tables loaded before sharding
        by_table: dict[str, list[FieldSpec]] = {}
        for f in self.fields:
            by_table.setdefault(f.table, []).append(f)
        self.table_names = list(by_table)  # the tables its fields read
        names = {t: [feat for feat, field, _ in self.features if self.field(field).table == t] for t in by_table}
        pooling = {"sum": trec.PoolingType.SUM, "mean": trec.PoolingType.MEAN}
        self.ebc = trec.EmbeddingBagCollection(tables=[
            trec.EmbeddingBagConfig(name=t, embedding_dim=tables[t].dim, num_embeddings=tables[t].num_embeddings,
                                    feature_names=names[t], pooling=pooling[table_pooling(t, fs)])
            for t, fs in by_table.items()], device=torch.device("meta"))
        self._register_state_dict_hook(_to_local_names)
        self._register_load_state_dict_pre_hook(_from_local_names, with_module=True)

    @property
    def is_sharded(self) -> bool:
        return self.plan is not None

    def kjt(self, batch: Batch, rows: int | None = None):
        """The batch's ids as a ``KeyedJaggedTensor`` of ``rows`` rows (default: the batch's),
        ids 0 left out (absent fields and padding rows: no ids)."""
        trec = _torchrec()
        values, lengths = [], []
        n, device = max(rows or len(batch), len(batch)), batch.label.device  # built where the batch is
        for _, name, i in self.features:
            ids = batch.sparse.get(name)
            if ids is None:
                values.append(torch.zeros(0, dtype=torch.long, device=device))
                lengths.append(torch.zeros(n, dtype=torch.long, device=device))
                continue
            ids = ids[:, i: i + 1] if i is not None else ids if ids.dim() == 2 else ids.unsqueeze(1)
            if len(ids) < n:  # padding rows: no ids
                ids = torch.cat([ids, ids.new_zeros(n - len(ids), ids.shape[1])])
            keep = ids > 0
            values.append(ids[keep])
            lengths.append(keep.sum(1))
        return trec.KeyedJaggedTensor(keys=[f for f, _, _ in self.features], values=torch.cat(values),
                                      lengths=torch.cat(lengths))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.is_sharded:
            raise RuntimeError("a torchrec collection reads its tables once sharded: call shard() first "
                               "(the stage loop does, in every Ray Train worker)")
        device = batch.label.device
        kjt = self.kjt(batch, self._common_rows(len(batch))).to(self._device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.ebc(kjt).to_dict()
        rows = {feat: out[feat][: len(batch)].to(device) for feat, _, _ in self.features}
        pooled = {f.name: rows[f.name] for f in self.pooled_fields}
        unpooled = {f.name: torch.stack([rows[position(f.name, i)] for i in range(f.max_len)], 1)
                    for f in self.sequence_fields}
        return {**pooled, **unpooled}

    def _common_rows(self, n: int) -> int:
        """Once sharded, every worker feeds the step's largest batch (at least one row): gloo's
        row-wise backward gathers equal splits only, and a worker whose shard ran out (zero
        rows) must still join the collectives. Padding rows hold no ids and are dropped."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return n
        t = torch.tensor([max(n, 1)], dtype=torch.long, device=self._device)  # NCCL: on the GPU
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def shard(self, world_size: int, sharding: dict[str, str] | None = None, row_wise_from_rows: int = 1_000_000,
              optimizer: str = "adagrad", lr: float = 0.01, eps: float = 1e-8,
              device: torch.device | None = None, process_group=None) -> ShardedEmbeddingCollection:
        """Shard the tables across the process group's workers and fuse their optimizer (in place).

        Frozen tables (``requires_grad=False``) get fused SGD at lr 0. Call after loading
        upstream weights and freezing: the local weights are copied into the shards.
        """
        import torch.distributed as dist
        from torchrec.distributed.comm_ops import set_gradient_division
        from torchrec.distributed.shard import shard
        from torchrec.distributed.types import ShardingEnv
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        set_gradient_division(False)  # the loop's loss is already divided by the step's global row count
        device = device or torch.device("cpu")
        trainable = [p for p in self.ebc.parameters() if p.requires_grad]
        frozen = [p for p in self.ebc.parameters() if not p.requires_grad]
        self.frozen = not trainable
        if trainable:
            cls, kwargs = fused_optimizer(optimizer, lr, eps, device)
            apply_optimizer_in_backward(cls, trainable, kwargs)
        if frozen:
            for p in frozen:
                p.requires_grad_(True)  # fused kernels need it; lr 0 keeps them bit-identical
            apply_optimizer_in_backward(torch.optim.SGD, frozen, {"lr": 0.0})
        plan = sharding_plan(self.table_specs, self.table_names, world_size,
                             sharding or {}, row_wise_from_rows)
        pg = process_group or dist.GroupMember.WORLD
        self.ebc = shard(self.ebc, _generators(plan, world_size), env=ShardingEnv.from_process_group(pg),
                         device=device)
        self._device = device
        self.plan = plan
        for key, value in self.state_dict().items():
            if key not in self._pending:
                self._init_shards(key, value)
        self.load_unsharded(self._pending)
        self._pending = {}
        return self

    def _init_shards(self, key: str, value, block: int = 1 << 16) -> None:
        """Normal(0, init_std) values for this worker's shards of table ``key``: blocks of rows
        drawn from a seed per (table, block), so the values do not depend on the plan."""
        base = torch.initial_seed() + zlib.crc32(key.encode())
        with torch.no_grad():
            for (row0, col0), tensor in shards_of(value):
                rows, cols = tensor.shape
                for b in range(row0 // block, (row0 + rows - 1) // block + 1):
                    g = torch.Generator().manual_seed((base + b) % 2**63)
                    values = torch.randn(block, value.size(1), generator=g) * self.init_std
                    lo, hi = max(row0, b * block), min(row0 + rows, (b + 1) * block)
                    tensor[lo - row0: hi - row0] = values[lo - b * block: hi - b * block, col0: col0 + cols]

    @property
    def fused_optimizer(self):
        """The sharded module's fused optimizer (``KeyedOptimizer``: ``state_dict`` of sharded state)."""
        return self.ebc.fused_optimizer

    def load_unsharded(self, state: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
        """Copy full (unsharded) tables into this worker's shards; returns the keys loaded."""
        loaded = []
        for key, value in self.state_dict().items():
            full = state.get(prefix + key)
            if full is None:
                continue
            with torch.no_grad():
                for offsets, tensor in shards_of(value):
                    tensor.copy_(full[region(offsets, tensor.shape)])
            loaded.append(prefix + key)
        return loaded

    def unsharded_state(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The full tables gathered onto rank ``dst`` (a collective: every worker calls it);
        ``None`` on the other ranks. For serving, the next stage, and tests."""
        return _gather_all(self.state_dict(), dst)

    def unsharded_optimizer_state(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The fused optimizer's state gathered whole onto rank ``dst`` (``{'{param}/{name}': tensor}``)."""
        flat = {f"{param}/{name}": v for param, st in self.fused_optimizer.state_dict()["state"].items()
                for name, v in st.items()}
        return _gather_all(flat, dst)

    def local_shards(self) -> dict[str, list[tuple[list[int], list[int]]]]:
        """This worker's shards per table: ``(offsets, sizes)``."""
        return {key: [(offsets, list(tensor.shape)) for offsets, tensor in shards_of(value)]
                for key, value in self.state_dict().items() if hasattr(value, "local_shards")}


def shards_of(value) -> list[tuple[list[int], torch.Tensor]]:
    """``(offsets, tensor)`` of this worker's pieces of a ShardedTensor; a plain tensor is one piece."""
    if hasattr(value, "local_shards"):
        return [(s.metadata.shard_offsets, s.tensor) for s in value.local_shards()]
    return [([0] * value.dim(), value)]


def region(offsets: list[int], shape) -> tuple[slice, ...]:
    """The slice of the whole tensor that a shard at ``offsets`` with ``shape`` covers."""
    return tuple(slice(o, o + n) for o, n in zip(offsets, shape))


def _gather_all(state: dict, dst: int) -> dict[str, torch.Tensor] | None:
    """Whole tensors of a state holding ShardedTensors, assembled on rank ``dst`` from every
    worker's local shards (a collective). Ranks may hold different keys (a table-wise table's
    optimizer state lives on its owner only), so the union of keys is gathered first."""
    import torch.distributed as dist

    def part(value):
        if hasattr(value, "local_shards"):
            return ("shards", tuple(value.size()), value.dtype,
                    [(offsets, tensor.detach().cpu()) for offsets, tensor in shards_of(value)])
        return ("whole", value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value)

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: _assemble([part(v)]) for k, v in state.items()}
    rank, world = dist.get_rank(), dist.get_world_size()
    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(state))
    out = {}
    for key in sorted(set().union(*keys)):
        parts: list | None = [None] * world if rank == dst else None
        dist.gather_object(part(state[key]) if key in state else None, parts, dst=dst)
        if rank == dst:
            out[key] = _assemble([p for p in parts if p is not None])
    return out if rank == dst else None


def _assemble(parts: list) -> torch.Tensor:
    if parts[0][0] == "whole":
        return parts[0][1]
    _, size, dtype, _ = parts[0]
    full = torch.zeros(size, dtype=dtype)
    for _, _, _, shards in parts:
        for offsets, tensor in shards:
            full[region(offsets, tensor.shape)] = tensor
    return full



def fused_optimizer(name: str, lr: float, eps: float, device: torch.device) -> tuple[type, dict]:
    """The optimizer class and arguments fused into TorchRec's backward."""
    if name == "adam":
        if device.type != "cuda":
            raise SpecError("train.sparse_optimizer: fused Adam needs a GPU under the torchrec backend; on CPU use "
                            "'adagrad' or 'rowwise_adagrad'")
        return torch.optim.Adam, {"lr": lr, "eps": eps}
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad
        return RowWiseAdagrad, {"lr": lr, "eps": eps}
    if name == "adagrad":
        return torch.optim.Adagrad, {"lr": lr, "eps": eps}
    raise SpecError(f"train.sparse_optimizer: '{name}' is not offered by the torchrec backend "
                    f"(adagrad, rowwise_adagrad, and adam on GPU)")


def sharding_plan(tables: dict[str, TableSpec], names: list[str], world_size: int, chosen: dict[str, str],
                  row_wise_from_rows: int) -> dict[str, tuple[str, int | None]]:
    """``{table: (sharding type, rank for table-wise)}``: as configured, else by size.

    Unconfigured tables of ``row_wise_from_rows`` rows or more are row-wise (when there
    are several workers); the others table-wise, largest first onto the least loaded rank.
    """
    for table, kind in chosen.items():
        if table not in names:
            raise SpecError(f"model.sharding: unknown table '{table}' (tables: {sorted(names)})")
        if kind not in SHARDING_TYPES:
            raise SpecError(f"model.sharding.{table}: unknown sharding '{kind}' (one of {list(SHARDING_TYPES)})")
    load = [0] * world_size
    plan: dict[str, tuple[str, int | None]] = {}
    for table in sorted(names, key=lambda t: -tables[t].num_embeddings * tables[t].dim):
        kind = chosen.get(table) or ("row_wise" if world_size > 1 and tables[table].num_embeddings
                                     >= row_wise_from_rows else "table_wise")
        rank = None
        if kind == "table_wise":
            rank = load.index(min(load))
            load[rank] += tables[table].num_embeddings * tables[table].dim
        plan[table] = (kind, rank)
    return {t: plan[t] for t in names}


def _generators(plan: dict[str, tuple[str, int | None]], world_size: int) -> dict:
    from torchrec.distributed import sharding_plan as sp

    make = {"table_wise": lambda r: sp.table_wise(rank=r), "row_wise": lambda r: sp.row_wise(),
            "column_wise": lambda r: sp.column_wise(ranks=list(range(world_size))),
            "data_parallel": lambda r: sp.data_parallel()}
    return {t: make[kind](rank) for t, (kind, rank) in plan.items()}


_TORCHREC_PREFIX = "ebc.embedding_bags."


def _to_local_names(module, state, prefix, local_metadata):
    for key in [k for k in state if k.startswith(prefix + _TORCHREC_PREFIX)]:
        state[prefix + "tables." + key[len(prefix + _TORCHREC_PREFIX):]] = state.pop(key)
    return state


def _from_local_names(module, state, prefix, local_metadata, strict, missing, unexpected, errors):
    """Rename to TorchRec's keys; before sharding, keep the whole tables aside for ``shard``."""
    for key in [k for k in state if k.startswith(prefix + "tables.")]:
        if not module.is_sharded:
            module._pending[key[len(prefix):]] = state[key].detach().cpu().clone()
        state[prefix + _TORCHREC_PREFIX + key[len(prefix + "tables."):]] = state.pop(key)
