"""The allocator: one bandit per device, choosing each device's (pruning ratio, LoRA rank) per round."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from operator import attrgetter
from typing import Any

import numpy as np

from fedspine.bandit.arms import Arm, ArmSpace
from fedspine.bandit.fleet import FleetModel
from fedspine.bandit.planner import capacity, one_step_cheaper
from fedspine.bandit.policies import POLICIES, make_policy
from fedspine.bandit.reward import RewardConfig, combine, loss_gain, time_score

DeviceId = str | int

_EXTRA_KEYS = ("achieved_ratio", "update_norm", "failed")
_REPORT_FIELDS = (
    "device_id",
    "arm",
    "round_time_s",
    "loss_before",
    "loss_after",
    "achieved_ratio",
    "update_norm",
    "failed",
)
_report_fields = attrgetter(*_REPORT_FIELDS)
_STATE_VERSION = 2
OBJECTIVES = ("deadline", "paper")
# Objective "deadline": an arm a device has not run itself is admitted only if its pooled predicted
# time, times this margin, meets the deadline (ours; chosen on the synthetic fleets that
# scripts/allocator_vs_planner.py holds out: 1.0 overshoots the planner's makespan by ~7%, 1.05
# costs ~2% capacity).
_UNPROVEN_MARGIN = 1.03
_CONFIG_KEYS = (
    "safe_slack",
    "objective",
    "deadline_slack",
    "explore_factor",
    "change_factor",
    "monotone_pruning",
    "prune_elasticity",
)
DEFAULT_POLICY = {"deadline": "pooled-ucb", "paper": "s-ucb"}


@dataclass(frozen=True)
class RoundReport:
    """What one device reports after a round (or ``failed=True`` if it never finished).

    ``achieved_ratio`` defaults to the arm's ratio; ``update_norm`` (Frobenius norm of the
    device's LoRA update) is optional. Times are seconds, losses are the local training loss
    before and after the round's local steps.
    """

    device_id: DeviceId
    arm: Arm
    round_time_s: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    achieved_ratio: float | None = None
    update_norm: float | None = None
    failed: bool = False


class Allocator:
    """Chooses every device's arm each round and learns from what the round reported.

    It knows nothing about device speed or bandwidth: it learns them from reported round times.
    Each device is a lane of ``policy``, fed with the reward of
    :class:`~fedspine.bandit.reward.RewardConfig`. All randomness comes from ``seed``;
    :meth:`state_dict` is plain JSON and a restored allocator makes exactly the same choices.

    ``objective`` says what the allocation serves (both ours; see README "The allocator"):

    * ``"deadline"`` (default): time to accuracy. A round lasts as long as its slowest device,
      so each round gets one deadline, the shortest every device is predicted to meet (the
      slowest device's fastest arm, times ``1 + deadline_slack``), learnt from the fleet time
      model (:mod:`fedspine.bandit.fleet`). Each device gets the pruning ratio of the largest
      arm predicted to finish by it, so a fast device's spare time becomes capacity and only the
      pace-setters prune hard; the policy (default ``pooled-ucb``, which pools what each arm
      buys over the fleet) chooses the rank. The reward's time term is relative to the
      deadline: finishing within it costs nothing. :meth:`deadline_arms` gives the details
      (guessed costs of arms nobody ran, monotone pruning, a sparsity target).
    * ``"paper"``: the FedSpine paper's structure as we reconstruct it: per-device bandits
      (default ``s-ucb``) on the reward with its 0.25-quantile time reference, optionally
      capped by ``safe_slack`` below. Kept for ablations and honesty.

    Use it inside any FL loop::

        alloc = Allocator(ArmSpace.grid([0.0, 0.2, 0.4, 0.6], [4, 8, 16]), seed=0)
        for rnd in range(1, rounds + 1):
            arms = alloc.assign(devices, rnd)               # {device_id: Arm(ratio, rank)}
            reports = [train_on(d, arms[d]) for d in devices]  # -> RoundReport each
            rewards = alloc.observe_round(reports)

    Devices unseen before start with no history; a device absent for some rounds keeps its
    history; an assignment never observed by the next :meth:`assign` counts as a failure
    (reward 0). Rejected calls raise ``ValueError`` naming the argument and change nothing.

    ``safe_slack`` (objective ``"paper"``; ours, not in the paper) turns on safe exploration: the
    fleet time model keeps every device's exploration under the round's predicted makespan at
    the reward-optimal arms, times ``1 + safe_slack``. ``None`` leaves pure per-device bandits.
    """

    def __init__(
        self,
        space: ArmSpace,
        policy: str | None = None,
        policy_params: Mapping[str, Any] | None = None,
        reward: RewardConfig | None = None,
        seed: int = 0,
        safe_slack: float | None = 0.05,
        objective: str = "deadline",
        deadline_slack: float = 0.0,
        explore_factor: float = 1.25,
        change_factor: float | None = 1.5,
        monotone_pruning: bool = True,
        prune_elasticity: float = 0.8,
    ):
        if not isinstance(space, ArmSpace):
            raise ValueError(f"space must be an ArmSpace, got {type(space).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if reward is not None and not isinstance(reward, RewardConfig):
            raise ValueError(f"reward must be a RewardConfig, got {type(reward).__name__}")
        if safe_slack is not None and (
            isinstance(safe_slack, bool)
            or not isinstance(safe_slack, numbers.Real)
            or not 0 <= safe_slack < math.inf
        ):
            raise ValueError(f"safe_slack must be None (off) or a number >= 0, got {safe_slack!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        _check_number(deadline_slack, "deadline_slack", lo=0.0)
        _check_number(explore_factor, "explore_factor", lo=1.0)
        if change_factor is not None:
            _check_number(change_factor, "change_factor", lo=1.0, lo_open=True)
        _check_bool(monotone_pruning, "monotone_pruning")
        _check_number(prune_elasticity, "prune_elasticity", lo=0.0)
        self.space = space
        self.objective = objective
        self.safe_slack = None if safe_slack is None else float(safe_slack)
        self.deadline_slack = float(deadline_slack)
        self.explore_factor = float(explore_factor)
        self.change_factor = None if change_factor is None else float(change_factor)
        self.monotone_pruning = bool(monotone_pruning)
        self.prune_elasticity = float(prune_elasticity)
        # The paper objective keeps its original time model exactly (no change detection).
        if objective == "deadline":  # sudden changes are caught by change_factor, so times fade slowly
            self.fleet = FleetModel(len(space), decay=0.98, change_factor=self.change_factor)
        else:
            self.fleet = FleetModel(len(space))
        self._capacity = capacity(space)
        self._step = one_step_cheaper(space)
        self._cheapest = int(np.argmin(self._capacity))
        self._arm_ratios = np.array([a.ratio for a in space], dtype=np.float64)
        self._arm_ranks = np.array([a.rank for a in space], dtype=np.int64)
        self._grid_ratios = np.array(space.ratios)
        # A newcomer's first arm: pruning is undone by nothing when devices prune progressively
        # (the paper's design), so start unpruned at the lowest rank; else on the cheapest arm.
        unpruned = np.flatnonzero(self._arm_ratios == self._grid_ratios[0])
        self._start_arm = (
            int(unpruned[np.argmin(self._arm_ranks[unpruned])]) if self.monotone_pruning else self._cheapest
        )
        self._arm_index = dict(space.arm_index_map)
        self._arm_by_id = {id(a): i for a, i in self._arm_index.items()}
        self.policy = make_policy(policy or DEFAULT_POLICY[objective], space, **dict(policy_params or {}))
        self.reward = reward or RewardConfig()
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self._lanes: dict[DeviceId, int] = {}
        self._pending: dict[DeviceId, tuple[int, int]] = {}  # device -> (round, arm index)
        self._round = 0
        # Per-device scales of the loss gain and update norm (see RewardConfig), by lane.
        self._gain_ref = np.zeros(0)
        self._norm_ref = np.zeros(0)
        self._floor = np.zeros(0)  # objective "deadline": each lane's pruning so far (monotone)
        # Fleet-level time reference: this round's completion times, and an EMA over past rounds.
        self._time_ref_ema: float | None = None
        self._times_round = 0
        self._times: list[float] = []
        # objective "deadline": the deadline set for the current round (None until times are known)
        self._deadline: float | None = None

    # --- choosing ------------------------------------------------------------------------------
    def assign(self, device_ids: Iterable[DeviceId], round: int) -> dict[DeviceId, Arm]:
        """Arms for ``device_ids`` in round ``round`` (rounds count from 1 and never go back)."""
        ids = _check_ids(device_ids, "device_ids")
        if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 1:
            raise ValueError(f"round must be an integer >= 1, got {round!r}")
        round = int(round)
        if round < self._round:
            raise ValueError(f"round must not go back: got {round}, the allocator is at round {self._round}")
        if self._pending and round == self._round:
            for d in ids:
                if d in self._pending:
                    raise ValueError(
                        f"device_ids: {d!r} already has an unobserved assignment for round {round}"
                    )
        # validated: from here on, state changes
        self._expire_before(round)
        self._fold_time_ref(before_round=round)
        self._round = round
        new = [d for d in ids if d not in self._lanes]
        if new:
            self.fleet.add_lanes(len(new))
            self._gain_ref = np.concatenate([self._gain_ref, np.zeros(len(new))])
            self._norm_ref = np.concatenate([self._norm_ref, np.zeros(len(new))])
            self._floor = np.concatenate([self._floor, np.zeros(len(new))])
            for d, lane in zip(new, self.policy.add_lanes(len(new)), strict=True):
                self._lanes[d] = int(lane)
        lanes = np.fromiter(map(self._lanes.__getitem__, ids), dtype=np.int64, count=len(ids))
        if self.objective == "deadline":
            allowed, self._deadline = self.deadline_arms(lanes)
        else:
            allowed = None if self.safe_slack is None else self.safe_arms(lanes)
        arms = self.policy.select(lanes, self.rng, allowed).tolist()
        self._pending.update(zip(ids, zip(repeat(round), arms, strict=False), strict=True))
        return dict(zip(ids, map(self.space.arms.__getitem__, arms), strict=True))

    # --- learning ------------------------------------------------------------------------------
    def observe(
        self,
        device_id: DeviceId,
        arm: Arm,
        round_time_s: float,
        loss_before: float,
        loss_after: float,
        **extra: Any,
    ) -> float:
        """Reward one device's round and update its bandit; returns the reward in [0, 1].

        ``extra`` may hold ``achieved_ratio``, ``update_norm`` and ``failed``. Fleet statistics
        (the time reference) come from earlier rounds; prefer
        :meth:`observe_round` when the whole round is at hand.
        """
        unknown = sorted(set(extra) - set(_EXTRA_KEYS))
        if unknown:
            raise ValueError(f"unknown extra field(s) {unknown}; allowed: {list(_EXTRA_KEYS)}")
        report = RoundReport(device_id, arm, round_time_s, loss_before, loss_after, **extra)
        return self._observe([report], whole_round=False)[device_id]

    def observe_round(self, reports: Iterable[RoundReport | Mapping[str, Any]]) -> dict[DeviceId, float]:
        """Reward a whole round at once, using that round's own fleet statistics."""
        reports = list(reports)
        if set(map(type, reports)) <= {RoundReport}:
            return self._observe(reports, whole_round=True)
        parsed = []
        for i, r in enumerate(reports):
            if isinstance(r, RoundReport):
                parsed.append(r)
            elif isinstance(r, Mapping):
                try:
                    parsed.append(RoundReport(**r))
                except TypeError as exc:
                    raise ValueError(f"reports[{i}]: {exc}") from None
            else:
                raise ValueError(f"reports[{i}] must be a RoundReport or a dict, got {type(r).__name__}")
        return self._observe(parsed, whole_round=True)

    def fail(self, device_id: DeviceId) -> float:
        """Record that a device never reported back for its pending assignment (reward 0)."""
        pend = self._pending.get(device_id)
        if pend is None:
            raise ValueError(f"device_id {device_id!r} has no pending assignment")
        return self._observe([RoundReport(device_id, self.space[pend[1]], failed=True)], whole_round=False)[
            device_id
        ]

    def _observe(self, reports: Sequence[RoundReport], whole_round: bool) -> dict[DeviceId, float]:
        n = len(reports)
        if n == 0:
            return {}
        cols = dict(zip(_REPORT_FIELDS, zip(*map(_report_fields, reports), strict=True), strict=True))
        ids = _check_ids(cols["device_id"], "device_id")
        if not all(map(self._pending.__contains__, ids)):
            d = next(d for d in ids if d not in self._pending)
            what = "unknown device" if d not in self._lanes else "device without a pending assignment"
            raise ValueError(f"device_id {d!r}: {what} (call assign first; an assignment is observed once)")
        # Arms handed out by assign() are the space's own objects: look them up by identity first
        # (a C-level int lookup), by value only for the rest.
        arm_idx = np.fromiter(
            map(self._arm_by_id.get, map(id, cols["arm"]), repeat(-1)), dtype=np.int64, count=n
        )
        if (arm_idx < 0).any():
            by_value = np.fromiter(map(self._arm_index.get, cols["arm"], repeat(-1)), dtype=np.int64, count=n)
            arm_idx = np.where(arm_idx < 0, by_value, arm_idx)
        if (arm_idx < 0).any():
            r = reports[int(np.argmax(arm_idx < 0))]
            self.space.index(r.arm, f"arm (device {r.device_id!r})")  # raises with the full message
        if not set(map(type, cols["failed"])) <= {bool, np.bool_}:
            for v in cols["failed"]:
                _check_bool(v, "failed")
        failed = np.fromiter(cols["failed"], dtype=bool, count=n)
        ok = ~failed
        times = _column(cols["round_time_s"], "round_time_s", ids, ok, lo=0.0)
        before = _column(cols["loss_before"], "loss_before", ids, ok, lo=0.0)
        after = _column(cols["loss_after"], "loss_after", ids, ok, lo=0.0)
        norms = _column(cols["update_norm"], "update_norm", ids, None, lo=0.0)
        ratios = _column(cols["achieved_ratio"], "achieved_ratio", ids, None, lo=0.0, hi=1.0)
        ratios = np.where(np.isnan(ratios), self._arm_ratios[arm_idx], ratios)
        # validated: from here on, state changes
        gains = np.where(ok, loss_gain(before, after), 0.0)
        decay = self.reward.reference_decay
        lanes = np.fromiter(map(self._lanes.__getitem__, ids), dtype=np.int64, count=n)
        old_gain_ref, old_norm_ref = self._gain_ref[lanes], self._norm_ref[lanes]
        gain_ref = np.where(ok, np.maximum(gains, decay * old_gain_ref), old_gain_ref)
        has_norm = ok & ~np.isnan(norms)
        norm_ref = np.where(has_norm, np.maximum(np.nan_to_num(norms), decay * old_norm_ref), old_norm_ref)
        round_times = [*self._times, *times[ok].tolist()]
        reward_cfg = self.reward
        if self.objective == "deadline":
            # Finishing by the round's deadline costs nothing; pruning counts only toward a target.
            if self._deadline is not None:
                time_ref = self._deadline
            else:
                time_ref = max(round_times) if whole_round and round_times else math.inf
            # Finishing in time is guaranteed by the deadline, so the base share would only
            # compress what arms buy; without a sparsity target, pruning earns nothing by itself.
            prune_w = reward_cfg.prune_weight if reward_cfg.target_ratio else 0.0
            if reward_cfg.loss_weight + prune_w + reward_cfg.update_weight > 0:
                reward_cfg = replace(reward_cfg, base_weight=0.0, prune_weight=prune_w)
        elif whole_round or self._time_ref_ema is None:
            time_ref = float(np.quantile(round_times, self.reward.time_quantile)) if round_times else 1.0
        else:
            time_ref = self._time_ref_ema
        gain_scale, norm_scale = gain_ref, norm_ref
        if self.objective == "deadline":
            # One fleet-wide scale: a device's own best gain moves with the arms it plays, which
            # would blur what the arms buy; device effects are the pooled policy's job.
            gain_scale = float(max(self._gain_ref.max(initial=0.0), gain_ref.max(initial=0.0)))
            norm_scale = float(max(self._norm_ref.max(initial=0.0), norm_ref.max(initial=0.0)))
        rewards, scores = combine(
            reward_cfg,
            gain=gains,
            ratio=ratios,
            target_ratio=self.reward.target_ratio or self.space.max_ratio,
            update_norm=np.where(ok, norms, np.nan),
            round_time_s=np.where(ok, times, 1.0),
            gain_ref=gain_scale,
            norm_ref=norm_scale,
            time_ref=time_ref,
        )
        rewards[failed] = 0.0
        if self.objective == "deadline":  # learn from the arm that actually ran
            arm_idx = np.where(ok, self._effective_arms(arm_idx, ratios), arm_idx)
            if self.monotone_pruning:
                self._floor[lanes[ok]] = np.maximum(self._floor[lanes[ok]], ratios[ok])
        self.policy.update(lanes, arm_idx, rewards)
        self.fleet.observe(lanes[ok], arm_idx[ok], times[ok], scores["quality"][ok])
        self._times = round_times
        self._gain_ref[lanes], self._norm_ref[lanes] = gain_ref, norm_ref
        if len(ids) == len(self._pending):  # ids are distinct and all pending: the whole round
            self._pending.clear()
        else:
            for d in ids:
                del self._pending[d]
        return dict(zip(ids, rewards.tolist(), strict=True))

    def deadline_arms(self, lanes: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Arms each lane may play under the round's deadline, and the deadline (objective
        ``"deadline"``; None while no device's time is known).

        * A device never observed gets its start arm (unpruned at the lowest rank when pruning
          is monotone, else the cheapest arm); one round gives its speed.
        * Times come from the fleet model. An arm nobody has run is guessed from run arms of the
          same rank: pruning more scales the time by the kept fraction to the power
          ``prune_elasticity`` (compute and transfer shrink with the pruned structure; ours);
          pruning less or a rank one step higher costs ``explore_factor`` times its run
          neighbour one grid step cheaper; a lower rank costs at most what the higher one did.
        * The deadline is the slowest device's fastest arm (among the arms its pruning so far
          allows), times ``1 + deadline_slack``.
        * Each device gets the pruning ratio of the largest arm (by capacity,
          ``fedspine.bandit.planner``) predicted to meet the deadline, as the planner would
          choose, and the policy chooses among the ranks at that ratio that meet it. Pruning is
          never undone, so the ratio is not explored. A device that meets the deadline on no
          arm plays its fastest.
        * With ``RewardConfig.target_ratio``, the fleet's mean ratio is held at the target: a
          longer deadline if the devices would prune more, a common pruning floor if less.
        """
        n, n_arms = lanes.size, len(self.space)
        allowed = np.zeros((n, n_arms), dtype=bool)
        theta, phi = self.fleet.fit()
        known = ~np.isnan(theta[lanes])
        allowed[~known, self._start_arm] = True
        guess = self._guess_arm_costs(phi)
        if not known.any() or np.isnan(guess).all():
            allowed[known, self._start_arm] = True
            return allowed, None
        lanes_k = lanes[known]
        pred = self.fleet.predict_blended(lanes_k, prior_weight=0.25, fitted=(theta, phi))
        # a pooled prediction for an arm the device has not run itself carries the model's error
        unproven = self.fleet.weight[lanes_k] < 0.5
        pred = np.where(unproven, pred * _UNPROVEN_MARGIN, pred)
        pred = np.where(np.isnan(phi)[None, :], np.exp(theta[lanes_k, None] + guess[None, :]), pred)
        pred = np.where(np.isnan(pred), np.inf, pred)
        pred[self._arm_ratios[None, :] < self._floor[lanes_k, None] - 1e-9] = np.inf  # pruned already
        fastest = pred.min(axis=1)
        deadline = float(fastest[np.isfinite(fastest)].max(initial=0.0)) * (1.0 + self.deadline_slack)
        if deadline <= 0.0:
            allowed[known, self._start_arm] = True
            return allowed, None
        fits, ok = self._fit_deadline(pred, deadline)
        target = self.reward.target_ratio
        if target and self._arm_ratios[ok.argmax(axis=1)].mean() > target + 1e-9:
            # a sparsity target below what this deadline needs: lengthen the round until it holds
            longest = max(2.0, float(pred[np.isfinite(pred)].max() / deadline))
            for factor in np.geomspace(1.02, longest, 40):  # the last one if none is enough
                fits, ok = self._fit_deadline(pred, deadline * factor)
                if self._arm_ratios[ok.argmax(axis=1)].mean() <= target + 1e-9:
                    break
            deadline *= float(factor)
        elif target:
            ok = self._sparsity_floor(fits, ok)
        allowed[known] = ok
        return allowed, deadline

    def _fit_deadline(self, pred: np.ndarray, deadline: float) -> tuple[np.ndarray, np.ndarray]:
        """Arms predicted to meet ``deadline`` (a device that meets it on none: its fastest), and
        among them those at the ratio of the largest arm that fits, as the planner would choose
        (ties: the least pruning, which is never undone)."""
        fits = pred <= deadline * (1 + 1e-9)
        fits[np.arange(pred.shape[0]), pred.argmin(axis=1)] |= ~fits.any(axis=1)
        score = np.where(fits, self._capacity[None, :] - 1e-9 * self._arm_ratios[None, :], -np.inf)
        chosen = self._arm_ratios[score.argmax(axis=1)]
        return fits, fits & np.isclose(self._arm_ratios[None, :], chosen[:, None])

    def _guess_arm_costs(self, phi: np.ndarray) -> np.ndarray:
        """Arm costs (log-time effects) with the arms nobody has run guessed from run ones of
        the same rank, as :meth:`deadline_arms` describes; NaN where nothing is known yet."""
        out = phi.copy()
        run = ~np.isnan(phi)
        ratios, ranks = self._arm_ratios, self._arm_ranks
        same_rank = ranks[:, None] == ranks[None, :]
        # pruning more than a run arm: the nearest run arm of the same rank that prunes less
        less = same_rank & (ratios[None, :] < ratios[:, None] - 1e-12) & run[None, :]
        ref = np.where(less, ratios[None, :], -np.inf).argmax(axis=1)
        has = less.any(axis=1) & ~run
        kept = np.log((1 - ratios[has]) / (1 - ratios[ref[has]]))
        out[has] = phi[ref[has]] + self.prune_elasticity * kept
        # heavier by one grid step than a run arm
        heavier = self._step & run[None, :]
        bound = np.where(heavier, phi[None, :], -np.inf).max(axis=1)
        take = np.isnan(out) & heavier.any(axis=1)
        out[take] = bound[take] + np.log(self.explore_factor)
        # a lower rank than a run arm at the same ratio: no slower than it
        same_ratio_higher = (
            np.isclose(ratios[:, None], ratios[None, :]) & (ranks[None, :] > ranks[:, None]) & run[None, :]
        )
        upper = np.where(same_ratio_higher, phi[None, :], np.inf).min(axis=1)
        take = np.isnan(out) & same_ratio_higher.any(axis=1)
        out[take] = upper[take]
        return out

    def _effective_arms(self, arm_idx: np.ndarray, achieved: np.ndarray) -> np.ndarray:
        """The arm that ran: the assigned rank at the grid ratio nearest to the achieved one
        (a device already pruned further than its arm ran at its own sparsity)."""
        nearest = self._grid_ratios[np.abs(achieved[:, None] - self._grid_ratios[None, :]).argmin(axis=1)]
        want = np.isclose(self._arm_ratios[None, :], nearest[:, None]) & (
            self._arm_ranks[None, :] == self._arm_ranks[arm_idx][:, None]
        )
        return np.where(want.any(axis=1), want.argmax(axis=1), arm_idx)

    def _sparsity_floor(self, fits: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """With a sparsity target: pin each device's ratio to ``max(floor, the ratio the deadline
        gives it)`` with the lowest common floor whose fleet mean reaches ``target_ratio`` (ours).
        The pace setters prune what the deadline needs, the others exactly the floor; the policy
        picks the rank. ``chosen`` is the allowed set without a target."""
        ratios = self._arm_ratios
        need = np.where(chosen, ratios[None, :], np.inf).min(axis=1)
        pinned = need
        for floor in sorted(set(ratios.tolist())):
            above = np.where(fits & (ratios[None, :] >= floor - 1e-12), ratios[None, :], np.inf).min(axis=1)
            pinned = np.where(np.isfinite(above), np.maximum(above, need), need)
            if pinned.mean() >= self.reward.target_ratio - 1e-9:
                break
        return fits & np.isclose(ratios[None, :], pinned[:, None])

    def safe_arms(self, lanes: np.ndarray) -> np.ndarray | None:
        """Arms each lane may explore, or None when the fleet model cannot tell yet.

        The fleet model (``fedspine.bandit.fleet``) predicts every device's time on every arm
        and, with the pooled quality per arm, its reward. The arm with the best predicted reward
        gives each device a predicted time; the slowest of those, times ``1 + safe_slack``, is
        the round's time cap. A device exploring a heavy arm would otherwise set the whole
        round's makespan; under the cap, exploration happens where it costs nobody any waiting.
        Arms (or devices) the model knows nothing about stay allowed, so newcomers and untried
        arms are still explored (ours).
        """
        if self._time_ref_ema is None:
            return None
        pred = self.fleet.predict(lanes)
        quality = self.fleet.quality()
        predicted_reward = time_score(pred, self._time_ref_ema, self.reward.time_alpha) * quality[None, :]
        rows = np.arange(lanes.size)
        known = ~np.all(np.isnan(predicted_reward), axis=1)
        if not known.any():
            return None
        best = np.nanargmax(predicted_reward[known], axis=1)
        cap = float(np.max(pred[rows[known], best])) * (1.0 + float(self.safe_slack or 0.0))
        allowed = ~(pred > cap)  # NaN (unknown) stays allowed
        stuck = ~allowed.any(axis=1)
        if stuck.any():
            allowed[stuck, np.nanargmin(pred[stuck], axis=1)] = True
        return allowed

    # --- fleet statistics ---------------------------------------------------------------------
    def _fold_time_ref(self, before_round: int) -> None:
        """Fold the finished round's time quantile into the EMA used by a lone ``observe``."""
        if self._times_round >= before_round:
            return
        if self._times:
            value = float(np.quantile(self._times, self.reward.time_quantile))
            lam, old = self.reward.fleet_ema, self._time_ref_ema
            self._time_ref_ema = value if old is None else (1 - lam) * old + lam * value
        self._times = []
        self._times_round = before_round

    def _expire_before(self, round: int) -> None:
        stale = [d for d, (r, _) in self._pending.items() if r < round]
        if stale:
            lanes = np.array([self._lanes[d] for d in stale], dtype=np.int64)
            arms = np.array([self._pending[d][1] for d in stale], dtype=np.int64)
            self.policy.update(lanes, arms, np.zeros(len(stale)))
            for d in stale:
                del self._pending[d]

    # --- inspection ------------------------------------------------------------------------------
    @property
    def devices(self) -> list[DeviceId]:
        return list(self._lanes)

    @property
    def pending(self) -> dict[DeviceId, Arm]:
        return {d: self.space[a] for d, (_, a) in self._pending.items()}

    def best_arm(self, device_id: DeviceId) -> Arm | None:
        """The arm with the best estimated reward for a device (no exploration); None if unknown."""
        if device_id not in self._lanes:
            raise ValueError(f"device_id {device_id!r}: unknown device")
        a = int(self.policy.best([self._lanes[device_id]])[0])
        return None if a < 0 else self.space[a]

    def estimates(self, device_id: DeviceId) -> dict[Arm, float]:
        """Estimated mean reward per arm tried by the device."""
        if device_id not in self._lanes:
            raise ValueError(f"device_id {device_id!r}: unknown device")
        est = self.policy.estimates(self._lanes[device_id])
        return {self.space[i]: float(v) for i, v in enumerate(est) if not math.isnan(v)}

    # --- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "space": self.space.to_dict(),
            "reward": self.reward.to_dict(),
            "seed": self.seed,
            "safe_slack": self.safe_slack,
            "objective": self.objective,
            "deadline_slack": self.deadline_slack,
            "explore_factor": self.explore_factor,
            "change_factor": self.change_factor,
            "monotone_pruning": self.monotone_pruning,
            "prune_elasticity": self.prune_elasticity,
            "deadline": self._deadline,
            "floor": self._floor.tolist(),
            "rng": self.rng.bit_generator.state,
            "fleet": self.fleet.state_dict(),
            "policy": self.policy.state_dict(),
            "lanes": [[d, lane] for d, lane in self._lanes.items()],
            "pending": [[d, r, a] for d, (r, a) in self._pending.items()],
            "round": self._round,
            "gain_ref": self._gain_ref.tolist(),
            "norm_ref": self._norm_ref.tolist(),
            "time_ref_ema": self._time_ref_ema,
            "times_round": self._times_round,
            "times": list(self._times),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not {_STATE_VERSION}")
        if ArmSpace.from_dict(state["space"]) != self.space:
            raise ValueError("state was saved for a different arm space")
        if RewardConfig(**state["reward"]) != self.reward:
            raise ValueError(f"state reward config {state['reward']} differs from {self.reward.to_dict()}")
        if state["policy"]["policy"] != self.policy.name:
            raise ValueError(f"state is for policy {state['policy']['policy']!r}, not {self.policy.name!r}")
        for name in _CONFIG_KEYS:
            if state[name] != getattr(self, name):
                raise ValueError(f"state {name} {state[name]!r} differs from {getattr(self, name)!r}")
        self.policy.load_state_dict(state["policy"])
        self.fleet.load_state_dict(state["fleet"])
        self.seed = int(state["seed"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self._lanes = {_json_id(d): int(lane) for d, lane in state["lanes"]}
        self._pending = {_json_id(d): (int(r), int(a)) for d, r, a in state["pending"]}
        self._round = int(state["round"])
        self._gain_ref = np.asarray(state["gain_ref"], dtype=np.float64)
        self._norm_ref = np.asarray(state["norm_ref"], dtype=np.float64)
        ema = state["time_ref_ema"]
        self._time_ref_ema = None if ema is None else float(ema)
        self._times_round = int(state["times_round"])
        self._times = [float(x) for x in state["times"]]
        self._deadline = None if state["deadline"] is None else float(state["deadline"])
        self._floor = np.asarray(state["floor"], dtype=np.float64)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Allocator:
        """Rebuild an allocator (space, policy, reward, RNG, history) from :meth:`state_dict`."""
        pol = state["policy"]
        if pol.get("policy") not in POLICIES:
            raise ValueError(f"state policy must be one of {sorted(POLICIES)}, got {pol.get('policy')!r}")
        alloc = cls(
            ArmSpace.from_dict(state["space"]),
            policy=pol["policy"],
            policy_params=pol["params"],
            reward=RewardConfig(**state["reward"]),
            seed=int(state["seed"]),
            **{k: state[k] for k in _CONFIG_KEYS},
        )
        alloc.load_state_dict(state)
        return alloc


# --- validation helpers ------------------------------------------------------------------------
def _json_id(d: Any) -> DeviceId:
    return d if isinstance(d, str) else int(d)


_FAST_ID_TYPES = {str, int}
_FAST_NUMBER_TYPES = {float, int, np.float64, np.float32, np.int64, np.int32, type(None)}


def _check_ids(ids: Iterable[Any], what: str) -> list[DeviceId]:
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} must be a collection of device ids, not a single string")
    out = list(ids)
    if not set(map(type, out)) <= _FAST_ID_TYPES:  # slow path only to convert or to name the bad id
        for i, d in enumerate(out):
            if isinstance(d, bool) or not isinstance(d, (str, numbers.Integral)):
                raise ValueError(f"{what}: device ids must be str or int (JSON-safe), got {d!r}")
            out[i] = d if isinstance(d, str) else int(d)
    if len(set(out)) != len(out):
        dup = sorted({str(d) for d in out if out.count(d) > 1})
        raise ValueError(f"{what}: duplicate device ids {dup}")
    return out


def _check_number(v: Any, name: str, *, lo: float, lo_open: bool = False) -> None:
    bad = isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
    if bad or v < lo or (lo_open and v == lo):
        raise ValueError(f"{name} must be a finite number {'>' if lo_open else '>='} {lo}, got {v!r}")


def _check_bool(v: Any, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {v!r}")
    return bool(v)


def _column(
    values: Sequence[Any],
    name: str,
    ids: Sequence[DeviceId],
    required: np.ndarray | None,
    *,
    lo: float,
    hi: float | None = None,
) -> np.ndarray:
    """One numeric report field as floats (NaN where absent), validated and named on error.

    ``required`` marks the reports that must carry the field (None: it is optional for all).
    """
    if not set(map(type, values)) <= _FAST_NUMBER_TYPES:  # slow path only to name a bad value
        for d, v in zip(ids, values, strict=True):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"{name} must be a number, got {v!r} for device {d!r}")
    out = np.array(values, dtype=np.float64)  # None -> NaN
    absent = np.isnan(out)
    if absent.any():
        if values.count(None) == len(values):
            is_none = absent
        else:
            is_none = np.array([v is None for v in values], dtype=bool)
        if (absent & ~is_none).any():
            i = int(np.argmax(absent & ~is_none))
            raise ValueError(f"{name} must be finite, got {values[i]!r} for device {ids[i]!r}")
        if required is not None and (is_none & required).any():
            i = int(np.argmax(is_none & required))
            raise ValueError(f"{name} is required for device {ids[i]!r} (or pass failed=True)")
    bad = ~absent & ~(np.isfinite(out) & (out >= lo) & (out <= (np.inf if hi is None else hi)))
    if bad.any():
        i = int(np.argmax(bad))
        rng_txt = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be finite and {rng_txt}, got {values[i]!r} for device {ids[i]!r}")
    return out
