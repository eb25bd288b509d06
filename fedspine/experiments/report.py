"""Tables and the results page of an experiment: per group one row per variant, over seeds;
``results.md`` (+ figures) and ``results.json`` under the output folder."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedspine.experiments.figures import make_figures, sweep_figure
from fedspine.experiments.runner import CellResult
from fedspine.experiments.spec import Cell, Experiment, Sweep
from fedspine.fl.simulator import SUSTAIN_WINDOW, time_to_target


@dataclass(frozen=True)
class Row:
    """One variant of one group, over seeds."""

    variant: str
    seeds: int
    final_accuracy: tuple[float, float]  # mean, std
    best_accuracy: float
    device_accuracy: float | None  # each device's own pruned model, final round (eval.devices)
    time_to_target_s: float | None  # mean over the seeds that reached it
    reached: int
    speedup: str  # reference's speed-up over this variant, time to target
    sustained_time_s: float | None  # mean over the seeds that reached it, SUSTAIN_WINDOW evaluations
    sustained_reached: int
    sustained_speedup: str  # the same speed-up on the sustained time to target
    final_gap: str  # reference's final accuracy minus this variant's, points, paired by seed
    device_gap: str  # the same on the device models' accuracy (eval.devices)
    equal_time_gap: str  # the same on the global model at the earlier of the two runs' end times
    time_per_round_s: float
    sparsity: float
    megabytes: float
    waiting_s: float
    deployed_mparams: float | None


def rows(results: Sequence[CellResult], reference: str) -> dict[str, list[Row]]:
    """Per group, one row per variant (in spec order)."""
    out: dict[str, list[Row]] = {}
    groups = list(dict.fromkeys(r.cell.group for r in results))
    for g in groups:
        mine = [r for r in results if r.cell.group == g]
        by_variant = {
            v: [r for r in mine if r.cell.variant == v] for v in dict.fromkeys(r.cell.variant for r in mine)
        }
        ref = {r.cell.seed: r for r in by_variant.get(reference, [])}
        table = [_row(v, rs, ref, v == reference) for v, rs in by_variant.items()]
        best = best_of(table, prefix="fixed-prune")
        if best is not None:
            table.append(_row(f"best fixed-prune ({best})", by_variant[best], ref, False))
        out[g] = table
    return out


def best_of(table: Sequence[Row], prefix: str, *, sustained: bool = False) -> str | None:
    """The strongest of a static baseline's sweep (variants named ``prefix...``; at least two):
    reached the target on the most seeds, then sooner, then more accurate, on the first crossing
    or (``sustained``) on the sustained time. Chosen on the same seeds it is compared on, which
    favours the baseline."""
    sweep = [r for r in table if r.variant.startswith(prefix)]
    if len(sweep) < 2:
        return None

    def key(r: Row) -> tuple[float, float, float]:
        reached, t = (
            (r.sustained_reached, r.sustained_time_s) if sustained else (r.reached, r.time_to_target_s)
        )
        return -reached, t or math.inf, -r.final_accuracy[0]

    return min(sweep, key=key).variant


def _row(variant: str, rs: list[CellResult], ref: Mapping[int, CellResult], is_ref: bool) -> Row:
    s = [r.summary for r in rs]
    finals = np.array([x["final_accuracy"] for x in s if x.get("final_accuracy") is not None], dtype=float)
    tta = [x["time_to_target_s"] for x in s if x.get("time_to_target_s") is not None]
    dev = [d for d in map(device_accuracy, rs) if d is not None]
    deployed = [x["deployed_params_mean"] for x in s if x.get("deployed_params_mean") is not None]
    sustained = [t for t in (sustained_time(r) for r in rs) if t is not None]
    return Row(
        variant=variant,
        seeds=len(rs),
        final_accuracy=(float(finals.mean()), float(finals.std())) if finals.size else (math.nan, math.nan),
        best_accuracy=float(
            np.mean([x["best_accuracy"] for x in s if x.get("best_accuracy") is not None] or [math.nan])
        ),
        device_accuracy=float(np.mean(dev)) if dev else None,
        time_to_target_s=float(np.mean(tta)) if tta else None,
        reached=len(tta),
        speedup="(reference)" if is_ref else speedup(rs, ref),
        sustained_time_s=float(np.mean(sustained)) if sustained else None,
        sustained_reached=len(sustained),
        sustained_speedup="(reference)" if is_ref else speedup(rs, ref, metric=sustained_time),
        final_gap="(reference)" if is_ref else accuracy_gap(rs, ref, final_accuracy),
        device_gap="(reference)" if is_ref else accuracy_gap(rs, ref, device_accuracy),
        equal_time_gap="(reference)" if is_ref else equal_time_gap(rs, ref),
        time_per_round_s=float(np.mean([x["clock_s"] / max(1, x["rounds"]) for x in s])),
        sparsity=float(np.mean([x.get("final_mean_sparsity") or 0.0 for x in s])),
        megabytes=float(np.mean([x["bytes_total"] for x in s])) / 1e6,
        waiting_s=float(np.mean([x["mean_waiting_s"] for x in s])),
        deployed_mparams=float(np.mean(deployed)) / 1e6 if deployed else None,
    )


def first_crossing(result: CellResult) -> float | None:
    """The run's time to target: the first evaluation at or above it."""
    return result.summary.get("time_to_target_s")


def sustained_time(result: CellResult) -> float | None:
    """The run's sustained time to target, from its records (so runs written before the summary
    had it count too): the mean of ``SUSTAIN_WINDOW`` evaluations reaches the target."""
    return time_to_target(result.records, result.cell.cfg.eval.target_accuracy, SUSTAIN_WINDOW)


def paired_ratios(
    baseline: Sequence[CellResult],
    reference: Mapping[int, CellResult],
    metric: Callable[[CellResult], float | None] = first_crossing,
) -> tuple[list[float], bool, int]:
    """Per seed, the baseline's time to target over the reference's: (ratios, whether any is a
    lower bound, seeds left out because the reference never reached the target). A seed where
    only the baseline never reached it counts its whole simulated time (a lower bound)."""
    ratios, bound, missing = [], False, 0
    for b in baseline:
        r = reference.get(b.cell.seed)
        t_ref = None if r is None else metric(r)
        if t_ref is None:
            missing += 1
            continue
        t_b = metric(b)
        if t_b is None:
            t_b, bound = b.summary["clock_s"], True
        ratios.append(t_b / t_ref)
    return ratios, bound, missing


def speedup(
    baseline: Sequence[CellResult],
    reference: Mapping[int, CellResult],
    metric: Callable[[CellResult], float | None] = first_crossing,
) -> str:
    """Reference's time-to-target speed-up over ``baseline``, seed by seed (paired), averaged;
    with two or more seeds also the 95% bootstrap interval of that mean and every seed's ratio.
    ``metric`` reads a run's time to target (the first crossing unless told otherwise); ">"
    marks a lower bound and seeds the reference never reached are counted in a note
    (``paired_ratios``)."""
    ratios, bound, missing = paired_ratios(baseline, reference, metric)
    if not ratios:
        return "n/a (reference never reached the target)"
    text = ">" * bound + _mean_and_interval(ratios, ".2f", unit="x")
    if len(ratios) > 1:
        text += f" ({', '.join(f'{x:.2f}' for x in ratios)})"
    if missing:
        text += f" ({len(ratios)} of {len(ratios) + missing} seeds)"
    return text


@dataclass
class SweepPoint:
    """One variant at one point of a sweep (``Experiment.sweeps``), on the sustained time."""

    group: str
    value: float
    label: str  # the variant, or "best fixed-prune" for the fixed-prune sweep's best arm there
    variant: str
    time_s: float | None  # mean sustained time to target over the seeds that reached it
    reached: int
    seeds: int
    speedup: float | None  # reference's mean paired speed-up over it (None for the reference)
    interval: tuple[float, float] | None
    lower_bound: bool


def sweep_points(exp: Experiment, results: Sequence[CellResult], sweep: Sweep) -> list[SweepPoint]:
    """Every variant along ``sweep``, a fixed-prune sweep replaced by its best arm at each point
    (``best_of`` on the sustained time, the reading reported here: chosen per point, which
    favours the baseline)."""
    tables = rows(results, exp.reference)
    out = []
    for group, value in sorted(exp.sweep_points(sweep).items(), key=lambda kv: kv[1]):
        mine = [r for r in results if r.cell.group == group]
        if not mine:
            continue
        ref = {r.cell.seed: r for r in mine if r.cell.variant == exp.reference}
        best = best_of(tables.get(group, []), prefix="fixed-prune", sustained=True)
        shown = [v for v in exp.variants if not v.startswith("fixed-prune")] + ([best] if best else [])
        for v in shown:
            rs = [r for r in mine if r.cell.variant == v]
            if not rs:
                continue
            times = [t for t in (sustained_time(r) for r in rs) if t is not None]
            label = "best fixed-prune" if v == best else v
            is_ref = v == exp.reference
            ratios, bound, _ = ([], False, 0) if is_ref else paired_ratios(rs, ref, sustained_time)
            out.append(
                SweepPoint(
                    group,
                    value,
                    label,
                    v,
                    float(np.mean(times)) if times else None,
                    len(times),
                    len(rs),
                    float(np.mean(ratios)) if ratios else None,
                    bootstrap_interval(ratios) if len(ratios) > 1 else None,
                    bound,
                )
            )
    return out


def format_sweep(exp: Experiment, points: Sequence[SweepPoint], sweep: Sweep) -> str:
    """A markdown table: one row per sweep value, the reference's sustained time and its
    sustained speed-up over every other variant."""
    values = list(dict.fromkeys(p.value for p in points))
    others = list(dict.fromkeys(p.label for p in points if p.label != exp.reference))
    head = [sweep.label, f"{exp.reference}: sustained time (s, sim.)"] + [f"over {v}" for v in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in values:
        at = {p.label: p for p in points if p.value == x}
        cells = [f"{x:g}", _sweep_time(at.get(exp.reference))]
        for v in others:
            p = at.get(v)
            if p is None or p.speedup is None:
                cells.append("–")
                continue
            text = ">" * p.lower_bound + f"{p.speedup:.2f}x"
            if p.interval is not None:
                text += f" [{p.interval[0]:.2f}, {p.interval[1]:.2f}]"
            if p.label != p.variant:
                text += f" ({p.variant})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sweep_time(p: SweepPoint | None) -> str:
    if p is None or p.time_s is None:
        return "–" if p is None else f"never ({p.seeds} seeds)"
    note = f" ({p.reached}/{p.seeds} seeds)" if p.reached < p.seeds else ""
    return f"{p.time_s:.1f}{note}"


def final_accuracy(result: CellResult) -> float | None:
    return result.summary.get("final_accuracy")


def device_accuracy(result: CellResult) -> float | None:
    """The mean accuracy of the devices' own pruned models after the last round."""
    return result.records[-1].get("device_accuracy_mean") if result.records else None


def accuracy_gap(
    baseline: Sequence[CellResult],
    reference: Mapping[int, CellResult],
    metric: Callable[[CellResult], float | None],
) -> str:
    """Reference's accuracy minus the baseline's, in points, seed by seed (paired: same
    partition, fleet and jitter), averaged; with two or more pairs also the 95% bootstrap
    interval of that mean. Positive: the reference is more accurate. A paired difference is
    far less noisy than two means side by side, whose seed spreads overlap."""
    gaps = []
    for b in baseline:
        r = reference.get(b.cell.seed)
        a_ref, a_b = (None, None) if r is None else (metric(r), metric(b))
        if a_ref is not None and a_b is not None:
            gaps.append(100.0 * (a_ref - a_b))
    return _gap_text(gaps, len(baseline))


def _gap_text(gaps: Sequence[float], seeds: int) -> str:
    if not gaps:
        return "–"
    text = _mean_and_interval(gaps, "+.1f")
    if len(gaps) < seeds:
        text += f" ({len(gaps)} of {seeds} seeds)"
    return text


def accuracy_at(result: CellResult, clock_s: float) -> float | None:
    """The global model's accuracy at the last evaluation at or before ``clock_s`` (simulated)."""
    seen = [
        r["accuracy"]
        for r in result.records
        if r.get("accuracy") is not None and r.get("clock_s", math.inf) <= clock_s
    ]
    return seen[-1] if seen else None


def equal_time_gap(baseline: Sequence[CellResult], reference: Mapping[int, CellResult]) -> str:
    """Reference's accuracy minus the baseline's at the same simulated time (ours): per seed,
    the earlier of the two runs' end clocks, which both reached, so a run with shorter rounds
    is compared with the other where both stood then, not after more rounds than it had. The
    round budget favours the run with the longer rounds; this cut favours neither."""
    gaps = []
    for b in baseline:
        r = reference.get(b.cell.seed)
        if r is None:
            continue
        t = min(r.summary["clock_s"], b.summary["clock_s"])
        a_ref, a_b = accuracy_at(r, t), accuracy_at(b, t)
        if a_ref is not None and a_b is not None:
            gaps.append(100.0 * (a_ref - a_b))
    return _gap_text(gaps, len(baseline))


def _mean_and_interval(values: Sequence[float], fmt: str, unit: str = "") -> str:
    """``mean<unit>``, and with two or more values `` [lo, hi]``, the 95% bootstrap interval."""
    text = format(float(np.mean(values)), fmt) + unit
    if len(values) > 1:
        lo, hi = bootstrap_interval(values)
        text += f" [{format(lo, fmt)}, {format(hi, fmt)}]"
    return text


def bootstrap_interval(
    values: Sequence[float], draws: int = 10_000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the paired seeds; fixed RNG, so a
    table is reproducible). With 3 seeds it is coarse: it can only span the seeds' own range."""
    v = np.asarray(values, dtype=float)
    idx = np.random.default_rng(0).integers(0, v.size, size=(draws, v.size))
    means = v[idx].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def format_table(table: Sequence[Row], *, target: float | None) -> str:
    tgt = f"{target:.2f}" if target is not None else "target"
    head = [
        "variant",
        "final acc (mean ± std)",
        "best acc",
        "device acc",
        "final acc: reference − row (points)",
        "device acc: reference − row (points)",
        "acc at equal time: reference − row (points)",
        f"time to {tgt} (s, sim.)",
        "speed-up of reference",
        f"sustained time to {tgt} (s, sim.)",
        "sustained speed-up",
        "time/round (s, sim.)",
        "sparsity",
        "MB sent",
        "waiting/round (s)",
        "deployed params (M)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def reached(t: float | None, k: int, n: int) -> str:
        return "not reached" if t is None else f"{t:.1f}" + (f" ({k}/{n} seeds)" if k < n else "")

    for r in table:
        tta = reached(r.time_to_target_s, r.reached, r.seeds)
        cells = [
            r.variant,
            f"{r.final_accuracy[0]:.3f} ± {r.final_accuracy[1]:.3f}"
            if r.seeds > 1
            else f"{r.final_accuracy[0]:.3f}",
            f"{r.best_accuracy:.3f}",
            "–" if r.device_accuracy is None else f"{r.device_accuracy:.3f}",
            r.final_gap,
            r.device_gap,
            r.equal_time_gap,
            tta,
            r.speedup,
            reached(r.sustained_time_s, r.sustained_reached, r.seeds),
            r.sustained_speedup,
            f"{r.time_per_round_s:.2f}",
            f"{r.sparsity:.2f}",
            f"{r.megabytes:.1f}",
            f"{r.waiting_s:.2f}",
            "–" if r.deployed_mparams is None else f"{r.deployed_mparams:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arms_per_tier(results: Sequence[CellResult], strategy: str = "fedspine") -> str | None:
    """Mean pruning ratio / LoRA rank per device tier after warm-up, one row per run of a
    ``strategy`` variant (the arms it chose), and whether the ratios fall from the slowest tier to
    the fastest. Warm-up is the first third of the rounds (ours: the allocator has seen every
    device's times by then). Each run's tiers are ranked slowest first by their mean round time in
    its first round, where every device runs the allocator's start arm (on a fleet whose tiers are
    equally fast that ranking, and so *ordered*, is arbitrary); the columns keep the first run's
    order. None when no such run has per-round arms."""
    lines: list[str] = []
    columns: list[str] = []
    grouped = any(r.cell.group for r in results)
    for r in results:
        if r.cell.cfg.strategy.name != strategy:
            continue
        rounds = [x for x in r.records if x.get("arms") and x.get("tiers")]
        after = rounds[len(rounds) // 3 :]
        if not after:
            continue
        ratio: dict[str, list[float]] = {}
        rank: dict[str, list[float]] = {}
        for rec in after:
            for device, (p, k) in rec["arms"].items():
                tier = rec["tiers"][device]
                ratio.setdefault(tier, []).append(p)
                rank.setdefault(tier, []).append(k)
        first = rounds[0]
        slow: dict[str, list[float]] = {}
        for device, t in first.get("round_time_s", {}).items():
            slow.setdefault(first["tiers"][device], []).append(t)
        tiers = sorted(ratio, key=lambda t: -float(np.mean(slow.get(t, [0.0]))))
        means = [float(np.mean(ratio[t])) for t in tiers]
        ordered = all(a >= b for a, b in zip(means[:-1], means[1:], strict=True)) and means[0] > means[-1]
        if not lines:
            columns = tiers
            lines = [
                f"Arms per tier after warm-up (rounds {len(rounds) - len(after) + 1}-{len(rounds)}; "
                "mean ratio / mean rank; *ordered*: the slowest tier prunes most and the fastest least):",
                "",
                "| " + "group | " * grouped + "variant | seed | " + " | ".join(columns) + " | ordered |",
                "|" + "---|" * (len(columns) + 3 + grouped),
            ]
        cells = [f"{np.mean(ratio[t]):.2f} / {np.mean(rank[t]):.1f}" if t in ratio else "–" for t in columns]
        lines.append(
            "| "
            + f"{r.cell.group} | " * grouped
            + f"{r.cell.variant} | {r.cell.seed} | "
            + " | ".join(cells)
            + f" | {'yes' if ordered else 'no'} |"
        )
    return "\n".join(lines) if lines else None


def environment() -> dict[str, str]:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "torch_pruning", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    env["cpus"] = str(os.cpu_count())
    from fedspine.fl.placement import cpu_has_bf16

    env["cpu bf16"] = "yes" if cpu_has_bf16() else "no (train.precision auto = fp32)"
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return env


# Runs a page holds that were not trained for it: the summary key naming where they came from,
# and what results.md says of them.
_BORROWED = {
    "reused_from": "Runs copied from an identical config that had already finished (`--reuse`): ",
    "retimed_from": (
        "Runs retimed, not trained (`fedspine.fl.retime`): a strategy that never reads the clock "
        "learns the same on a fleet that differs only in device speed, so these are the named "
        "run's records with the round times of this fleet: "
    ),
    "replayed_from": (
        "Runs replayed, not trained (`fedspine.fl.replay`): fed the named run's observations, "
        "this row's strategy parameters assign every device the same arm in every round, so "
        "these are that run's records: "
    ),
}


def write_results(
    exp: Experiment,
    results: Sequence[CellResult],
    out: str | Path,
    *,
    command: str,
    size: str,
    figures: bool = True,
    missing: Sequence[Cell] = (),
) -> Path:
    """``results.md`` (+ PNG figures) under ``out``; returns the markdown path. ``missing`` lists
    planned runs that have not run (a partial table says so at the top)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = results[0].cell.cfg.eval.target_accuracy if results else None
    tables = rows(results, exp.reference)
    figs = make_figures(exp, results, out) if figures else {}
    env = environment()
    wall = sum(r.summary.get("wall_s", 0.0) for r in results if not any(r.summary.get(k) for k in _BORROWED))
    seed_ids = sorted({r.cell.seed for r in results})
    seeds = f"{len(seed_ids)} seed(s)"
    if seed_ids != list(range(len(seed_ids))):  # not 0..n-1 (a confirmation on fresh seeds): name them
        seeds += f" ({', '.join(map(str, seed_ids))})"
    md = [f"# {exp.title}", ""]
    if exp.about:
        md += [exp.about, ""]
    md += [
        f"Reproduce: `{command}`",
        "",
        f"Size `{size}`, {seeds}, {len(results)} runs, {wall / 60:.1f} min of wall time in all. "
        f"Spec: `{exp.source}`. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "Columns: *final acc* is the global model's test accuracy after the last round; *device acc* "
        "the mean over devices of each device's own pruned model (when `eval.devices` is on); "
        "*reference − row* is the reference's accuracy minus the row's in points, seed by seed, "
        "averaged, with a 95% bootstrap interval over the paired seeds (positive: the reference is "
        "more accurate); *at equal time*: the same on the global model at the earlier of the two "
        "runs' simulated end times (the last evaluation by then); times are "
        "simulated seconds from the device time model; *speed-up of reference* is "
        f"`{exp.reference}`'s time-to-target advantage over the row, seed by seed, averaged, with a 95% "
        'bootstrap interval over the paired seeds and each seed\'s ratio when there are several (">" = '
        "the row never reached the target, so the ratio is a lower bound); *sustained*: the same on the "
        f"first evaluation where the mean of the last {SUSTAIN_WINDOW} evaluations reaches the target, a "
        "less noisy measure than the first crossing; *best fixed-prune* repeats "
        "the fastest ratio of a fixed-prune sweep, chosen on the same seeds; *waiting* is the mean "
        "idle time per device per round (makespan minus its own time); *sparsity* is the mean "
        "achieved pruning ratio.",
        "",
    ]
    if missing:
        md += [
            f"**Partial results:** {len(missing)} planned run(s) have not run yet and are not in the tables: "
            + "; ".join(_cell_name(c) for c in missing)
            + ".",
            "",
        ]
    for key, what in _BORROWED.items():
        named = [r for r in results if r.summary.get(key)]
        if named:
            runs = "; ".join(f"{_cell_name(r.cell)} from `{r.summary[key]}`" for r in named)
            md += [f"{what}{runs}.", ""]
    md += _precision_note(results)
    md += _code_note(results)
    for g, table in tables.items():
        if g:
            md += [f"## {g}", ""]
        md += [format_table(table, target=target), ""]
        for kind, path in figs.get(g, {}).items():
            md += [f"![{kind}]({path.relative_to(out).as_posix()})", ""]
    for kind, path in figs.get("*", {}).items():
        md += [f"![{kind}]({path.relative_to(out).as_posix()})", ""]
    for sweep in exp.sweeps:
        points = sweep_points(exp, results, sweep)
        if not points:
            continue
        md += [
            f"## Along {sweep.label} (`{sweep.field}`)",
            "",
            f"`{exp.reference}`'s sustained time to target and its paired sustained speed-up over each "
            "variant (mean over seeds, 95% bootstrap interval; > = a lower bound), at every point of the "
            "sweep; the fixed-prune sweep is represented by its best ratio at each point.",
            "",
            format_sweep(exp, points, sweep),
            "",
        ]
        if figures:
            fig = sweep_figure(exp.reference, points, sweep, out / "figures")
            md += [f"![along {sweep.field}]({fig.relative_to(out).as_posix()})", ""]
    tiers = arms_per_tier(results)
    if tiers:
        md += [tiers, ""]
    path = out / "results.md"
    path.write_text("\n".join(md))
    (out / "results.json").write_text(
        json.dumps(
            {
                "experiment": exp.name,
                "size": size,
                "command": command,
                "environment": env,
                "missing": [_cell_name(c) for c in missing],
                "runs": [
                    {
                        "group": r.cell.group,
                        "variant": r.cell.variant,
                        "seed": r.cell.seed,
                        "summary": r.summary,
                    }
                    for r in results
                ],
            },
            indent=2,
            default=float,
        )
    )
    return path


def _precision_note(results: Sequence[CellResult]) -> list[str]:
    """A warning when the runs did not all compute in one precision (``train.precision: auto``
    resolves per machine). Runs from before the summary recorded it are listed apart: unknown is
    not the same as different."""
    by: dict[str, list[str]] = {}
    unrecorded: list[str] = []
    for r in results:
        name = _cell_name(r.cell)
        if "precision" in r.summary:
            by.setdefault(r.summary["precision"], []).append(name)
        else:
            unrecorded.append(name)
    note = []
    if len(by) > 1:
        parts = "; ".join(f"{p}: {', '.join(names)}" for p, names in sorted(by.items()))
        note.append(f"**Mixed precision:** these runs did not all compute in one precision ({parts}).")
    if unrecorded and by:
        known = " / ".join(sorted(by))
        note.append(
            f"**Precision not recorded** for {', '.join(unrecorded)} (finished before runs recorded it); "
            f"the others computed in {known}."
        )
    return [*note, ""] if note else []


def _code_note(results: Sequence[CellResult]) -> list[str]:
    """Which fedspine source each run came from (``fedspine.provenance``), when the runs that
    recorded it did not all come from the same; runs from before the record are counted apart."""
    by: dict[str, list[str]] = {}
    unrecorded = 0
    for r in results:
        code = r.summary.get("code")
        if code is None:
            unrecorded += 1
        else:
            by.setdefault(code, []).append(_cell_name(r.cell))
    if len(by) < 2:
        return []
    parts = "; ".join(f"`{code}`: {', '.join(names)}" for code, names in sorted(by.items()))
    older = f"; {unrecorded} older runs did not record it" if unrecorded else ""
    return [f"**Code:** these runs came from {len(by)} versions of the fedspine source ({parts}{older}).", ""]


def _cell_name(cell: Cell) -> str:
    return " ".join(x for x in (cell.group, cell.variant, f"seed {cell.seed}") if x)


__all__ = [
    "Row",
    "best_of",
    "bootstrap_interval",
    "environment",
    "format_table",
    "rows",
    "speedup",
    "write_results",
]
