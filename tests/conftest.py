"""Shared fixtures: one local Ray for the session, planted data, real MovieLens-100K."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from raytrain_ctr.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """The 'tiny' planted dataset (100k source rows, 10k target rows), written once."""
    from raytrain_ctr.data.synth import generate, make_config

    out = str(tmp_path_factory.mktemp("synth") / "tiny")
    generate(out, make_config("tiny"), parallelism=1)
    return out


@pytest.fixture(scope="session")
def entities(tmp_path_factory) -> str:
    """A small two-entity planted dataset (the 'entities' preset, scaled down: MKT's setting), written once."""
    from raytrain_ctr.data.synth import generate, make_config

    out = str(tmp_path_factory.mktemp("entities") / "data")
    generate(out, make_config("entities", rows=24_000, n_users=2_000, n_target_users=600, n_items=600,
                              rows_per_shard=6_000), parallelism=1)
    return out


@pytest.fixture(scope="session")
def ml100k(tmp_path_factory) -> str:
    """MovieLens-100K from the recbole wheel (installed by the set-up command), random split."""
    from raytrain_ctr.data.movielens import prepare

    out = str(tmp_path_factory.mktemp("ml") / "ml100k")
    prepare(out)
    return out
