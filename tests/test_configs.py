"""Every shipped job config (and every variant of it) and every shipped search space is valid:
the method's stages resolve and every stage's model builds from the planted data's specs."""

from pathlib import Path

import pytest
import yaml

from raytrain_ctr import pipeline
from raytrain_ctr.config import from_dict, load_config, replace
from raytrain_ctr.data.dataset import CTRDataset, DataError
from raytrain_ctr.methods import METHODS, get_method
from raytrain_ctr.spec import SpecError
from raytrain_ctr.tune import _sample_value, load_space, tuned_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
JOBS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("_space"))


def check(cfg, ds: CTRDataset) -> None:
    method = get_method(cfg.method, cfg.method_args)
    for st in method.stages:
        pipeline.check_stage_inputs(cfg, ds, method, st)
    pipeline.resolve_stages(cfg, method, ds)  # every stage's key, and stage_train names stages the method has


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_every_job_config_and_variant_builds(path, tiny_data):
    ds = CTRDataset.load(tiny_data)
    variants = [None, *(yaml.safe_load(path.read_text()).get("variants") or {})]
    for variant in variants:
        check(load_config(path, variant).with_overrides({"data": tiny_data}), ds)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_search_space_key_applies(method, tiny_data):
    ds = CTRDataset.load(tiny_data)
    cfg = load_config(CONFIGS / "movielens.yaml").with_overrides({"data": tiny_data, "method": method,
                                                                   "as_of": "2024-06-01"})  # E-CDCTR's windows
    for key, spec in load_space(None, method).items():
        check(cfg.with_overrides(tuned_overrides(cfg, {key: _sample_value(spec)})), ds)


def test_cdanet_sweep_space_file(tiny_data):
    ds = CTRDataset.load(tiny_data)
    cfg = load_config(CONFIGS / "cdanet.yaml").with_overrides({"data": tiny_data})
    space = load_space(str(CONFIGS / "cdanet_space.yaml"), "cdanet")
    assert {"method_args.alpha", "method_args.beta", "method_args.experts", "method_args.expert_depth",
            "method_args.tower_depth", "method_args.d"} <= set(space)
    for key, spec in space.items():
        check(cfg.with_overrides({key: _sample_value(spec)}), ds)


@pytest.mark.parametrize("key, value, rule", [
    ("train.epochs", -1, "must be ≥ 1"), ("train.epochs", 0, "must be ≥ 1"), ("train.patience", 0, "must be ≥ 1"),
    ("train.batch_size", 0, "must be ≥ 1"), ("train.batch_size", 2.5, "expected an integer"),
    ("train.lr", "abc", "expected a number"), ("train.lr", 0, "must be > 0"), ("train.lr", float("nan"), "finite"),
    ("train.sparse_lr", -0.1, "must be > 0"), ("train.workers", 0, "must be ≥ 1"),
    ("train.workers", "2", "expected an integer"), ("train.weight_decay", -1e-4, "must be ≥ 0"),
    ("train.deterministic", "yes", "expected true or false"), ("train.shuffle_buffer", -5, "must be ≥ 0"),
    ("model.dropout", 1.0, "must be < 1"), ("model.deep", [64, 0], "layer widths ≥ 1"),
    ("model.deep", 64, "layer widths ≥ 1"), ("model.cross_layers", -1, "must be ≥ 0"),
    ("model.embedding_dim", 0, "must be ≥ 1"),
])
def test_settings_are_type_and_range_checked_on_the_driver(key, value, rule, tiny_data):
    cfg = load_config(CONFIGS / "target_only.yaml").with_overrides({"data": tiny_data})
    with pytest.raises(SpecError, match=rf"{key}: .*{rule}"):
        cfg.with_overrides({key: value})


def test_yaml_floats_written_without_a_dot_are_numbers(tiny_data):
    cfg = load_config(CONFIGS / "target_only.yaml").with_overrides({"train.lr": "1e-3", "train.sparse_lr": None})
    assert cfg.train.lr == 0.001 and cfg.train.sparse_lr is None


def test_more_workers_than_a_local_ray_has_cpus_or_gpus_stop_before_any_worker(tiny_data, ray_local, tmp_path):
    cfg = load_config(CONFIGS / "target_only.yaml").with_overrides(
        {"data": tiny_data, "storage": str(tmp_path), "train.workers": 64})
    with pytest.raises(SpecError, match="train.workers: 64 workers need 64 CPUs and the Ray cluster has"):
        pipeline.run(cfg)
    assert not (tmp_path / "stages").exists()
    gpu = cfg.with_overrides({"train.workers": 2, "train.use_gpu": True})
    with pytest.raises(SpecError, match="train.workers: 2 workers need 2 GPUs and the Ray cluster has 0; .*use_gpu"):
        pipeline.run(gpu)
    assert gpu.train.resources_per_worker == {"CPU": 1, "GPU": 1}
    with pytest.raises(SpecError, match="train.workers: 2 workers need 128 CPUs .*cpus_per_worker"):
        pipeline.run(cfg.with_overrides({"train.workers": 2, "train.cpus_per_worker": 64}))
    assert not (tmp_path / "stages").exists()


def test_a_stage_s_controller_polls_its_workers_often(ray_local):
    """init_ray shortens Ray Train's controller poll (2 s by default: a finished stage waited two polls before its
    fit returned), and Ray Train hands the setting to every controller it starts."""
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR, get_env_vars_to_propagate

    assert float(get_env_vars_to_propagate()[HEALTH_CHECK_INTERVAL_S_ENV_VAR]) == 0.2


def test_roles_map_any_domain_names_to_the_methods_roles(tmp_path, tiny_data):
    """A config's roles rename the data's domains (video, game) to the ones the methods read; every stage of every
    method then finds its domains and builds; without roles the error says how to map them."""
    import shutil

    from helpers import rename_domains

    from raytrain_ctr.methods import METHODS, get_method
    from raytrain_ctr.pipeline import check_stage_inputs

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    roles = rename_domains(str(data), {"source": "video", "target": "game"})
    cfg = from_dict({"data": str(data), "method": "finetune", "roles": roles, "as_of": "2025-06-01"})
    ds = cfg.dataset()
    assert sorted(ds.domains) == ["source", "target"] and ds.domain("target").named == "game"
    assert ds.domain("target").spec.domain == "target" and ds.domain("target").path.endswith("/game")
    for name in METHODS:
        method = get_method(name)
        for stage in method.stages:
            check_stage_inputs(cfg, ds, method, stage)
    assert ds.version() != CTRDataset.load(str(data), {"source": "game", "target": "video"}).version()
    with pytest.raises(DataError, match=r"no domain 'source' \(has \['game', 'video'\]\); .*roles: \{source: "):
        pipeline.run(replace(cfg, roles={}))


@pytest.mark.parametrize("roles, message", [
    ({"target": "gmae"}, r"roles.target: the data at .* has no domain 'gmae' .*did you mean 'game'"),
    ({"source": "game", "target": "game"}, "a domain plays one role"),
    ({"targt": "game"}, "roles: unknown key 'targt'; did you mean 'target'"),
    ({"source": "video"}, None),  # 'game' keeps its name: fine, as long as it is not a role's name
])
def test_bad_roles(roles, message, tmp_path, tiny_data):
    import shutil

    from helpers import rename_domains

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    rename_domains(str(data), {"source": "video", "target": "game"})
    if message is None:
        assert sorted(CTRDataset.load(str(data), roles).domains) == ["game", "source"]
        return
    with pytest.raises(SpecError, match=message):
        from_dict({"data": str(data), "method": "finetune", "roles": roles}).dataset()


def test_a_role_name_taken_by_another_domain(tmp_path, tiny_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    with pytest.raises(SpecError, match="the data has a domain 'target' and the roles give that name to domain "
                                        "'source'"):
        CTRDataset.load(str(data), {"target": "source"})
