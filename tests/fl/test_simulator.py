"""End to end: tiny random model, 8 simulated devices, 3 rounds, every strategy."""

import numpy as np
import pytest

from fedspine.config import load_config
from fedspine.fl.simulator import Simulation, run
from fedspine.fl.strategies import STRATEGIES
from fedspine.logging import RunLogger, read_metrics

BASE = [
    "log.progress=false",
    "fleet.devices=8",
    "train.rounds=3",
    "train.local_steps=4",
    "train.prune_interval=2",
    "data.max_examples=240",
    "eval.devices=true",
]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_end_to_end_on_the_same_loop(name, tmp_path):
    cfg = load_config(None, [*BASE, f"strategy.name={name}"])
    logger = RunLogger(tmp_path / name, config=cfg.to_dict())
    result = run(cfg, logger)
    records = read_metrics(tmp_path / name)
    assert [r["round"] for r in records] == [1, 2, 3] == [r["round"] for r in result.records]
    clocks = [r["clock_s"] for r in records]
    assert all(b > a for a, b in zip([0.0, *clocks], clocks, strict=False))
    for r in records:
        assert set(r["arms"]) == {f"d{i:03d}" for i in range(8)} and not r["failures"]
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["device_accuracy_min"] <= 1.0
        assert np.isfinite([r["loss_before"], r["loss_after"]]).all()
        assert r["bytes_up"] > 0 and r["mean_waiting_s"] >= 0
        reports = r["reports"]  # each device's own report; the record's means are over them
        assert set(reports) == set(r["arms"])
        assert np.isclose(np.mean([v["loss_before"] for v in reports.values()]), r["loss_before"])
        assert all(v["update_norm"] >= 0 for v in reports.values())
    pruned = STRATEGIES[name].prunes
    assert (records[-1]["mean_sparsity"] > 0) == pruned
    assert result.summary["final_accuracy"] == records[-1]["accuracy"]


def test_same_seed_same_run():
    a = run(load_config(None, [*BASE, "strategy.name=fedspine", "eval.devices=false"])).records
    b = run(load_config(None, [*BASE, "strategy.name=fedspine", "eval.devices=false"])).records
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)


def test_bad_config_names_the_field_before_any_work():
    with pytest.raises(ValueError, match=r"strategy.name must be one of \[.*'fedspine'.*\], got 'fedsp1ne'"):
        load_config(None, ["strategy.name=fedsp1ne"])
    with pytest.raises(
        ValueError, match=r"data.partition must be one of \['iid', 'dirichlet', 'pathological', 'shard'\]"
    ):
        load_config(None, ["data.partition=shards"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['train.lr_rate'\]"):
        load_config(None, ["train.lr_rate=0.1"])
    with pytest.raises(ValueError, match="train.rounds must be int"):
        load_config(None, ["train.rounds=three"])
    with pytest.raises(ValueError, match=r"strategy.aggregation must be None or one of \[.*'zero-pad'\]"):
        load_config(None, ["strategy.aggregation=mean"])
    with pytest.raises(ValueError, match="train.lr must be float, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_aggregation_rule_can_be_swapped_for_an_ablation():
    sim = Simulation(load_config(None, [*BASE, "strategy.name=fedspine", "strategy.aggregation=fedspine"]))
    assert sim.server.rule.name == "fedspine" and sim.server.strategy.name == "fedspine"
    assert Simulation(load_config(None, BASE)).server.rule.name == "zero-pad"


def test_exponent_floats_without_a_dot_are_numbers():
    # YAML 1.1 reads 5e-4 as a string; a user writing it means the number.
    assert load_config(None, ["train.lr=5e-4"]).train.lr == 5e-4


@pytest.mark.parametrize(
    "name, extra",
    [("fedspine", []), ("flora", []), ("random-arm", []), ("fedspine", ["train.server_momentum=0.5"])],
)
def test_killed_and_resumed_run_ends_with_exactly_the_same_metrics(name, extra, tmp_path):
    cfg = load_config(None, [*BASE, f"strategy.name={name}", "train.rounds=4", "eval.devices=false", *extra])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    uninterrupted = run(cfg).records
    ckpt = tmp_path / "ckpt"
    logger = RunLogger(tmp_path / "run", config=cfg.to_dict())
    first = run(cfg, logger, checkpoint_dir=ckpt, stop_after=2)  # "killed" after round 2
    assert len(first.records) == 2
    resumed = run(
        cfg, RunLogger(tmp_path / "run", config=cfg.to_dict(), resume=True), checkpoint_dir=ckpt, resume=True
    )
    assert strip(resumed.records) == strip(uninterrupted)
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_resume_refuses_a_different_config(tmp_path):
    cfg = load_config(None, [*BASE, "train.rounds=2", "eval.devices=false"])
    run(cfg, checkpoint_dir=tmp_path / "c", stop_after=1)
    other = load_config(None, [*BASE, "train.rounds=2", "eval.devices=false", "train.lr=0.1"])
    with pytest.raises(ValueError, match="different configuration"):
        run(other, checkpoint_dir=tmp_path / "c", resume=True)


def test_wandb_offline_run_is_written_without_a_login(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [*BASE, "train.rounds=1", "eval.devices=false", "log.wandb=offline"])
    logger = RunLogger(tmp_path, config=cfg.to_dict(), wandb_mode="offline", name="t")
    result = run(cfg, logger)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run directory"
    assert result.summary["deployed_params_max"] <= result.summary["original_params"]


def test_the_summary_records_what_precision_auto_resolved_to(monkeypatch):
    import fedspine.fl.placement as placement

    monkeypatch.setattr(placement, "cpu_has_bf16", lambda cpuinfo=None: False)  # a CPU without bf16
    cfg = load_config(None, [*BASE, "train.rounds=1", "eval.devices=false"])
    summary = run(cfg).summary
    assert (summary["precision"], summary["compute_device"]) == ("fp32", "cpu")


def test_a_table_of_runs_in_different_precisions_says_so():
    from fedspine.experiments.report import _precision_note
    from fedspine.experiments.runner import CellResult
    from fedspine.experiments.spec import Cell

    cfg = load_config(None, BASE)
    cells = [Cell("", v, 0, cfg) for v in ("a", "b", "c")]
    same = [CellResult(c, [], {"precision": "fp32"}) for c in cells]
    assert _precision_note(same) == []
    mixed = [*same[:2], CellResult(cells[2], [], {"precision": "bf16"})]
    note = _precision_note(mixed)[0]
    assert note.startswith("**Mixed precision:**")
    assert "bf16: c seed 0" in note and "fp32: a seed 0, b seed 0" in note
    unknown = [*same[:2], CellResult(cells[2], [], {})]
    (note,) = _precision_note(unknown)[:-1]
    assert "Mixed" not in note and "not recorded** for c seed 0" in note and "in fp32" in note


def test_time_to_target_first_crossing_and_sustained_skip_rounds_without_an_evaluation():
    from fedspine.fl.simulator import time_to_target

    records = [
        {"clock_s": 1.0, "accuracy": 0.71},
        {"clock_s": 2.0},  # not evaluated this round
        {"clock_s": 3.0, "accuracy": 0.60},
        {"clock_s": 4.0, "accuracy": 0.80},
        {"clock_s": 5.0, "accuracy": 0.69},
    ]
    assert time_to_target(records, 0.70) == 1.0
    assert time_to_target(records, 0.70, window=2) == 4.0  # (0.60 + 0.80) / 2
    assert time_to_target(records, 0.70, window=3) == 4.0  # (0.71 + 0.60 + 0.80) / 3
    assert time_to_target(records, 0.75, window=3) is None
    assert time_to_target(records, None) is None


def test_a_time_budget_ends_the_run_after_the_round_that_spends_it(tmp_path):
    cfg = load_config(None, [*BASE, "strategy.name=fedspine", "eval.devices=false", "eval.every=5"])
    full = run(cfg).records
    budget = (full[0]["clock_s"] + full[1]["clock_s"]) / 2  # spent during round 2
    capped = load_config(
        None,
        [
            *BASE,
            "strategy.name=fedspine",
            "eval.devices=false",
            "eval.every=5",
            "train.rounds=6",
            f"train.time_budget_s={budget}",
        ],
    )
    ckpt = tmp_path / "ckpt"
    assert len(run(capped, checkpoint_dir=ckpt, stop_after=1).records) == 1
    out = run(capped, checkpoint_dir=ckpt, resume=True)
    keep = lambda r: {k: v for k, v in r.items() if k not in ("wall_s", "accuracy")}  # noqa: E731
    assert [r["round"] for r in out.records] == [1, 2]
    assert [keep(r) for r in out.records] == [keep(r) for r in full[:2]]
    assert (
        "accuracy" not in out.records[0] and out.records[1]["accuracy"] is not None
    )  # the last is evaluated
    assert out.summary["rounds"] == 2 and out.summary["final_accuracy"] == out.records[1]["accuracy"]
    with pytest.raises(ValueError, match="train.time_budget_s must be None or a finite number > 0, got -1"):
        load_config(None, ["train.time_budget_s=-1"])
