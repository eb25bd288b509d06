"""experiments/compare.py and fedspine.experiments: specs, tables, resumable runs, every spec's smoke size."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from fedspine.experiments import Cell, CellResult, load_experiment, plan, rows, run_cells, speedup
from fedspine.experiments.report import arms_per_tier, bootstrap_interval
from fedspine.experiments.runner import read_finished

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted(
    p for p in (ROOT / "experiments/configs").glob("*.yaml") if "experiment" in yaml.safe_load(p.read_text())
)


def script_main(name, argv):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"experiments/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def compare_main(argv):
    return script_main("compare", argv)


def write_spec(tmp_path, variants=None, **experiment):
    spec = {
        "experiment": {
            "name": "t",
            "reference": "fedspine",
            "variants": variants
            or {"fedspine": {"strategy.name": "fedspine"}, "fedavg": {"strategy.name": "fedavg-lora"}},
            **experiment,
        },
        "run": {
            "fleet": {"devices": 4},
            "data": {"max_examples": 200},
            "train": {"rounds": 2, "local_steps": 2, "prune_interval": 1},
            "eval": {"target_accuracy": 0.0},
            "log": {"progress": False},
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_committed_spec_is_valid_at_every_size():
    assert len(SPECS) >= 1
    for path in SPECS:
        exp = load_experiment(path)
        assert "smoke" in exp.sizes, f"{path.name} needs a smoke size for CI"
        for size in exp.size_names():
            assert plan(exp, size=size, seeds=1)


def test_the_script_folder_and_the_package_do_not_shadow_each_other():
    """``python experiments/compare.py`` puts the top-level experiments/ folder first on sys.path
    and still imports the fedspine.experiments package (a missing spec is refused by it)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "experiments/compare.py", "--config", "no-such-spec.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert "experiment file 'no-such-spec.yaml' does not exist" in out.stderr


def test_a_bad_variant_is_named_with_its_field_before_any_work(tmp_path):
    path = write_spec(tmp_path, variants={"fedspine": {}, "typo": {"strategy.name": "fedsp1ne"}})
    with pytest.raises(ValueError, match=r"variant 'typo': strategy.name must be one of"):
        load_experiment(path)
    with pytest.raises(ValueError, match=r"experiment.reference must be one of \['fedavg', 'fedspine'\]"):
        load_experiment(write_spec(tmp_path, reference="fedsp1ne"))
    assert compare_main(["--config", str(write_spec(tmp_path, seeds=0))]) == 2
    assert compare_main(["--config", str(write_spec(tmp_path)), "--groups", "alpha 0.1"]) == 2


def test_cells_of_one_seed_differ_only_in_the_variant(tmp_path):
    exp = load_experiment(write_spec(tmp_path, groups={"a": {"data.alpha": 0.1}, "b": {"data.alpha": 1.0}}))
    cells = plan(exp, seeds=2)
    assert len(cells) == 2 * 2 * 2
    a0 = [c.cfg.to_dict() for c in cells if c.group == "a" and c.seed == 0]
    assert a0[0]["strategy"] != a0[1]["strategy"]
    assert {**a0[0], "strategy": None} == {**a0[1], "strategy": None}
    assert {c.cfg.data.alpha for c in cells if c.group == "b"} == {1.0}


def test_fresh_seeds_start_at_first_seed_and_a_negative_one_is_refused(tmp_path):
    exp = load_experiment(write_spec(tmp_path))
    cells = plan(exp, seeds=2, first_seed=3)
    assert sorted({c.seed for c in cells}) == [3, 4]
    assert {c.cfg.seed for c in cells} == {3, 4}
    assert [c.cfg.to_dict() for c in cells if c.seed == 3] == [
        c.cfg.to_dict() for c in plan(exp, seeds=4) if c.seed == 3
    ]
    assert compare_main(["--config", str(write_spec(tmp_path)), "--first-seed", "-1"]) == 2


def test_a_size_can_set_one_variant_apart_and_names_unknown_variants(tmp_path):
    sizes = {"short": {"train.rounds": 1, "per_variant": {"fedspine": {"train.time_budget_s": 5.0}}}}
    groups = {"a": {"per_variant": {"fedspine": {"train.rounds": 3}}}}
    exp = load_experiment(write_spec(tmp_path, sizes=sizes, groups=groups))
    cfg = {(c.variant, c.cfg.train.rounds, c.cfg.train.time_budget_s) for c in plan(exp, size="short")}
    assert cfg == {("fedspine", 3, 5.0), ("fedavg", 1, None)}  # the size's entry is applied last
    assert {c.cfg.train.time_budget_s for c in plan(exp)} == {None}
    bad = {"short": {"per_variant": {"fedsp1ne": {"train.rounds": 1}}}}
    with pytest.raises(ValueError, match=r"experiment.sizes.short.per_variant names \['fedsp1ne'\]"):
        load_experiment(write_spec(tmp_path, sizes=bad))


def _result(variant, seed, tta, clock=100.0, records=()):
    from types import SimpleNamespace

    cfg = SimpleNamespace(eval=SimpleNamespace(target_accuracy=0.7))
    summary = {
        "time_to_target_s": tta,
        "clock_s": clock,
        "rounds": 5,
        "final_accuracy": 0.7,
        "best_accuracy": 0.7,
        "bytes_total": 1e6,
        "mean_waiting_s": 1.0,
        "final_mean_sparsity": 0.0,
    }
    return CellResult(Cell("", variant, seed, cfg), list(records), summary)


def test_speedup_is_per_seed_with_a_bootstrap_interval_and_marks_lower_bounds():
    ref = {0: _result("fedspine", 0, 10.0), 1: _result("fedspine", 1, 20.0)}
    # mean of 3.0 and 1.0; resampling two seeds gives means 1, 2 or 3
    assert speedup([_result("b", 0, 30.0), _result("b", 1, 20.0)], ref) == "2.00x [1.00, 3.00] (3.00, 1.00)"
    assert speedup([_result("b", 0, None, clock=50.0), _result("b", 1, 20.0)], ref).startswith(">3.00x [")
    ref_missing = {0: _result("fedspine", 0, None), 1: _result("fedspine", 1, 20.0)}
    assert speedup([_result("b", 0, 5.0), _result("b", 1, 40.0)], ref_missing) == "2.00x (1 of 2 seeds)"
    table = rows([*ref.values(), _result("b", 0, 30.0), _result("b", 1, 20.0)], "fedspine")[""]
    assert [r.variant for r in table] == ["fedspine", "b"] and table[1].speedup.startswith("2.00x")


def test_a_sweep_reads_its_points_off_the_groups_and_reports_the_speedup_along_them(tmp_path):
    from types import SimpleNamespace

    from fedspine.experiments.figures import sweep_figure
    from fedspine.experiments.report import format_sweep, sweep_points

    groups = {
        "ours": {},
        "slow": {"fleet.link_scale": 0.1},
        "both": {"fleet.link_scale": 0.5, "train.lr": 0.1},
    }
    sweeps = {"fleet.link_scale": {"label": "link", "default": 1.0, "log": True}}
    names = ("fedspine", "fedavg", "fixed-prune 0.1", "fixed-prune 0.5")
    variants = {v: {"strategy.name": "fedspine" if v == "fedspine" else "fedavg-lora"} for v in names}
    exp = load_experiment(write_spec(tmp_path, variants=variants, groups=groups, sweeps=sweeps))
    (sweep,) = exp.sweeps
    assert exp.sweep_points(sweep) == {"ours": 1.0, "slow": 0.1}  # "both" sets another field too
    for bad, why in (
        ({"train.lr": {"default": 1.0}}, "needs at least two groups on it"),
        ({"fleet.link_scale": {"default": "one"}}, r"must be \{label, default: <number>"),
    ):
        with pytest.raises(ValueError, match=why):
            load_experiment(write_spec(tmp_path, groups=groups, sweeps=bad))

    def run(group, variant, seed, crossing):  # accuracy 0.6 before clock `crossing`, 0.8 from it
        cfg = SimpleNamespace(eval=SimpleNamespace(target_accuracy=0.7))
        records = [
            {"round": i, "clock_s": float(i), "accuracy": 0.6 + 0.2 * (i >= crossing)} for i in range(1, 41)
        ]
        summary = {"time_to_target_s": float(crossing), "clock_s": 40.0, "rounds": 40, "final_accuracy": 0.8}
        summary |= {"best_accuracy": 0.8, "bytes_total": 1.0, "mean_waiting_s": 0.0}
        return CellResult(Cell(group, variant, seed, cfg), records, summary | {"final_mean_sparsity": 0.0})

    # sustained (mean of three evaluations >= 0.7) = crossing + 1; fedspine: 7 s (ours), 17 s (slow)
    crossings = {
        "fedspine": (6, 16),
        "fedavg": (18, 48),
        "fixed-prune 0.1": (10, 40),
        "fixed-prune 0.5": (14, 22),
    }
    results = [
        run(g, v, seed, c[i] + (seed if v != "fedspine" else 0))
        for v, c in crossings.items()
        for i, g in enumerate(("ours", "slow"))
        for seed in (0, 1)
    ]
    points = sweep_points(exp, results, sweep)
    at = {(p.value, p.label): p for p in points}
    assert [p.value for p in points][0] == 0.1  # sorted along the axis
    assert at[1.0, "fedspine"].time_s == 7.0 and at[1.0, "fedspine"].speedup is None
    assert at[1.0, "fedavg"].speedup == pytest.approx(np.mean([19 / 7, 20 / 7]))
    assert at[1.0, "best fixed-prune"].speedup == pytest.approx(np.mean([11 / 7, 12 / 7]))
    slow = at[0.1, "best fixed-prune"]  # the best arm is chosen at each point
    assert slow.variant == "fixed-prune 0.5" and at[1.0, "best fixed-prune"].variant == "fixed-prune 0.1"
    assert slow.speedup == pytest.approx(np.mean([23 / 17, 24 / 17])) and not slow.lower_bound
    assert at[0.1, "fedavg"].lower_bound and at[0.1, "fedavg"].speedup == pytest.approx(
        40 / 17
    )  # whole clock
    lines = format_sweep(exp, points, sweep).splitlines()
    assert lines[0] == "| link | fedspine: sustained time (s, sim.) | over fedavg | over best fixed-prune |"
    assert lines[2].startswith("| 0.1 | 17.0 | >2.35x [2.35, 2.35] | 1.38x [1.35, 1.41] (fixed-prune 0.5) |")
    assert lines[3].startswith("| 1 | 7.0 |") and lines[3].endswith("(fixed-prune 0.1) |")
    assert sweep_figure("fedspine", points, sweep, tmp_path / "figures").exists()


def test_the_best_static_arm_is_chosen_on_the_reading_it_is_compared_on():
    from types import SimpleNamespace

    from fedspine.experiments.report import best_of

    def row(variant, first, sustained):
        return SimpleNamespace(
            variant=variant,
            reached=3,
            time_to_target_s=first,
            sustained_reached=3,
            sustained_time_s=sustained,
            final_accuracy=(0.78, 0.01),
        )

    table = [
        row("fedspine", 5.0, 6.0),
        row("fixed-prune 0.1", 10.0, 16.0),
        row("fixed-prune 0.5", 11.0, 12.0),
    ]
    assert best_of(table, "fixed-prune") == "fixed-prune 0.1"  # first to cross
    assert best_of(table, "fixed-prune", sustained=True) == "fixed-prune 0.5"  # first to hold it
    assert best_of(table[:2], "fixed-prune") is None  # one arm is no sweep


def test_accuracy_gaps_are_paired_by_seed_in_points_with_an_interval():
    from fedspine.experiments.report import accuracy_gap, device_accuracy, final_accuracy, format_table

    def res(variant, seed, final, device):
        r = _result(variant, seed, 10.0, records=[{"device_accuracy_mean": device}])
        r.summary["final_accuracy"] = final
        return r

    ref = {0: res("fedspine", 0, 0.80, 0.75), 1: res("fedspine", 1, 0.70, 0.65)}
    rows_b = [res("b", 0, 0.78, 0.76), res("b", 1, 0.69, 0.68)]
    # paired gaps +2 and +1 points: mean +1.5, resampled means 1, 1.5 or 2
    assert accuracy_gap(rows_b, ref, final_accuracy) == "+1.5 [+1.0, +2.0]"
    assert accuracy_gap(rows_b, ref, device_accuracy) == "-2.0 [-3.0, -1.0]"
    assert accuracy_gap(rows_b[:1], {1: ref[1]}, final_accuracy) == "–"  # no pair
    assert accuracy_gap(rows_b, {0: ref[0]}, final_accuracy) == "+2.0 (1 of 2 seeds)"
    table = rows([*ref.values(), *rows_b], "fedspine")[""]
    assert (table[0].final_gap, table[1].device_gap) == ("(reference)", "-2.0 [-3.0, -1.0]")
    assert "| +1.5 [+1.0, +2.0] | -2.0 [-3.0, -1.0] |" in format_table(table, target=0.7)


def test_accuracy_at_equal_time_cuts_both_runs_at_the_earlier_end():
    from fedspine.experiments.report import accuracy_at, equal_time_gap

    def run(variant, seed, curve):  # (clock, accuracy) per round
        records = [{"clock_s": t, "accuracy": a} for t, a in curve]
        return _result(variant, seed, None, clock=curve[-1][0], records=records)

    short_rounds = run("fedspine", 0, [(1, 0.5), (2, 0.6), (3, 0.7), (4, 0.8)])  # ends at 4 s
    long_rounds = run("b", 0, [(2, 0.6), (4, 0.75), (6, 0.9)])  # ends at 6 s: cut at 4 s
    assert accuracy_at(long_rounds, 4.0) == 0.75 and accuracy_at(long_rounds, 1.0) is None
    assert equal_time_gap([long_rounds], {0: short_rounds}) == "+5.0"
    # the other way round the cut is the baseline's end: 2 s, where the reference stood at 0.6
    assert equal_time_gap([run("b", 0, [(2, 0.7)])], {0: short_rounds}) == "-10.0"
    assert equal_time_gap([long_rounds], {}) == "–"


def test_the_sustained_speedup_waits_for_a_mean_of_evaluations_at_the_target():
    def curve(accs):
        return [{"clock_s": 10.0 * (k + 1), "accuracy": a} for k, a in enumerate(accs)]

    # the reference touches 0.70 in round 1, drops, and its mean of 3 reaches 0.707 in round 4 (40 s)
    ref = _result("fedspine", 0, 10.0, records=curve([0.70, 0.62, 0.68, 0.82, 0.78, 0.78]))
    # the baseline crosses in round 3 and stays: its mean of 3 reaches 0.71 in round 5 (50 s)
    base = _result("b", 0, 30.0, records=curve([0.55, 0.62, 0.70, 0.71, 0.72, 0.72]))
    table = rows([ref, base], "fedspine")[""]
    assert table[1].speedup == "3.00x" and table[1].sustained_speedup == "1.25x"
    assert (table[0].sustained_time_s, table[1].sustained_time_s) == (40.0, 50.0)
    never = _result("c", 0, None, clock=60.0, records=curve([0.5] * 6))
    assert rows([ref, never], "fedspine")[""][1].sustained_speedup == ">1.50x"  # its whole 60 s


def test_arms_per_tier_orders_tiers_by_speed_and_checks_the_pruning_order():
    from types import SimpleNamespace

    def run(variant, strategy, arms_by_round, group="", times=(1.0, 3.0, 2.0)):
        tiers = {"a": "fast", "b": "slow", "c": "mid"}
        records = [
            {
                "round": 1,
                "arms": {d: [0.0, 4] for d in tiers},
                "tiers": tiers,
                "round_time_s": dict(zip("abc", times, strict=True)),
            },
            *({"round": k + 2, "arms": arms, "tiers": tiers} for k, arms in enumerate(arms_by_round)),
        ]
        cfg = SimpleNamespace(strategy=SimpleNamespace(name=strategy))
        return CellResult(Cell(group, variant, 0, cfg), records, {})

    good = {"a": [0.0, 8], "b": [0.5, 4], "c": [0.2, 4]}
    flipped = {"a": [0.5, 4], "b": [0.0, 8], "c": [0.2, 4]}
    text = arms_per_tier(
        [
            run("fedspine", "fedspine", [good] * 5),
            run("x", "fedspine", [flipped] * 5),
            run("f", "fixed-prune", [good]),
        ]
    )
    lines = text.splitlines()
    assert "rounds 3-6" in lines[0]  # 6 rounds, the first third is warm-up
    assert lines[2] == "| variant | seed | slow | mid | fast | ordered |"
    assert lines[4] == "| fedspine | 0 | 0.50 / 4.0 | 0.20 / 4.0 | 0.00 / 8.0 | yes |"
    assert lines[5].endswith("| no |") and len(lines) == 6  # the fixed-prune run is not listed
    assert arms_per_tier([run("f", "fixed-prune", [good])]) is None

    # another group, whose fleet ranks the tiers otherwise: its cells stay under their own columns
    other = run("fedspine", "fedspine", [flipped] * 5, group="fast b", times=(3.0, 1.0, 2.0))
    lines = arms_per_tier([run("fedspine", "fedspine", [good] * 5, group="ours"), other]).splitlines()
    assert lines[2] == "| group | variant | seed | slow | mid | fast | ordered |"
    assert lines[5] == "| fast b | fedspine | 0 | 0.00 / 8.0 | 0.20 / 4.0 | 0.50 / 4.0 | yes |"


def test_bootstrap_interval_covers_the_mean_and_stays_within_the_seeds():
    lo, hi = bootstrap_interval([1.2, 1.5, 1.8])
    assert 1.2 <= lo < 1.5 < hi <= 1.8
    assert bootstrap_interval([2.0, 2.0]) == (2.0, 2.0)


def test_the_best_of_a_fixed_prune_sweep_gets_its_own_row():
    ref = {s: _result("fedspine", s, 10.0) for s in (0, 1)}
    sweep = [_result("fixed-prune 0.1", s, 30.0) for s in (0, 1)] + [
        _result("fixed-prune 0.3", s, t) for s, t in ((0, 12.0), (1, None))
    ]
    sweep += [_result("fixed-prune 0.5", s, 15.0) for s in (0, 1)]
    table = rows([*ref.values(), *sweep], "fedspine")[""]
    # 0.3 is fastest on one seed but missed the target on the other: 0.5 is the strongest
    assert table[-1].variant == "best fixed-prune (fixed-prune 0.5)" and table[-1].speedup.startswith("1.50x")


@pytest.mark.slow
def test_compare_writes_tables_and_figures_and_does_not_repeat_finished_runs(tmp_path, capsys):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    args = ["--config", str(spec), "--seeds", "1", "--out", str(out)]
    assert compare_main([*args, "--shard", "2/2"]) == 0  # one of the two runs, no tables yet
    assert not (out / "results.md").exists()
    assert compare_main([*args, "--partial", "--no-figures"]) == 0  # table of what ran, the rest listed
    md = (out / "results.md").read_text()
    assert ("| fedavg |" in md) != ("| fedspine |" in md) and "Partial results:** 1 planned run" in md
    capsys.readouterr()
    assert compare_main(args) == 0
    assert capsys.readouterr().out.count("done before, read back") == 1
    md = (out / "results.md").read_text()
    assert "| fedspine |" in md and "| fedavg |" in md and "--seeds 1" in md
    for fig in ("accuracy_vs_time", "arms_per_tier", "finish_times", "waiting", "accuracy_vs_sparsity"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert compare_main(args) == 0
    assert capsys.readouterr().out.count("done before, read back") == 2
    assert compare_main([*args, "--shard", "3/2"]) == 2
    # a run from before a field existed (its config lacks it) is the same run at that field's default
    for path in out.rglob("config.json"):
        old = json.loads(path.read_text())
        del old["train"]["time_budget_s"]
        path.write_text(json.dumps(old))
    assert compare_main([*args, "--no-figures"]) == 0
    assert capsys.readouterr().out.count("done before, read back") == 2


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_experiment_runs_at_its_smoke_size(path, tmp_path):
    assert compare_main(["--config", str(path), "--smoke", "--seeds", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_deploy_script_reports_fractions_of_the_unpruned_model(tmp_path):
    assert script_main("deploy", ["--smoke", "--ratios", "0.3", "0.5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0.3, 0.5]
    assert rows[1]["params"] < rows[0]["params"]  # more pruning, fewer parameters
    assert 0 < rows[1]["memory_ratio"] < rows[0]["memory_ratio"] < 1
    assert (tmp_path / "figures" / "deploy.png").exists()
    assert script_main("deploy", ["--smoke", "--ratios", "1.5", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_a_run_finished_elsewhere_with_the_same_config_is_copied_not_rerun(tmp_path, monkeypatch, capsys):
    spec, first, second = write_spec(tmp_path), tmp_path / "first", tmp_path / "second"
    args = ["--config", str(spec), "--seeds", "1", "--no-figures"]
    assert compare_main([*args, "--out", str(first), "--variants", "fedavg"]) == 0
    assert compare_main([*args, "--variants", "nope"]) == 2

    import fedspine.fl.simulator as simulator

    def no_training(*a, **k):
        raise AssertionError("a copied run must not train")

    monkeypatch.setattr(simulator, "run", no_training)
    cells = plan(load_experiment(spec), seeds=1)
    fedavg = next(c for c in cells if c.variant == "fedavg")
    (result,) = run_cells([fedavg], second, reuse=[first])
    source = fedavg.run_dir(first)
    assert result.summary["reused_from"] == source.as_posix()
    assert (fedavg.run_dir(second) / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()
    with pytest.raises(AssertionError, match="must not train"):  # no identical config: it would run
        run_cells([next(c for c in cells if c.variant == "fedspine")], second, reuse=[first])
    capsys.readouterr()
    assert compare_main([*args, "--out", str(second), "--partial", "--reuse", str(first)]) == 0
    assert "copied from an identical config" in (second / "results.md").read_text()

    # the same config under another default (as the summary records it) is not a copy
    summary = json.loads((source / "summary.json").read_text())
    assert summary["strategy_params"] == {"rank": 8} and len(summary["code"]) == 12
    summary["strategy_params"] = {"rank": 16}
    (source / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(AssertionError, match="must not train"):
        run_cells([fedavg], tmp_path / "third", reuse=[first])
    assert "ran other strategy defaults; not copied" in capsys.readouterr().out
    # a parameter added since the run (absent from its summary) is taken at its default: a copy
    summary["strategy_params"] = {}
    (source / "summary.json").write_text(json.dumps(summary))
    (result,) = run_cells([fedavg], tmp_path / "fourth", reuse=[first])
    assert result.summary["reused_from"] == source.as_posix()
    # a default spelled out in the finished run's config is the run that leaves it implicit
    config = json.loads((source / "config.json").read_text())
    config["strategy"]["params"] = {"rank": 8}
    (source / "config.json").write_text(json.dumps(config))
    (result,) = run_cells([fedavg], tmp_path / "fifth", reuse=[first])
    assert result.summary["reused_from"] == source.as_posix()
    copied = json.loads((fedavg.run_dir(tmp_path / "fifth") / "config.json").read_text())
    assert copied["strategy"]["params"] == {}  # the cell's own config, as a rerun would write

    # a finished run in place whose summary records another default is stale: rerun, not read back
    fourth = fedavg.run_dir(tmp_path / "fourth")
    summary = json.loads((fourth / "summary.json").read_text())
    (fourth / "summary.json").write_text(json.dumps({**summary, "strategy_params": {"rank": 16}}))
    assert read_finished([fedavg], tmp_path / "fourth") == ([], [fedavg])
    capsys.readouterr()
    with pytest.raises(AssertionError, match="must not train"):
        run_cells([fedavg], tmp_path / "fourth")
    assert "ran under other strategy defaults; starting over" in capsys.readouterr().out


@pytest.mark.slow
def test_identical_cells_of_one_call_run_once(tmp_path, capsys):
    """An unpruned ceiling repeated in every group of a sweep (same config) trains once."""
    from dataclasses import replace

    cells = plan(load_experiment(write_spec(tmp_path)), seeds=1)
    fedavg = next(c for c in cells if c.variant == "fedavg")
    twin = replace(fedavg, group="another group")
    first, second = run_cells([fedavg, twin], tmp_path / "out")
    assert second.summary["reused_from"] == fedavg.run_dir(tmp_path / "out").as_posix()
    assert "same config finished" in capsys.readouterr().out
    assert first.summary["final_accuracy"] == second.summary["final_accuracy"]


@pytest.mark.slow
def test_a_baseline_on_another_fleet_is_retimed_not_trained(tmp_path, monkeypatch, capsys):
    """A fleet sweep trains each baseline once: a cell that differs from a finished run only in
    the fleet's timing is retimed (``fedspine.fl.retime``); FedSpine, which reads the clock, runs."""
    spec = write_spec(tmp_path, groups={"ours": {}, "slow link": {"fleet.link_scale": 0.1}})
    cells = plan(load_experiment(spec), seeds=1)
    pick = {(c.group, c.variant): c for c in cells}
    (ours,) = run_cells([pick["ours", "fedavg"]], tmp_path / "out")

    import fedspine.fl.simulator as simulator

    def no_training(*a, **k):
        raise AssertionError("a retimed run must not train")

    monkeypatch.setattr(simulator, "run", no_training)
    (slow,) = run_cells([pick["slow link", "fedavg"]], tmp_path / "out", reuse=[tmp_path / "out"])
    assert slow.summary["retimed_from"] == pick["ours", "fedavg"].run_dir(tmp_path / "out").as_posix()
    assert "retimed" in capsys.readouterr().out
    accuracies = lambda r: [x["accuracy"] for x in r.records]  # noqa: E731
    assert accuracies(slow) == accuracies(ours)
    assert slow.summary["clock_s"] > 2 * ours.summary["clock_s"]  # a tenth of the link: mostly transfer
    assert json.loads((pick["slow link", "fedavg"].run_dir(tmp_path / "out") / "config.json").read_text())[
        "fleet"
    ]["link_scale"] == pytest.approx(0.1)
    with pytest.raises(AssertionError, match="must not train"):
        run_cells([pick["slow link", "fedspine"]], tmp_path / "out", reuse=[tmp_path / "out"])
    monkeypatch.undo()
    capsys.readouterr()
    args = ["--config", str(spec), "--seeds", "1", "--no-figures", "--out", str(tmp_path / "out")]
    assert compare_main([*args, "--partial", "--variants", "fedavg"]) == 0
    assert "Runs retimed, not trained" in (tmp_path / "out" / "results.md").read_text()


def test_results_md_says_when_its_runs_came_from_different_code():
    from fedspine.experiments.report import _code_note

    def result(seed, code):
        cell = SimpleNamespace(group="", variant="fedspine", seed=seed)
        return CellResult(cell, [], {} if code is None else {"code": code})

    assert _code_note([result(0, "aaa"), result(1, "aaa"), result(2, None)]) == []
    (note, _) = _code_note([result(0, "aaa"), result(1, "bbb"), result(2, None)])
    assert "2 versions" in note and "`bbb`: fedspine seed 1" in note and "1 older runs" in note


def test_every_variant_of_a_figure_gets_its_own_line():
    from fedspine.experiments.figures import line_styles

    labels = [f"v{i}" for i in range(13)]
    styles = line_styles(labels, reference="v3")
    assert len({(tuple(s["color"]), s["ls"]) for s in styles.values()}) == 13
    assert styles["v3"]["lw"] > styles["v0"]["lw"] and styles["v3"]["zorder"] > styles["v0"]["zorder"]


@pytest.mark.slow
def test_a_fedspine_run_whose_allocation_replays_is_not_trained_again(tmp_path, monkeypatch, capsys):
    """Parameters that, fed a finished run's observations, allocate every arm it did give that
    run (fedspine.fl.replay): copied from --reuse, or kept in place when a default changed."""
    variants = {
        "fedspine": {"strategy.name": "fedspine"},
        "no bound": {"strategy.name": "fedspine", "strategy.params": {"value_confidence": 0.0}},
        "paper": {"strategy.name": "fedspine", "strategy.params": {"objective": "paper"}},
    }
    cells = plan(load_experiment(write_spec(tmp_path, variants)), seeds=1)
    ours, no_bound, paper = (next(c for c in cells if c.variant == v) for v in variants)
    first = tmp_path / "first"
    (done,) = run_cells([ours], first)

    import fedspine.fl.simulator as simulator

    def no_training(*a, **k):
        raise AssertionError("a replayed run must not train")

    monkeypatch.setattr(simulator, "run", no_training)
    (result,) = run_cells([no_bound], tmp_path / "second", reuse=[first])
    assert result.summary["replayed_from"] == ours.run_dir(first).as_posix()
    assert result.summary["strategy_params"]["value_confidence"] == 0.0
    assert result.records == done.records
    with pytest.raises(AssertionError, match="must not train"):  # the paper objective parts at once
        run_cells([paper], tmp_path / "third", reuse=[first])
    assert "allocates differently from round 1; not replayed" in capsys.readouterr().out

    # in place: the run's summary says it ran under an older default (the bound off); it replays
    summary_path = ours.run_dir(first) / "summary.json"
    summary = json.loads(summary_path.read_text())
    older = {**summary["strategy_params"], "value_confidence": 0.0}
    summary_path.write_text(json.dumps({**summary, "strategy_params": older}))
    (kept,) = run_cells([ours], first)
    assert kept.records == done.records and kept.summary["ran_strategy_params"] == older
    assert "replayed" in capsys.readouterr().out
    assert (
        compare_main(
            [
                "--config",
                str(write_spec(tmp_path, variants)),
                "--seeds",
                "1",
                "--no-figures",
                "--out",
                str(tmp_path / "second"),
                "--partial",
                "--variants",
                "no bound",
            ]
        )
        == 0
    )
    assert "Runs replayed, not trained" in (tmp_path / "second" / "results.md").read_text()
