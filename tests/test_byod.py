"""The README's "Bring your own data" walkthrough, command by command, on the checked-in sample click log
(two domains named video and game, positives only; not MovieLens): CSV → Parquet → negatives → spec infer →
validate --config → a leaderboard."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from raytrain_ctr.cli import main
from raytrain_ctr.data.dataset import CTRDataset

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clicklog"
sys.path.insert(0, str(SAMPLE))


def test_the_sample_is_what_its_script_writes(tmp_path):
    from make_sample import main as make

    make(tmp_path)
    for name in ("video.csv", "game.csv"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes()


def test_click_log_to_leaderboard(tmp_path, ray_local, capsys):
    from to_parquet import convert

    raw, data, runs = tmp_path / "raw", tmp_path / "clicks", tmp_path / "runs"
    counts = convert(SAMPLE, raw)
    assert counts["game"] == {"train": 960, "valid": 120, "test": 120}
    assert main(["negatives", str(raw), "--out", str(data), "--item-columns", "category", "--k", "4"]) == 0
    assert main(["spec", "infer", str(data)]) == 0
    ds = CTRDataset.load(str(data), {"source": "video", "target": "game"})
    game = ds.domain("target").spec
    assert game.time == "ts" and game.user_id == "user_id"
    assert {f.name: f.ids for f in game.fields} == {"user_id": "identity", "item_id": "identity",
                                                    "category": "vocab", "hour": "identity"}
    assert game.field("hour").first_id == 0  # hours 0..23: 0-based, no hour on the OOV row
    assert game.tables[game.field("item_id").table].num_embeddings == 2060  # one table over both domains' ids
    config = ["--config", str(SAMPLE / "clicklog.yaml"), "--set", f"data={data}", "--set", f"storage={runs}"]
    assert main(["validate", *config]) == 0
    assert "method 'target_only' finds the domains" in capsys.readouterr().out
    assert main(["compare", *config, "--methods", "target_only", "all", "--seeds", "0",
                 "--out", str(tmp_path / "board")]) == 0
    rows = {r["entry"]: r for r in json.loads((tmp_path / "board" / "leaderboard.json").read_text())["rows"]}
    assert set(rows) == {"target_only", "all"}
    for r in rows.values():  # the taste the sample plants is learnt on the game domain's newest tenth
        assert r["test_auc"][0] > 0.6, r
    test = pq.read_table(ds.files("target", "test"))
    assert test.num_rows == 120 * 5 and sorted(set(test.column("label").to_pylist())) == [0, 1]


def test_validate_without_roles_says_how_to_map_the_domains(tmp_path, capsys):
    from to_parquet import convert

    convert(SAMPLE, tmp_path / "raw")
    assert main(["negatives", str(tmp_path / "raw"), "--out", str(tmp_path / "d"), "--parallelism", "1"]) == 0
    assert main(["spec", "infer", str(tmp_path / "d")]) == 0
    assert main(["validate", "--config", str(SAMPLE / "clicklog.yaml"), "--set", f"data={tmp_path / 'd'}",
                 "--set", "roles={}"]) == 2
    assert "no domain 'target' (has ['game', 'video']); name the data's domains after the roles" in \
        capsys.readouterr().err
