"""Experiment configs: YAML with a ``base:`` block and named ``variants:`` (FuxiCTR style).

    base:
      data: data/ml100k
      method: finetune
      method_args: {pretrain: source}
      model: {backbone: dcn, deep: [256, 128], cross_layers: 3}
      train: {epochs: 5, batch_size: 1024, lr: 0.001, workers: 2}
      storage: runs
    variants:
      all: {method_args: {pretrain: all}}

Every key is checked; an unknown one is reported with the nearest valid key.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from raytrain_ctr.data.dataset import ROLES, CTRDataset, join
from raytrain_ctr.embedding import check_sparse_optimizer
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import SpecError, check_keys, checked
from raytrain_ctr.windows import Window

SPARSE_OPTIMIZERS = ("adam", "adagrad", "rowwise_adagrad", "sgd")
SELECT_ON = ("eval", "train")


# each setting's type and range, checked on the driver before anything starts:
# (kind, minimum, minimum excluded, upper bound excluded, None allowed)
TRAIN_RULES: dict[str, tuple] = {
    "epochs": (int, 1), "batch_size": (int, 1), "lr": (float, 0, True), "sparse_lr": (float, 0, True, None, True),
    "sparse_eps": (float, 0, True), "weight_decay": (float, 0), "embedding_l2": (float, 0), "patience": (int, 1),
    "seed": (int, 0),
    "workers": (int, 1), "shuffle_buffer": (int, 0), "cache_mb": (int, 0), "max_failures": (int, 0),
    "deterministic": (bool,), "fail_once_at_epoch": (int, 0, False, None, True), "tensorboard": (bool,),
    "mlflow": (str, None, False, None, True), "progress": (bool,), "use_gpu": (bool,), "cpus_per_worker": (int, 1),
    "warm_start": (str, None, False, None, True),
}
# settings that do not change a stage's result (resources, tracking, testing aids): left out of its key, so a
# stage resumes on another worker count (DCP reshards its tables) and tracking can be switched on for a re-run
NOT_IN_KEY = ("workers", "use_gpu", "cpus_per_worker", "max_failures", "fail_once_at_epoch", "cache_mb", "tensorboard",
              "mlflow", "progress")
# settings added after stage keys were first written: at these values (the behaviour before them) they are left
# out of the key, so every artifact trained before keeps its key
ADDED_DEFAULTS = {"embedding_l2": 0.0, "select_on": "eval", "warm_start": None}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 2048          # rows per step per worker, over all the step's domains
    lr: float = 1e-3                # dense parameters (Adam)
    sparse_lr: float | None = None  # embedding tables; None = lr
    sparse_optimizer: str = "adam"  # embedding tables: adam | adagrad | sgd (local), rowwise_adagrad (torchrec)
    sparse_eps: float = 1e-8        # Adam/Adagrad epsilon of the tables' optimizer
    weight_decay: float = 0.0       # dense parameters only
    embedding_l2: float = 0.0       # ½·λ·‖e‖² of each embedding vector a step looks up, per row (train/step.py)
    patience: int = 2               # early stopping on the selection AUC (select_on)
    select_on: str = "eval"         # the epoch kept: best validation AUC of the stage's eval domain (the target), or
    #                                 "train": of its train domains (mean; pre-training on the source picks its epoch
    #                                 on the source's validation split, whether or not the domains share ids)
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False           # one GPU per worker (NCCL, TorchRec's fused GPU kernels, pinned host batches)
    cpus_per_worker: int = 1        # CPUs each worker reserves (and torch's threads in it)
    shuffle_buffer: int = 0         # rows in each worker's local shuffle buffer (0 = stream order); a cached
    #                                 split's slice is permuted whole when it is > 0
    cache_mb: int = 256             # splits smaller than this on disk are cached in the object store
    max_failures: int = 1           # worker failures survived per stage (resume from last checkpoint)
    deterministic: bool = False     # keep block order (reproducible data order, slower)
    fail_once_at_epoch: int | None = None  # testing aid: a worker dies once at this epoch's start
    activity_buckets: tuple[int, ...] = ()  # edges of user-activity buckets (clicks in the evaluated domain's
    #                                         train split) the test metrics are broken down by (MKT Table 3: [10, 30])
    tensorboard: bool = True        # every epoch's metrics as TensorBoard events under STORAGE/tensorboard/
    mlflow: str | None = None       # an MLflow tracking URI: every epoch's metrics to a run per stage
    progress: bool = True           # a progress line per epoch on the driver (rows/s, valid AUC, ETA)
    warm_start: str | None = None   # an epoch checkpoint of a run of this stage (a local directory holding state.pt
    #                                 and origin.json) it continues from with this config's hyperparameters: model,
    #                                 optimizer state, epoch, best-so-far and history (PBT's exploit; in the stage's
    #                                 key as the checkpoint's origin: the run's artifact and epoch)

    def __post_init__(self) -> None:
        for name, rule in TRAIN_RULES.items():
            object.__setattr__(self, name, checked(getattr(self, name), f"train.{name}", *rule))
        edges = list(self.activity_buckets)
        if any(not isinstance(e, int) or e < 1 for e in edges) or edges != sorted(set(edges)):
            raise SpecError(f"train.activity_buckets: increasing click counts ≥ 1, got {edges}")
        object.__setattr__(self, "activity_buckets", tuple(edges))
        if self.select_on not in SELECT_ON:
            raise SpecError(f"train.select_on: '{self.select_on}' is not one of {list(SELECT_ON)}")
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise SpecError(f"train.sparse_optimizer: unknown optimizer '{self.sparse_optimizer}' "
                            f"(one of {list(SPARSE_OPTIMIZERS)})")

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """What each Ray Train worker reserves (``ScalingConfig.resources_per_worker``)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}


@dataclass(frozen=True)
class ExperimentConfig:
    data: str
    method: str
    method_args: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: str = "runs"
    name: str | None = None
    as_of: str | None = None  # ISO date the stages' time windows and `latest` inputs are relative to
    # time windows (relative to as_of) of stages that declare none: "train" for every train split, a stage's
    # name for its own, "eval" for the valid/test splits (E-CDCTR's baselines on the last month: train: [-1, 0])
    windows: dict[str, Window] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # the data's domain playing each role: {source: video, ...}
    # train-config keys of one stage, by stage name, over the stage's own overrides: a sweep tunes the last stage's
    # learning rates while the stages upstream keep theirs (and their content-addressed artifacts)
    stage_train: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.as_of is not None:
            try:
                dt.date.fromisoformat(str(self.as_of))
            except ValueError:
                raise SpecError(f"as_of: '{self.as_of}' is not a date (YYYY-MM-DD)") from None
            object.__setattr__(self, "as_of", str(self.as_of))
        object.__setattr__(self, "windows", {str(k): Window.parse(v, f"windows.{k}")
                                             for k, v in dict(self.windows or {}).items()})
        check_sparse_optimizer(self.model.embedding_backend, self.train.sparse_optimizer, self.train.use_gpu)
        if not isinstance(self.roles, dict) or not all(isinstance(v, str) for v in self.roles.values()):
            raise SpecError(f"roles: a mapping of role to domain name, e.g. {{source: video, target: game}}, "
                            f"got {self.roles!r}")
        check_keys(self.roles, ROLES, "roles")
        if not isinstance(self.stage_train, dict) or not all(isinstance(v, dict) for v in self.stage_train.values()):
            raise SpecError(f"stage_train: a mapping of stage name to train keys, e.g. {{finetune: {{lr: 0.001}}}}, "
                            f"got {self.stage_train!r}")
        for name, keys in self.stage_train.items():
            check_keys(keys, _TRAIN, f"stage_train.{name}")
            try:
                replace(self.train, **keys)
            except SpecError as e:
                raise SpecError(f"stage_train.{name}: {e}") from e

    def train_for(self, stage: str, overrides: dict[str, Any]) -> TrainConfig:
        """A stage's train config: the run's, then the stage's own ``overrides``, then ``stage_train[stage]``."""
        keys = {**overrides, **self.stage_train.get(stage, {})}
        return replace(self.train, **keys) if keys else self.train

    def dataset(self) -> CTRDataset:
        """The data, its domains renamed to their roles."""
        return CTRDataset.load(self.data, self.roles)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.method}-s{self.train.seed}"

    def to_dict(self) -> dict:
        return {**asdict(self), "windows": {k: w.as_list() for k, w in self.windows.items()}}

    def window(self, stage: str, declared: Window | None = None, split: str = "train") -> Window | None:
        """A stage's window of its train splits (``split="train"``) or of its valid/test splits
        (``"eval"``): the one the stage declares, else the config's for the stage or the split."""
        if declared is not None:
            return declared
        return self.windows.get(stage) if split == "train" and stage in self.windows else self.windows.get(split)

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """Apply dotted overrides (``train.lr``, ``model.deep``, ``method_args.alpha``)."""
        raw = self.to_dict()
        for key, value in overrides.items():  # copied: a later dotted key must not write into the caller's dict
            set_dotted(raw, key, copy.deepcopy(value))
        return from_dict(raw)


def storage_path(cfg: ExperimentConfig, *parts: str) -> str:
    """A path under the config's storage: a URI, or an absolute local path."""
    return join(cfg.storage, *parts) if "://" in cfg.storage else str(Path(cfg.storage).absolute().joinpath(*parts))


_TOP = {f.name for f in fields(ExperimentConfig)}
_MODEL = {f.name for f in fields(ModelConfig)}
_TRAIN = {f.name for f in fields(TrainConfig)}


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def from_dict(raw: dict, where: str = "config") -> ExperimentConfig:
    check_keys(raw, _TOP, where)
    for key in ("data", "method"):
        if key not in raw:
            raise SpecError(f"{where}: missing required key '{key}'")
    model = dict(raw.get("model") or {})
    check_keys(model, _MODEL, f"{where}: model")
    train = dict(raw.get("train") or {})
    check_keys(train, _TRAIN, f"{where}: train")
    try:
        return ExperimentConfig(
            data=str(raw["data"]), method=raw["method"], method_args=dict(raw.get("method_args") or {}),
            model=ModelConfig(**model), train=TrainConfig(**train),
            storage=str(raw.get("storage", "runs")), name=raw.get("name"), as_of=raw.get("as_of"),
            windows=dict(raw.get("windows") or {}), roles=dict(raw.get("roles") or {}),
            stage_train=raw.get("stage_train") or {})
    except TypeError as e:
        raise SpecError(f"{where}: {e}") from e


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path, variant: str | None = None) -> ExperimentConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping")
    check_keys(raw, {"base", "variants"}, str(path))
    base = raw.get("base") or {}
    variants = raw.get("variants") or {}
    if variant:
        if variant not in variants:
            raise SpecError(f"{path}: no variant '{variant}' (variants: {sorted(variants)})")
        base = merge(base, variants[variant])
        base.setdefault("name", None)
    return from_dict(base, where=f"{path}" + (f" (variant {variant})" if variant else ""))


__all__ = ["ExperimentConfig", "TrainConfig", "load_config", "from_dict", "merge", "replace"]
