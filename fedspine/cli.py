"""Command line. ``fedspine run --config FILE [section.field=value ...]`` runs a federated
simulation; ``fedspine config show`` prints the effective config of the same arguments;
``fedspine partition`` (same arguments) prints its device partition without training;
``fedspine demo`` shows the allocator alone on a synthetic fleet (numpy only); ``fedspine replay
RUN_DIR strategy.params.x=y`` says whether other strategy parameters would have allocated as a
finished run did (exit 0: the same run; 1: where it parts).
Parsing and dispatch only; the work lives in the library.

A user's mistake (a ``fedspine.config.ConfigError``: a bad field, flag, file or a config the
model and data cannot run) is one line on stderr, ``fedspine: error: ...``, exit code 2, before
anything is written; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

import numpy as np

from fedspine.config import ConfigError, finite, require


def _demo(args: argparse.Namespace) -> int:
    from fedspine.bandit import POLICIES, Allocator, ArmSpace
    from fedspine.bandit.planner import capacity, plan
    from fedspine.bandit.synthetic import SyntheticFleet, fixed_makespans

    need = require
    need(
        args.policy is None or args.policy in POLICIES, "--policy", f"one of {sorted(POLICIES)}", args.policy
    )
    need(args.every >= 1, "--every", ">= 1", args.every)
    need(args.seed >= 0, "--seed", ">= 0", args.seed)
    need(
        finite(args.safe_slack) and args.safe_slack >= 0,
        "--safe-slack",
        "a finite number >= 0",
        args.safe_slack,
    )
    space = ArmSpace.grid([round(0.1 * i, 1) for i in range(8)], [4, 8, 16, 32])
    fleet = SyntheticFleet.paper_mix(args.devices, seed=args.seed)
    alloc = Allocator(
        space,
        policy=args.policy,
        seed=args.seed,
        objective=args.objective,
        safe_slack=None if args.no_safe else args.safe_slack,
    )
    tiers = np.array(fleet.tiers)
    devices = list(range(fleet.n_devices))
    rng = np.random.default_rng(args.seed + 1)
    cap = capacity(space)
    print(
        f"fedspine demo: {fleet.n_devices} devices (tiers {_counts(tiers)}), {len(space)} arms, "
        f"objective {args.objective}, policy {alloc.policy.name}"
        + (f", safe cap {'off' if args.no_safe else args.safe_slack}" if args.objective == "paper" else "")
        + "; device speeds are hidden from the allocator"
    )
    header = f"{'round':>5} {'makespan s':>11} {'capacity':>9}  " + "  ".join(
        f"{t + ' (ratio, rank)':>22}" for t in np.unique(tiers)
    )
    print(header)
    makespans, capacities = [], []
    for rnd in range(1, args.rounds + 1):
        arms = alloc.assign(devices, rnd)
        reports = fleet.run_round([arms[d] for d in devices], space, rng)
        alloc.observe_round(reports)
        makespans.append(max(r.round_time_s for r in reports))
        capacities.append(np.mean([cap[space.index(arms[d])] for d in devices]))
        if rnd == 1 or rnd % args.every == 0 or rnd == args.rounds:
            cols = []
            for t in np.unique(tiers):
                mine = [arms[d] for d in devices if tiers[d] == t]
                cols.append(
                    f"{np.mean([a.ratio for a in mine]):>13.2f}, {np.mean([a.rank for a in mine]):>6.1f}"
                )
            print(
                f"{rnd:>5} {makespans[-1]:>11.2f} {capacities[-1]:>9.2f}  "
                + "  ".join(f"{c:>22}" for c in cols)
            )
    tail = max(1, args.rounds // 3)
    learnt, learnt_cap = float(np.mean(makespans[-tail:])), float(np.mean(capacities[-tail:]))
    ref = plan(fleet.expected_times(space), space)
    ref_makespan = float(fixed_makespans(fleet, space, ref.arms, tail, rng).mean())
    ref_cap = float(cap[ref.arms].mean())
    print(
        f"\nlast {tail} rounds: mean makespan {learnt:.2f} s, capacity {learnt_cap:.2f}; planner that knows "
        f"every speed: {ref_makespan:.2f} s, capacity {ref_cap:.2f} "
        f"(ratios {learnt / ref_makespan:.3f} and {learnt_cap / ref_cap:.3f})"
    )
    per_tier = {str(t): str(space[int(np.bincount(ref.arms[tiers == t]).argmax())]) for t in np.unique(tiers)}
    print("planner's most common arm per tier:", per_tier)
    return 0


def _counts(values: np.ndarray) -> str:
    names, counts = np.unique(values, return_counts=True)
    return ", ".join(f"{n} x{c}" for n, c in zip(names.tolist(), counts.tolist(), strict=True))


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fedspine.config import load_config
    from fedspine.fl.build import check

    if args.resume:  # the run's own config; overrides may not change it
        if args.config or args.overrides or args.check:
            raise ConfigError("--resume takes the run's saved config; drop --config, --check and overrides")
        need = require
        resume = Path(args.resume)
        need(resume.is_dir(), "--resume", "a run folder", args.resume)
        need((resume / "config.json").is_file(), "--resume", "a run folder holding config.json", args.resume)
        cfg = load_config(resume / "config.json")
    else:
        cfg = load_config(args.config, args.overrides)
    check(cfg)
    if args.check:  # what run_in_dir refuses before writing anything, and nothing else
        from fedspine.fl.world import World

        world = World.build(cfg)
        print(
            f"fedspine: ok: {cfg.model.name} ({world.shape.num_layers} layers), {len(world.device_ids)} "
            f"devices, {sum(len(p) for p in world.parts.values())} training examples; nothing written"
        )
        return 0
    from fedspine.fl.checkpoint import CheckpointError
    from fedspine.fl.simulator import default_run_dir, run_in_dir

    run_dir = Path(args.resume) if args.resume else default_run_dir(cfg)
    try:
        result = run_in_dir(cfg, run_dir, resume=bool(args.resume), verbose=True)
    except CheckpointError as exc:  # every generation damaged: name the run and the files, no traceback
        print(f"fedspine: error: cannot resume {run_dir}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary, indent=2, default=float))
    print(f"per-round metrics: {run_dir / 'metrics.jsonl'}")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedspine.config import load_config
    from fedspine.data.partition import format_stats
    from fedspine.fl.build import check
    from fedspine.fl.world import World

    cfg = check(load_config(args.config, args.overrides))  # a user error: one line from main()
    world = World.build(cfg)  # the run's own data and partition (a min_size it cannot meet fails here)
    d = cfg.data
    print(
        f"{d.source}, {cfg.fleet.devices} devices, data.partition={d.partition}, data.alpha={d.alpha}, "
        f"data.min_size={d.min_size}, seed={cfg.seed} (flwr-datasets partitioners, fedspine.data.partition)"
    )
    print(format_stats(world.partition_stats, label_names=world.data.label_names, max_devices=args.rows))
    return 0


def _config_show(args: argparse.Namespace) -> int:
    from fedspine.config import load_config, to_yaml
    from fedspine.fl.build import effective
    from fedspine.fl.strategies import STRATEGIES

    cfg = effective(load_config(args.config, args.overrides))  # refused as `fedspine run` refuses
    print(to_yaml(cfg), end="")
    if cfg.strategy.aggregation is None:
        rule = STRATEGIES[cfg.strategy.name].aggregation
        print(f"# strategy.aggregation null: the rule of strategy {cfg.strategy.name!r}, {rule!r}")
    return 0


def _sections() -> str:
    """The run config's sections and their fields, from the dataclasses (``run --help``)."""
    from fedspine.config import field_defaults

    sections: dict[str, list[str]] = {}
    for name in field_defaults():
        section, _, leaf = name.rpartition(".")
        sections.setdefault(section or "(top level)", []).append(leaf)
    width = max(map(len, sections)) + 2
    lines = ["config sections and their fields (section.field=value; `fedspine config show` prints all):"]
    for section, names in sections.items():
        body = textwrap.wrap(", ".join(names), 96 - width)
        lines += [f"  {section:<{width}}{body[0]}", *(f"  {'':<{width}}{line}" for line in body[1:])]
    lines.append("  strategy.params are the strategy's typed fields (FedSpineParams, FixedPruneParams, ...)")
    return "\n".join(lines)


def _replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedspine.config import load_config
    from fedspine.fl.replay import ReplayError, first_divergence
    from fedspine.logging import read_metrics

    run_dir = Path(args.run_dir)
    need = require
    need((run_dir / "config.json").is_file(), "RUN_DIR", "a run folder holding config.json", args.run_dir)
    need((run_dir / "metrics.jsonl").is_file(), "RUN_DIR", "a run folder holding metrics.jsonl", args.run_dir)
    need(len(args.overrides) > 0, "overrides", "at least one strategy.params.field=value", args.overrides)
    ran = load_config(run_dir / "config.json")
    target = load_config(run_dir / "config.json", args.overrides)
    records = read_metrics(run_dir)
    try:
        parts = first_divergence(records, ran, target)
    except ReplayError as exc:
        raise ConfigError(str(exc)) from None
    change = " ".join(args.overrides)
    if parts is None:
        print(f"fedspine: {change}: the same allocation in all {len(records)} rounds, so the same run")
        return 0
    print(f"fedspine: {change}: other arms from round {parts} of {len(records)}; the run differs from there")
    return 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedspine", description="Federated prune-and-tune on heterogeneous devices."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="the bandit allocator on a synthetic heterogeneous fleet (numpy only, seconds)",
        parents=[common],
    )
    demo.add_argument(
        "--devices", type=int, default=80, help="fleet size, split 30:40:10 like the paper's testbed"
    )
    demo.add_argument("--rounds", type=int, default=30)
    demo.add_argument("--objective", default="deadline", choices=["deadline", "paper"])
    demo.add_argument("--policy", default=None, help="default: pooled-ucb (deadline) or s-ucb (paper)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--safe-slack", type=float, default=0.05, help="objective paper: the safe cap's slack")
    demo.add_argument("--no-safe", action="store_true", help="objective paper: per-device bandits only")
    demo.add_argument("--every", type=int, default=10, help="print every N rounds")
    demo.set_defaults(func=_demo)
    run = sub.add_parser(
        "run",
        help="a federated simulation from a YAML/TOML config plus overrides",
        epilog=_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    _config_arguments(run)
    run.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    run.add_argument(
        "--check",
        action="store_true",
        help="check the config, the model's shape and the data against the fleet, then stop (writes nothing)",
    )
    run.set_defaults(func=_run)
    part = sub.add_parser(
        "partition", help="a config's device partition: sizes, label counts, label entropy (no training)"
    )
    _config_arguments(part)
    part.add_argument("--rows", type=int, default=None, help="show at most this many devices (default: all)")
    part.set_defaults(func=_partition)
    config = sub.add_parser("config", help="the effective config: config show --config FILE [overrides]")
    show = config.add_subparsers(dest="action", required=True).add_parser(
        "show",
        help="print the full effective config as YAML, every default included",
        epilog=_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    _config_arguments(show)
    show.set_defaults(func=_config_show)
    replay = sub.add_parser(
        "replay",
        help="would other strategy parameters have allocated as a finished run did? (no training)",
        parents=[common],
    )
    replay.add_argument("run_dir", metavar="RUN_DIR", help="a run's folder (config.json, metrics.jsonl)")
    replay.add_argument("overrides", nargs="*", help="strategy.params.field=value (what to change)")
    replay.set_defaults(func=_replay)
    sub.add_parser(
        "flower",
        help="the same run on Flower: fedspine flower sim|deploy --config FILE [overrides]",
        add_help=False,
    )
    return ap


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="YAML or TOML file (default: built-in tiny smoke settings)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="section.field=value, e.g. strategy.name=hetlora train.rounds=5"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flower"]:  # its own parser, in fedspine.flower (imports flwr only when used)
        from fedspine.flower.__main__ import main as flower_main

        return int(flower_main(argv[1:]) or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after a flag (``run a=1 --check b=2``): argparse takes one run of them only
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        for flag in ("devices", "rounds"):  # demo's sizes
            require(getattr(args, flag, 1) >= 1, f"--{flag}", ">= 1", getattr(args, flag, 1))
        return int(args.func(args))
    except (ConfigError, OSError) as exc:  # the user's input, or a folder the run cannot write
        if getattr(args, "debug", False):
            raise
        print(f"fedspine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
