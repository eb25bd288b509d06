"""Experiments: run every variant (strategy or ablation) of one spec on the same fleet, data
partition and budget, over seeds, and turn the runs into tables and figures.

A spec is a YAML file with two sections: ``run`` (an ordinary run config, the shared budget) and
``experiment`` (what varies)::

    experiment:
      name: main
      title: FedSpine vs baselines
      about: one paragraph on what the experiment shows
      reference: fedspine            # speed-ups are this variant's, over every other one
      seeds: 3
      variants:                      # label -> overrides of the run config
        fedspine: {strategy.name: fedspine}
        hetlora: {strategy.name: hetlora}
      groups:                        # optional sweep: every variant runs in every group
        alpha=0.1: {data.alpha: 0.1}
        sparsity=0.4:                # what differs per variant goes under per_variant
          per_variant: {fixed-prune: {strategy.params: {ratio: 0.4}}}
      sizes:                         # named overrides; "full" is the run config as written
        smoke: {model.name: tiny-bert, data.source: synthetic}

Each run writes its own run directory (metrics.jsonl, summary.json, checkpoint), so a killed
comparison resumes where it stopped and a finished run is never repeated. Same seed across
variants means the same partition, fleet and jitter stream: the only difference is the variant.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedspine.config import RunConfig, config_from_mapping

FULL = "full"


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    about: str
    run: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    reference: str
    seeds: int = 1
    groups: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    def size_names(self) -> list[str]:
        return [FULL, *sorted(self.sizes)]

    def config(self, *, size: str, group: str, variant: str, seed: int) -> RunConfig:
        """The run config of one cell: run section < size < group < variant < the group's
        ``per_variant`` entry for it < seed."""
        shared = dict(self.groups[group])
        per_variant = shared.pop("per_variant", None) or {}
        overrides = {
            **self.sizes.get(size, {}),
            **shared,
            **self.variants[variant],
            **(per_variant.get(variant) or {}),
        }
        overrides["seed"] = seed
        return config_from_mapping(self.run, overrides)


@dataclass(frozen=True)
class Cell:
    group: str
    variant: str
    seed: int
    cfg: RunConfig

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / (_slug(self.group) or "all") / _slug(self.variant) / f"seed{self.seed}"


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate a spec: every cell's run config is built (and so validated) here,
    before any work starts; errors say which variant/group/size broke which field."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"experiment file {str(p)!r} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) != {"experiment", "run"}:
        raise ValueError(f"{p}: an experiment file has exactly two sections, 'experiment' and 'run'")
    e = dict(raw["experiment"])
    allowed = {"name", "title", "about", "reference", "seeds", "variants", "groups", "sizes"}
    unknown = sorted(set(e) - allowed)
    if unknown:
        raise ValueError(f"{p}: unknown experiment field(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("name", "variants", "reference"):
        if key not in e:
            raise ValueError(f"{p}: experiment.{key} is required")
    variants = _overrides_table(e["variants"], f"{p}: experiment.variants")
    if e["reference"] not in variants:
        raise ValueError(
            f"{p}: experiment.reference must be one of {sorted(variants)}, got {e['reference']!r}"
        )
    exp = Experiment(
        name=str(e["name"]),
        title=str(e.get("title", e["name"])),
        about=str(e.get("about", "")).strip(),
        run=dict(raw["run"] or {}),
        variants=variants,
        reference=str(e["reference"]),
        seeds=int(e.get("seeds", 1)),
        groups=_overrides_table(e.get("groups") or {"": {}}, f"{p}: experiment.groups"),
        sizes=_overrides_table(e.get("sizes") or {}, f"{p}: experiment.sizes", allow_empty=True),
        source=str(p),
    )
    if exp.seeds < 1:
        raise ValueError(f"{p}: experiment.seeds must be >= 1, got {exp.seeds}")
    for group, overrides in exp.groups.items():
        extra = sorted(set(overrides.get("per_variant") or {}) - set(exp.variants))
        if extra:
            raise ValueError(
                f"{p}: experiment.groups.{group}.per_variant names {extra}, which are not variants; "
                f"have {sorted(exp.variants)}"
            )
    for size in exp.size_names():
        for group in exp.groups:
            for variant in exp.variants:
                try:
                    exp.config(size=size, group=group, variant=variant, seed=0)
                except ValueError as exc:
                    where = (
                        f"size {size!r}, group {group!r}, variant {variant!r}"
                        if group
                        else f"size {size!r}, variant {variant!r}"
                    )
                    raise ValueError(f"{p}: {where}: {exc}") from None
    return exp


def _overrides_table(raw: Any, where: str, *, allow_empty: bool = False) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not (raw or allow_empty):
        raise ValueError(f"{where} must be a non-empty mapping of label -> overrides")
    out = {}
    for label, overrides in raw.items():
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}.{label} must map 'section.field' to a value, got {overrides!r}")
        out[str(label)] = dict(overrides)
    return out


def plan(exp: Experiment, *, size: str = FULL, seeds: int | None = None) -> list[Cell]:
    if size not in exp.size_names():
        raise ValueError(f"size must be one of {exp.size_names()}, got {size!r}")
    n = exp.seeds if seeds is None else seeds
    if n < 1:
        raise ValueError(f"seeds must be >= 1, got {n}")
    return [
        Cell(g, v, s, exp.config(size=size, group=g, variant=v, seed=s))
        for g in exp.groups
        for s in range(n)
        for v in exp.variants
    ]


@dataclass
class CellResult:
    cell: Cell
    records: list[dict[str, Any]]
    summary: dict[str, Any]


def finished_runs(roots: Sequence[str | Path]) -> dict[str, Path]:
    """Finished run directories under ``roots``, keyed by their exact config (canonical JSON)."""
    found: dict[str, Path] = {}
    for root in roots:
        for cfg_path in sorted(Path(root).rglob("config.json")):
            if (cfg_path.parent / "summary.json").exists() and (cfg_path.parent / "metrics.jsonl").exists():
                found.setdefault(_config_key(_read_json(cfg_path)), cfg_path.parent)
    return found


def _config_key(cfg: Any) -> str:
    return json.dumps(cfg, sort_keys=True)


def _wanted(cell: Cell) -> dict[str, Any]:
    return json.loads(json.dumps(cell.cfg.to_dict()))


def _is_finished(cell: Cell, out: Path) -> bool:
    run_dir = cell.run_dir(out)
    return (run_dir / "summary.json").exists() and _read_json(run_dir / "config.json") == _wanted(cell)


def read_finished(cells: Sequence[Cell], out: str | Path) -> tuple[list[CellResult], list[Cell]]:
    """The cells already finished under ``out`` (read back, nothing run) and the missing ones."""
    out = Path(out)
    done = [c for c in cells if _is_finished(c, out)]
    return [_read_back(c, c.run_dir(out)) for c in done], [c for c in cells if c not in done]


def _read_back(cell: Cell, run_dir: Path) -> CellResult:
    from fedspine.logging import read_metrics

    return CellResult(cell, read_metrics(run_dir), _read_json(run_dir / "summary.json"))


def run_cells(
    cells: Sequence[Cell],
    out: str | Path,
    *,
    wandb: str = "disabled",
    project: str = "fedspine",
    group_name: str | None = None,
    reuse: Sequence[str | Path] = (),
) -> list[CellResult]:
    """Run (or pick up) every cell; a finished cell with the same config is read back, a killed
    one resumes from its checkpoint, one whose config changed starts over.

    A cell whose exact config already ran to the end under one of the ``reuse`` folders (another
    experiment's results, say) is copied from there instead of run again; its summary records
    ``reused_from`` and results.md lists it. A run's numbers follow from its config and seed, so
    the copy is what a rerun would give, for none of the compute."""
    from fedspine.fl.simulator import run
    from fedspine.logging import RunLogger

    out = Path(out)
    elsewhere = finished_runs(reuse) if reuse else {}
    results = []
    for i, cell in enumerate(cells, 1):
        run_dir = cell.run_dir(out)
        label = f"[{i}/{len(cells)}] {cell.group + ' ' if cell.group else ''}{cell.variant} seed {cell.seed}"
        want = _wanted(cell)
        have = _read_json(run_dir / "config.json")
        if have is not None and have != want:
            print(f"{label}: config changed since the last run; starting over", flush=True)
            shutil.rmtree(run_dir)
            have = None
        source = elsewhere.get(_config_key(want))
        if have is None and source is not None and source.resolve() != run_dir.resolve():
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "metrics.jsonl"):
                shutil.copyfile(source / name, run_dir / name)
            summary = {**_read_json(source / "summary.json"), "reused_from": source.as_posix()}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
            print(f"{label}: same config finished in {source}; copied", flush=True)
            have = want
        if have is not None and (run_dir / "summary.json").exists():
            print(f"{label}: done before, read back", flush=True)
            results.append(_read_back(cell, run_dir))
            continue
        resume = (run_dir / "checkpoint").exists()
        print(f"{label}: {'resuming' if resume else 'running'} -> {run_dir}", flush=True)
        logger = RunLogger(
            run_dir,
            config=cell.cfg.to_dict(),
            wandb_mode=wandb,
            project=project,
            name="/".join(x for x in (group_name, cell.group, cell.variant, f"seed{cell.seed}") if x),
            group=group_name,
            resume=resume,
        )
        start = time.perf_counter()
        res = run(cell.cfg, logger, checkpoint_dir=run_dir / "checkpoint", resume=resume)
        res.summary["wall_s"] = time.perf_counter() - start
        (run_dir / "summary.json").write_text(json.dumps(res.summary, indent=2, default=float))
        acc = res.summary.get("final_accuracy")
        print(
            f"{label}: final accuracy {acc if acc is None else f'{acc:.3f}'}, "
            f"simulated {res.summary['clock_s']:.0f} s, wall {res.summary['wall_s']:.0f} s",
            flush=True,
        )
        results.append(CellResult(cell, res.records, res.summary))
    return results


def _cell_name(cell: Cell) -> str:
    return " ".join(x for x in (cell.group, cell.variant, f"seed {cell.seed}") if x)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


# --- tables ----------------------------------------------------------------------------------


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
        out[g] = [_row(v, rs, ref, v == reference) for v, rs in by_variant.items()]
    return out


def _row(variant: str, rs: list[CellResult], ref: Mapping[int, CellResult], is_ref: bool) -> Row:
    s = [r.summary for r in rs]
    finals = np.array([x["final_accuracy"] for x in s if x.get("final_accuracy") is not None], dtype=float)
    tta = [x["time_to_target_s"] for x in s if x.get("time_to_target_s") is not None]
    dev = [r.records[-1].get("device_accuracy_mean") for r in rs if r.records]
    dev = [d for d in dev if d is not None]
    deployed = [x["deployed_params_mean"] for x in s if x.get("deployed_params_mean") is not None]
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
        time_per_round_s=float(np.mean([x["clock_s"] / max(1, x["rounds"]) for x in s])),
        sparsity=float(np.mean([x.get("final_mean_sparsity") or 0.0 for x in s])),
        megabytes=float(np.mean([x["bytes_total"] for x in s])) / 1e6,
        waiting_s=float(np.mean([x["mean_waiting_s"] for x in s])),
        deployed_mparams=float(np.mean(deployed)) / 1e6 if deployed else None,
    )


def speedup(baseline: Sequence[CellResult], reference: Mapping[int, CellResult]) -> str:
    """Reference's time-to-target speed-up over ``baseline``, seed by seed, averaged.

    A seed where the baseline never reached the target while the reference did counts as a
    lower bound (the baseline's whole simulated time), marked ">"; seeds where the reference
    did not reach it are left out (and counted in the note)."""
    ratios, bound, missing = [], False, 0
    for b in baseline:
        r = reference.get(b.cell.seed)
        t_ref = None if r is None else r.summary.get("time_to_target_s")
        if t_ref is None:
            missing += 1
            continue
        t_b = b.summary.get("time_to_target_s")
        if t_b is None:
            t_b, bound = b.summary["clock_s"], True
        ratios.append(t_b / t_ref)
    if not ratios:
        return "n/a (reference never reached the target)"
    text = f"{'>' if bound else ''}{np.mean(ratios):.2f}x"
    if missing:
        text += f" ({len(ratios)} of {len(ratios) + missing} seeds)"
    return text


def format_table(table: Sequence[Row], *, target: float | None) -> str:
    tgt = f"{target:.2f}" if target is not None else "target"
    head = [
        "variant",
        "final acc (mean ± std)",
        "best acc",
        "device acc",
        f"time to {tgt} (s, sim.)",
        "speed-up of reference",
        "time/round (s, sim.)",
        "sparsity",
        "MB sent",
        "waiting/round (s)",
        "deployed params (M)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        tta = "not reached" if r.time_to_target_s is None else f"{r.time_to_target_s:.1f}"
        if r.time_to_target_s is not None and r.reached < r.seeds:
            tta += f" ({r.reached}/{r.seeds} seeds)"
        cells = [
            r.variant,
            f"{r.final_accuracy[0]:.3f} ± {r.final_accuracy[1]:.3f}"
            if r.seeds > 1
            else f"{r.final_accuracy[0]:.3f}",
            f"{r.best_accuracy:.3f}",
            "–" if r.device_accuracy is None else f"{r.device_accuracy:.3f}",
            tta,
            r.speedup,
            f"{r.time_per_round_s:.2f}",
            f"{r.sparsity:.2f}",
            f"{r.megabytes:.1f}",
            f"{r.waiting_s:.2f}",
            "–" if r.deployed_mparams is None else f"{r.deployed_mparams:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "torch_pruning", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    env["cpus"] = str(os.cpu_count())
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return env


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
    wall = sum(r.summary.get("wall_s", 0.0) for r in results if not r.summary.get("reused_from"))
    seeds = max((r.cell.seed for r in results), default=0) + 1
    md = [f"# {exp.title}", ""]
    if exp.about:
        md += [exp.about, ""]
    md += [
        f"Reproduce: `{command}`",
        "",
        f"Size `{size}`, {seeds} seed(s), {len(results)} runs, {wall / 60:.1f} min of wall time in all. "
        f"Spec: `{exp.source}`. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "Columns: *final acc* is the global model's test accuracy after the last round; *device acc* "
        "the mean over devices of each device's own pruned model (when `eval.devices` is on); times are "
        "simulated seconds from the device time model; *speed-up of reference* is "
        f'`{exp.reference}`\'s time-to-target advantage over the row, seed by seed (">" = the row never '
        "reached the target, so the ratio is a lower bound); *waiting* is the mean idle time per device "
        "per round (makespan minus its own time); *sparsity* is the mean achieved pruning ratio.",
        "",
    ]
    if missing:
        md += [
            f"**Partial results:** {len(missing)} planned run(s) have not run yet and are not in the tables: "
            + "; ".join(_cell_name(c) for c in missing)
            + ".",
            "",
        ]
    reused = [r for r in results if r.summary.get("reused_from")]
    if reused:
        md += [
            "Runs copied from an identical config that had already finished (`--reuse`): "
            + "; ".join(f"{_cell_name(r.cell)} from `{r.summary['reused_from']}`" for r in reused)
            + ".",
            "",
        ]
    for g, table in tables.items():
        if g:
            md += [f"## {g}", ""]
        md += [format_table(table, target=target), ""]
        for kind, path in figs.get(g, {}).items():
            md += [f"![{kind}]({path.relative_to(out).as_posix()})", ""]
    for kind, path in figs.get("*", {}).items():
        md += [f"![{kind}]({path.relative_to(out).as_posix()})", ""]
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


# --- figures ---------------------------------------------------------------------------------


def make_figures(exp: Experiment, results: Sequence[CellResult], out: Path) -> dict[str, dict[str, Path]]:
    """Per group: accuracy vs simulated time, the reference's arms per tier, waiting per round;
    across groups: final accuracy vs sparsity. Returns {group: {kind: path}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    variants = list(exp.variants)
    colour = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    made: dict[str, dict[str, Path]] = {}
    for g in dict.fromkeys(r.cell.group for r in results):
        mine = [r for r in results if r.cell.group == g]
        suffix = f"-{_slug(g)}" if g else ""
        made[g] = {}

        fig, ax = plt.subplots(figsize=(6.4, 4))
        for v in variants:
            for k, r in enumerate(x for x in mine if x.cell.variant == v):
                pts = [(0.0, None)] + [(q["clock_s"], q.get("accuracy")) for q in r.records]
                pts = [(c, a) for c, a in pts if a is not None]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker=".",
                        color=colour[v],
                        alpha=0.9 if k == 0 else 0.35,
                        label=v if k == 0 else None,
                    )
        target = mine[0].cell.cfg.eval.target_accuracy if mine else None
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.2f}")
        ax.set(xlabel="simulated time (s)", ylabel="global test accuracy", title=f"{exp.name} {g}".strip())
        ax.legend(fontsize=7)
        made[g]["accuracy vs simulated time"] = _save(fig, fig_dir / f"accuracy_vs_time{suffix}.png")

        ref = next((r for r in mine if r.cell.variant == exp.reference), None)
        if ref is not None and ref.records:
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
            tiers = sorted({t for q in ref.records for t in q.get("tiers", {}).values()})
            for t in tiers:
                rounds, ratio, rank = [], [], []
                for q in ref.records:
                    arms = [q["arms"][d] for d, tier in q.get("tiers", {}).items() if tier == t]
                    if arms:
                        rounds.append(q["round"])
                        ratio.append(np.mean([a[0] for a in arms]))
                        rank.append(np.mean([a[1] for a in arms]))
                a1.plot(rounds, ratio, marker="o", label=t)
                a2.plot(rounds, rank, marker="o", label=t)
            for a in (a1, a2):
                a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a1.set(xlabel="round", ylabel="mean pruning ratio", title=f"{exp.reference}: ratio per tier")
            a2.set(xlabel="round", ylabel="mean LoRA rank", title=f"{exp.reference}: rank per tier")
            a1.legend(fontsize=7)
            made[g]["arms per tier"] = _save(fig, fig_dir / f"arms_per_tier{suffix}.png")

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for v in variants:
            r = next((x for x in mine if x.cell.variant == v), None)
            if r is not None:
                ax.plot(
                    [q["round"] for q in r.records],
                    [q["mean_waiting_s"] for q in r.records],
                    marker=".",
                    color=colour[v],
                    label=v,
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(
            xlabel="round",
            ylabel="mean waiting per device (s, sim.)",
            title="waiting time per round (seed 0)",
        )
        ax.legend(fontsize=7)
        made[g]["waiting time per round"] = _save(fig, fig_dir / f"waiting{suffix}.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    markers = "os^Dvx*P"
    for gi, g in enumerate(dict.fromkeys(r.cell.group for r in results)):
        for v in variants:
            rs = [r for r in results if r.cell.group == g and r.cell.variant == v and r.records]
            if not rs:
                continue
            acc = [r.records[-1].get("device_accuracy_mean", r.summary.get("final_accuracy")) for r in rs]
            sp = [r.summary.get("final_mean_sparsity") or 0.0 for r in rs]
            ax.scatter(
                np.mean(sp),
                np.mean([a for a in acc if a is not None] or [np.nan]),
                color=colour[v],
                marker=markers[gi % len(markers)],
                label=f"{v} {g}".strip(),
            )
    ax.set(
        xlabel="mean achieved sparsity",
        ylabel="final accuracy (device models if evaluated)",
        title="accuracy vs sparsity",
    )
    ax.legend(fontsize=6, ncol=2)
    made["*"] = {"accuracy vs sparsity": _save(fig, fig_dir / "accuracy_vs_sparsity.png")}
    return made


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


__all__ = [
    "Cell",
    "CellResult",
    "Experiment",
    "Row",
    "format_table",
    "load_experiment",
    "plan",
    "rows",
    "run_cells",
    "speedup",
    "write_results",
]
