"""Strategies: what each device is told to do each round, and which aggregation rule applies.

Every method, FedSpine and the baselines, runs through the same round loop, the same client
step, data, clock and time model; a strategy only answers "which (ratio, rank) for which
device" and "which aggregation rule". Adding a baseline is one small class and one registry
entry. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedspine.bandit import Allocator, Arm, ArmSpace, RewardConfig, RoundReport
from fedspine.fl.messages import Failure, TrainRes


@dataclass(frozen=True)
class StrategyContext:
    """What every strategy may know: the arm space, each device's tier (a label only some
    baselines use, e.g. HetLoRA assigns ranks by tier; FedSpine ignores it), and a seed."""

    space: ArmSpace
    tiers: Mapping[str, str]
    seed: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)  # strategy-specific options


class Strategy:
    name: ClassVar[str]
    aggregation: ClassVar[str]  # a rule of fedspine.lora.aggregate.AGGREGATORS
    prunes: ClassVar[bool] = True

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        allowed = self.param_names()
        unknown = sorted(set(ctx.params) - set(allowed))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for strategy {self.name!r}; allowed: {allowed}")

    @classmethod
    def param_names(cls) -> list[str]:
        return []

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

    # helpers
    def _param(self, name: str, default: Any) -> Any:
        return self.ctx.params.get(name, default)


class FedSpine(Strategy):
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

    @classmethod
    def param_names(cls) -> list[str]:
        return [
            "objective",
            "policy",
            "policy_params",
            "safe_slack",
            "deadline_slack",
            "explore_factor",
            "reward",
        ]

    def __init__(self, ctx: StrategyContext):
        super().__init__(ctx)
        self.allocator = Allocator(
            ctx.space,
            policy=self._param("policy", None),
            policy_params=self._param("policy_params", None),
            reward=RewardConfig(**self._param("reward", {})),
            seed=ctx.seed,
            safe_slack=self._param("safe_slack", 0.05),
            objective=self._param("objective", "deadline"),
            deadline_slack=self._param("deadline_slack", 0.0),
            explore_factor=self._param("explore_factor", 1.25),
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


class _Fixed(Strategy):
    """Base for baselines whose arm does not depend on what the rounds report."""

    def arm_for(self, device: str) -> Arm:
        raise NotImplementedError

    def configure(self, rnd: int, devices: Sequence[str]) -> dict[str, Arm]:
        return {d: self.arm_for(d) for d in devices}


def _by_tier(strategy: Strategy, key: str, default: Mapping[str, Any], device: str) -> Any:
    table = strategy._param(key, default)
    tier = strategy.ctx.tiers.get(device)
    if tier not in table:
        raise ValueError(
            f"{strategy.name}: no {key} entry for tier {tier!r} of device {device!r}; have {sorted(table)}"
        )
    return table[tier]


# The pruning baselines aggregate exactly as FedSpine does (zero-padding, count-normalised
# channels), so a comparison with them measures the arm choice alone.
PRUNING_BASELINE_RULE = FedSpine.aggregation

# Default per-tier settings for the tier-based baselines, for the paper's tiers (ours).
TIER_RANKS = {"tx2": 4, "nx": 8, "agx": 16, "orin": 16}
TIER_RATIOS = {"tx2": 0.6, "nx": 0.4, "agx": 0.2, "orin": 0.0}


class FedAvgLoRA(_Fixed):
    """FedAvg of LoRA adapters (FedIT-style): no pruning, one rank for everyone."""

    name = "fedavg-lora"
    aggregation = "zero-pad"
    prunes = False

    @classmethod
    def param_names(cls) -> list[str]:
        return ["rank"]

    def arm_for(self, device: str) -> Arm:
        return Arm(0.0, int(self._param("rank", 8)))


class HetLoRA(_Fixed):
    """HetLoRA (Cho et al. 2024): no pruning, rank by device tier, norm-weighted zero-padding."""

    name = "hetlora"
    aggregation = "hetlora"
    prunes = False

    @classmethod
    def param_names(cls) -> list[str]:
        return ["tier_ranks"]

    def arm_for(self, device: str) -> Arm:
        return Arm(0.0, int(_by_tier(self, "tier_ranks", TIER_RANKS, device)))


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

    @classmethod
    def param_names(cls) -> list[str]:
        return ["ratio", "rank"]

    def arm_for(self, device: str) -> Arm:
        return Arm(float(self._param("ratio", 0.4)), int(self._param("rank", 8)))


class TierPrune(_Fixed):
    """Ratio by known device tier (an oracle-ish heuristic: it is told who is slow)."""

    name = "tier-prune"
    aggregation = PRUNING_BASELINE_RULE

    @classmethod
    def param_names(cls) -> list[str]:
        return ["tier_ratios", "rank"]

    def arm_for(self, device: str) -> Arm:
        return Arm(float(_by_tier(self, "tier_ratios", TIER_RATIOS, device)), int(self._param("rank", 8)))


class RandomArm(Strategy):
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


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedSpine, FedAvgLoRA, HetLoRA, FlexLoRA, FLoRA, FixedPrune, TierPrune, RandomArm)
}


def make_strategy(name: str, ctx: StrategyContext) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    return STRATEGIES[name](ctx)
