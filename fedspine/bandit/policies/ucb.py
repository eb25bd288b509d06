"""Index policies of the UCB family: the arm with the highest optimistic index is played.

Arms a lane has not played yet get an infinite index, so every lane tries each arm once first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.policies.base import Policy, argmax_random_ties, check_param, counts_state


class UCB1(Policy):
    r"""UCB1 (Auer, Cesa-Bianchi & Fischer, 2002, "Finite-time analysis of the multiarmed bandit problem").

    .. math:: I_a = \hat\mu_a + c \sqrt{2 \ln t / n_a}

    with :math:`t` the lane's total pulls and :math:`n_a` the pulls of arm a; ``c = 1`` is the
    original algorithm for rewards in [0, 1].
    """

    name = "ucb1"

    def __init__(self, space: ArmSpace, *, c: float = 1.0):
        check_param("c", c, low=0.0)
        self.c = float(c)
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {"c": self.c}

    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        return counts_state(n, self.n_arms)

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        s = self._state
        n, t = s["counts"][lanes], s["t"][lanes]
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = self.c * np.sqrt(2.0 * np.log(np.maximum(t, 1))[:, None] / n)
            index = np.where(n > 0, s["sums"][lanes] / n + bonus, np.inf)
        return argmax_random_ties(np.where(allowed, index, -np.inf), rng)

    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        s = self._state
        s["counts"][lanes, arms] += 1.0
        s["sums"][lanes, arms] += rewards
        s["t"][lanes] += 1


class DiscountedUCB(Policy):
    r"""Discounted UCB (Garivier & Moulines, 2011, "On upper-confidence bound policies for
    switching bandit problems", ALT).

    Every update of a lane first discounts all its statistics by :math:`\gamma`, so old rewards
    fade and the policy follows a drifting optimum:

    .. math::
        N_a \leftarrow \gamma N_a + 1[a_t = a], \quad S_a \leftarrow \gamma S_a + x_t 1[a_t = a],
        \quad I_a = S_a / N_a + c \sqrt{\xi \ln n / N_a}, \quad n = \textstyle\sum_b N_b

    (``ln n`` is clamped at 0). Garivier & Moulines write the bonus factor as :math:`c = 2B`
    with :math:`B` the reward bound; we expose :math:`c` directly (default 1, ours: the paper's
    :math:`c = 2` over-explores rewards in [0, 1] in our tests). The effective memory is
    :math:`1/(1-\gamma)` pulls, which must exceed the number of arms several times over.
    """

    name = "discounted-ucb"

    def __init__(self, space: ArmSpace, *, gamma: float = 0.99, xi: float = 0.5, c: float = 1.0):
        check_param("gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
        check_param("xi", xi, low=0.0, low_open=True)
        check_param("c", c, low=0.0)
        self.gamma, self.xi, self.c = float(gamma), float(xi), float(c)
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "xi": self.xi, "c": self.c}

    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        return counts_state(n, self.n_arms)

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        s = self._state
        n = s["counts"][lanes]
        total = np.maximum(n.sum(axis=1), 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = self.c * np.sqrt(self.xi * np.log(total)[:, None] / n)
            index = np.where(n > 0, s["sums"][lanes] / n + bonus, np.inf)
        return argmax_random_ties(np.where(allowed, index, -np.inf), rng)

    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        s = self._state
        s["counts"][lanes] *= self.gamma
        s["sums"][lanes] *= self.gamma
        s["counts"][lanes, arms] += 1.0
        s["sums"][lanes, arms] += rewards
        s["t"][lanes] += 1


class SlidingWindowUCB(Policy):
    r"""Sliding-window UCB (Garivier & Moulines, 2011): UCB over each lane's last ``window`` pulls.

    .. math:: I_a = \hat\mu_a^{(\tau)} + c \sqrt{\xi \ln \min(t, \tau) / N_a^{(\tau)}}

    An arm absent from the window gets an infinite index and is tried again, which is what lets
    the policy notice that a once-bad arm has become good. Each lane keeps a ring buffer of its
    last ``window`` (arm, reward) pairs; counts and sums are maintained incrementally.
    """

    name = "sliding-window-ucb"

    def __init__(self, space: ArmSpace, *, window: int = 100, c: float = 1.0, xi: float = 0.6):
        check_param("window", window, low=1, integer=True)
        check_param("c", c, low=0.0)
        check_param("xi", xi, low=0.0, low_open=True)
        self.window, self.c, self.xi = int(window), float(c), float(xi)
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {"window": self.window, "c": self.c, "xi": self.xi}

    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        return {
            **counts_state(n, self.n_arms),
            "hist_arm": np.full((n, self.window), -1, dtype=np.int64),
            "hist_reward": np.zeros((n, self.window), dtype=np.float64),
        }

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        s = self._state
        n = s["counts"][lanes]
        horizon = np.maximum(np.minimum(s["t"][lanes], self.window), 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = self.c * np.sqrt(self.xi * np.log(horizon)[:, None] / n)
            index = np.where(n > 0, s["sums"][lanes] / n + bonus, np.inf)
        return argmax_random_ties(np.where(allowed, index, -np.inf), rng)

    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        s = self._state
        slot = s["t"][lanes] % self.window
        old_arm = s["hist_arm"][lanes, slot]
        evict = old_arm >= 0
        if evict.any():
            el, ea = lanes[evict], old_arm[evict]
            s["counts"][el, ea] -= 1.0
            s["sums"][el, ea] -= s["hist_reward"][el, slot[evict]]
            # Exact zero once an arm leaves the window, so float residue cannot fake a mean.
            emptied = s["counts"][el, ea] <= 0.0
            s["counts"][el[emptied], ea[emptied]] = 0.0
            s["sums"][el[emptied], ea[emptied]] = 0.0
        s["hist_arm"][lanes, slot] = arms
        s["hist_reward"][lanes, slot] = rewards
        s["counts"][lanes, arms] += 1.0
        s["sums"][lanes, arms] += rewards
        s["t"][lanes] += 1
