"""Figures of an experiment (matplotlib, imported only when drawing): accuracy vs simulated time,
the reference's arms per tier and finish times, waiting time per round, accuracy vs sparsity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedspine.experiments.runner import CellResult
from fedspine.experiments.spec import Experiment, Sweep, slug


def line_styles(labels: Sequence[str], reference: str) -> dict[str, dict[str, Any]]:
    """A distinct line per label: ten colours, then the same colours dashed, then dotted (a spec
    has up to 13 variants, and two variants in one colour read as one); the reference thicker
    and drawn on top."""
    import matplotlib.pyplot as plt

    dashes = ("-", "--", ":", "-.")
    return {
        v: dict(
            color=plt.cm.tab10(i % 10),
            ls=dashes[(i // 10) % len(dashes)],
            lw=2.2 if v == reference else 1.0,
            zorder=3 if v == reference else 2,
        )
        for i, v in enumerate(labels)
    }


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
    line = line_styles(variants, exp.reference)
    colour = {v: st["color"] for v, st in line.items()}
    made: dict[str, dict[str, Path]] = {}
    for g in dict.fromkeys(r.cell.group for r in results):
        mine = [r for r in results if r.cell.group == g]
        suffix = f"-{slug(g)}" if g else ""
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
                        **line[v],
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

            # every device's finish time against its round's makespan: spare time that went unused
            fig, ax = plt.subplots(figsize=(6.4, 3.6))
            for i, t in enumerate(tiers):
                pts = [
                    (q["round"] + 0.25 * (i - (len(tiers) - 1) / 2), s)
                    for q in ref.records
                    for d, s in q.get("round_time_s", {}).items()
                    if q.get("tiers", {}).get(d) == t
                ]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), s=8, alpha=0.7, label=t)
            ax.plot(
                [q["round"] for q in ref.records],
                [q["makespan_s"] for q in ref.records],
                color="k",
                lw=1,
                label="makespan",
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(
                xlabel="round",
                ylabel="device round time (s, sim.)",
                title=f"{exp.reference}: finish times against the makespan",
            )
            ax.legend(fontsize=7)
            made[g]["finish times"] = _save(fig, fig_dir / f"finish_times{suffix}.png")

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for v in variants:
            r = next((x for x in mine if x.cell.variant == v), None)
            if r is not None:
                ax.plot(
                    [q["round"] for q in r.records],
                    [q["mean_waiting_s"] for q in r.records],
                    marker=".",
                    **line[v],
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


def sweep_figure(reference: str, points: Sequence[Any], sweep: Sweep, fig_dir: Path) -> Path:
    """Along one sweep: every variant's sustained time to target (left; hollow where it is a mean
    over the seeds that reached it only) and the reference's paired speed-up over each (right,
    95% interval; hollow where some seed's ratio is a lower bound).
    ``points`` are ``fedspine.experiments.report.SweepPoint``s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(dict.fromkeys([reference, *(p.label for p in points)]))
    lines = line_styles(labels, reference)
    for v in labels:
        mine = [p for p in points if p.label == v]
        style = dict(**lines[v], marker="o", label=v)
        timed = [p for p in mine if p.time_s is not None]
        if timed:
            a1.plot([p.value for p in timed], [p.time_s for p in timed], **style)
            part = [(p.value, p.time_s) for p in timed if p.reached < p.seeds]
            if part:  # a mean over the seeds that reached the target only
                edge = style["color"]
                a1.scatter(*zip(*part, strict=True), s=60, facecolors="white", edgecolors=edge, zorder=3)
        fast = [p for p in mine if p.speedup is not None]
        if fast:
            ys = np.array([p.speedup for p in fast])
            bounds = np.array([p.interval or (p.speedup, p.speedup) for p in fast])
            err = np.stack([ys - bounds[:, 0], bounds[:, 1] - ys])
            a2.errorbar([p.value for p in fast], ys, yerr=err, capsize=3, **style)
            hollow = [(p.value, p.speedup) for p in fast if p.lower_bound]
            if hollow:
                edge = style["color"]
                a2.scatter(*zip(*hollow, strict=True), s=60, facecolors="white", edgecolors=edge, zorder=3)
    a2.axhline(1.0, color="grey", ls="--", lw=0.8)
    for a in (a1, a2):
        if sweep.log:
            a.set_xscale("log")
        a.set_xlabel(sweep.label)
    a1.set_yscale("log")
    a1.set(ylabel="sustained time to target (s, sim.)", title="time to target (hollow: not every seed)")
    a2.set(ylabel=f"{reference}'s speed-up over the variant", title="paired speed-up (hollow: a lower bound)")
    a1.legend(fontsize=7)
    return _save(fig, fig_dir / f"sweep_{slug(sweep.field)}.png")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["make_figures", "sweep_figure"]
