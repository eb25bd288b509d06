"""The allocator's parts: the RewardTracker and SafeExploration it composes, each with its own state."""

import json

import numpy as np
import pytest

from fedspine.bandit import Allocator, Arm, ArmSpace, RewardConfig, RoundReport
from fedspine.bandit.fleet import FleetModel
from fedspine.bandit.planner import capacity
from fedspine.bandit.safety import SafeExploration
from fedspine.bandit.synthetic import SyntheticFleet
from fedspine.bandit.tracker import RewardTracker

SPACE = ArmSpace.grid([0.0, 0.25, 0.5], [4, 8])
STATE_KEYS = [
    "version", "space", "reward", "seed", "safe_slack", "objective", "deadline_slack",
    "explore_factor", "change_factor", "monotone_pruning", "prune_elasticity", "ratio_rule",
    "value_shrink",  # added within version 3: a state without it loads as 0 (off)
    "deadline_rule",  # added within version 3: a state without it loads as "shortest"
    "prune_tolerance",  # added within version 3: a state without it loads as 0 (off)
    "value_confidence",  # added within version 3: a state without it loads as 0 (off)
    "value_round_effect",  # added within version 3: a state without it loads as False (off)
    "deadline", "floor",
    "rng", "fleet", "policy", "lanes", "pending", "round", "gain_ref", "norm_ref", "time_ref_ema",
    "times_round", "times",
]  # fmt: skip


def _safety(space=SPACE, **kw):
    settings = dict(
        objective="deadline",
        safe_slack=None,
        deadline_slack=0.0,
        explore_factor=1.25,
        monotone_pruning=True,
        prune_elasticity=0.8,
        target_ratio=0.0,
        time_alpha=1.0,
    )
    return SafeExploration(space, **{**settings, **kw})


@pytest.mark.parametrize("objective", ["deadline", "paper"])
def test_the_state_keeps_its_version_3_layout_and_round_trips_through_the_parts(objective):
    fleet = SyntheticFleet.paper_mix(8, seed=0)
    alloc = Allocator(SPACE, seed=3, objective=objective, reward=RewardConfig(target_ratio=0.2))
    rng = np.random.default_rng(0)
    for rnd in range(1, 6):
        arms = alloc.assign(range(8), rnd)
        alloc.observe_round(fleet.run_round([arms[d] for d in range(8)], SPACE, rng))
    state = alloc.state_dict()
    assert list(state) == STATE_KEYS
    assert {k: state[k] for k in ("deadline", "floor")} == alloc.safety.state_dict()
    tracked = ("gain_ref", "norm_ref", "time_ref_ema", "times_round", "times")
    assert {k: state[k] for k in tracked} == alloc.reward_tracker.state_dict()
    text = json.dumps(state)
    again = Allocator.from_state_dict(json.loads(text))
    assert json.dumps(again.state_dict()) == text
    assert again.assign(range(8), 6) == alloc.assign(range(8), 6)


def test_a_device_that_achieved_a_hair_above_its_ratio_may_play_that_ratio_again():
    """Channel rounding leaves a device at sparsity 0.101 on arm 0.1. Its pruning floor is the
    grid ratio it ran (0.1), not 0.101, which would forbid arm 0.1 and push the device one grid
    step up every round (seen at the powered size: every device at 0.3 by round 3)."""
    space = ArmSpace.grid([0.1, 0.2, 0.3], [4])
    alloc = Allocator(space, seed=0)
    fast = []
    for rnd, slow_time in ((1, 4.0), (2, 3.0), (3, 3.0), (4, 3.0)):
        arms = alloc.assign([0, 1], rnd)
        fast.append(arms[1].ratio)
        reports = [
            RoundReport(
                d,
                arms[d],
                round_time_s=t,
                loss_before=1.0,
                loss_after=0.9,
                achieved_ratio=arms[d].ratio + 0.001,
            )
            for d, t in ((0, slow_time), (1, 1.0))
        ]
        alloc.observe_round(reports)
    assert fast == [0.1, 0.1, 0.1, 0.1]  # the fast device never needed more (was 0.1, 0.2, 0.3)
    assert alloc.state_dict()["floor"] == [0.3, 0.1]


@pytest.mark.parametrize("objective", ["deadline", "paper"])
def test_under_a_sparsity_target_what_an_arm_is_worth_leaves_out_the_pruning_ingredient(objective):
    """Two devices with the same loss drop, one pruned to the target and one to half of it: the
    reward counts the pruning ingredient, and under the deadline objective what the fleet model
    learns an arm is worth does not (otherwise the value ratio rule prunes every device towards
    the target: seen at the powered size on the real task, 2026-12-03); the paper objective's
    reconstruction is left as it was."""
    tracker = RewardTracker(RewardConfig(target_ratio=0.2), SPACE, objective=objective)
    tracker.add_lanes(2)
    same = np.array([1.0, 1.0])
    rewards, learnt = tracker.score(
        np.array([0, 1]),
        np.array([True, True]),
        times=np.array([2.0, 2.0]),
        loss_before=same,
        loss_after=same * 0.5,
        update_norm=np.full(2, np.nan),
        ratio=np.array([0.1, 0.2]),
        whole_round=True,
        deadline=2.0,
    )
    assert rewards[1] > rewards[0]
    if objective == "deadline":
        assert learnt[0] == learnt[1]
    else:
        assert learnt[1] > learnt[0]


def test_reward_tracker_scores_a_failure_zero_and_keeps_its_scales():
    tracker = RewardTracker(RewardConfig(), SPACE, objective="paper")
    tracker.add_lanes(2)
    lanes, ok = np.array([0, 1]), np.array([True, False])
    nan = np.full(2, np.nan)
    rewards, quality = tracker.score(
        lanes,
        ok,
        times=np.array([2.0, np.nan]),
        loss_before=np.array([1.0, np.nan]),
        loss_after=np.array([0.5, np.nan]),
        update_norm=nan,
        ratio=np.array([0.0, 0.25]),
        whole_round=True,
        deadline=None,
    )
    assert rewards[1] == 0.0 and 0.0 < rewards[0] <= 1.0 and quality.shape == (2,)
    assert tracker.gain_ref.tolist() == [0.5, 0.0] and tracker.times == [2.0]
    tracker.fold(before_round=2)  # the round's time quantile becomes the EMA
    assert (tracker.time_ref_ema, tracker.times, tracker.times_round) == (2.0, [], 2)


def test_safe_exploration_starts_newcomers_unpruned_and_floors_only_monotone_pruning():
    safety = _safety()
    safety.add_lanes(2)
    fleet = FleetModel(len(SPACE))
    fleet.add_lanes(2)
    allowed = safety.allowed(np.array([0, 1]), fleet, None)
    assert safety.deadline is None and allowed.sum(axis=1).tolist() == [1, 1]
    assert SPACE[safety.start_arm].ratio == 0.0 and SPACE[safety.start_arm].rank == 4
    safety.observe(np.array([1]), np.array([0.25]))
    assert safety.floor.tolist() == [0.0, 0.25]
    loose = _safety(monotone_pruning=False)
    loose.add_lanes(1)
    loose.observe(np.array([0]), np.array([0.5]))
    assert loose.floor.tolist() == [0.0] and loose.start_arm == int(np.argmin(capacity(SPACE)))  # cheapest


@pytest.mark.parametrize("shrink", [0.0, 10.0])
def test_value_shrink_keeps_one_lucky_round_from_buying_pruning(shrink):
    """Four devices play (0.0, 4) for five rounds at quality 0.4; one of them tries rank 8 once
    and is lucky (quality 1.0). Unshrunk, rank 8 is worth 2.5x rank 4, enough to prune half
    the model for it; shrunk by 10 pseudo-observations, the one round moves it little."""
    space = ArmSpace.grid([0.0, 0.5], [4, 8])
    idx = space.arm_index_map
    fleet = FleetModel(len(space))
    fleet.add_lanes(4)
    lanes = np.arange(4)
    for _ in range(5):
        fleet.observe(lanes, np.full(4, idx[Arm(0.0, 4)]), np.ones(4), np.full(4, 0.4))
    fleet.observe(np.array([0]), np.array([idx[Arm(0.0, 8)]]), np.ones(1), np.ones(1))
    safety = _safety(space=space, value_shrink=shrink)
    worth = safety.arm_worth(fleet)
    gap = worth[idx[Arm(0.0, 8)]] - worth[idx[Arm(0.0, 4)]]
    if shrink == 0:
        assert gap == pytest.approx(np.log(2.5), abs=0.05)
        assert worth[idx[Arm(0.5, 8)]] > worth[idx[Arm(0.0, 4)]]  # halving the model "pays"
    else:
        assert 0 < gap < 0.15  # ~0.11: one pull against ten at the mean
        assert worth[idx[Arm(0.5, 8)]] < worth[idx[Arm(0.0, 4)]]


def test_the_fleet_fit_is_the_exact_least_squares_solution_when_devices_play_few_arms():
    """Each device plays two neighbouring arms of a chain, the case where alternating sweeps
    crawl (eight of them left these effects at about half their size); noise-free data is
    recovered exactly, and an arm nobody played stays unknown."""
    from fedspine.bandit.fleet import fit_factors

    n_dev, n_arm = 40, 9
    rng = np.random.default_rng(0)
    theta, phi = rng.normal(size=n_dev), np.linspace(-1.0, 1.0, n_arm - 1)
    log_sum, weight = np.zeros((n_dev, n_arm)), np.zeros((n_dev, n_arm))
    for i in range(n_dev):
        for a in (i % (n_arm - 2), i % (n_arm - 2) + 1):
            w = 1.0 + i % 3
            weight[i, a] = w
            log_sum[i, a] = w * (theta[i] + phi[a])
    got_theta, got_phi = fit_factors(log_sum, weight)
    assert np.isnan(got_phi[-1])  # never played
    shift = phi.mean()  # effects are centred on the played arms
    np.testing.assert_allclose(got_phi[:-1], phi - shift, atol=1e-9)
    np.testing.assert_allclose(got_theta, theta + shift, atol=1e-9)


def test_arms_that_no_device_connects_get_no_contrast_from_rounding():
    """Every device on one arm of its own: nothing tells the arms apart, so every arm effect is
    zero and each device keeps its own mean (multiplying by 1/w instead of dividing left rounding
    that the solve blew up to effects of order 1)."""
    from fedspine.bandit.fleet import fit_factors

    rng = np.random.default_rng(187)
    n_dev, n_arm = 30, 12
    weight = np.zeros((n_dev, n_arm))
    arm = rng.integers(0, n_arm, n_dev)
    weight[np.arange(n_dev), arm] = rng.random(n_dev) + 0.1
    log_sum = weight * rng.normal(size=(n_dev, n_arm))
    theta, phi = fit_factors(log_sum, weight)
    played = np.isin(np.arange(n_arm), arm)
    np.testing.assert_array_equal(np.isnan(phi), ~played)
    np.testing.assert_allclose(phi[played], 0.0, atol=1e-12)
    np.testing.assert_allclose(theta, log_sum.sum(axis=1) / weight.sum(axis=1), atol=1e-12)


@pytest.mark.parametrize("rank_gain, expect", [(0.0, "shortest"), (2.0, "longer")])
def test_the_progress_deadline_is_lengthened_only_when_what_it_buys_pays_for_the_time(rank_gain, expect):
    """A slow and a fast device; the shortest deadline (5 s) holds the slow one at (0.5, 4).
    One more second lets it play rank 16: worth it when rank 16 is worth e^2 times rank 4
    (predicted progress per second 0.92 against 0.79), not when ranks are worth the same."""
    space = ArmSpace.grid([0.0, 0.5], [4, 16])  # (0,4) (0,16) (0.5,4) (0.5,16)
    pred = np.array([[10.0, 14.0, 5.0, 6.0], [2.0, 3.0, 1.0, 1.5]])
    log_worth = np.log([1.0, 1.0, 0.5, 0.5]) + np.array([0.0, rank_gain, 0.0, rank_gain])
    safety = _safety(space=space, ratio_rule="value", deadline_rule="progress")
    deadline = safety._progress_deadline(pred, 5.0, log_worth)
    if expect == "shortest":
        assert deadline == 5.0
    else:
        assert 6.0 <= deadline < 6.1  # the first searched deadline that admits (0.5, 16)
    with pytest.raises(ValueError, match="deadline_rule must be one of"):
        _safety(deadline_rule="longest")
