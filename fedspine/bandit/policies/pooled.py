"""A bandit whose arms are learnt by the whole fleet at once (ours)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.fleet import fit_factors
from fedspine.bandit.planner import capacity
from fedspine.bandit.policies.base import Policy, check_param


class PooledUCB(Policy):
    r"""UCB on arm effects pooled over every lane (ours).

    A device sees each arm a few times at most, but what an arm *buys* (the loss improvement and
    quality it yields relative to other arms) is much the same on every device; what differs is
    how easy a device's data is. So rewards are pooled in the two-factor model of
    ``fedspine.bandit.fleet``, :math:`\log \max(R_{i,a}, f) \approx u_i + w_a`, each lane
    discounted by ``decay`` at its every update, and each lane plays

    .. math:: a_i = \arg\max_{a \in \mathcal{A}_i} \; w_a + c \sqrt{2 \ln N / n_a}

    over its allowed arms :math:`\mathcal{A}_i` (the allocator's safe set), with :math:`n_a` the
    fleet's discounted pulls of a and :math:`N` their sum (Auer et al. 2002's index on pooled
    statistics). Arms nobody has pulled come first; ties go to the arm of largest capacity
    (``fedspine.bandit.planner``), then to a random one. The device effect :math:`u_i` separates a
    device's difficulty from the arm's value, so a slow device that only ever plays cheap arms
    does not make cheap arms look good.

    ``center`` (ours, off by default): a round's rewards share the phase of training (early
    rounds barely move the loss on any arm), so arms first tried in different rounds differ by
    more than what they buy. With ``center=True`` the log rewards of one update that holds at
    least two lanes (:meth:`Allocator.observe_round <fedspine.bandit.Allocator.observe_round>`
    reports a round at once) are taken relative to the mean over its lanes whose reward is above
    ``floor`` (failures are left out of the mean and stay penalised), so only contrasts within a
    round teach the arm effects; an update of one lane is not centred. The estimates are then
    relative, not mean rewards.
    """

    name = "pooled-ucb"

    def __init__(
        self,
        space: ArmSpace,
        *,
        c: float = 0.1,
        decay: float = 0.9,
        floor: float = 1e-3,
        center: bool = False,
    ):
        if not isinstance(center, bool):
            raise ValueError(f"center must be True or False, got {center!r}")
        check_param("c", c, low=0.0)
        check_param("decay", decay, low=0.0, high=1.0, low_open=True)
        check_param("floor", floor, low=0.0, high=1.0, low_open=True)
        self.c, self.decay, self.floor = float(c), float(decay), float(floor)
        self.center = center
        self._capacity = capacity(space)
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {"c": self.c, "decay": self.decay, "floor": self.floor, "center": self.center}

    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        return {"log_sum": np.zeros((n, self.n_arms)), "weight": np.zeros((n, self.n_arms))}

    def _fit(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.n_lanes
        log_sum, weight = self._state["log_sum"][:n], self._state["weight"][:n]
        lane_effect, arm_effect = fit_factors(log_sum, weight)
        return lane_effect, arm_effect, weight.sum(axis=0)

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        _, arm_effect, pulls = self._fit()
        total = max(float(pulls.sum()), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            index = np.where(pulls > 0, arm_effect + self.c * np.sqrt(2.0 * np.log1p(total) / pulls), np.inf)
        # One ranking serves every lane (the index is pooled): best index first, ties by capacity,
        # then in a random order drawn once per round; each lane plays its first allowed arm.
        order = np.lexsort((rng.permutation(self.n_arms), -self._capacity, -index))
        return order[np.argmax(allowed[:, order], axis=1)]

    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        s = self._state
        s["log_sum"][lanes] *= self.decay
        s["weight"][lanes] *= self.decay
        logs = np.log(np.maximum(rewards, self.floor))
        if self.center:
            done = rewards > self.floor
            if np.count_nonzero(done) >= 2:
                logs = logs - logs[done].mean()
        s["log_sum"][lanes, arms] += logs
        s["weight"][lanes, arms] += 1.0

    def _estimates(self, lanes: np.ndarray) -> np.ndarray:
        lane_effect, arm_effect, _ = self._fit()
        return np.minimum(1.0, np.exp(lane_effect[lanes, None] + arm_effect[None, :]))
