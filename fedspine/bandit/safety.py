"""Safe exploration: which arms each device may play this round (ours, not in the FedSpine paper).

A round lasts as long as its slowest device, so one device exploring a heavy arm costs the whole
fleet waiting time; and pruning is never undone on a device. :class:`SafeExploration` turns the
fleet time model (:mod:`fedspine.bandit.fleet`) into an allowed set of arms per device before the
policy chooses among them:

* objective ``"deadline"``: one deadline per round and, per device, the arms predicted to meet
  it (:meth:`SafeExploration.deadline_arms`), with every device's pruning so far as a floor
  (monotone pruning) and a margin on pooled predictions for arms a device has not run itself;
  each device's ratio is the least pruning that meets it unless a rank's learnt worth pays
  for more (``ratio_rule``);
* objective ``"paper"``: an optional cap on exploration at the round's predicted makespan
  (``safe_slack``, :meth:`SafeExploration.safe_arms`).

It owns each lane's pruning floor and the current round's deadline; the ``Allocator`` composes
it, owns the fleet model and hands it in. numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.fleet import FleetModel, fit_factors
from fedspine.bandit.planner import capacity, one_step_cheaper
from fedspine.bandit.reward import time_score

# Objective "deadline": an arm a device has not run itself is admitted only if its pooled predicted
# time, times this margin, meets the deadline (ours; 1.03 was needed while the fleet fit
# under-estimated arm effects; with the exact fit, 1.0 holds the makespan at 0.97-0.99x the
# planner's on the fleets scripts/allocator_vs_planner.py holds out).
UNPROVEN_MARGIN = 1.0

# Ratio rule "value": the learnt worth of an arm is taken as proportional to its kept fraction to
# this power times a learnt factor per rank (ours; 1 = capacity's kept-fraction term). Pruning is
# never undone, so it is taken only for a rank whose learnt worth beats the least pruning that
# meets the deadline by more than VALUE_MARGIN (ours: a hysteresis against noise ratcheting the
# pruning upward round by round).
PRUNE_VALUE_EXPONENT = 1.0
VALUE_MARGIN = 0.05
RATIO_RULES = ("value", "capacity")
# Deadline rule "progress" (ours): the deadline is searched from the shortest one up to this many
# times it, on PROGRESS_STEPS geometric steps, and a longer one is taken only when its predicted
# progress per second beats the shortest's by PROGRESS_MARGIN (noise in the learnt worth must
# not lengthen every round).
DEADLINE_RULES = ("shortest", "progress")
PROGRESS_SEARCH = 2.0
PROGRESS_STEPS = 16
PROGRESS_MARGIN = 0.05


class SafeExploration:
    """The allowed arms of each lane, from the fleet model, and the state that needs: each lane's
    pruning so far (``floor``, objective ``"deadline"`` with monotone pruning) and the round's
    deadline (``deadline``; None until some device's time is known, always None for ``"paper"``).

    Settings are the ``Allocator``'s, validated there: ``safe_slack`` (``"paper"``; None = off),
    ``deadline_slack``, ``explore_factor``, ``monotone_pruning``, ``prune_elasticity``, and from
    the reward config ``target_ratio`` (0 = none) and ``time_alpha``.
    """

    def __init__(
        self,
        space: ArmSpace,
        *,
        objective: str,
        safe_slack: float | None,
        deadline_slack: float,
        explore_factor: float,
        monotone_pruning: bool,
        prune_elasticity: float,
        target_ratio: float,
        time_alpha: float,
        ratio_rule: str = "value",
        value_shrink: float = 0.0,
        deadline_rule: str = "shortest",
        prune_tolerance: float = 0.0,
        value_confidence: float = 0.0,
    ):
        if ratio_rule not in RATIO_RULES:
            raise ValueError(f"ratio_rule must be one of {list(RATIO_RULES)}, got {ratio_rule!r}")
        if deadline_rule not in DEADLINE_RULES:
            raise ValueError(f"deadline_rule must be one of {list(DEADLINE_RULES)}, got {deadline_rule!r}")
        self.ratio_rule = ratio_rule
        self.value_shrink = value_shrink
        self.deadline_rule = deadline_rule
        self.prune_tolerance = prune_tolerance
        self.value_confidence = value_confidence
        self.space = space
        self.objective = objective
        self.safe_slack = safe_slack
        self.deadline_slack = deadline_slack
        self.explore_factor = explore_factor
        self.monotone_pruning = monotone_pruning
        self.prune_elasticity = prune_elasticity
        self.target_ratio = target_ratio
        self.time_alpha = time_alpha
        self._capacity = capacity(space)
        self._step = one_step_cheaper(space)
        self._arm_ratios = np.array([a.ratio for a in space], dtype=np.float64)
        self._arm_ranks = np.array([a.rank for a in space], dtype=np.int64)
        self._rank_index = np.array([space.ranks.index(a.rank) for a in space])
        self._ratio_index = np.array([space.ratios.index(a.ratio) for a in space])
        # A newcomer's first arm: pruning is undone by nothing when devices prune progressively
        # (the paper's design), so start unpruned at the lowest rank; else on the cheapest arm.
        unpruned = np.flatnonzero(self._arm_ratios == np.array(space.ratios)[0])
        self.start_arm = (
            int(unpruned[np.argmin(self._arm_ranks[unpruned])])
            if monotone_pruning
            else int(np.argmin(self._capacity))
        )
        self.floor = np.zeros(0)  # objective "deadline": each lane's pruning so far (monotone)
        self.deadline: float | None = None  # objective "deadline": the current round's

    def add_lanes(self, n: int) -> None:
        self.floor = np.concatenate([self.floor, np.zeros(n)])

    # --- the allowed arms --------------------------------------------------------------------------
    def allowed(self, lanes: np.ndarray, fleet: FleetModel, time_ref_ema: float | None) -> np.ndarray | None:
        """The arms each of ``lanes`` may play this round (None: any); sets the round's deadline."""
        if self.objective == "deadline":
            allowed, self.deadline = self.deadline_arms(lanes, fleet)
            return allowed
        return None if self.safe_slack is None else self.safe_arms(lanes, fleet, time_ref_ema)

    def observe(self, lanes: np.ndarray, achieved_ratios: np.ndarray) -> None:
        """Completed rounds of ``lanes`` (distinct) at ``achieved_ratios``, grid ratios (the
        ratio of the arm that ran, ``Allocator._effective_arms``): raise their floors."""
        if self.objective == "deadline" and self.monotone_pruning:
            self.floor[lanes] = np.maximum(self.floor[lanes], achieved_ratios)

    def deadline_arms(self, lanes: np.ndarray, fleet: FleetModel) -> tuple[np.ndarray, float | None]:
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
          allows), times ``1 + deadline_slack``; with ``deadline_rule="progress"`` the one with
          the most predicted learning progress per second from there up
          (:meth:`_progress_deadline`).
        * Each device gets one ratio (:meth:`_fit_deadline`): the least pruning predicted to
          meet the deadline, or with ``ratio_rule="value"`` a larger one where a rank's learnt
          worth (:meth:`arm_worth`) pays for it by ``VALUE_MARGIN``; with ``"capacity"`` the
          ratio of the largest arm by capacity (``fedspine.bandit.planner``) that meets it, as
          the planner would choose. The policy chooses among the ranks at that ratio that meet
          it. Pruning is never undone, so the ratio is not explored. A device that meets the
          deadline on no arm plays its fastest.
        * With ``RewardConfig.target_ratio``, the fleet's mean ratio is held at the target: a
          longer deadline if the devices would prune more, more pruning on the slowest devices
          first if less (:meth:`_hold_sparsity`).
        """
        n, n_arms = lanes.size, len(self.space)
        allowed = np.zeros((n, n_arms), dtype=bool)
        theta, phi = fleet.fit()
        known = ~np.isnan(theta[lanes])
        allowed[~known, self.start_arm] = True
        guess = self._guess_arm_costs(phi)
        if not known.any() or np.isnan(guess).all():
            allowed[known, self.start_arm] = True
            return allowed, None
        lanes_k = lanes[known]
        pred = fleet.predict_blended(lanes_k, prior_weight=0.25, fitted=(theta, phi))
        # a pooled prediction for an arm the device has not run itself carries the model's error
        unproven = fleet.weight[lanes_k] < 0.5
        pred = np.where(unproven, pred * UNPROVEN_MARGIN, pred)
        pred = np.where(np.isnan(phi)[None, :], np.exp(theta[lanes_k, None] + guess[None, :]), pred)
        pred = np.where(np.isnan(pred), np.inf, pred)
        pred[self._arm_ratios[None, :] < self.floor[lanes_k, None] - 1e-9] = np.inf  # pruned already
        fastest = pred.min(axis=1)
        deadline = float(fastest[np.isfinite(fastest)].max(initial=0.0)) * (1.0 + self.deadline_slack)
        if deadline <= 0.0:
            allowed[known, self.start_arm] = True
            return allowed, None
        worth = self.arm_worth(fleet) if self.ratio_rule == "value" else self._capacity
        tol = float(np.expm1(self.prune_tolerance * fleet.noise_sigma()))  # as a fraction of the deadline
        if self.deadline_rule == "progress":
            deadline = self._progress_deadline(pred, deadline, worth, tol)  # point estimates of worth
        worth_se = self.worth_se(fleet) if self.ratio_rule == "value" and self.value_confidence > 0 else None
        fits, ok = self._fit_deadline(pred, deadline, worth, tol, worth_se)
        target = self.target_ratio
        if target and self._arm_ratios[ok.argmax(axis=1)].mean() > target + 1e-9:
            # a sparsity target below what this deadline needs: lengthen the round until it holds
            longest = max(2.0, float(pred[np.isfinite(pred)].max() / deadline))
            for factor in np.geomspace(1.02, longest, 40):  # the last one if none is enough
                fits, ok = self._fit_deadline(pred, deadline * factor, worth, tol, worth_se)
                if self._arm_ratios[ok.argmax(axis=1)].mean() <= target + 1e-9:
                    break
            deadline *= float(factor)
        if target:
            ok = self._hold_sparsity(fits, ok, fastest)
        allowed[known] = ok
        return allowed, deadline

    def _fit_deadline(
        self,
        pred: np.ndarray,
        deadline: float,
        worth: np.ndarray,
        tolerance: float = 0.0,
        worth_se: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Arms predicted to meet ``deadline`` (a device that meets it on none: its fastest), and
        among them the ones the policy may choose: at one ratio per device, the least pruning
        that meets the deadline unless a more pruned arm is worth more (``worth`` per arm,
        :meth:`arm_worth` or capacity). Above that least pruning only the ranks that beat it
        stay, so no device pays pruning for a rank it then does not play. With ``worth_se``
        (per rank, :meth:`worth_se`) a rank other than the device's best at its least pruning
        must beat it by the margin after ``value_confidence`` standard errors of the difference
        are taken off: a lower confidence bound, since the prune is never undone."""
        fits = pred <= deadline * (1 + 1e-9)
        # ratios by grid index (exact comparisons)
        ri = self._ratio_index[None, :]
        if tolerance > 0:  # a miss within the noise does not justify a prune never undone
            rows = np.arange(pred.shape[0])
            finite = np.isfinite(pred)
            at_floor = finite & (ri == np.where(finite, ri, len(self.space.ratios)).min(axis=1)[:, None])
            floor_pred = np.where(at_floor, pred, np.inf)
            near = floor_pred.min(axis=1) <= deadline * (1 + tolerance)
            near &= ~(fits & at_floor).any(axis=1)
            fits[rows[near], floor_pred.argmin(axis=1)[near]] = True
        fits[np.arange(pred.shape[0]), pred.argmin(axis=1)] |= ~fits.any(axis=1)
        least = np.where(fits, ri, len(self.space.ratios)).min(axis=1)
        at_least = fits & (ri == least[:, None])
        margin = np.log1p(VALUE_MARGIN) if self.ratio_rule == "value" else 0.0
        log_worth = np.log(np.maximum(worth, 1e-12)) if self.ratio_rule == "capacity" else worth
        at_least_worth = np.where(at_least, log_worth[None, :], -np.inf)
        base = at_least_worth.max(axis=1)
        bound = np.broadcast_to(log_worth[None, :], pred.shape)
        if worth_se is not None:
            base_rank = self._rank_index[at_least_worth.argmax(axis=1)]
            other = self._rank_index[None, :] != base_rank[:, None]
            se = np.hypot(worth_se[self._rank_index][None, :], worth_se[base_rank][:, None])
            bound = bound - np.where(other, self.value_confidence * se, 0.0)
        # ties: the least pruning, which is never undone
        score = np.where(fits, bound - 1e-9 * self._arm_ratios[None, :], -np.inf)
        best = score.argmax(axis=1)
        raise_it = score[np.arange(pred.shape[0]), best] > base + margin
        chosen = np.where(raise_it, self._ratio_index[best], least)
        ok = fits & (ri == chosen[:, None])
        # above the least pruning only the ranks that pay for it stay
        ok &= ~raise_it[:, None] | (bound > base[:, None] + margin)
        return fits, ok

    def worth_se(self, fleet: FleetModel) -> np.ndarray:
        """Standard error of each rank's learnt effect (ours; one per rank of the grid): the
        fleet's residual sigma of log quality (:meth:`FleetModel.value_sigma`) over the square
        root of the rank's discounted observations, ``inf`` for a rank nobody played or while the sigma is
        unknown. Used by ``value_confidence``."""
        pulls = fleet.value_weight.sum(axis=0)  # what arm_values counts, without its fit
        n_rank = np.bincount(self._rank_index, weights=pulls, minlength=len(self.space.ranks))
        se = np.full(n_rank.shape, np.inf)
        played = n_rank > 0
        se[played] = fleet.value_sigma() / np.sqrt(n_rank[played])
        return se

    def _progress_deadline(
        self, pred: np.ndarray, shortest: float, worth: np.ndarray, tolerance: float = 0.0
    ) -> float:
        """The deadline that maximises predicted learning progress per second of round time
        (ours): ``mean_i w_i(D) / D``, where ``w_i(D)`` is the learnt worth (as a factor, not a
        log) of the most valuable arm device ``i`` may play under deadline ``D``, from
        :meth:`arm_worth` (ratio rule ``"value"``) or capacity (``"capacity"``). Every device
        runs the same local steps whatever the deadline, so a round's progress depends on the
        arms alone and its cost on its length. Candidates run from ``shortest`` to
        ``PROGRESS_SEARCH`` times it; a longer deadline must beat the shortest by
        ``PROGRESS_MARGIN``. Before any worth is learnt every rank is worth the same, and the
        kept fraction alone never pays for a longer round on a fleet whose pace-setters are a
        minority, so the rule starts at the shortest deadline."""
        log_worth = worth if self.ratio_rule == "value" else np.log(np.maximum(worth, 1e-12))
        best_d, best_j = shortest, -np.inf
        for k, d in enumerate(shortest * np.geomspace(1.0, PROGRESS_SEARCH, PROGRESS_STEPS)):
            _, ok = self._fit_deadline(pred, float(d), worth, tolerance)
            gain = np.exp(np.where(ok, log_worth[None, :], -np.inf).max(axis=1)).mean()
            j = gain / d
            if k == 0:
                best_j = j * (1.0 + PROGRESS_MARGIN)
            elif j > best_j:
                best_d, best_j = float(d), j
        return best_d

    def arm_worth(self, fleet: FleetModel) -> np.ndarray:
        """Log worth of every arm for the ratio rule ``"value"`` (ours), from the fleet model's
        pooled quality (:meth:`FleetModel.arm_values`: what each arm bought, device effects
        removed), split on the grid into a ratio effect plus a rank effect so that an arm
        nobody played is still valued. Pruning is never worth more than the kept fraction to
        ``PRUNE_VALUE_EXPONENT`` says (a pruned model that trains as fast locally is still a
        smaller model); a ratio nobody played is valued that way from the nearest played one.
        A rank nobody played is worth what its nearest played rank is: no gain is assumed
        before one is seen, since pruning for it is never undone. With nothing played every
        rank is worth the same, so each device takes the least pruning that meets the deadline.

        ``value_shrink`` (ours; 0 = off) pulls each rank's effect towards the pull-weighted mean
        of the played ranks as if it had that many more observations at the mean
        ``h_r <- (n_r h_r + s h_mean) / (n_r + s)``, the usual empirical-Bayes
        shrinkage, so a rank seen a few times cannot buy pruning, which is never undone, on the
        strength of one lucky round."""
        effect, pulls = fleet.arm_values()
        n_p, n_r = len(self.space.ratios), len(self.space.ranks)
        ri = self._ratio_index
        known = ~np.isnan(effect) & (pulls > 0)
        prior = PRUNE_VALUE_EXPONENT * np.log(1.0 - np.array(self.space.ratios))
        if not known.any():
            return prior[ri]
        grid_sum = np.zeros((n_p, n_r))
        grid_w = np.zeros((n_p, n_r))
        np.add.at(grid_sum, (ri[known], self._rank_index[known]), effect[known] * pulls[known])
        np.add.at(grid_w, (ri[known], self._rank_index[known]), pulls[known])
        g, h = fit_factors(grid_sum, grid_w)
        g_seen, h_seen = np.flatnonzero(~np.isnan(g)), np.flatnonzero(~np.isnan(h))
        if self.value_shrink > 0:
            n_rank = grid_w.sum(axis=0)[h_seen]
            mean = float(np.average(h[h_seen], weights=n_rank))
            h[h_seen] = (n_rank * h[h_seen] + self.value_shrink * mean) / (n_rank + self.value_shrink)
        near_r = h_seen[np.abs(np.arange(n_r)[:, None] - h_seen[None, :]).argmin(axis=1)]  # ties: lower
        h = h[near_r]
        near_p = g_seen[np.abs(np.arange(n_p)[:, None] - g_seen[None, :]).argmin(axis=1)]
        g = g[near_p] + prior - prior[near_p]
        # pruning costs at least what the prior says, going up the grid from the least pruned
        for i in range(1, n_p):
            g[i] = min(g[i], g[i - 1] + prior[i] - prior[i - 1])
        return g[ri] + h[self._rank_index]

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

    def _hold_sparsity(self, fits: np.ndarray, chosen: np.ndarray, fastest: np.ndarray) -> np.ndarray:
        """With a sparsity target: pin each device's ratio so that the fleet's mean ratio comes
        as close to ``target_ratio`` as one grid step of one device allows (ours). Every device
        starts at the ratio the deadline gives it (``chosen``, the allowed set without a target);
        while the mean is below the target, devices prune one grid step more, the slowest
        (``fastest``: each device's predicted time on its fastest arm) first, so the pace setters
        prune most and the fastest devices keep their capacity. A mean above the target (what the
        deadline needs after it was lengthened as far as it goes) is left as it is. The policy
        picks the rank at the pinned ratio."""
        ratios = np.asarray(self.space.ratios)
        n = fits.shape[0]
        ri = self._ratio_index[None, :]
        level = np.where(chosen, ri, len(ratios)).min(axis=1)
        top = np.where(fits, ri, -1).max(axis=1)  # pruning more only makes a device faster
        order = np.argsort(-fastest, kind="stable")  # slowest first
        for _ in range(len(ratios)):
            gap = self.target_ratio - ratios[level].mean()
            can = order[level[order] < top[order]]
            if gap <= 1e-9 or can.size == 0:
                break
            gain = np.cumsum(ratios[level[can] + 1] - ratios[level[can]]) / n
            # the prefix of raises that lands nearest the target (raising none is index -1)
            miss = np.abs(gap - np.concatenate([[0.0], gain]))
            k = int(miss.argmin())
            if k == 0:
                break
            level[can[:k]] += 1
        return fits & (ri == level[:, None])

    def safe_arms(
        self, lanes: np.ndarray, fleet: FleetModel, time_ref_ema: float | None
    ) -> np.ndarray | None:
        """Arms each lane may explore, or None when the fleet model cannot tell yet.

        The fleet model predicts every device's time on every arm and, with the pooled quality
        per arm, its reward (``time_ref_ema``: the reward's time reference over past rounds). The
        arm with the best predicted reward gives each device a predicted time; the slowest of
        those, times ``1 + safe_slack``, is the round's time cap. A device exploring a heavy arm
        would otherwise set the whole round's makespan; under the cap, exploration happens where
        it costs nobody any waiting. Arms (or devices) the model knows nothing about stay
        allowed, so newcomers and untried arms are still explored (ours).
        """
        if time_ref_ema is None:
            return None
        pred = fleet.predict(lanes)
        quality = fleet.quality()
        predicted_reward = time_score(pred, time_ref_ema, self.time_alpha) * quality[None, :]
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

    # --- persistence (keys of the Allocator's state, version 3) ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"deadline": self.deadline, "floor": self.floor.tolist()}

    def load_state_dict(self, state: Any) -> None:
        self.deadline = None if state["deadline"] is None else float(state["deadline"])
        self.floor = np.asarray(state["floor"], dtype=np.float64)
