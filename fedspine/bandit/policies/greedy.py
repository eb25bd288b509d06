"""Simple baselines: epsilon-greedy and uniform random choice."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.policies.base import (
    Policy,
    argmax_random_ties,
    check_param,
    counts_state,
    random_allowed,
)


class _CountingPolicy(Policy):
    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        return counts_state(n, self.n_arms)

    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        s = self._state
        s["counts"][lanes, arms] += 1.0
        s["sums"][lanes, arms] += rewards
        s["t"][lanes] += 1


class EpsilonGreedy(_CountingPolicy):
    r"""Epsilon-greedy (Sutton & Barto, "Reinforcement Learning", 2nd ed., §2.2-2.3).

    With probability :math:`\epsilon` play a uniformly random arm, otherwise
    :math:`\arg\max_a \hat\mu_a`. Unplayed arms count as the best (our choice, as in the UCB
    policies), so each arm is tried once before greedy play starts.
    """

    name = "epsilon-greedy"

    def __init__(self, space: ArmSpace, *, epsilon: float = 0.1):
        check_param("epsilon", epsilon, low=0.0, high=1.0)
        self.epsilon = float(epsilon)
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        s = self._state
        n = s["counts"][lanes]
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(n > 0, s["sums"][lanes] / n, np.inf)
        greedy = argmax_random_ties(np.where(allowed, mean, -np.inf), rng)
        explore = rng.random(lanes.size) < self.epsilon
        return np.where(explore, random_allowed(allowed, rng), greedy)


class UniformRandom(_CountingPolicy):
    """Uniformly random arm every time: the no-learning reference for regret comparisons."""

    name = "random"

    def __init__(self, space: ArmSpace):
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {}

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        return random_allowed(allowed, rng)
