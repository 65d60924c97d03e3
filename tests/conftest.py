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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on loopback for the session; its endpoint and
    dummy credentials go into the environment, where pyarrow, boto3 and Ray's workers read them."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # generous: a busy 2-core machine starts it slowly
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh bucket on the loopback S3 server: ``s3://NAME``."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
