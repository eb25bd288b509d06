"""Strategies: what each device is told to do each round, and which aggregation rule applies.

Every method, FedSpine and the baselines, runs through the same round loop, the same client
step, data, clock and time model; a strategy (an ``ArmAssigner``) only answers "which (ratio,
rank) for which device" and "which aggregation rule". Its options are one small frozen
dataclass (``FedSpineParams``, ``FixedPruneParams``, ...; peft's config style), built from
``strategy.params`` and validated field by field. Adding a baseline is one small class, its
params dataclass and one registry entry. numpy only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedspine.bandit import POLICIES, Allocator, Arm, ArmSpace, RewardConfig, RoundReport
from fedspine.bandit.allocator import CONFIG_ADDED, OBJECTIVES
from fedspine.bandit.safety import DEADLINE_RULES, RATIO_RULES
from fedspine.config import ConfigError, fill_missing, from_mapping, require
from fedspine.fl.messages import Failure, TrainRes

PARAMS = "strategy.params."  # how errors name a strategy's parameters

# Default per-tier settings for the tier-based baselines, for the paper's tiers (ours).
TIER_RANKS = {"tx2": 4, "nx": 8, "agx": 16, "orin": 16}
TIER_RATIOS = {"tx2": 0.6, "nx": 0.4, "agx": 0.2, "orin": 0.0}


# --- typed parameters, one dataclass per strategy (``strategy.params`` in a run config) ----------
def _check_rank(rank: int) -> None:
    require(rank >= 1, f"{PARAMS}rank", ">= 1", rank)


def _check_ratio(ratio: float, name: str) -> None:
    require(0 <= ratio < 1, f"{PARAMS}{name}", "in [0, 1)", ratio)


def _check_table(table: Mapping[str, Any], name: str) -> None:
    require(len(table) > 0, f"{PARAMS}{name}", "a non-empty tier -> value mapping", table)


@dataclass(frozen=True)
class NoParams:
    """A strategy without parameters."""


@dataclass(frozen=True)
class FedSpineParams:
    """The allocator's settings (``fedspine.bandit.Allocator`` documents each)."""

    objective: str = "deadline"  # one of fedspine.bandit.allocator.OBJECTIVES
    policy: str | None = None  # a policy of fedspine.bandit.POLICIES; None: the objective's own
    policy_params: dict[str, Any] | None = None  # its constructor's options (checked by the policy)
    safe_slack: float | None = 0.05  # objective "paper": safe exploration's slack; None: off
    deadline_slack: float = 0.0  # objective "deadline": headroom on the learnt deadline
    explore_factor: float = 1.25  # objective "deadline": how far above the deadline to explore
    prune_elasticity: float = 0.8  # objective "deadline": guessed time ~ kept fraction ** this
    ratio_rule: str = "value"  # objective "deadline": prune for learnt worth or for capacity ("capacity")
    value_shrink: float = 0.0  # ratio rule "value": pseudo-observations shrinking rank worth; 0: off
    deadline_rule: str = "shortest"  # objective "deadline": "progress" may lengthen it for worth
    prune_tolerance: float = 0.0  # objective "deadline": noise sigmas a miss must exceed to prune; 0: off
    value_confidence: float = 1.645  # ratio rule "value": std errors off a rank's worth to prune; 0: off
    value_round_effect: bool = False  # objective "deadline": learn arm worth net of each round's shift
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        o = self.objective
        require(o in OBJECTIVES, f"{PARAMS}objective", f"one of {list(OBJECTIVES)}", o)
        ok = self.policy is None or self.policy in POLICIES
        require(ok, f"{PARAMS}policy", f"None or one of {sorted(POLICIES)}", self.policy)
        ok = self.safe_slack is None or self.safe_slack >= 0
        require(ok, f"{PARAMS}safe_slack", "None (off) or >= 0", self.safe_slack)
        require(self.deadline_slack >= 0, f"{PARAMS}deadline_slack", ">= 0", self.deadline_slack)
        require(self.explore_factor >= 1, f"{PARAMS}explore_factor", ">= 1", self.explore_factor)
        require(self.prune_elasticity >= 0, f"{PARAMS}prune_elasticity", ">= 0", self.prune_elasticity)
        require(self.value_shrink >= 0, f"{PARAMS}value_shrink", ">= 0", self.value_shrink)
        require(self.prune_tolerance >= 0, f"{PARAMS}prune_tolerance", ">= 0", self.prune_tolerance)
        require(self.value_confidence >= 0, f"{PARAMS}value_confidence", ">= 0", self.value_confidence)
        rule = self.ratio_rule
        require(rule in RATIO_RULES, f"{PARAMS}ratio_rule", f"one of {list(RATIO_RULES)}", rule)
        rule = self.deadline_rule
        require(rule in DEADLINE_RULES, f"{PARAMS}deadline_rule", f"one of {list(DEADLINE_RULES)}", rule)


@dataclass(frozen=True)
class FedAvgLoRAParams:
    rank: int = 8  # everyone's LoRA rank

    def __post_init__(self) -> None:
        _check_rank(self.rank)


@dataclass(frozen=True)
class TierRankParams:
    """HetLoRA, FlexLoRA, FLoRA: the LoRA rank of each device tier."""

    tier_ranks: dict[str, int] = field(default_factory=lambda: dict(TIER_RANKS))

    def __post_init__(self) -> None:
        _check_table(self.tier_ranks, "tier_ranks")
        for tier, rank in self.tier_ranks.items():
            require(rank >= 1, f"{PARAMS}tier_ranks.{tier}", ">= 1", rank)


@dataclass(frozen=True)
class FixedPruneParams:
    ratio: float = 0.4  # everyone's pruning ratio
    rank: int = 8

    def __post_init__(self) -> None:
        _check_ratio(self.ratio, "ratio")
        _check_rank(self.rank)


@dataclass(frozen=True)
class TierPruneParams:
    tier_ratios: dict[str, float] = field(default_factory=lambda: dict(TIER_RATIOS))
    rank: int = 8

    def __post_init__(self) -> None:
        _check_table(self.tier_ratios, "tier_ratios")
        for tier, ratio in self.tier_ratios.items():
            _check_ratio(ratio, f"tier_ratios.{tier}")
        _check_rank(self.rank)


# --- strategies --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyContext:
    """What every strategy may know: the arm space, each device's tier (a label only some
    baselines use, e.g. HetLoRA assigns ranks by tier; FedSpine ignores it), a seed, and its
    parameters (a mapping, as in a run config, or the strategy's ``Params`` instance)."""

    space: ArmSpace
    tiers: Mapping[str, str]
    seed: int = 0
    params: Any = field(default_factory=dict)


class ArmAssigner:
    """A federated method as fedspine runs it: which arm (pruning ratio, LoRA rank) each sampled
    device trains with this round, and which aggregation rule combines the results.

    Not Flower's ``Strategy``: the round loop, the projection of the global adapter and the
    aggregation belong to ``fedspine.fl.server`` / ``simulator``; an assigner only chooses arms
    (``configure``) and may learn from what came back (``observe``). Its typed parameters are
    ``self.params``, an instance of its ``Params`` dataclass, validated on construction.
    """

    name: ClassVar[str]
    aggregation: ClassVar[str]  # a rule of fedspine.lora.aggregate.AGGREGATORS
    prunes: ClassVar[bool] = True
    # Whether what it assigns depends on the round times it observes. A run of a strategy that
    # does not can be retimed onto another fleet (fedspine.fl.retime) instead of trained again.
    reads_clock: ClassVar[bool] = False
    Params: ClassVar[type] = NoParams
    # Parameters added since run summaries began to record them, with the value that reproduces
    # the behaviour from before each existed (not always today's default): how an older run's
    # summary is read (``recorded_params``).
    params_added: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        self.params = self.parse_params(ctx.params)

    @classmethod
    def parse_params(cls, raw: Any) -> Any:
        """``raw`` (a mapping, as in ``strategy.params``) as a validated ``cls.Params``."""
        if isinstance(raw, cls.Params):
            return raw
        try:
            return from_mapping(cls.Params, dict(raw), PARAMS)
        except ValueError as exc:
            raise ConfigError(f"strategy {cls.name!r}: {exc}") from None

    def configure(self, rnd: int, devices: Sequence[str]) -> dict[str, Arm]:
        raise NotImplementedError

    def observe(
        self,
        rnd: int,
        results: Sequence[TrainRes],
        failures: Sequence[Failure],
        round_time_s: Mapping[str, float],
    ) -> None:
        """Called after each round with what came back (most strategies ignore it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got {sorted(state)}")


class FedSpine(ArmAssigner):
    """The paper's method: an online bandit picks every device's (ratio, rank) from observed
    round outcomes, with no knowledge of device speed (``fedspine.bandit``). The default objective
    ``"deadline"`` (ours) learns a common round deadline and gives each device the arm its spare
    time affords; ``objective: paper`` is the per-device reconstruction of the paper's bandit.

    Aggregation (ours; the paper's rule is not public): zero-padding with count-normalised
    channels. Our reconstruction ``fedspine`` (update-norm weights, rank components averaged only
    over the devices that had them) collapsed the global model to one class on the quick preset
    (Dirichlet 0.5: 0.584 -> 0.416 by round 4), while zero-padding reached 0.734 by round 3 with
    the same arms; it stays available as ``strategy.aggregation=fedspine`` for ablations
    (``fedspine run --config experiments/configs/quick.yaml strategy.aggregation=fedspine``)."""

    name = "fedspine"
    aggregation = "zero-pad"
    reads_clock = True
    Params = FedSpineParams
    params_added = {k: v for k, v in CONFIG_ADDED.items() if k in FedSpineParams.__dataclass_fields__}

    def __init__(self, ctx: StrategyContext):
        super().__init__(ctx)
        p = self.params
        self.allocator = Allocator(
            ctx.space,
            policy=p.policy,
            policy_params=p.policy_params,
            reward=p.reward,
            seed=ctx.seed,
            safe_slack=p.safe_slack,
            objective=p.objective,
            deadline_slack=p.deadline_slack,
            explore_factor=p.explore_factor,
            prune_elasticity=p.prune_elasticity,
            ratio_rule=p.ratio_rule,
            value_shrink=p.value_shrink,
            deadline_rule=p.deadline_rule,
            prune_tolerance=p.prune_tolerance,
            value_confidence=p.value_confidence,
            value_round_effect=p.value_round_effect,
            monotone_pruning=True,  # a simulated device never regrows what it pruned
        )

    def configure(self, rnd: int, devices: Sequence[str]) -> dict[str, Arm]:
        return self.allocator.assign(list(devices), rnd)

    def observe(
        self,
        rnd: int,
        results: Sequence[TrainRes],
        failures: Sequence[Failure],
        round_time_s: Mapping[str, float],
    ) -> None:
        pending = self.allocator.pending
        reports = [
            RoundReport(
                r.device_id,
                pending[r.device_id],
                round_time_s=round_time_s[r.device_id],
                loss_before=r.loss_before,
                loss_after=r.loss_after,
                achieved_ratio=r.achieved_ratio,
                update_norm=r.update_norm,
            )
            for r in results
            if r.device_id in pending
        ]
        reports += [
            RoundReport(f.device_id, pending[f.device_id], failed=True)
            for f in failures
            if f.device_id in pending
        ]
        self.allocator.observe_round(reports)

    def state_dict(self) -> dict[str, Any]:
        return {"allocator": self.allocator.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.allocator.load_state_dict(state["allocator"])


class _Fixed(ArmAssigner):
    """Base for baselines whose arm does not depend on what the rounds report."""

    def arm_for(self, device: str) -> Arm:
        raise NotImplementedError

    def configure(self, rnd: int, devices: Sequence[str]) -> dict[str, Arm]:
        return {d: self.arm_for(d) for d in devices}


def _by_tier(strategy: ArmAssigner, key: str, device: str) -> Any:
    table = getattr(strategy.params, key)
    tier = strategy.ctx.tiers.get(device)
    if tier not in table:
        raise ValueError(
            f"{strategy.name}: no {key} entry for tier {tier!r} of device {device!r}; have {sorted(table)}"
        )
    return table[tier]


# The pruning baselines aggregate exactly as FedSpine does (zero-padding, count-normalised
# channels), so a comparison with them measures the arm choice alone.
PRUNING_BASELINE_RULE = FedSpine.aggregation


class FedAvgLoRA(_Fixed):
    """FedAvg of LoRA adapters (FedIT-style): no pruning, one rank for everyone."""

    name = "fedavg-lora"
    aggregation = "zero-pad"
    prunes = False
    Params = FedAvgLoRAParams

    def arm_for(self, device: str) -> Arm:
        return Arm(0.0, self.params.rank)


class HetLoRA(_Fixed):
    """HetLoRA (Cho et al. 2024): no pruning, rank by device tier, norm-weighted zero-padding."""

    name = "hetlora"
    aggregation = "hetlora"
    prunes = False
    Params = TierRankParams

    def arm_for(self, device: str) -> Arm:
        return Arm(0.0, int(_by_tier(self, "tier_ranks", device)))


class FlexLoRA(HetLoRA):
    """FlexLoRA (Bai et al. 2024): ranks by tier, full-size aggregation, SVD redistribution."""

    name = "flexlora"
    aggregation = "flexlora"


class FLoRA(HetLoRA):
    """FLoRA (Wang et al. 2024): ranks by tier, exact stacking aggregation folded into the base."""

    name = "flora"
    aggregation = "flora"


class FixedPrune(_Fixed):
    """The same ratio and rank for everyone: the pruning baseline at equal sparsity."""

    name = "fixed-prune"
    aggregation = PRUNING_BASELINE_RULE
    Params = FixedPruneParams

    def arm_for(self, device: str) -> Arm:
        return Arm(self.params.ratio, self.params.rank)


class TierPrune(_Fixed):
    """Ratio by known device tier (an oracle-ish heuristic: it is told who is slow)."""

    name = "tier-prune"
    aggregation = PRUNING_BASELINE_RULE
    Params = TierPruneParams

    def arm_for(self, device: str) -> Arm:
        return Arm(float(_by_tier(self, "tier_ratios", device)), self.params.rank)


class RandomArm(ArmAssigner):
    """A uniformly random arm of the same space each round (seeded): the no-learning control."""

    name = "random-arm"
    aggregation = PRUNING_BASELINE_RULE

    def __init__(self, ctx: StrategyContext):
        super().__init__(ctx)
        self.rng = np.random.Generator(np.random.PCG64(ctx.seed))

    def configure(self, rnd: int, devices: Sequence[str]) -> dict[str, Arm]:
        picks = self.rng.integers(0, len(self.ctx.space), size=len(devices))
        return {d: self.ctx.space[int(i)] for d, i in zip(devices, picks, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


STRATEGIES: dict[str, type[ArmAssigner]] = {
    cls.name: cls
    for cls in (FedSpine, FedAvgLoRA, HetLoRA, FlexLoRA, FLoRA, FixedPrune, TierPrune, RandomArm)
}


def resolved_params(name: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Strategy ``name``'s parameters with every default filled in, as plain JSON data: what a
    run's summary records, since a changed default changes a run without changing its config."""
    params = STRATEGIES[name].parse_params(raw or {})
    plain = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}
    return json.loads(json.dumps(plain, default=str))


def recorded_params(name: str, recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A run summary's ``strategy_params`` read as that run behaved: a parameter added since it
    ran takes the value from before it existed (the strategy's ``params_added``), else today's
    default, so that a flipped default never passes an older run off as a run of the new one."""
    before = json.loads(json.dumps(dict(STRATEGIES[name].params_added)))
    return fill_missing(recorded, {**resolved_params(name, {}), **before})


def make_strategy(name: str, ctx: StrategyContext) -> ArmAssigner:
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name](ctx)
