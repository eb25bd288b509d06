"""The allocator: one bandit per device, choosing each device's (pruning ratio, LoRA rank) per round."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from fedspine.bandit.arms import Arm, ArmSpace
from fedspine.bandit.fleet import FleetModel
from fedspine.bandit.policies import POLICIES, make_policy
from fedspine.bandit.reward import RewardConfig
from fedspine.bandit.safety import DEADLINE_RULES, RATIO_RULES, SafeExploration
from fedspine.bandit.tracker import RewardTracker

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
_STATE_VERSION = 3
OBJECTIVES = ("deadline", "paper")
_CONFIG_KEYS = (
    "safe_slack",
    "objective",
    "deadline_slack",
    "explore_factor",
    "change_factor",
    "monotone_pruning",
    "prune_elasticity",
    "ratio_rule",
    "value_shrink",
    "deadline_rule",
    "prune_tolerance",
    "value_confidence",
    "value_round_effect",
)
# Config keys added after state version 3 was written, with the value older states imply (the
# behaviour from before the key existed, which is not always today's default).
CONFIG_ADDED = {
    "value_shrink": 0.0,
    "deadline_rule": "shortest",
    "prune_tolerance": 0.0,
    "value_confidence": 0.0,
    "value_round_effect": False,
}


def _saved_config(state: Mapping[str, Any], name: str) -> Any:
    return state.get(name, CONFIG_ADDED[name]) if name in CONFIG_ADDED else state[name]


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


class _Reports(NamedTuple):
    """A batch of validated reports as columns (NaN where an optional field is absent)."""

    ids: list[DeviceId]
    lanes: np.ndarray
    arm_idx: np.ndarray
    failed: np.ndarray
    times: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    update_norm: np.ndarray
    ratios: np.ndarray  # achieved (default: the arm's)


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
      model (:mod:`fedspine.bandit.fleet`). Each device takes the least pruning predicted to
      finish by it, and more only for a rank whose learnt worth pays for it (``ratio_rule``
      ``"value"``; ``"capacity"``: the ratio of the largest arm by capacity that fits, as the
      planner chooses), so a fast device's spare time becomes capacity and only the
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

    ``value_shrink`` (objective ``"deadline"`` with ``ratio_rule="value"``; ours, 0 = off): shrink
    each rank's learnt worth towards the played ranks' mean by that many pseudo-observations
    before pruning is taken for it (:meth:`SafeExploration.arm_worth`).

    ``deadline_rule`` (objective ``"deadline"``; ours): ``"shortest"`` (default) sets each round's
    deadline as above; ``"progress"`` lengthens it (up to 2x) when the learnt worth of what the
    longer round buys (less pruning, higher ranks) predicts more learning progress per second
    (:meth:`SafeExploration._progress_deadline`).

    ``prune_tolerance`` (objective ``"deadline"``; ours, 0 = off): pruning is never undone, so a
    device whose least pruning so far is predicted to miss the deadline by less than this many
    standard deviations of the fleet's learnt round-time noise (``FleetModel.noise_sigma``) is
    not pruned further for it; it plays its fastest arm at that pruning, and the round may run
    that much longer than the deadline.

    ``value_confidence`` (objective ``"deadline"`` with ``ratio_rule="value"``; ours, default
    1.645, 0 = off; adopted by the pre-registered fresh-seed test in experiments/README.md):
    a rank buys pruning only on its lower confidence bound, its learnt worth less this many
    standard errors of its difference from the rank it would replace (the fleet's residual
    sigma of log quality over the square root of each rank's observations,
    :meth:`SafeExploration.worth_se`); the prune is never undone, so one round's luck must
    not pay for it. 1.645 is a one-sided 95% bound.

    ``value_round_effect`` (objective ``"deadline"``; ours, off by default): the value model
    learns what each arm buys net of a shift common to the whole round (``FleetModel``'s
    ``round_effect``), so the training phase, or a reward scale that moves, is not read as the
    worth of the arms played that round. It needs :meth:`observe_round`; per-device reports
    take the last round's shift.

    ``safe_slack`` (objective ``"paper"``; ours, not in the paper) turns on safe exploration: the
    fleet time model keeps every device's exploration under the round's predicted makespan at
    the reward-optimal arms, times ``1 + safe_slack``. ``None`` leaves pure per-device bandits.

    Its parts, each owning its own state (all of it in :meth:`state_dict`): the ``policy`` (one
    lane per device), the ``fleet`` time model, the ``reward_tracker``
    (:class:`~fedspine.bandit.tracker.RewardTracker`: the reward's per-device scales and time
    reference) and ``safety`` (:class:`~fedspine.bandit.safety.SafeExploration`: the allowed arms,
    the pruning floors and the round's deadline). The allocator itself validates the reports and
    keeps the lanes, the pending assignments and the RNG.
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
        ratio_rule: str = "value",
        value_shrink: float = 0.0,
        deadline_rule: str = "shortest",
        prune_tolerance: float = 0.0,
        value_confidence: float = 1.645,
        value_round_effect: bool = False,
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
        _check_number(value_shrink, "value_shrink", lo=0.0)
        _check_number(prune_tolerance, "prune_tolerance", lo=0.0)
        _check_number(value_confidence, "value_confidence", lo=0.0)
        _check_bool(value_round_effect, "value_round_effect")
        if ratio_rule not in RATIO_RULES:
            raise ValueError(f"ratio_rule must be one of {list(RATIO_RULES)}, got {ratio_rule!r}")
        if deadline_rule not in DEADLINE_RULES:
            raise ValueError(f"deadline_rule must be one of {list(DEADLINE_RULES)}, got {deadline_rule!r}")
        self.space = space
        self.objective = objective
        self.change_factor = None if change_factor is None else float(change_factor)
        # The paper objective keeps its original time model exactly (no change detection).
        if objective == "deadline":  # sudden changes are caught by change_factor, so times fade slowly
            self.fleet = FleetModel(
                len(space),
                decay=0.98,
                change_factor=self.change_factor,
                round_effect=bool(value_round_effect),
            )
        else:
            self.fleet = FleetModel(len(space), round_effect=bool(value_round_effect))  # value model unused
        self._arm_ratios = np.array([a.ratio for a in space], dtype=np.float64)
        self._arm_ranks = np.array([a.rank for a in space], dtype=np.int64)
        self._grid_ratios = np.array(space.ratios)
        self._arm_index = dict(space.arm_index_map)
        self._arm_by_id = {id(a): i for a, i in self._arm_index.items()}
        self.policy = make_policy(policy or DEFAULT_POLICY[objective], space, **dict(policy_params or {}))
        self.reward = reward or RewardConfig()
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self._lanes: dict[DeviceId, int] = {}
        self._pending: dict[DeviceId, tuple[int, int]] = {}  # device -> (round, arm index)
        self._round = 0
        # The reward's references (per-lane gain and norm scales, the fleet's time reference).
        self.reward_tracker = RewardTracker(self.reward, space, objective=objective)
        # The allowed arms: pruning floors, the round's deadline, the paper objective's time cap.
        self.safety = SafeExploration(
            space,
            objective=objective,
            safe_slack=None if safe_slack is None else float(safe_slack),
            deadline_slack=float(deadline_slack),
            explore_factor=float(explore_factor),
            monotone_pruning=bool(monotone_pruning),
            prune_elasticity=float(prune_elasticity),
            target_ratio=self.reward.target_ratio,
            time_alpha=self.reward.time_alpha,
            ratio_rule=ratio_rule,
            value_shrink=float(value_shrink),
            deadline_rule=deadline_rule,
            prune_tolerance=float(prune_tolerance),
            value_confidence=float(value_confidence),
        )

    # The safety settings live in ``safety``; read here for the state's config keys.
    safe_slack = property(lambda self: self.safety.safe_slack)
    deadline_slack = property(lambda self: self.safety.deadline_slack)
    explore_factor = property(lambda self: self.safety.explore_factor)
    monotone_pruning = property(lambda self: self.safety.monotone_pruning)
    prune_elasticity = property(lambda self: self.safety.prune_elasticity)
    ratio_rule = property(lambda self: self.safety.ratio_rule)
    value_shrink = property(lambda self: self.safety.value_shrink)
    deadline_rule = property(lambda self: self.safety.deadline_rule)
    prune_tolerance = property(lambda self: self.safety.prune_tolerance)
    value_confidence = property(lambda self: self.safety.value_confidence)
    value_round_effect = property(lambda self: self.fleet.round_effect)

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
        self.reward_tracker.fold(before_round=round)
        self._round = round
        new = [d for d in ids if d not in self._lanes]
        if new:
            self.fleet.add_lanes(len(new))
            self.reward_tracker.add_lanes(len(new))
            self.safety.add_lanes(len(new))
            for d, lane in zip(new, self.policy.add_lanes(len(new)), strict=True):
                self._lanes[d] = int(lane)
        lanes = np.fromiter(map(self._lanes.__getitem__, ids), dtype=np.int64, count=len(ids))
        allowed = self.safety.allowed(lanes, self.fleet, self.reward_tracker.time_ref_ema)
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
        if not reports:
            return {}
        r = self._validate(reports)
        # validated: from here on, state changes
        ok, lanes = ~r.failed, r.lanes
        rewards, quality = self.reward_tracker.score(
            lanes,
            ok,
            times=r.times,
            loss_before=r.loss_before,
            loss_after=r.loss_after,
            update_norm=r.update_norm,
            ratio=r.ratios,
            whole_round=whole_round,
            deadline=self.safety.deadline,
        )
        arm_idx = r.arm_idx
        if self.objective == "deadline":  # learn from the arm that actually ran
            arm_idx = np.where(ok, self._effective_arms(arm_idx, r.ratios), arm_idx)
            # the floor is the grid ratio that ran, not the achieved one: channel rounding
            # leaves a device at 0.101 on arm 0.1, and a floor of 0.101 would forbid that arm
            # and ratchet the device up the grid one step a round
            self.safety.observe(lanes[ok], self._arm_ratios[arm_idx[ok]])
        self.policy.update(lanes, arm_idx, rewards)
        self.fleet.observe(lanes[ok], arm_idx[ok], r.times[ok], quality[ok], whole_round=whole_round)
        if len(r.ids) == len(self._pending):  # ids are distinct and all pending: the whole round
            self._pending.clear()
        else:
            for d in r.ids:
                del self._pending[d]
        return dict(zip(r.ids, rewards.tolist(), strict=True))

    def _validate(self, reports: Sequence[RoundReport]) -> _Reports:
        """The reports as columns, every field checked (named on error); changes nothing."""
        n = len(reports)
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
        # A report is for the arm the device was assigned: crediting another arm would teach the
        # policy about an arm that never ran there (what the device achieved goes in achieved_ratio).
        assigned = np.fromiter((self._pending[d][1] for d in ids), dtype=np.int64, count=n)
        if (arm_idx != assigned).any():
            i = int(np.argmax(arm_idx != assigned))
            raise ValueError(
                f"arm (device {ids[i]!r}) must be the arm it was assigned, {self.space[assigned[i]]}, "
                f"got {reports[i].arm}; report what it achieved in achieved_ratio"
            )
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
        lanes = np.fromiter(map(self._lanes.__getitem__, ids), dtype=np.int64, count=n)
        return _Reports(ids, lanes, arm_idx, failed, times, before, after, norms, ratios)

    def _effective_arms(self, arm_idx: np.ndarray, achieved: np.ndarray) -> np.ndarray:
        """The arm that ran: the assigned rank at the grid ratio nearest to the achieved one
        (a device already pruned further than its arm ran at its own sparsity)."""
        nearest = self._grid_ratios[np.abs(achieved[:, None] - self._grid_ratios[None, :]).argmin(axis=1)]
        want = np.isclose(self._arm_ratios[None, :], nearest[:, None]) & (
            self._arm_ranks[None, :] == self._arm_ranks[arm_idx][:, None]
        )
        return np.where(want.any(axis=1), want.argmax(axis=1), arm_idx)

    # --- allowed arms (fedspine.bandit.safety) -------------------------------------------------
    def deadline_arms(self, lanes: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Arms each lane may play under the round's deadline, and the deadline (objective
        ``"deadline"``): :meth:`SafeExploration.deadline_arms` on this allocator's fleet model."""
        return self.safety.deadline_arms(lanes, self.fleet)

    def safe_arms(self, lanes: np.ndarray) -> np.ndarray | None:
        """Arms each lane may explore under the paper objective's time cap, or None when the fleet
        model cannot tell yet: :meth:`SafeExploration.safe_arms` on this allocator's fleet model."""
        return self.safety.safe_arms(lanes, self.fleet, self.reward_tracker.time_ref_ema)

    # --- pending assignments ------------------------------------------------------------------
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
            "ratio_rule": self.ratio_rule,
            "value_shrink": self.value_shrink,
            "deadline_rule": self.deadline_rule,
            "prune_tolerance": self.prune_tolerance,
            "value_confidence": self.value_confidence,
            "value_round_effect": self.value_round_effect,
            **self.safety.state_dict(),  # deadline, floor
            "rng": self.rng.bit_generator.state,
            "fleet": self.fleet.state_dict(),
            "policy": self.policy.state_dict(),
            "lanes": [[d, lane] for d, lane in self._lanes.items()],
            "pending": [[d, r, a] for d, (r, a) in self._pending.items()],
            "round": self._round,
            **self.reward_tracker.state_dict(),  # gain_ref, norm_ref, time_ref_ema, times_round, times
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
            saved = _saved_config(state, name)
            if saved != getattr(self, name):
                raise ValueError(f"state {name} {saved!r} differs from {getattr(self, name)!r}")
        self.policy.load_state_dict(state["policy"])
        self.fleet.load_state_dict(state["fleet"])
        self.seed = int(state["seed"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self._lanes = {_json_id(d): int(lane) for d, lane in state["lanes"]}
        self._pending = {_json_id(d): (int(r), int(a)) for d, r, a in state["pending"]}
        self._round = int(state["round"])
        self.reward_tracker.load_state_dict(state)
        self.safety.load_state_dict(state)

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
            **{k: _saved_config(state, k) for k in _CONFIG_KEYS},
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
