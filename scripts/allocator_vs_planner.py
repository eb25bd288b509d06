"""The allocator against the speed-knowing planner on synthetic fleets whose speeds it never sees.

    python scripts/allocator_vs_planner.py              # the issue's table: 4 fleets x 3 seeds, 30 rounds
    python scripts/allocator_vs_planner.py --rounds 50 --seeds 5
    python scripts/allocator_vs_planner.py --figures results/allocator   # + mechanism figures

For every fleet and allocator it prints, over rounds 21-30 (after warm-up) and averaged over the
seeds (worst seed in brackets): mean makespan and mean capacity relative to the planner
(``fedspine.bandit.planner``: common deadline, largest arm per device under it), Spearman(device
speed, assigned capacity), and the share of (device, round) pairs on the cheapest arm next to the
planner's. A last table slows 10 devices 3x at round 21 and reports how many rounds the allocator
takes to move them to arms no heavier than the planner's re-solved ones. The fleets here are not
the ones the defaults were tuned on (``paper_mix`` seeds 0 and 3, ``drawn`` seeds 11 and 12).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedspine.bandit import Allocator, ArmSpace
from fedspine.bandit.planner import capacity, plan
from fedspine.bandit.synthetic import SyntheticFleet, scorecard, simulate

SPACE = ArmSpace.grid([round(0.1 * i, 1) for i in range(8)], [4, 8, 16, 32])

FLEETS = {
    "paper mix (30:40:10 tiers), seed 10": lambda: SyntheticFleet.paper_mix(80, seed=10),
    "drawn: compute 8x, link 8x, seed 21": lambda: SyntheticFleet.drawn(80, seed=21),
    "drawn: compute 4x, link 16x, seed 22": lambda: SyntheticFleet.drawn(
        80, seed=22, compute_spread=4, bandwidth_spread=16
    ),
    "drawn: compute 8x, equal links, seed 23": lambda: SyntheticFleet.drawn(
        80, seed=23, bandwidth_spread=1.0
    ),
}

DEFAULT = "fedspine (deadline, pooled-ucb, value rule at a 95% bound)"
ALLOCATORS = {
    DEFAULT: {},
    "deadline, pooled-ucb centred per round": {"policy_params": {"center": True}},
    "deadline, capacity ratio rule": {"ratio_rule": "capacity"},
    "deadline, value rule shrunk by 10 pulls": {"value_shrink": 10.0},
    "deadline, progress deadline rule": {"deadline_rule": "progress"},
    "deadline, prune tolerance 1 noise sigma": {"prune_tolerance": 1.0},
    "deadline, value rule without the lower bound": {"value_confidence": 0.0},
    "deadline, value model with a round effect": {"value_round_effect": True},
    "round effect, random in the same safe set": {"value_round_effect": True, "policy": "random"},
    "deadline, random in the same safe set": {"policy": "random"},
    "capacity rule, random in the same safe set": {"ratio_rule": "capacity", "policy": "random"},
    "deadline, per-device s-ucb in the safe set": {"policy": "s-ucb"},
    "paper (s-ucb, quantile reward, safe cap)": {"objective": "paper"},
    "paper, no cap (per-device s-ucb)": {"objective": "paper", "safe_slack": None},
}


def rounds_to_adapt(
    run: dict[str, np.ndarray], slow: list[int], planner_cap: np.ndarray, start: int
) -> int | None:
    """Rounds after ``start`` (0-based round index) until every slowed device's capacity is at
    most its re-solved planner capacity times 1.1; None if that never happens."""
    cap = capacity(SPACE)
    for k, arms in enumerate(run["arms"][start:]):
        if np.all(cap[arms[slow]] <= planner_cap * 1.1 + 1e-9):
            return k + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--figures", default=None, help="folder for the mechanism figures (needs matplotlib)")
    args = ap.parse_args()
    window = slice(max(0, args.rounds - 10), args.rounds)
    print(f"rounds {window.start + 1}-{window.stop}, mean over seeds 0-{args.seeds - 1} [worst seed]\n")
    for fname, make in FLEETS.items():
        fleet = make()
        print(f"## {fname}")
        print(
            "| allocator | makespan / planner | capacity / planner | Spearman(speed, capacity) "
            "| on cheapest arm (planner) |"
        )
        print("|---|---:|---:|---:|---:|")
        for aname, kw in ALLOCATORS.items():
            cards = [
                scorecard(
                    fleet,
                    SPACE,
                    simulate(fleet, Allocator(SPACE, seed=s, **kw), args.rounds, seed=s),
                    window,
                    seed=s,
                )
                for s in range(args.seeds)
            ]
            mk = [c.makespan_ratio for c in cards]
            cp = [c.capacity_ratio for c in cards]
            rho = [c.speed_capacity_spearman for c in cards]
            ch = [c.cheapest_share for c in cards]
            print(
                f"| {aname} | {np.mean(mk):.3f} [{max(mk):.3f}] | {np.mean(cp):.3f} [{min(cp):.3f}] "
                f"| {np.mean(rho):.2f} [{min(rho):.2f}] "
                f"| {np.mean(ch):.2f} ({cards[0].planner_cheapest_share:.2f}) |"
            )
        print()
    fleet = SyntheticFleet.paper_mix(80, seed=10)
    slow = list(range(40, 50))  # ten Xavier NX boards start throttling
    slowed_plan = plan(fleet.slowed(slow, 3.0).expected_times(SPACE), SPACE)
    planner_cap = capacity(SPACE)[slowed_plan.arms[slow]]
    print("## 10 NX devices become 3x slower at round 21 (paper mix, seed 10)")
    print("| allocator | rounds until they are on arms no heavier than the planner's, per seed |")
    print("|---|---|")
    adapting = (DEFAULT, "deadline, pooled-ucb centred per round")
    adapting += ("deadline, capacity ratio rule", "deadline, prune tolerance 1 noise sigma")
    adapting += ("deadline, value model with a round effect", "deadline, random in the same safe set")
    for aname in adapting:
        kw = ALLOCATORS[aname]
        got = []
        for s in range(args.seeds):
            run = simulate(fleet, Allocator(SPACE, seed=s, **kw), 40, seed=s, change=(21, slow, 3.0))
            got.append(rounds_to_adapt(run, slow, planner_cap, start=20))
        print(f"| {aname} | {', '.join('never' if g is None else str(g) for g in got)} |")
    learnt_worth(fleet, args.rounds)
    if args.figures:
        mechanism_figures(Path(args.figures), args.rounds)


def learnt_worth(fleet: SyntheticFleet, rounds: int) -> None:
    """What the value model has learnt an arm is worth after ``rounds`` rounds (allocator seed
    0), against the fleet's true expected gain, as log ratios to the unpruned rank 4."""
    n_ranks = len(SPACE.ranks)
    true = np.log(fleet.expected_gains(SPACE)).reshape(-1, n_ranks)
    true -= true[0, 0]
    print(f"\n## Learnt worth after {rounds} rounds (paper mix, seed 10; log, against unpruned rank 4)")
    head = " | ".join(f"rank {r}" for r in SPACE.ranks[1:])
    print(f"| value model | {head} | ratio {SPACE.ratios[5]} |")
    print("|---|" + "---:|" * n_ranks)
    rows = {"truth (the fleet's expected gain)": true}
    compared = (
        DEFAULT,
        "deadline, value model with a round effect",
    )
    for aname in compared:
        alloc = Allocator(SPACE, seed=0, **ALLOCATORS[aname])
        simulate(fleet, alloc, rounds, seed=0)
        w = alloc.safety.arm_worth(alloc.fleet).reshape(-1, n_ranks)
        rows[aname] = w - w[0, 0]
    for name, w in rows.items():
        cells = " | ".join(f"{v:+.2f}" for v in [*w[0, 1:], w[5, 0]])
        print(f"| {name} | {cells} |")


def mechanism_figures(out: Path, rounds: int) -> None:
    """Capacity per tier over rounds, finish times against the deadline, capacity per device
    against the planner's: the paper mix, seed 10, allocator seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fleet = SyntheticFleet.paper_mix(80, seed=10)
    cap = capacity(SPACE)
    ref = plan(fleet.expected_times(SPACE), SPACE)
    alloc = Allocator(SPACE, seed=0)
    rng = np.random.default_rng(0)
    devices = list(range(fleet.n_devices))
    tiers = np.array(fleet.tiers)
    caps, last_times, deadlines = [], None, []
    for rnd in range(1, rounds + 1):
        arms = alloc.assign(devices, rnd)
        deadlines.append(alloc.state_dict()["deadline"])
        reports = fleet.run_round([arms[d] for d in devices], SPACE, rng)
        alloc.observe_round(reports)
        caps.append(cap[[SPACE.index(arms[d]) for d in devices]])
        last_times = np.array([r.round_time_s for r in reports])
    caps_arr = np.array(caps)
    x = np.arange(1, rounds + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for t, color in zip(("tx2", "nx", "agx"), ("tab:red", "tab:orange", "tab:green"), strict=True):
        ax.plot(x, caps_arr[:, tiers == t].mean(axis=1), color=color, label=f"{t} (allocator)")
        ax.axhline(cap[ref.arms[tiers == t]].mean(), color=color, ls="--", lw=1, label=f"{t} (planner)")
    ax.set(xlabel="round", ylabel="mean capacity (1 - ratio) * log2(2 rank)", title="Capacity per tier")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "capacity_per_tier.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    order = np.argsort(fleet.speeds)
    ax.scatter(
        np.arange(fleet.n_devices),
        last_times[order],
        s=10,
        c="tab:blue",
        label=f"finish time, round {rounds}",
    )
    ax.axhline(deadlines[-1], color="tab:blue", ls="--", lw=1, label="allocator's deadline")
    ax.axhline(ref.deadline, color="k", ls=":", lw=1, label="planner's deadline (true times)")
    ax.set(
        xlabel="device, slowest to fastest",
        ylabel="round time (s)",
        title="Finish times against the deadline",
    )
    ax.set_ylim(0, max(last_times.max(), ref.deadline) * 1.15)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "finish_vs_deadline.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    mine = caps_arr[-10:].mean(axis=0)
    ax.scatter(cap[ref.arms], mine, s=12, c=np.log(fleet.speeds), cmap="viridis")
    lim = [0, cap.max() * 1.05]
    ax.plot(lim, lim, "k:", lw=1)
    ax.set(
        xlabel="planner's capacity",
        ylabel=f"allocator's capacity, rounds {rounds - 9}-{rounds}",
        title="Capacity per device",
    )
    fig.tight_layout()
    fig.savefig(out / "capacity_vs_planner.png", dpi=120)
    plt.close(fig)
    print(f"\nfigures: {', '.join(str(p) for p in sorted(out.glob('*.png')))}")


if __name__ == "__main__":
    main()
