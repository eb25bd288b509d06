import json

import pytest

from fedspine.cli import main
from fedspine.config import ConfigError
from fedspine.logging import read_metrics


def smoke_run(tmp_path):
    """``fedspine run`` on the smoke config, 4 devices, 2 rounds, into ``tmp_path``."""
    config = ["--config", "experiments/configs/smoke.yaml"]
    return ["run", *config, f"log.dir={tmp_path}", "log.progress=false", "train.rounds=2", "fleet.devices=4"]


def test_run_smoke_config_writes_metrics(tmp_path, capsys):
    rc = main(smoke_run(tmp_path))
    assert rc == 0
    records = read_metrics(tmp_path / "fedspine-seed0")
    assert [r["round"] for r in records] == [1, 2]
    summary = json.loads((tmp_path / "fedspine-seed0" / "summary.json").read_text())
    assert summary["rounds"] == 2 and 0 <= summary["final_accuracy"] <= 1


def test_run_rejects_a_bad_config_before_any_work(capsys):
    assert main(["run", "fleet.devices=0"]) == 2
    assert "fleet.devices must be >= 1, got 0" in capsys.readouterr().err


def test_partition_prints_the_runs_partition_without_training(capsys):
    smoke = ["--config", "experiments/configs/smoke.yaml", "fleet.devices=5"]
    assert main(["partition", *smoke, "data.partition=shard", "data.min_size=1"]) == 0
    out = capsys.readouterr().out
    assert "data.partition=shard" in out and "5 devices, " in out and "entropy" in out
    assert len([line for line in out.splitlines() if line.split()[:1] in (["0"], ["4"])]) == 2  # all rows
    assert main(["partition", *smoke, "data.classes_per_device=0"]) == 2
    assert "data.classes_per_device must be >= 1, got 0" in capsys.readouterr().err
    assert main(["partition", *smoke, "data.min_size=10000"]) == 2  # the data cannot meet it
    assert "fedspine: error: fleet.devices=5 with data.min_size=10000 needs 50000" in capsys.readouterr().err


def test_demo_runs(capsys):
    assert main(["demo", "--devices", "20", "--rounds", "12", "--every", "6"]) == 0
    out = capsys.readouterr().out
    assert "objective deadline, policy pooled-ucb" in out and "planner that knows every speed" in out
    assert main(["demo", "--devices", "20", "--rounds", "6", "--objective", "paper", "--no-safe"]) == 0
    assert "objective paper, policy s-ucb, safe cap off" in capsys.readouterr().out


def test_resume_continues_a_run_from_its_checkpoint(tmp_path):
    assert main(smoke_run(tmp_path)) == 0
    run_dir = tmp_path / "fedspine-seed0"
    assert (run_dir / "checkpoint" / "ckpt-000002" / "MANIFEST.json").exists()
    assert main(["run", "--resume", str(run_dir)]) == 0  # already finished: nothing left to run
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]
    assert main(["run", "--resume", str(run_dir), "train.rounds=3"]) == 2


def test_check_runs_every_check_and_writes_nothing(tmp_path, capsys):
    args = ["run", "--config", "experiments/configs/smoke.yaml", f"log.dir={tmp_path}/runs", "--check"]
    assert main([*args, "fleet.devices=4"]) == 0  # an override after a flag is still an override
    assert "devices" in capsys.readouterr().out and not (tmp_path / "runs").exists()
    assert main([*args, "fleet.devices=300"]) == 2  # too few examples: only the data can tell
    assert capsys.readouterr().err.startswith("fedspine: error: fleet.devices=300 with data.min_size=8")


def test_debug_shows_the_traceback_instead_of_one_line():
    with pytest.raises(ConfigError, match="fleet.devices must be >= 1"):
        main(["run", "--debug", "fleet.devices=0"])


def test_replay_says_whether_other_parameters_would_have_allocated_the_same(tmp_path, capsys):
    assert main(smoke_run(tmp_path)) == 0
    run_dir = str(tmp_path / "fedspine-seed0")
    assert main(["replay", run_dir, "strategy.params.objective=paper"]) == 1  # parts: exit 1
    assert "other arms from round 1 of 2" in capsys.readouterr().out
    assert main(["replay", run_dir, "strategy.params.value_shrink=0.0"]) == 0  # today's default: the same
    assert "the same allocation in all 2 rounds" in capsys.readouterr().out
    assert main(["replay", run_dir, "train.lr=0.1"]) == 2
    assert "differ in 'train.lr', not only in strategy.params" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "nope"), "strategy.params.value_shrink=1"]) == 2
    assert "RUN_DIR must be a run folder holding config.json" in capsys.readouterr().err
