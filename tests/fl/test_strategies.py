import dataclasses
import json

import pytest

from fedspine.bandit import Arm, ArmSpace
from fedspine.fl.messages import Failure, TrainRes
from fedspine.fl.strategies import (
    STRATEGIES,
    ArmAssigner,
    FixedPruneParams,
    NoParams,
    StrategyContext,
    make_strategy,
)

SPACE = ArmSpace.grid([0.0, 0.2, 0.4, 0.6], [4, 8, 16])
TIERS = {"a": "tx2", "b": "nx", "c": "agx"}


def ctx(**params):
    return StrategyContext(SPACE, TIERS, seed=3, params=params)


def result(device, rnd, loss_after=1.0):
    return TrainRes(rnd, device, 4, {}, {}, 10, 2.0, loss_after, 0.2, 1.0)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_assigns_an_arm_per_device_and_round_trips_its_state(name):
    s = make_strategy(name, ctx())
    for rnd in (1, 2):
        arms = s.configure(rnd, ["a", "b", "c"])
        assert set(arms) == {"a", "b", "c"} and all(isinstance(a, Arm) for a in arms.values())
        if not s.prunes:
            assert all(a.ratio == 0.0 for a in arms.values())
        s.observe(rnd, [result("a", rnd), result("b", rnd)], [Failure(rnd, "c", "oom")], {"a": 3.0, "b": 5.0})
    clone = make_strategy(name, ctx())
    clone.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert clone.configure(3, ["a", "b", "c"]) == s.configure(3, ["a", "b", "c"])


@pytest.mark.parametrize("objective", ["deadline", "paper"])
def test_fedspine_feeds_one_observation_per_device_and_round_to_its_allocator(objective):
    s = make_strategy("fedspine", ctx(objective=objective))
    assert s.allocator.objective == objective
    s.configure(1, ["a", "b", "c"])
    s.observe(1, [result("a", 1), result("b", 1)], [Failure(1, "c", "timeout")], {"a": 3.0, "b": 5.0})
    assert s.allocator.pending == {}
    if objective == "paper":
        assert len(s.allocator.estimates("a")) == 1 and len(s.allocator.estimates("c")) == 1
        assert list(s.allocator.estimates("c").values()) == [0.0]  # a failure is the worst reward
    else:  # learns from the arm that ran: "a" reported achieved ratio 0.2 on its rank-4 arm
        est_a, est_c = s.allocator.estimates("a"), s.allocator.estimates("c")
        assert est_a[Arm(0.2, 4)] > 0.5 and max(est_c.values()) < 0.01  # failure: the worst reward


def test_tier_baselines_follow_the_tier_tables_and_name_missing_tiers():
    assert make_strategy("hetlora", ctx()).configure(1, ["a", "c"]) == {"a": Arm(0.0, 4), "c": Arm(0.0, 16)}
    tp = make_strategy("tier-prune", ctx(tier_ratios={"tx2": 0.5, "nx": 0.3, "agx": 0.0}, rank=4))
    assert tp.configure(1, ["a", "b"]) == {"a": Arm(0.5, 4), "b": Arm(0.3, 4)}
    with pytest.raises(ValueError, match="no tier_ranks entry for tier 'nx'"):
        make_strategy("hetlora", ctx(tier_ranks={"tx2": 4})).configure(1, ["b"])
    with pytest.raises(
        ValueError, match=r"strategy 'fixed-prune': unknown field\(s\) \['strategy.params.rnak'\]"
    ):
        make_strategy("fixed-prune", ctx(rnak=4))
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_strategy("fedprox", ctx())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_has_typed_frozen_params_with_defaults(name):
    cls = STRATEGIES[name]
    assert issubclass(cls, ArmAssigner) and dataclasses.is_dataclass(cls.Params)
    s = make_strategy(name, ctx())
    assert s.params == cls.Params() and isinstance(s.params, cls.Params)
    if dataclasses.fields(cls.Params):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(s.params, dataclasses.fields(cls.Params)[0].name, None)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("fixed-prune", {"ratio": 1.5}, r"strategy.params.ratio must be in \[0, 1\), got 1.5"),
        ("fixed-prune", {"rank": "8"}, r"strategy.params.rank must be int, got '8'"),
        ("fedavg-lora", {"rank": 0}, r"strategy.params.rank must be >= 1, got 0"),
        ("hetlora", {"tier_ranks": {"tx2": 0}}, r"strategy.params.tier_ranks.tx2 must be >= 1, got 0"),
        ("flora", {"tier_ranks": {}}, r"strategy.params.tier_ranks must be a non-empty tier -> value"),
        ("tier-prune", {"tier_ratios": {"nx": -0.1}}, r"tier_ratios.nx must be in \[0, 1\), got -0.1"),
        (
            "fedspine",
            {"policy": "ucb2"},
            r"strategy.params.policy must be None or one of \[.*'ucb1'.*\], got 'ucb2'",
        ),
        (
            "fedspine",
            {"objective": "makespan"},
            r"strategy.params.objective must be one of \['deadline', 'paper'\]",
        ),
        ("fedspine", {"explore_factor": 0.5}, r"strategy.params.explore_factor must be >= 1, got 0.5"),
        ("fedspine", {"safe_slack": -1.0}, r"strategy.params.safe_slack must be None \(off\) or >= 0"),
        (
            "fedspine",
            {"reward": {"loss_wieght": 1.0}},
            r"unknown field\(s\) \['strategy.params.reward.loss_wieght'\]",
        ),
        (
            "random-arm",
            {"rank": 4},
            r"'random-arm': unknown field\(s\) \['strategy.params.rank'\]; allowed: \[\]",
        ),
    ],
)
def test_bad_strategy_params_name_the_field_the_value_and_what_is_allowed(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(name, ctx(**params))


def test_params_come_from_a_mapping_or_ready_made():
    typed = make_strategy("fixed-prune", StrategyContext(SPACE, TIERS, params=FixedPruneParams(ratio=0.2)))
    assert typed.configure(1, ["a"]) == {"a": Arm(0.2, 8)}
    assert make_strategy("fixed-prune", ctx(ratio=0)).params.ratio == 0.0  # YAML's 0 is the float 0.0
    assert make_strategy("random-arm", ctx()).params == NoParams()


def test_an_older_summary_is_read_with_the_values_from_before_its_missing_parameters():
    """A summary from before ``value_confidence`` existed ran without the bound (0), not under
    today's default, so it must not pass for a run of today's FedSpine."""
    from fedspine.fl.strategies import recorded_params, resolved_params

    today = resolved_params("fedspine", {})
    older = {k: v for k, v in today.items() if k not in ("value_confidence", "value_round_effect")}
    assert today["value_confidence"] == 1.645
    read = recorded_params("fedspine", older)
    assert read["value_confidence"] == 0.0 and read["value_round_effect"] is False
    assert read != today and read == resolved_params("fedspine", {"value_confidence": 0.0})
    assert recorded_params("fedspine", today) == today
    assert recorded_params("fixed-prune", {}) == resolved_params("fixed-prune", {})  # nothing added
