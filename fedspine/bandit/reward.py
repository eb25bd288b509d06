"""FedSpine's round reward: how good was this (ratio, rank) for this device, in [0, 1]."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RewardConfig:
    r"""Weights of the reward's ingredients.

    **Paper** ([S], ``shared/paper.md`` §2.4): the reward combines (i) local-loss improvement,
    (ii) pruning progress, (iii) the estimated importance of the device's LoRA update and
    (iv) its completion time relative to the other devices of the round. **The formula is
    ours** (the paper's is not public). Oort-style (Lai et al., OSDI 2021), a quality score is
    multiplied by a straggler penalty:

    .. math::
        R_i = s^{time}_i \cdot
              \frac{w_0 + w_\ell s^{loss}_i + w_p s^{prune}_i + w_u s^{update}_i}{w_0 + w_\ell + w_p + w_u},
        \qquad s^{time}_i = \min(1, T_{ref} / T_i)^{\alpha}

    * :math:`T_{ref}`: the ``time_quantile`` of the round's completion times. Devices at or below
      it are not penalised; slower ones lose reward in proportion to how late they are. The
      product (not a sum) keeps the incentive to speed up alive even for a device far behind:
      halving its time doubles its reward. A low quantile (0.25) makes the fleet converge to one
      arm per device whatever the starting point, in our synthetic studies;
    * :math:`s^{loss}_i = g_i / G_i`, :math:`g_i = \max(0, (L^{before}_i - L^{after}_i) / L^{before}_i)`,
      with :math:`G_i` the device's own best recent gain (:math:`G_i \leftarrow \max(g_i, \delta G_i)`,
      ``reference_decay`` :math:`= \delta`). Per-device scaling is enough for a per-device bandit
      and avoids a race to the bottom that round-relative scaling invites;
    * :math:`s^{prune}_i = \min(1, p_i / p_{target})`: pruning ratio reached, relative to
      ``target_ratio`` (default: the space's largest ratio);
    * :math:`s^{update}_i = \lVert\Delta W_i\rVert / U_i`, scaled like the loss (dropped, with its
      weight, when a device reports no update norm);
    * :math:`w_0` (``base_weight``) is the share of reward earned just by finishing in time.

    A device that fails (timeout, crash, out of memory) gets the worst reward, 0. The time
    reference comes from the whole round in ``Allocator.observe_round``; a lone
    ``Allocator.observe`` uses its EMA over past rounds (``fleet_ema``: weight of the newest).
    """

    base_weight: float = 1.0
    loss_weight: float = 1.0
    prune_weight: float = 0.25
    update_weight: float = 0.25
    time_quantile: float = 0.25
    time_alpha: float = 1.0
    reference_decay: float = 0.9
    target_ratio: float = 0.0
    fleet_ema: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"RewardConfig.{f.name} must be a finite number, got {v!r}")
        for name in ("base_weight", "loss_weight", "prune_weight", "update_weight", "time_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"RewardConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.base_weight + self.loss_weight + self.prune_weight + self.update_weight <= 0:
            raise ValueError("RewardConfig: at least one of base/loss/prune/update weights must be > 0")
        if not 0.0 <= self.reference_decay <= 1.0:
            raise ValueError(f"RewardConfig.reference_decay must be in [0, 1], got {self.reference_decay!r}")
        if not 0.0 <= self.target_ratio < 1.0:
            raise ValueError(
                "RewardConfig.target_ratio must be in [0, 1) (0 means the space's largest ratio), "
                f"got {self.target_ratio!r}"
            )
        if not 0.0 <= self.time_quantile <= 1.0:
            raise ValueError(f"RewardConfig.time_quantile must be in [0, 1], got {self.time_quantile!r}")
        if not 0.0 < self.fleet_ema <= 1.0:
            raise ValueError(f"RewardConfig.fleet_ema must be in (0, 1], got {self.fleet_ema!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loss_gain(loss_before: np.ndarray, loss_after: np.ndarray) -> np.ndarray:
    """Relative loss improvement, 0 when the loss did not go down (or started at 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(loss_before > 0, (loss_before - loss_after) / loss_before, 0.0)
    return np.maximum(g, 0.0)


def time_score(round_time_s: np.ndarray, time_ref: float, alpha: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(round_time_s > 0, time_ref / round_time_s, 1.0)
    return np.minimum(1.0, ratio) ** alpha


def _relative(values: np.ndarray, ref: np.ndarray | float) -> np.ndarray:
    ref_arr = np.asarray(ref, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ref_arr > 0, values / ref_arr, 0.0)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def combine(
    cfg: RewardConfig,
    *,
    gain: np.ndarray,
    ratio: np.ndarray,
    target_ratio: float,
    update_norm: np.ndarray,
    round_time_s: np.ndarray,
    gain_ref: np.ndarray | float,
    norm_ref: np.ndarray | float,
    time_ref: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rewards and the scores behind them (for logging), all arrays over devices.

    ``update_norm`` is NaN where a device did not report one; that ingredient is then left out
    of that device's quality mean. ``gain_ref``/``norm_ref`` are per-device references.
    """
    scores = {
        "loss": _relative(gain, gain_ref),
        "prune": _relative(ratio, target_ratio),
        "update": _relative(np.nan_to_num(update_norm, nan=0.0), norm_ref),
        "time": time_score(round_time_s, time_ref, cfg.time_alpha),
    }
    w_update = np.where(np.isnan(update_norm), 0.0, cfg.update_weight)
    num = (
        cfg.base_weight
        + cfg.loss_weight * scores["loss"]
        + cfg.prune_weight * scores["prune"]
        + w_update * scores["update"]
    )
    den = cfg.base_weight + cfg.loss_weight + cfg.prune_weight + w_update
    scores["quality"] = num / den
    # What the arm bought in learning: the quality without the pruning ingredient, which only
    # says how far the ratio is from a sparsity target (ours; equal to "quality" without one).
    scores["learning"] = (num - cfg.prune_weight * scores["prune"]) / den
    return np.clip(scores["time"] * scores["quality"], 0.0, 1.0), scores
