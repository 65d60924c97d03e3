"""Planted-mechanism CTR data for a source and a target domain (DESIGN §8).

Every latent quantity is a pure function of ``(seed, name, id)`` (a counter-based hash,
no stored world), so any shard can be generated alone: ``N`` rows are cut into fixed
shards, each written by one Ray task from its own seed, and the files are byte-identical
whatever the parallelism. A cluster can write billions of rows this way.

The planted mechanisms:

* users and items shared across domains at chosen overlap rates; a user's preference is
  ``sqrt(shared_pref)·u_shared + sqrt(1-shared_pref)·u_domain`` (transfer helps, naive
  fine-tuning can be pulled off the target optimum);
* a target domain ``target_ratio`` times the source; Zipf id popularity;
* a ``noise_frac`` share of source rows whose labels follow the reversed preference
  (ground truth kept in the ``is_noise`` and ``true_prob`` (the clean rule's click
  probability) columns, which no spec lists as features): rows drawn at random
  (``noise_by: row``: no feature tells them apart, so no sample selector can), or every row of
  a ``noise_frac`` share of the source's channels (``noise_by: channel``, preset
  ``channel_noise``: placements whose clicks mislead, visible to a selector through
  ``src_channel``, the negative transfer CCTL's IFN is built to find);
* heterogeneous schemas: ``src_channel`` only in the source, ``tgt_position`` only in
  the target, each with its own effect;
* ``months`` of data with preferences drifting linearly (the last month is the present): 30-day
  months from a fixed epoch, or calendar months from ``start`` (preset ``drift``: ten calendar
  months, E-CDCTR's monthly windows; each user's stable preference plus a drifting part);
* behaviour sequences ``hist_items`` drawn from each user's current preference;
* ``entities`` (MKT's multi-entity setting, preset ``entities``): the two domains are two item
  entities with disjoint items, each with specific fields that carry signal (the source's
  ``item_price`` and ``src_channel``, the target's ``tgt_style`` and ``tgt_position``) beside the
  shared ones; items of both entities share a topic (``item_topic``) whose latent explains most
  of theirs, so what the source teaches about users and topics transfers; every row holds one
  behaviour sequence per entity (``hist_source``, ``hist_target``: the user's clicks on each,
  the second one shorter);
* user features (``user_age``, ``user_gender``) and item features (``item_cat``,
  ``item_price``) derived from the latents, so cold ids still carry signal.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain_ctr.data.dataset import join, resolve, write_dataset_yaml
from raytrain_ctr.runtime import map_tasks
from raytrain_ctr.spec import DomainSpec, SpecError
from raytrain_ctr.windows import add_months

MONTH_SECONDS = 30 * 86400
T0 = 1_700_000_000  # first month's start, unix seconds
ROW_GROUP_ROWS = 4096  # small row groups stream in small blocks and balance across workers
SPLIT_FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))


NOISE_BY = ("row", "channel")


@dataclass(frozen=True)
class SynthConfig:
    rows: int = 200_000            # source rows; target rows = rows * target_ratio
    target_ratio: float = 0.1
    n_users: int = 20_000          # users of the source domain
    n_target_users: int = 4_000
    n_items: int = 4_000
    user_overlap: float = 0.5      # share of target users that also appear in the source
    item_overlap: float = 0.8      # share of target items that also appear in the source
    shared_pref: float = 0.7       # share of preference variance common to both domains
    noise_frac: float = 0.2        # share of source rows labelled by the reversed preference
    noise_by: str = "row"          # row: rows at random; channel: whole src_channel values (see the docstring)
    months: int = 6
    drift: float = 0.6
    latent_dim: int = 8
    signal: float = 2.5            # scale of the preference term of the logit
    zipf: float = 1.05
    seq_len: int = 10
    hetero: bool = True
    entities: bool = False         # two item entities: disjoint items, specific fields, a sequence per entity
    start: str = ""                # ISO date: months are calendar months from it (empty: 30-day months from T0)
    emb_dim: int = 16
    rows_per_shard: int = 50_000
    seed: int = 0


PRESETS: dict[str, dict] = {
    "default": {},
    "tiny": {"rows": 100_000, "n_users": 4_000, "n_target_users": 1_000, "n_items": 1_000,
             "rows_per_shard": 5_000},
    "homogeneous": {"hetero": False},
    "noisy": {"noise_frac": 0.4},
    "channel_noise": {"noise_by": "channel", "noise_frac": 1 / 3},  # two of the six channels
    "entities": {"entities": True, "rows": 150_000, "target_ratio": 0.15, "item_overlap": 0.0,
                 "user_overlap": 0.9, "noise_frac": 0.0},
    # E-CDCTR (§4.1): ten calendar months from 2025-01-01, preferences drifting; a target a fifth of the
    # source with most users and items shared, sparse per month (about two target rows per user a month)
    "drift": {"rows": 400_000, "target_ratio": 0.2, "n_users": 10_000, "n_target_users": 3_000, "n_items": 2_000,
              "user_overlap": 0.8, "item_overlap": 0.8, "months": 10, "start": "2025-01-01", "noise_frac": 0.0,
              "rows_per_shard": 40_000},
    "large": {"rows": 1_000_000, "n_users": 100_000, "n_target_users": 20_000, "n_items": 20_000,
              "rows_per_shard": 100_000},
}


def make_config(preset: str = "default", **overrides) -> SynthConfig:
    if preset not in PRESETS:
        raise SpecError(f"unknown synth preset '{preset}' (one of {sorted(PRESETS)})")
    valid = {f.name for f in fields(SynthConfig)}
    for k in overrides:
        if k not in valid:
            raise SpecError(f"unknown synth option '{k}' (valid: {sorted(valid)})")
    cfg = replace(SynthConfig(), **{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})
    if cfg.noise_by not in NOISE_BY:
        raise SpecError(f"synth option noise_by: '{cfg.noise_by}' is not one of {NOISE_BY}")
    if cfg.noise_by == "channel" and not (cfg.hetero or cfg.entities):
        raise SpecError("synth option noise_by: 'channel' needs the source's src_channel field (hetero or entities)")
    if cfg.start:
        try:
            dt.date.fromisoformat(cfg.start)
        except ValueError:
            raise SpecError(f"synth option start: '{cfg.start}' is not a date (YYYY-MM-DD)") from None
    return cfg


# ---- counter-based randomness: a pure function of (seed, stream, id, column) ----------------

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 → uint64, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _stream(seed: int, name: str) -> np.uint64:
    h = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    for ch in name.encode():
        h = _mix(h * _GOLD + np.uint64(ch))
    return h[0]


def uniform(seed: int, name: str, ids: np.ndarray, k: int = 1) -> np.ndarray:
    """``[len(ids), k]`` uniforms in (0, 1), fixed per (seed, name, id, column)."""
    base = _stream(seed, name)
    x = ids.astype(np.uint64)[:, None] * _GOLD + np.arange(1, k + 1, dtype=np.uint64)[None, :] * _M2 + base
    return ((_mix(x) >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def normal(seed: int, name: str, ids: np.ndarray, k: int = 1) -> np.ndarray:
    u = uniform(seed, name, ids, 2 * k)
    return np.sqrt(-2.0 * np.log(u[:, :k])) * np.cos(2.0 * np.pi * u[:, k:])


def zipf_ranks(rng: np.random.Generator, n: int, size, s: float) -> np.ndarray:
    """Ranks in ``[0, n)`` with P(rank k) ∝ (k+1)^-s (continuous inverse-CDF approximation)."""
    u = rng.random(size)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1))
    else:
        x = ((n + 1) ** (1 - s) - 1) * u + 1
        x = x ** (1 / (1 - s))
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


# ---- the world --------------------------------------------------------------------------------

N_AGE, N_CAT, N_SLOT, N_CHANNEL, N_POSITION, N_STYLE, N_TOPIC = 7, 8, 8, 6, 5, 6, 64
TOPIC_SHARE = 0.8  # with entities: share of an item's latent variance that its topic explains


class World:
    """Latents and features of users and items, computed on demand from the seed."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.seed = cfg.seed
        self._item_latent: np.ndarray | None = None

    def user_ids(self, domain: str, ranks: np.ndarray) -> np.ndarray:
        """1-based user ids; target users overlap with source users at ``user_overlap``."""
        if domain == "source":
            return ranks + 1
        shared = uniform(self.seed, "user_overlap", ranks)[:, 0] < self.cfg.user_overlap
        return np.where(shared, ranks + 1, self.cfg.n_users + ranks + 1)

    def item_ids(self, domain: str, ranks: np.ndarray) -> np.ndarray:
        if domain == "source":
            return ranks + 1
        shared = uniform(self.seed, "item_overlap", ranks)[:, 0] < self.cfg.item_overlap
        return np.where(shared, ranks + 1, self.cfg.n_items + ranks + 1)

    def user_pref(self, domain: str, users: np.ndarray, month: np.ndarray) -> np.ndarray:
        c, d = self.cfg, self.cfg.latent_dim
        u = (math.sqrt(c.shared_pref) * normal(self.seed, "u_shared", users, d)
             + math.sqrt(1 - c.shared_pref) * normal(self.seed, f"u_{domain}", users, d))
        age = (month - (c.months - 1)) / max(c.months - 1, 1)  # -1 (oldest) .. 0 (present)
        return u + c.drift * age[:, None] * normal(self.seed, "u_drift", users, d)

    def item_topic(self, items: np.ndarray) -> np.ndarray:
        """With ``entities``: the topic of an item of either entity (an entity-shared field)."""
        return 1 + (uniform(self.seed, "topic", items)[:, 0] * N_TOPIC).astype(np.int64)

    def item_latent(self, items: np.ndarray) -> np.ndarray:
        """Each item's latent, looked up in the world's table of every item id (``2·n_items + 1`` rows,
        made once: a shard's candidate pools read it tens of times a row)."""
        if self._item_latent is None:
            ids = np.arange(2 * self.cfg.n_items + 1)
            v = normal(self.seed, "v", ids, self.cfg.latent_dim)
            if self.cfg.entities:  # items of both entities share their topic's latent: what transfers across them
                v = (math.sqrt(TOPIC_SHARE) * normal(self.seed, "v_topic", self.item_topic(ids), self.cfg.latent_dim)
                     + math.sqrt(1 - TOPIC_SHARE) * v)
            self._item_latent = v
        return self._item_latent[items]

    def user_features(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = normal(self.seed, "u_shared", users, 2)
        age = 1 + np.digitize(z[:, 0], np.linspace(-1.5, 1.5, N_AGE - 1))
        gender = 1 + (z[:, 1] > 0).astype(np.int64)
        return age, gender

    def item_features(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = self.item_latent(items)[:, : min(N_CAT, self.cfg.latent_dim)]
        cat = 1 + np.argmax(v, axis=1)
        price = np.exp(0.5 * normal(self.seed, "price", items)[:, 0]).astype(np.float32)
        return cat, price

    def affinity(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u * v).sum(-1) / math.sqrt(self.cfg.latent_dim)


@functools.lru_cache(maxsize=2)
def world_of(cfg: SynthConfig) -> World:
    """One world per config and process: its item table serves every shard a process writes."""
    return World(cfg)


# ---- shards ---------------------------------------------------------------------------------


def noisy_channels(cfg: SynthConfig) -> int:
    """``noise_by: channel``: channels ``1..m`` are the noisy ones, ``m`` the nearest to ``noise_frac`` of them."""
    return round(cfg.noise_frac * N_CHANNEL)


def domain_rows(cfg: SynthConfig, domain: str) -> int:
    return cfg.rows if domain == "source" else max(1, round(cfg.rows * cfg.target_ratio))


def num_shards(cfg: SynthConfig, domain: str) -> int:
    return math.ceil(domain_rows(cfg, domain) / cfg.rows_per_shard)


def generate_shard(cfg: SynthConfig, domain: str, shard: int) -> pa.Table:
    """All rows of one shard of one domain (every split), as an Arrow table with a ``split`` column."""
    world = world_of(cfg)
    start = shard * cfg.rows_per_shard
    n = min(cfg.rows_per_shard, domain_rows(cfg, domain) - start)
    rng = np.random.default_rng([cfg.seed, 0 if domain == "source" else 1, shard])
    n_users = cfg.n_users if domain == "source" else cfg.n_target_users
    n_items = cfg.n_items  # one catalogue size; target items outside the overlap get fresh ids

    users = world.user_ids(domain, zipf_ranks(rng, n_users, n, cfg.zipf))
    items = world.item_ids(domain, zipf_ranks(rng, n_items, n, cfg.zipf))
    month = rng.integers(0, cfg.months, n)
    ts = timestamps(cfg, month, rng)
    u = world.user_pref(domain, users, month)
    pref = world.affinity(u, world.item_latent(items))
    age, gender = world.user_features(users)
    cat, price = world.item_features(items)
    slot = rng.integers(1, N_SLOT + 1, n)
    has_price = not cfg.entities or domain == "source"  # with entities: a field specific to the products

    logit = (cfg.signal * pref
             + 1.0 * normal(cfg.seed, "w_age_cat", age * (N_CAT + 1) + cat)[:, 0]
             + 0.8 * normal(cfg.seed, "b_item", items)[:, 0]
             + 0.3 * normal(cfg.seed, "b_user", users)[:, 0]
             + (0.3 * np.log(price) if has_price else 0.0)
             + 0.4 * normal(cfg.seed, "w_slot", slot)[:, 0]
             + (0.0 if domain == "source" else -0.2))
    cols: dict[str, pa.Array] = {"item_topic": pa.array(world.item_topic(items))} if cfg.entities else {}
    if (cfg.hetero or cfg.entities) and domain == "source":
        channel = rng.integers(1, N_CHANNEL + 1, n)
        logit = logit + 0.8 * normal(cfg.seed, "w_channel", channel)[:, 0]
        cols["src_channel"] = pa.array(channel)
    if cfg.entities and domain == "target":  # the posts' style: a property of the item, with its own effect
        style = 1 + (uniform(cfg.seed, "style", items)[:, 0] * N_STYLE).astype(np.int64)
        logit = logit + 1.0 * normal(cfg.seed, "w_style", style)[:, 0]
        cols["tgt_style"] = pa.array(style)
    if (cfg.hetero or cfg.entities) and domain == "target":
        position = rng.integers(1, N_POSITION + 1, n)
        logit = logit - 0.35 * (position - 1)
        cols["tgt_position"] = pa.array(position)
    is_noise = np.zeros(n, dtype=bool)
    if domain == "source":
        draw = rng.random(n)  # drawn either way, so the labels' stream is the same for both settings
        is_noise = (channel <= noisy_channels(cfg)) if cfg.noise_by == "channel" else draw < cfg.noise_frac
    prob = 1 / (1 + np.exp(-logit))  # the clean rule, kept as ground truth (not a feature)
    noisy = np.where(is_noise, logit - 2 * cfg.signal * pref, logit)  # reversed preference
    label = (rng.random(n) < 1 / (1 + np.exp(-noisy))).astype(np.int8)

    if cfg.entities:  # one sequence per entity, under the user's preference for that entity
        hists = {"hist_source": behaviour(cfg, world, rng, "source", world.user_pref("source", users, month), 1),
                 "hist_target": behaviour(cfg, world, rng, "target", world.user_pref("target", users, month), 0,
                                          cfg.seq_len // 2)}
    else:
        hists = {"hist_items": behaviour(cfg, world, rng, domain, u, 1)}

    split_u = uniform(cfg.seed, f"split_{domain}", start + np.arange(n))[:, 0]
    split = np.digitize(split_u, np.cumsum([f for _, f in SPLIT_FRACTIONS])[:-1])
    table = pa.table({
        "row_id": pa.array(start + np.arange(n, dtype=np.int64)),
        "user_id": pa.array(users), "item_id": pa.array(items),
        "user_age": pa.array(age), "user_gender": pa.array(gender),
        "item_cat": pa.array(cat), **({"item_price": pa.array(price)} if has_price else {}),
        "ctx_slot": pa.array(slot), **cols, **hists,
        "ts": pa.array(ts), "label": pa.array(label), "is_noise": pa.array(is_noise),
        "true_prob": pa.array(prob.astype(np.float32)),
        "split": pa.array(split.astype(np.int8)),
    })
    return table


def month_starts(cfg: SynthConfig) -> np.ndarray:
    """Unix seconds of each month's start and of the last month's end (``months + 1`` values)."""
    if not cfg.start:
        return T0 + np.arange(cfg.months + 1, dtype=np.int64) * MONTH_SECONDS
    first = dt.date.fromisoformat(cfg.start).replace(day=1)
    days = [add_months(first, m) for m in range(cfg.months + 1)]
    return np.array([calendar.timegm(d.timetuple()) for d in days], dtype=np.int64)


def timestamps(cfg: SynthConfig, month: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform second inside each row's month."""
    if not cfg.start:  # the 30-day months' draw, kept as it was (the default data is unchanged byte for byte)
        return T0 + month * MONTH_SECONDS + rng.integers(0, MONTH_SECONDS, len(month))
    edges = month_starts(cfg)
    return edges[month] + (rng.random(len(month)) * (edges[month + 1] - edges[month])).astype(np.int64)


def behaviour(cfg: SynthConfig, world: World, rng: np.random.Generator, entity: str, u: np.ndarray,
              min_len: int, max_len: int | None = None) -> pa.ListArray:
    """A behaviour sequence per row: the top items of a candidate pool of ``entity``'s items under the
    preference ``u``, of a random length in ``[min_len, max_len]``."""
    n, pool, max_len = len(u), 4 * cfg.seq_len, max_len or cfg.seq_len
    cand = world.item_ids(entity, zipf_ranks(rng, cfg.n_items, (n, pool), cfg.zipf))
    score = world.affinity(u[:, None, :], world.item_latent(cand.ravel()).reshape(n, pool, -1))
    score = score + rng.gumbel(size=score.shape)
    best = np.argpartition(-score, max_len - 1, axis=1)[:, :max_len]  # the pool's top, then in order
    best = np.take_along_axis(best, np.argsort(-np.take_along_axis(score, best, 1), axis=1, kind="stable"), 1)
    top = np.take_along_axis(cand, best, axis=1)
    lengths = rng.integers(min_len, max_len + 1, n)
    keep = np.arange(max_len)[None, :] < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(top[keep]))


def write_shard(cfg: SynthConfig, out: str, domain: str, shard: int) -> int:
    """Generate one shard and write its train/valid/test parts; returns rows written."""
    table = generate_shard(cfg, domain, shard)
    fs, base = resolve(out)
    split_col = table.column("split").to_numpy()
    for i, (split, _) in enumerate(SPLIT_FRACTIONS):
        part = table.filter(pa.array(split_col == i)).drop_columns(["split"])
        path = join(base, domain, split, f"part-{shard:05d}.parquet")
        fs.create_dir(join(base, domain, split), recursive=True)
        pq.write_table(part, path, filesystem=fs, row_group_size=ROW_GROUP_ROWS)
    return table.num_rows


# ---- specs ------------------------------------------------------------------------------------


def make_spec(cfg: SynthConfig, domain: str) -> DomainSpec:
    d = cfg.emb_dim
    n_user_rows = cfg.n_users + cfg.n_target_users + 1
    n_item_rows = 2 * cfg.n_items + 1
    tables = {
        "user": {"num_embeddings": n_user_rows, "dim": d}, "item": {"num_embeddings": n_item_rows, "dim": d},
        "age": {"num_embeddings": N_AGE + 1, "dim": d}, "gender": {"num_embeddings": 3, "dim": d},
        "cat": {"num_embeddings": N_CAT + 1, "dim": d}, "slot": {"num_embeddings": N_SLOT + 1, "dim": d},
    }
    flds = [
        {"name": "user_id", "type": "categorical", "table": "user", "group": "user"},
        {"name": "user_age", "type": "categorical", "table": "age", "group": "user"},
        {"name": "user_gender", "type": "categorical", "table": "gender", "group": "user"},
        {"name": "item_id", "type": "categorical", "table": "item", "group": "item"},
        {"name": "item_cat", "type": "categorical", "table": "cat", "group": "item"},
        {"name": "ctx_slot", "type": "categorical", "table": "slot", "group": "context"},
    ]
    hists = ({"hist_source": cfg.seq_len, "hist_target": cfg.seq_len // 2} if cfg.entities
             else {"hist_items": cfg.seq_len})
    flds += [{"name": name, "type": "sequence", "table": "item", "group": "user", "max_len": length,
              "pooling": "mean"} for name, length in hists.items()]
    if cfg.entities:
        tables["topic"] = {"num_embeddings": N_TOPIC + 1, "dim": d}
        flds.append({"name": "item_topic", "type": "categorical", "table": "topic", "group": "item"})
    if not cfg.entities:
        flds.append({"name": "item_price", "type": "dense", "group": "item"})
    elif domain == "source":
        flds.append({"name": "item_price", "type": "dense", "group": "item", "scope": "specific"})
    if (cfg.hetero or cfg.entities) and domain == "source":
        tables["src_channel"] = {"num_embeddings": N_CHANNEL + 1, "dim": d}
        flds.append({"name": "src_channel", "type": "categorical", "table": "src_channel",
                     "group": "context", "scope": "specific"})
    if cfg.entities and domain == "target":
        tables["tgt_style"] = {"num_embeddings": N_STYLE + 1, "dim": d}
        flds.append({"name": "tgt_style", "type": "categorical", "table": "tgt_style",
                     "group": "item", "scope": "specific"})
    if (cfg.hetero or cfg.entities) and domain == "target":
        tables["tgt_position"] = {"num_embeddings": N_POSITION + 1, "dim": d}
        flds.append({"name": "tgt_position", "type": "categorical", "table": "tgt_position",
                     "group": "context", "scope": "specific"})
    return DomainSpec.from_dict({"domain": domain, "label": "label", "user_id": "user_id", "time": "ts",
                                 "tables": tables, "fields": flds})


def generate(out: str, cfg: SynthConfig, parallelism: int | None = None) -> dict[str, int]:
    """Write the whole dataset into ``out`` (Ray tasks, at most ``parallelism`` at a time).

    Without a running Ray (or with ``parallelism=1``) the shards are written in this process.
    """
    import yaml

    fs, base = resolve(out)
    fs.create_dir(base, recursive=True)
    map_tasks(write_shard, [(cfg, out, dom, s) for dom in ("source", "target") for s in range(num_shards(cfg, dom))],
              parallelism)
    for dom in ("source", "target"):
        with fs.open_output_stream(join(base, f"{dom}.spec.yaml")) as f:
            f.write(make_spec(cfg, dom).to_yaml().encode())
    write_dataset_yaml(out, {d: {"spec": f"{d}.spec.yaml", "path": d} for d in ("source", "target")},
                       description="raytrain-ctr synthetic planted-mechanism data")
    with fs.open_output_stream(join(base, "synth.yaml")) as f:
        f.write(yaml.safe_dump(asdict(cfg), sort_keys=False).encode())
    return {dom: domain_rows(cfg, dom) for dom in ("source", "target")}
