"""A synthetic heterogeneous fleet whose speeds are hidden from the allocator.

Used by the tests, the demo and the benchmark to check that the allocator learns what an
oracle that knows every device's speed would choose. The numbers are illustrative, not a model
of real hardware (``fedspine.fl.devices`` will hold that).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedspine.bandit.allocator import Allocator, RoundReport
from fedspine.bandit.arms import Arm, ArmSpace
from fedspine.bandit.reward import RewardConfig, combine

# The paper's testbed mix, 30 TX2 : 40 NX : 10 AGX [paper.md §3, S]; relative speeds are ours.
PAPER_TIERS: tuple[tuple[str, float, float, float], ...] = (
    # name, share of the fleet, relative compute speed, relative bandwidth
    ("tx2", 30 / 80, 1.0, 1.0),
    ("nx", 40 / 80, 2.0, 2.0),
    ("agx", 10 / 80, 5.0, 4.0),
)


def paper_mix_counts(n: int = 80) -> tuple[int, int, int]:
    """Devices per tier of ``PAPER_TIERS`` (TX2 / NX / AGX) when ``n`` devices are split 30:40:10:
    each share rounded, the rounding remainder to NX. The one definition of the mix: the device
    fleet of ``fedspine.fl.devices`` uses it too."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    counts = [round(share * int(n)) for _, share, _, _ in PAPER_TIERS]
    counts[1] += int(n) - sum(counts)
    return counts[0], counts[1], counts[2]


@dataclass(frozen=True)
class SyntheticFleet:
    """Round time of arm (p, r) on device i, in seconds:

    ``(work_s * (1 - p) * (1 + r / rank_scale)) / speed_i + comm_s * r * (1 - p) / bandwidth_i``,
    times log-normal noise. Local loss improvement grows with rank and shrinks with pruning:
    ``gain = gain_max * (1 - p) ** 1.5 * r / (r + rank_half)`` (times noise).
    """

    speeds: np.ndarray
    bandwidths: np.ndarray
    tiers: tuple[str, ...]
    work_s: float = 10.0
    rank_scale: float = 32.0
    comm_s: float = 0.25
    noise: float = 0.05
    gain_max: float = 0.2
    rank_half: float = 8.0

    @classmethod
    def paper_mix(cls, n_devices: int = 80, seed: int = 0, **kw: float) -> SyntheticFleet:
        """``n_devices`` split 30:40:10 into slow/medium/fast tiers, +-15% spread within a tier."""
        rng = np.random.default_rng(seed)
        counts = paper_mix_counts(n_devices)
        speeds, bws, tiers = [], [], []
        for (name, _, speed, bw), k in zip(PAPER_TIERS, counts, strict=True):
            speeds += list(speed * rng.uniform(0.85, 1.15, k))
            bws += list(bw * rng.uniform(0.85, 1.15, k))
            tiers += [name] * k
        return cls(np.array(speeds), np.array(bws), tuple(tiers), **kw)

    @classmethod
    def drawn(
        cls,
        n_devices: int = 80,
        seed: int = 0,
        compute_spread: float = 8.0,
        bandwidth_spread: float = 8.0,
        **kw: float,
    ) -> SyntheticFleet:
        """A fleet without tiers: speeds log-uniform over ``compute_spread`` (slowest to fastest)
        and bandwidths log-uniform over ``bandwidth_spread``, drawn independently, so compute and
        link need not go together as they do in :meth:`paper_mix`."""
        rng = np.random.default_rng(seed)
        speeds = np.exp(rng.uniform(0.0, np.log(compute_spread), n_devices))
        bws = np.exp(rng.uniform(0.0, np.log(bandwidth_spread), n_devices))
        return cls(speeds, bws, ("drawn",) * n_devices, **kw)

    def slowed(self, devices: Sequence[int], factor: float) -> SyntheticFleet:
        """The same fleet with ``devices`` ``factor`` times slower in compute and bandwidth."""
        speeds, bws = self.speeds.copy(), self.bandwidths.copy()
        idx = np.asarray(list(devices), dtype=np.int64)
        speeds[idx] /= factor
        bws[idx] /= factor
        return replace(self, speeds=speeds, bandwidths=bws)

    @property
    def n_devices(self) -> int:
        return len(self.speeds)

    def expected_times(self, space: ArmSpace) -> np.ndarray:
        """Noise-free round time, shape (devices, arms)."""
        p = np.array([a.ratio for a in space])
        r = np.array([a.rank for a in space], dtype=np.float64)
        compute = self.work_s * (1 - p) * (1 + r / self.rank_scale)
        comm = self.comm_s * r * (1 - p)
        return compute[None, :] / self.speeds[:, None] + comm[None, :] / self.bandwidths[:, None]

    def expected_gains(self, space: ArmSpace) -> np.ndarray:
        p = np.array([a.ratio for a in space])
        r = np.array([a.rank for a in space], dtype=np.float64)
        return self.gain_max * (1 - p) ** 1.5 * r / (r + self.rank_half)

    def run_round(
        self,
        arms: Sequence[Arm],
        space: ArmSpace,
        rng: np.random.Generator,
        devices: Sequence[int] | None = None,
    ) -> list[RoundReport]:
        """Simulate one round: the reports the devices would send back."""
        devices = list(range(self.n_devices)) if devices is None else list(devices)
        idx = np.array([space.index(a) for a in arms])
        t = self.expected_times(space)[devices, idx] * rng.lognormal(0.0, self.noise, len(devices))
        g = self.expected_gains(space)[idx] * rng.lognormal(0.0, self.noise, len(devices))
        return [
            RoundReport(d, a, round_time_s=float(ti), loss_before=1.0, loss_after=float(1.0 - gi))
            for d, a, ti, gi in zip(devices, arms, t, g, strict=True)
        ]


def expected_rewards(
    fleet: SyntheticFleet, space: ArmSpace, reward: RewardConfig, time_ref: float
) -> np.ndarray:
    """Noise-free reward of every (device, arm) for a given round time reference.

    The loss scale is each device's best achievable gain, which is what the allocator's decayed
    running maximum approaches.
    """
    gains = fleet.expected_gains(space)
    out, _ = combine(
        reward,
        gain=gains[None, :],
        ratio=np.array([a.ratio for a in space])[None, :],
        target_ratio=reward.target_ratio or space.max_ratio,
        update_norm=np.full((1, len(space)), np.nan),
        round_time_s=fleet.expected_times(space),
        gain_ref=float(gains.max()),
        norm_ref=float("nan"),
        time_ref=time_ref,
    )
    return out


def oracle_arms(
    fleet: SyntheticFleet, space: ArmSpace, reward: RewardConfig, iters: int = 200, start: str = "fastest"
) -> np.ndarray:
    """Best arm per device under the same reward, knowing every speed and bandwidth.

    A device's reward depends on the round's time quantile, i.e. on the other devices' arms, so
    the oracle iterates best responses to a fixed point from ``start`` ("fastest" or "slowest"
    arm for everyone).
    """
    times = fleet.expected_times(space)
    n = fleet.n_devices
    choice = times.argmin(axis=1) if start == "fastest" else times.argmax(axis=1)
    for _ in range(iters):
        t_ref = float(np.quantile(times[np.arange(n), choice], reward.time_quantile))
        new = expected_rewards(fleet, space, reward, t_ref).argmax(axis=1)
        if np.array_equal(new, choice):
            break
        choice = new
    return choice


def simulate(
    fleet: SyntheticFleet,
    allocator: Allocator,
    rounds: int,
    seed: int = 0,
    change: tuple[int, Sequence[int], float] | None = None,
    first_round: int = 1,
    monotone: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``rounds`` rounds of the allocator on the fleet; per-round makespan and arms.

    ``change = (round, devices, factor)`` makes those devices ``factor`` times slower in compute
    and bandwidth from that round on (thermal throttling, a worse link); the allocator is not told.
    ``first_round`` continues an allocator that has already run rounds. With ``monotone``
    (fedspine's devices prune progressively), a device never prunes less than it already has:
    it runs at ``max(assigned ratio, its sparsity)`` and reports that as ``achieved_ratio``;
    ``arms`` holds the arms that actually ran.
    """
    rng = np.random.default_rng(seed)
    space = allocator.space
    devices = list(range(fleet.n_devices))
    sparsity = np.zeros(fleet.n_devices)
    makespans, arm_log = [], []
    for rnd in range(first_round, first_round + rounds):
        if change is not None and rnd == change[0]:
            fleet = fleet.slowed(change[1], change[2])
        arms = allocator.assign(devices, rnd)
        ran = [
            Arm(max(arms[d].ratio, sparsity[d]) if monotone else arms[d].ratio, arms[d].rank) for d in devices
        ]
        reports = fleet.run_round(ran, space, rng)
        if monotone:
            sparsity = np.maximum(sparsity, [a.ratio for a in ran])
            reports = [
                replace(r, arm=arms[r.device_id], achieved_ratio=a.ratio)
                for r, a in zip(reports, ran, strict=True)
            ]
        allocator.observe_round(reports)
        makespans.append(max(r.round_time_s for r in reports))  # type: ignore[type-var]
        arm_log.append([space.index(a) for a in ran])
    return {"makespan": np.array(makespans), "arms": np.array(arm_log)}


def oracle_makespans(
    fleet: SyntheticFleet, space: ArmSpace, reward: RewardConfig, rounds: int, seed: int = 0
) -> np.ndarray:
    """Per-round makespan when every device plays its oracle arm, under the same noise model."""
    rng = np.random.default_rng(seed)
    best = oracle_arms(fleet, space, reward)
    return fixed_makespans(fleet, space, best, rounds, rng)


def fixed_makespans(
    fleet: SyntheticFleet, space: ArmSpace, arms: np.ndarray, rounds: int, rng: np.random.Generator
) -> np.ndarray:
    """Per-round makespan of a fixed arm per device (arm indices), under the fleet's noise."""
    chosen = [space[int(a)] for a in arms]
    return np.array([max(r.round_time_s for r in fleet.run_round(chosen, space, rng)) for _ in range(rounds)])  # type: ignore[type-var]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (ties get their average rank); NaN if either side is constant."""
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size, dtype=float)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


@dataclass(frozen=True)
class Scorecard:
    """How a run's allocation compares with the speed-knowing planner (``fedspine.bandit.planner``)
    over a window of rounds; ratios > 1 mean more than the planner."""

    makespan_ratio: float  # mean makespan / planner's mean makespan (same noise model)
    capacity_ratio: float  # mean assigned capacity / planner's
    speed_capacity_spearman: float  # Spearman(device speed, mean assigned capacity)
    cheapest_share: float  # share of (device, round) pairs on the cheapest arm
    planner_cheapest_share: float  # the planner's share of devices on the cheapest arm


def scorecard(
    fleet: SyntheticFleet, space: ArmSpace, run: dict[str, np.ndarray], window: slice, seed: int = 0
) -> Scorecard:
    """Score rounds ``window`` of ``simulate``'s output against the planner for ``fleet``."""
    from fedspine.bandit.planner import capacity, plan

    cap = capacity(space)
    ref = plan(fleet.expected_times(space), space)
    arms = run["arms"][window]
    ref_makespan = fixed_makespans(fleet, space, ref.arms, 50, np.random.default_rng(seed)).mean()
    cheapest = int(np.argmin(cap))
    return Scorecard(
        makespan_ratio=float(run["makespan"][window].mean() / ref_makespan),
        capacity_ratio=float(cap[arms].mean() / cap[ref.arms].mean()),
        speed_capacity_spearman=spearman(fleet.speeds, cap[arms].mean(axis=0)),
        cheapest_share=float((arms == cheapest).mean()),
        planner_cheapest_share=float((ref.arms == cheapest).mean()),
    )
