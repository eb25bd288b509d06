"""EXP3: adversarial bandits with exponential weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.policies.base import Policy, check_param, counts_state


class EXP3(Policy):
    r"""EXP3 (Auer, Cesa-Bianchi, Freund & Schapire, 2002, "The nonstochastic multiarmed bandit
    problem", SIAM J. Comput., Fig. 1).

    .. math::
        p_a = (1 - \gamma) \frac{w_a}{\sum_b w_b} + \frac{\gamma}{K}, \qquad
        w_{a_t} \leftarrow w_{a_t} \exp\!\Big(\frac{\gamma}{K} \frac{x_t}{p_{a_t}}\Big)

    Weights are kept as logarithms and shifted by their maximum, so long runs cannot overflow.
    ``counts``/``sums`` are kept only to report estimates; they do not drive the choice.
    """

    name = "exp3"

    def __init__(self, space: ArmSpace, *, gamma: float = 0.1):
        check_param("gamma", gamma, low=0.0, high=1.0, low_open=True)
        self.gamma = float(gamma)
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        return {**counts_state(n, self.n_arms), "log_w": np.zeros((n, self.n_arms), dtype=np.float64)}

    def _probs(self, lanes: np.ndarray) -> np.ndarray:
        log_w = self._state["log_w"][lanes]
        w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        return (1.0 - self.gamma) * w / w.sum(axis=1, keepdims=True) + self.gamma / self.n_arms

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        cdf = np.cumsum(self._probs(lanes) * allowed, axis=1)
        u = rng.random(lanes.size) * cdf[:, -1]
        arm = np.minimum((cdf <= u[:, None]).sum(axis=1), self.n_arms - 1)
        # Float round-off at the top of the cdf can land on a masked arm: take the last allowed one.
        last_allowed = self.n_arms - 1 - np.argmax(allowed[:, ::-1], axis=1)
        return np.where(allowed[np.arange(lanes.size), arm], arm, last_allowed)

    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        s = self._state
        p = self._probs(lanes)[np.arange(lanes.size), arms]
        s["log_w"][lanes, arms] += self.gamma * rewards / (p * self.n_arms)
        s["log_w"][lanes] -= s["log_w"][lanes].max(axis=1, keepdims=True)
        s["counts"][lanes, arms] += 1.0
        s["sums"][lanes, arms] += rewards
        s["t"][lanes] += 1
