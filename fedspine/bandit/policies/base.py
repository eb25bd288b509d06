"""The policy interface: many independent bandits ("lanes") evaluated together with numpy.

One lane is one device's bandit. Keeping every lane's statistics in (n_lanes, n_arms) arrays
lets the allocator choose arms for 10,000 devices in a few vectorised operations instead of
10,000 Python calls; a single bandit is simply a policy with one lane.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from fedspine.bandit.arms import ArmSpace


class Policy(ABC):
    """Select an arm per lane, learn from rewards in [0, 1], serialise to plain data.

    Subclasses declare their hyperparameters as keyword-only ``__init__`` arguments (validated
    there), describe each lane's state in :meth:`_fresh_state`, and implement :meth:`_select`
    and :meth:`_update`. Public methods validate their inputs before any state changes.
    """

    name: ClassVar[str]

    def __init__(self, space: ArmSpace):
        if not isinstance(space, ArmSpace):
            raise ValueError(f"space must be an ArmSpace, got {type(space).__name__}")
        self.space = space
        self.n_arms = len(space)
        self._n_lanes = 0
        self._state: dict[str, np.ndarray] = {k: v[:0] for k, v in self._fresh_state(1).items()}

    # --- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Hyperparameters, exactly as accepted by ``__init__``."""

    @abstractmethod
    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        """State arrays for ``n`` new lanes; first axis is the lane."""

    @abstractmethod
    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        """``allowed`` is a (lanes, arms) boolean mask with at least one True per row."""

    @abstractmethod
    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None: ...

    def _estimates(self, lanes: np.ndarray) -> np.ndarray:
        """Current estimate of each arm's mean reward (NaN where unknown), shape (lanes, arms)."""
        s = self._state
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(s["counts"][lanes] > 0, s["sums"][lanes] / s["counts"][lanes], np.nan)

    # --- public API ----------------------------------------------------------------------------
    @property
    def n_lanes(self) -> int:
        return self._n_lanes

    def add_lanes(self, n: int) -> np.ndarray:
        """Append ``n`` lanes with no history; returns their indices."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        fresh = self._fresh_state(n)
        start = self._n_lanes
        for k, arr in fresh.items():
            cur = self._state[k]
            if start + n > cur.shape[0]:  # grow geometrically so adding lanes one by one stays O(1)
                cap = max(start + n, 2 * cur.shape[0], 8)
                grown = np.empty((cap, *cur.shape[1:]), dtype=cur.dtype)
                grown[:start] = cur[:start]
                self._state[k] = grown
            self._state[k][start : start + n] = arr
        self._n_lanes = start + n
        return np.arange(start, start + n)

    def select(
        self, lanes: np.ndarray | list[int], rng: np.random.Generator, allowed: np.ndarray | None = None
    ) -> np.ndarray:
        """One arm index per lane in ``lanes`` (lanes must be distinct).

        ``allowed`` optionally restricts each lane to a subset of arms, shape (lanes, arms);
        every row needs at least one allowed arm.
        """
        lanes_arr = self._check_lanes(lanes)
        if allowed is None:
            mask = np.ones((lanes_arr.size, self.n_arms), dtype=bool)
        else:
            mask = np.asarray(allowed, dtype=bool)
            if mask.shape != (lanes_arr.size, self.n_arms):
                raise ValueError(f"allowed must have shape {(lanes_arr.size, self.n_arms)}, got {mask.shape}")
            if not mask.any(axis=1).all():
                raise ValueError("allowed must leave at least one arm per lane")
        if lanes_arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        return self._select(lanes_arr, rng, mask).astype(np.int64)

    def update(
        self, lanes: np.ndarray | list[int], arms: np.ndarray | list[int], rewards: np.ndarray | list[float]
    ) -> None:
        """Learn from one reward per lane for the arm that lane played."""
        lanes_arr = self._check_lanes(lanes)
        arms_arr = np.asarray(arms, dtype=np.int64).reshape(-1)
        rewards_arr = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if arms_arr.shape != lanes_arr.shape or rewards_arr.shape != lanes_arr.shape:
            raise ValueError(
                f"lanes, arms and rewards must have the same length, got "
                f"{lanes_arr.size}, {arms_arr.size}, {rewards_arr.size}"
            )
        if arms_arr.size and (arms_arr.min() < 0 or arms_arr.max() >= self.n_arms):
            raise ValueError(f"arms must be indices in [0, {self.n_arms}), got {arms_arr.tolist()}")
        if not np.all(np.isfinite(rewards_arr)) or np.any((rewards_arr < 0) | (rewards_arr > 1)):
            raise ValueError(f"rewards must be finite and in [0, 1], got {rewards_arr.tolist()}")
        if lanes_arr.size:
            self._update(lanes_arr, arms_arr, rewards_arr)

    def best(self, lanes: np.ndarray | list[int]) -> np.ndarray:
        """Arm with the highest estimated mean per lane (no exploration); -1 if nothing is known."""
        lanes_arr = self._check_lanes(lanes)
        est = self._estimates(lanes_arr)
        known = ~np.all(np.isnan(est), axis=1)
        out = np.full(lanes_arr.size, -1, dtype=np.int64)
        if known.any():
            out[known] = np.nanargmax(est[known], axis=1)
        return out

    def estimates(self, lane: int) -> np.ndarray:
        """Estimated mean reward of every arm for one lane (NaN where unknown)."""
        return self._estimates(self._check_lanes([lane]))[0]

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state; floats survive a JSON round trip bit for bit."""
        return {
            "policy": self.name,
            "params": self.params(),
            "space": self.space.to_dict(),
            "n_lanes": self._n_lanes,
            "arrays": {k: v[: self._n_lanes].tolist() for k, v in self._state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy") != self.name:
            raise ValueError(f"state is for policy {state.get('policy')!r}, not {self.name!r}")
        if state.get("params") != self.params():
            raise ValueError(f"state params {state.get('params')} differ from this policy's {self.params()}")
        if ArmSpace.from_dict(state["space"]) != self.space:
            raise ValueError("state was saved for a different arm space")
        n = int(state["n_lanes"])
        template = self._fresh_state(n)
        arrays = {}
        for k, fresh in template.items():
            arr = np.asarray(state["arrays"][k], dtype=fresh.dtype).reshape(fresh.shape)
            arrays[k] = arr
        self._state, self._n_lanes = arrays, n

    # --- helpers -------------------------------------------------------------------------------
    def _check_lanes(self, lanes: np.ndarray | list[int]) -> np.ndarray:
        arr = np.asarray(lanes, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self._n_lanes):
            raise ValueError(f"lanes must be in [0, {self._n_lanes}), got {arr.tolist()[:10]}")
        if arr.size > 1 and np.unique(arr).size != arr.size:
            raise ValueError("lanes must not repeat within one call")
        return arr

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args}; {self.n_arms} arms, {self._n_lanes} lanes)"


def random_allowed(allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random allowed arm per row."""
    return np.argmax(np.where(allowed, rng.random(allowed.shape), -1.0), axis=1)


def argmax_random_ties(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row-wise argmax, breaking ties uniformly at random (ties matter: unplayed arms are all +inf)."""
    top = values.max(axis=1, keepdims=True)
    noise = rng.random(values.shape)
    return np.argmax(np.where(values == top, noise, -1.0), axis=1)


def check_param(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Validate one hyperparameter and name it (and its allowed range) when it is wrong."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    allowed = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} in {allowed}, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")


def init_params(policy_cls: type[Policy]) -> list[str]:
    """Names of a policy's hyperparameters (its keyword-only constructor arguments)."""
    sig = inspect.signature(policy_cls.__init__)
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def counts_state(n: int, n_arms: int) -> dict[str, np.ndarray]:
    """The usual per-lane statistics: pulls and reward sums per arm, and the lane's own clock."""
    return {
        "counts": np.zeros((n, n_arms), dtype=np.float64),
        "sums": np.zeros((n, n_arms), dtype=np.float64),
        "t": np.zeros(n, dtype=np.int64),
    }
