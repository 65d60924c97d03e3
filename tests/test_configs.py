"""Every shipped job config (and every variant of it) and every shipped search space is valid:
the method's stages resolve and every stage's model builds from the planted data's specs."""

from pathlib import Path

import pytest
import yaml

from raytrain_ctr import pipeline
from raytrain_ctr.config import load_config
from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.methods import get_method
from raytrain_ctr.tune import SPACES, _sample_value, load_space

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
JOBS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("_space"))


def check(cfg, ds: CTRDataset) -> None:
    method = get_method(cfg.method, cfg.method_args)
    for st in method.stages:
        pipeline.check_stage_inputs(cfg, ds, method, st)


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_every_job_config_and_variant_builds(path, tiny_data):
    ds = CTRDataset.load(tiny_data)
    variants = [None, *(yaml.safe_load(path.read_text()).get("variants") or {})]
    for variant in variants:
        check(load_config(path, variant).with_overrides({"data": tiny_data}), ds)


@pytest.mark.parametrize("method", sorted(set(SPACES) - {"common"}))
def test_every_search_space_key_applies(method, tiny_data):
    ds = CTRDataset.load(tiny_data)
    cfg = load_config(CONFIGS / "movielens.yaml").with_overrides({"data": tiny_data, "method": method,
                                                                   "as_of": "2024-06-01"})  # E-CDCTR's windows
    for key, spec in load_space(None, method).items():
        check(cfg.with_overrides({key: _sample_value(spec)}), ds)


def test_cdanet_sweep_space_file(tiny_data):
    ds = CTRDataset.load(tiny_data)
    cfg = load_config(CONFIGS / "cdanet.yaml").with_overrides({"data": tiny_data})
    space = load_space(str(CONFIGS / "cdanet_space.yaml"), "cdanet")
    assert {"method_args.alpha", "method_args.beta", "method_args.experts", "method_args.expert_depth",
            "method_args.tower_depth", "method_args.d"} <= set(space)
    for key, spec in space.items():
        check(cfg.with_overrides({key: _sample_value(spec)}), ds)
