r"""The speed-knowing planner: the reference the allocator is measured against (ours).

A round lasts as long as its slowest device, so the time to a target accuracy is the sum of the
rounds' makespans. The planner knows every device's time on every arm and

1. sets one common deadline, the shortest that every device can meet:
   :math:`D = \max_i \min_a T_{i,a}` (the slowest device's fastest arm);
2. gives each device the largest arm that finishes by it:
   :math:`a_i = \arg\max_{a:\,T_{i,a} \le D} \mathrm{capacity}(a)`.

A device that finishes well before the slowest one would wait anyway, so its spare time is
free; the planner turns it into capacity (less pruning, a higher rank). Only the devices that set
the pace prune hard. The allocator (``fedspine.bandit.allocator``, objective ``"deadline"``)
does the same with times it has to learn.

Capacity (ours; the paper defines none) measures how much model a device trains on an arm:
:math:`(1 - p) \cdot \log_2(2r)`: the kept fraction of the prunable structure times a rank term
that grows with diminishing returns, as a LoRA update's expressiveness does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedspine.bandit.arms import ArmSpace


def capacity(space: ArmSpace) -> np.ndarray:
    """Capacity of every arm of ``space``: kept fraction times log2(2 * rank)."""
    p = np.array([a.ratio for a in space])
    r = np.array([a.rank for a in space], dtype=np.float64)
    return (1.0 - p) * np.log2(2.0 * r)


def one_step_cheaper(space: ArmSpace) -> np.ndarray:
    """``step[a, b]``: arm b is arm a with the next larger ratio or the next smaller rank of the
    space (one grid step cheaper along one axis)."""
    ri = np.array([space.ratios.index(a.ratio) for a in space])
    ki = np.array([space.ranks.index(a.rank) for a in space])
    more_pruned = (ri[None, :] == ri[:, None] + 1) & (ki[None, :] == ki[:, None])
    lower_rank = (ki[None, :] == ki[:, None] - 1) & (ri[None, :] == ri[:, None])
    return more_pruned | lower_rank


@dataclass(frozen=True)
class Plan:
    arms: np.ndarray  # arm index per device
    deadline: float  # seconds


def plan(times: np.ndarray, space: ArmSpace, deadline: float | None = None) -> Plan:
    """The planner's arms for known ``times`` (devices x arms, seconds).

    ``deadline`` defaults to the shortest common one every device can meet; a device that
    cannot meet a given deadline gets its fastest arm. Re-solve whenever speeds change."""
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 2 or times.shape[1] != len(space):
        raise ValueError(f"times must have shape (devices, {len(space)}), got {times.shape}")
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise ValueError("times must be finite and > 0")
    d = float(times.min(axis=1).max()) if deadline is None else float(deadline)
    cap = capacity(space)
    fits = times <= d * (1 + 1e-12)
    score = np.where(fits, cap[None, :], -np.inf)
    arms = np.argmax(score, axis=1)
    none = ~fits.any(axis=1)
    arms[none] = times[none].argmin(axis=1)
    return Plan(arms=arms, deadline=d)
