"""S-UCB: FedSpine's bandit over the (pruning ratio, LoRA rank) plane, as we reconstruct it."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.policies.base import Policy, argmax_random_ties, check_param, random_allowed


class SmoothUCB(Policy):
    r"""S-UCB ("Smooth UCB"), FedSpine's per-device configuration bandit.

    **From the paper** ([S]-tagged in ``shared/paper.md`` §2.4: a secondary reading of
    arXiv 2501.02438): one bandit per device chooses a (pruning ratio, LoRA rank) pair; it
    *partitions the continuous configuration space and progressively refines it*, balancing
    high observed reward against uncertainty in the UCB manner, with no prior knowledge of the
    device's compute or bandwidth.

    **Our reconstruction** (the exact rule is not public; HOO / zooming-bandit style):

    * The space is the arm grid (a fine grid stands in for the continuous plane; ``is_grid`` is
      required). Each lane keeps a partition of it into rectangular *cells* of grid indices,
      starting from ``init_ratio_cells x init_rank_cells`` cells.
    * Each leaf cell :math:`C` holds a pull count :math:`n_C` and a smoothed mean
      :math:`\mu_C \leftarrow \mu_C + \max(1/n_C, \beta)(x - \mu_C)`: the plain running mean
      for the first :math:`1/\beta` samples, an EMA afterwards, so rewards that drift as the
      model gets pruned and trained are tracked rather than averaged forever.
    * Score :math:`U_C = \mu_C + c\sqrt{2\ln t / n_C} + L \cdot \mathrm{diam}(C)`, with
      :math:`t` the lane's pulls and :math:`\mathrm{diam}` the cell's extent in grid steps
      normalised to [0, 1] per axis (the Lipschitz term of HOO: a large cell may hide a better
      point than its mean). Unvisited leaves score :math:`+\infty`.
    * Play the leaf with the highest score and draw an arm uniformly inside it (among the
      allowed arms, when the allocator restricts them).
    * Once a leaf has ``split_after`` samples it is halved along its longer (normalised) side;
      both children inherit :math:`\mu_C` and half of :math:`n_C` (ours: this keeps zooming
      fast instead of re-exploring both halves from scratch). At most ``max_cells`` cells per
      lane bound the memory (vectorised over lanes: (lanes, max_cells) arrays).
    """

    name = "s-ucb"

    def __init__(
        self,
        space: ArmSpace,
        *,
        c: float = 0.3,
        lipschitz: float = 0.1,
        beta: float = 0.2,
        split_after: int = 4,
        max_cells: int = 64,
        init_ratio_cells: int = 2,
        init_rank_cells: int = 2,
    ):
        if not space.is_grid:
            raise ValueError(
                "s-ucb needs a Cartesian arm space (every ratio with every rank); build it with ArmSpace.grid"
            )
        check_param("c", c, low=0.0)
        check_param("lipschitz", lipschitz, low=0.0)
        check_param("beta", beta, low=0.0, high=1.0, low_open=True)
        check_param("split_after", split_after, low=1, integer=True)
        check_param("init_ratio_cells", init_ratio_cells, low=1, integer=True)
        check_param("init_rank_cells", init_rank_cells, low=1, integer=True)
        self.c, self.lipschitz, self.beta = float(c), float(lipschitz), float(beta)
        self.split_after = int(split_after)
        self.init_ratio_cells, self.init_rank_cells = int(init_ratio_cells), int(init_rank_cells)
        self.n_ratios, self.n_ranks = len(space.ratios), len(space.ranks)
        p_edges = _edges(self.n_ratios, init_ratio_cells)
        r_edges = _edges(self.n_ranks, init_rank_cells)
        self._init_cells = [(p0, p1, r0, r1) for p0, p1 in p_edges for r0, r1 in r_edges]
        check_param("max_cells", max_cells, low=len(self._init_cells), integer=True)
        self.max_cells = int(max_cells)
        self._slots = min(self.max_cells, len(space))  # a grid of K arms never needs more than K cells
        self._arm_ratio_idx = np.arange(len(space)) // self.n_ranks
        self._arm_rank_idx = np.arange(len(space)) % self.n_ranks
        super().__init__(space)

    def params(self) -> dict[str, Any]:
        return {
            "c": self.c,
            "lipschitz": self.lipschitz,
            "beta": self.beta,
            "split_after": self.split_after,
            "max_cells": self.max_cells,
            "init_ratio_cells": self.init_ratio_cells,
            "init_rank_cells": self.init_rank_cells,
        }

    def _fresh_state(self, n: int) -> dict[str, np.ndarray]:
        cap, k = self._slots, len(self._init_cells)
        bounds = np.zeros((cap, 4), dtype=np.int64)
        bounds[:k] = np.asarray(self._init_cells, dtype=np.int64)
        cell_of_arm = np.empty(self.n_arms, dtype=np.int64)  # which leaf holds each arm
        for slot, (p0, p1, r0, r1) in enumerate(self._init_cells):
            for pi in range(p0, p1):
                cell_of_arm[pi * self.n_ranks + r0 : pi * self.n_ranks + r1] = slot
        return {
            # Slots [0, n_used) are exactly the leaves: a split keeps the left half in the parent's
            # slot and puts the right half in a new one, so no interior node is ever stored.
            "bounds": np.broadcast_to(bounds, (n, cap, 4)).copy(),  # p_lo, p_hi, r_lo, r_hi (half-open)
            "diam": np.broadcast_to(self._diam(bounds), (n, cap)).copy(),
            "cell_of_arm": np.broadcast_to(cell_of_arm, (n, self.n_arms)).copy(),
            "n_cell": np.zeros((n, cap), dtype=np.float64),
            "mu": np.zeros((n, cap), dtype=np.float64),
            "n_used": np.full(n, k, dtype=np.int64),
            "counts": np.zeros((n, self.n_arms), dtype=np.float64),
            "sums": np.zeros((n, self.n_arms), dtype=np.float64),
            "t": np.zeros(n, dtype=np.int64),
        }

    def _diam(self, b: np.ndarray) -> np.ndarray:
        dp = (b[..., 1] - b[..., 0] - 1) / max(self.n_ratios - 1, 1)
        dr = (b[..., 3] - b[..., 2] - 1) / max(self.n_ranks - 1, 1)
        return np.maximum(np.maximum(dp, dr), 0.0)

    def cell_scores(self, lanes: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """Score of every cell slot per lane; -inf for unused slots and cells with no allowed arm."""
        s = self._state
        n = s["n_cell"][lanes]
        t = np.maximum(s["t"][lanes], 1)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = s["mu"][lanes] + self.c * np.sqrt(2.0 * np.log(t) / n) + self.lipschitz * s["diam"][lanes]
        u = np.where(n > 0, u, np.inf)
        usable = np.arange(self._slots)[None, :] < s["n_used"][lanes][:, None]
        if allowed is not None and not allowed.all():
            flat = (s["cell_of_arm"][lanes] + self._slots * np.arange(lanes.size)[:, None])[allowed]
            usable &= np.bincount(flat, minlength=lanes.size * self._slots).reshape(lanes.size, -1) > 0
        return np.where(usable, u, -np.inf)

    def _select(self, lanes: np.ndarray, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
        cell = argmax_random_ties(self.cell_scores(lanes, allowed), rng)
        inside = (self._state["cell_of_arm"][lanes] == cell[:, None]) & allowed
        return random_allowed(inside, rng)  # uniform over the cell's allowed arms

    def _update(self, lanes: np.ndarray, arms: np.ndarray, rewards: np.ndarray) -> None:
        s = self._state
        cell = s["cell_of_arm"][lanes, arms]
        s["n_cell"][lanes, cell] += 1.0
        n = s["n_cell"][lanes, cell]
        mu = s["mu"][lanes, cell]
        s["mu"][lanes, cell] = mu + np.maximum(1.0 / n, self.beta) * (rewards - mu)
        s["counts"][lanes, arms] += 1.0
        s["sums"][lanes, arms] += rewards
        s["t"][lanes] += 1
        self._split(lanes, cell)

    def _split(self, lanes: np.ndarray, cell: np.ndarray) -> None:
        s = self._state
        b = s["bounds"][lanes, cell]
        wp, wr = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
        ready = (s["n_cell"][lanes, cell] >= self.split_after) & ((wp > 1) | (wr > 1))
        ready &= s["n_used"][lanes] < self._slots
        if not ready.any():
            return
        lanes, cell, b, wp, wr = lanes[ready], cell[ready], b[ready], wp[ready], wr[ready]
        along_ratio = (wp > 1) & ((wp / self.n_ratios >= wr / self.n_ranks) | (wr <= 1))
        lo_col = np.where(along_ratio, 0, 2)
        hi_col = lo_col + 1
        rows = np.arange(lanes.size)
        mid = b[rows, lo_col] + np.where(along_ratio, wp, wr) // 2
        child = s["n_used"][lanes]
        left, right = b.copy(), b.copy()
        left[rows, hi_col] = mid
        right[rows, lo_col] = mid
        s["bounds"][lanes, cell] = left
        s["bounds"][lanes, child] = right
        s["diam"][lanes, cell] = self._diam(left)
        s["diam"][lanes, child] = self._diam(right)
        coord = np.where(along_ratio[:, None], self._arm_ratio_idx[None, :], self._arm_rank_idx[None, :])
        moves = (s["cell_of_arm"][lanes] == cell[:, None]) & (coord >= mid[:, None])
        s["cell_of_arm"][lanes] = np.where(moves, child[:, None], s["cell_of_arm"][lanes])
        half = s["n_cell"][lanes, cell] / 2.0
        s["n_cell"][lanes, cell] = half
        s["n_cell"][lanes, child] = half
        s["mu"][lanes, child] = s["mu"][lanes, cell]
        s["n_used"][lanes] += 1

    def leaves(self, lane: int) -> list[dict[str, Any]]:
        """The lane's current partition, for inspection and plots: ratio/rank ranges, n, mean."""
        s = self._state
        out = []
        for c in range(int(s["n_used"][lane])):
            p0, p1, r0, r1 = (int(v) for v in s["bounds"][lane, c])
            out.append(
                {
                    "ratios": (self.space.ratios[p0], self.space.ratios[p1 - 1]),
                    "ranks": (self.space.ranks[r0], self.space.ranks[r1 - 1]),
                    "n": float(s["n_cell"][lane, c]),
                    "mean": float(s["mu"][lane, c]),
                }
            )
        return out


def _edges(n: int, parts: int) -> list[tuple[int, int]]:
    """Split range(n) into at most ``parts`` contiguous, near-equal, non-empty pieces."""
    parts = min(parts, n)
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts)]
