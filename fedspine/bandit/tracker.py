"""The reward's references: what a round's reward is measured against, kept across rounds.

:func:`fedspine.bandit.reward.combine` turns one round's reports into rewards given three
references; :class:`RewardTracker` owns them and the state they need:

* per lane, the loss-gain and update-norm scales (``gain_ref``, ``norm_ref``: the device's best
  recent value, decayed by ``RewardConfig.reference_decay``);
* fleet-wide, the time reference: the ``time_quantile`` of this round's completion times
  (``times``, for round ``times_round``) and an EMA of it over past rounds (``time_ref_ema``),
  used by a lone ``Allocator.observe`` and by ``SafeExploration.safe_arms``.

Objective ``"deadline"`` measures time against the round's deadline instead and uses one
fleet-wide scale for the gain and the norm. The ``Allocator`` composes it. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.reward import RewardConfig, combine, loss_gain


class RewardTracker:
    """Rewards of completed rounds under ``config`` for ``objective``, and their references."""

    def __init__(self, config: RewardConfig, space: ArmSpace, *, objective: str):
        self.config = config
        self.objective = objective
        self.target_ratio = config.target_ratio or space.max_ratio  # of the prune score
        self.gain_ref = np.zeros(0)  # per lane
        self.norm_ref = np.zeros(0)  # per lane
        self.time_ref_ema: float | None = None
        self.times_round = 0
        self.times: list[float] = []  # completion times seen so far in round ``times_round``

    def add_lanes(self, n: int) -> None:
        self.gain_ref = np.concatenate([self.gain_ref, np.zeros(n)])
        self.norm_ref = np.concatenate([self.norm_ref, np.zeros(n)])

    def fold(self, before_round: int) -> None:
        """Fold the finished round's time quantile into the EMA used by a lone ``observe``."""
        if self.times_round >= before_round:
            return
        if self.times:
            value = float(np.quantile(self.times, self.config.time_quantile))
            lam, old = self.config.fleet_ema, self.time_ref_ema
            self.time_ref_ema = value if old is None else (1 - lam) * old + lam * value
        self.times = []
        self.times_round = before_round

    def score(
        self,
        lanes: np.ndarray,
        ok: np.ndarray,
        *,
        times: np.ndarray,
        loss_before: np.ndarray,
        loss_after: np.ndarray,
        update_norm: np.ndarray,
        ratio: np.ndarray,
        whole_round: bool,
        deadline: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rewards in [0, 1], the quality factor the fleet model learns) of validated reports of distinct
        ``lanes`` (``ok``: the round completed; a failure gets 0), and the references updated.

        ``whole_round``: the reports are the whole round, so its own times give the time
        reference; ``deadline``: the round's (objective ``"deadline"``), or None.
        """
        cfg = self.config
        gains = np.where(ok, loss_gain(loss_before, loss_after), 0.0)
        decay = cfg.reference_decay
        old_gain_ref, old_norm_ref = self.gain_ref[lanes], self.norm_ref[lanes]
        gain_ref = np.where(ok, np.maximum(gains, decay * old_gain_ref), old_gain_ref)
        has_norm = ok & ~np.isnan(update_norm)
        norm_ref = np.where(
            has_norm, np.maximum(np.nan_to_num(update_norm), decay * old_norm_ref), old_norm_ref
        )
        round_times = [*self.times, *times[ok].tolist()]
        reward_cfg = cfg
        if self.objective == "deadline":
            # Finishing by the round's deadline costs nothing; pruning counts only toward a target.
            if deadline is not None:
                time_ref = deadline
            else:
                time_ref = max(round_times) if whole_round and round_times else math.inf
            # Finishing in time is guaranteed by the deadline, so the base share would only
            # compress what arms buy; without a sparsity target, pruning earns nothing by itself.
            prune_w = cfg.prune_weight if cfg.target_ratio else 0.0
            if cfg.loss_weight + prune_w + cfg.update_weight > 0:
                reward_cfg = replace(cfg, base_weight=0.0, prune_weight=prune_w)
        elif whole_round or self.time_ref_ema is None:
            time_ref = float(np.quantile(round_times, cfg.time_quantile)) if round_times else 1.0
        else:
            time_ref = self.time_ref_ema
        gain_scale, norm_scale = gain_ref, norm_ref
        if self.objective == "deadline":
            # One fleet-wide scale: a device's own best gain moves with the arms it plays, which
            # would blur what the arms buy; device effects are the pooled policy's job.
            gain_scale = float(max(self.gain_ref.max(initial=0.0), gain_ref.max(initial=0.0)))
            norm_scale = float(max(self.norm_ref.max(initial=0.0), norm_ref.max(initial=0.0)))
        rewards, scores = combine(
            reward_cfg,
            gain=gains,
            ratio=ratio,
            target_ratio=self.target_ratio,
            update_norm=np.where(ok, update_norm, np.nan),
            round_time_s=np.where(ok, times, 1.0),
            gain_ref=gain_scale,
            norm_ref=norm_scale,
            time_ref=time_ref,
        )
        rewards[~ok] = 0.0
        self.times = round_times
        self.gain_ref[lanes], self.norm_ref[lanes] = gain_ref, norm_ref
        # The deadline objective holds a sparsity target itself (SafeExploration._hold_sparsity),
        # so what it learns an arm is worth leaves out the pruning ingredient; the paper
        # objective keeps its reconstruction as it was.
        return rewards, scores["learning" if self.objective == "deadline" else "quality"]

    # --- persistence (keys of the Allocator's state, version 3) ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "gain_ref": self.gain_ref.tolist(),
            "norm_ref": self.norm_ref.tolist(),
            "time_ref_ema": self.time_ref_ema,
            "times_round": self.times_round,
            "times": list(self.times),
        }

    def load_state_dict(self, state: Any) -> None:
        self.gain_ref = np.asarray(state["gain_ref"], dtype=np.float64)
        self.norm_ref = np.asarray(state["norm_ref"], dtype=np.float64)
        ema = state["time_ref_ema"]
        self.time_ref_ema = None if ema is None else float(ema)
        self.times_round = int(state["times_round"])
        self.times = [float(x) for x in state["times"]]
