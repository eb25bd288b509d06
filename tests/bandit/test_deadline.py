"""The default objective ("deadline") against the speed-knowing planner, on fleets it never sees."""

import json

import numpy as np
import pytest

from fedspine.bandit import Allocator, Arm, ArmSpace, RewardConfig, RoundReport
from fedspine.bandit.planner import capacity, one_step_cheaper, plan
from fedspine.bandit.synthetic import SyntheticFleet, scorecard, simulate, spearman

SPACE = ArmSpace.grid([round(0.1 * i, 1) for i in range(8)], [4, 8, 16, 32])
WINDOW = slice(20, 30)  # rounds 21-30 of 30
# Held out: the defaults were chosen on paper_mix seeds 0/3 and drawn seeds 11/12.
FLEETS = {
    "paper-mix": SyntheticFleet.paper_mix(80, seed=10),
    "drawn": SyntheticFleet.drawn(80, seed=22, compute_spread=4, bandwidth_spread=16),
}


def cards(fleet, seeds=(0, 1, 2), **kw):
    return [
        scorecard(fleet, SPACE, simulate(fleet, Allocator(SPACE, seed=s, **kw), 30, seed=s), WINDOW, seed=s)
        for s in seeds
    ]


# --- the planner ------------------------------------------------------------------------------
def test_planner_sets_the_shortest_common_deadline_and_the_largest_arm_under_it():
    space = ArmSpace.grid([0.0, 0.5], [4, 16])  # arms (0,4) (0,16) (0.5,4) (0.5,16)
    times = np.array([[10.0, 14.0, 5.0, 7.0], [2.0, 3.0, 1.0, 1.5]])  # slow, fast
    p = plan(times, space)
    assert p.deadline == 5.0  # the slow device's fastest arm
    assert [space[a] for a in p.arms] == [Arm(0.5, 4), Arm(0.0, 16)]
    # a fixed deadline nobody's fastest arm meets: that device plays its fastest arm
    assert [space[a] for a in plan(times, space, deadline=4.0).arms] == [Arm(0.5, 4), Arm(0.0, 16)]
    with pytest.raises(ValueError, match="shape"):
        plan(times[:, :3], space)


def test_capacity_grows_with_kept_fraction_and_rank_and_steps_are_one_grid_move():
    cap = capacity(SPACE)
    assert cap[SPACE.index(Arm(0.0, 32))] == cap.max() and cap[SPACE.index(Arm(0.7, 4))] == cap.min()
    step = one_step_cheaper(SPACE)
    a = SPACE.index(Arm(0.3, 8))
    assert {SPACE[b] for b in np.flatnonzero(step[a])} == {Arm(0.4, 8), Arm(0.3, 4)}


def test_spearman_matches_the_textbook_values():
    assert spearman(np.arange(5), np.arange(5) ** 2) == pytest.approx(1.0)
    assert spearman(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)


# --- the allocator against the planner ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FLEETS))
def test_learnt_allocation_with_the_capacity_rule_matches_the_planner_without_knowing_speeds(name):
    """Issue #17's synthetic targets, met by ``ratio_rule="capacity"`` (the rule the planner's
    capacity measure describes)."""
    fleet = FLEETS[name]
    got = cards(fleet, ratio_rule="capacity")
    assert np.mean([c.makespan_ratio for c in got]) <= 1.05, got
    assert np.mean([c.capacity_ratio for c in got]) >= 0.9, got
    assert min(c.speed_capacity_spearman for c in got) >= 0.7, got
    # no collapse onto the cheapest arm: about as many devices there as the planner puts there
    assert max(c.cheapest_share for c in got) <= got[0].planner_cheapest_share + 0.1, got


@pytest.mark.parametrize("name", sorted(FLEETS))
def test_the_default_value_rule_keeps_the_makespan_and_the_speed_order_but_less_capacity(name):
    """The default (``ratio_rule="value"``, chosen on the real task) holds the planner's makespan
    and orders capacity by speed, and buys less capacity than the capacity rule (it prunes only
    for a learnt worth, which puts more devices at rank 4): 0.88-0.91 of the planner's on these
    fleets, under the issue's 0.9 on the paper mix (README, allocator section)."""
    fleet = FLEETS[name]
    got, by_capacity = cards(fleet), cards(fleet, ratio_rule="capacity")
    assert np.mean([c.makespan_ratio for c in got]) <= 1.05, got
    assert min(c.speed_capacity_spearman for c in got) >= 0.7, got
    assert np.mean([c.capacity_ratio for c in got]) < np.mean([c.capacity_ratio for c in by_capacity])


@pytest.mark.parametrize("rule", ["capacity", "value"])
def test_the_pooled_policy_beats_random_choice_within_the_same_safe_set(rule):
    fleet = FLEETS["paper-mix"]
    ours, rnd = cards(fleet, ratio_rule=rule), cards(fleet, ratio_rule=rule, policy="random")
    # every seed of ours above every seed of random choice
    assert min(c.capacity_ratio for c in ours) > max(c.capacity_ratio for c in rnd)
    # the speed order: the capacity rule's at least random's; the default's value rule with its
    # confidence bound ties it (0.950 against 0.951 over these seeds, README)
    tie = 0.0 if rule == "capacity" else 0.005
    assert (
        np.mean([c.speed_capacity_spearman for c in ours])
        >= np.mean([c.speed_capacity_spearman for c in rnd]) - tie
    )
    if rule == "capacity":  # the value rule puts more devices on the cheapest arm than random does
        assert np.mean([c.cheapest_share for c in ours]) < np.mean([c.cheapest_share for c in rnd])


def test_devices_that_become_3x_slower_move_to_cheaper_arms_within_10_rounds():
    fleet = FLEETS["paper-mix"]
    slow = list(range(40, 50))
    cap = capacity(SPACE)
    resolved = cap[plan(fleet.slowed(slow, 3.0).expected_times(SPACE), SPACE).arms[slow]]
    run = simulate(fleet, Allocator(SPACE, seed=0), 40, seed=0, change=(21, slow, 3.0))
    before = cap[run["arms"][15:20][:, slow]].mean()
    after = cap[run["arms"][30][slow]]  # round 31: ten rounds after the change
    assert after.mean() < 0.6 * before
    assert np.all(after <= resolved * 1.1 + 1e-9)


def test_fast_devices_train_more_capacity_than_slow_ones_from_early_on():
    """The issue's symptom was the inverse (fastest tier pruned most)."""
    fleet = SyntheticFleet.paper_mix(80, seed=10)
    run = simulate(fleet, Allocator(SPACE, seed=0), 10, seed=0)
    cap = capacity(SPACE)[run["arms"][5:10]].mean(axis=0)
    tiers = np.array(fleet.tiers)
    assert cap[tiers == "tx2"].mean() < cap[tiers == "nx"].mean() < cap[tiers == "agx"].mean()


# --- mechanics ---------------------------------------------------------------------------------
def test_newcomers_start_unpruned_at_the_lowest_rank_and_the_round_then_gets_a_deadline():
    """Devices prune progressively (never back), so a newcomer starts with nothing pruned."""
    alloc = Allocator(SPACE, seed=0)
    arms = alloc.assign(["a", "b"], 1)
    assert set(arms.values()) == {Arm(0.0, 4)}
    alloc.observe_round(
        [
            RoundReport(d, a, round_time_s=t, loss_before=1.0, loss_after=0.9)
            for (d, a), t in zip(arms.items(), [2.0, 8.0], strict=True)
        ]
    )
    new = alloc.assign(["a", "b", "c"], 2)
    deadline = alloc.state_dict()["deadline"]
    # b's fastest arm, guessed from its one run: pruning 0.7 keeps 0.3 of the work (elasticity 0.8)
    assert deadline == pytest.approx(8.0 * 0.3**0.8)
    assert new["b"].ratio == 0.7 and new["a"].ratio == 0.0  # only the pace setter prunes
    assert new["c"] == Arm(0.0, 4)
    # without monotone pruning a newcomer starts on the cheapest arm instead
    assert set(Allocator(SPACE, seed=0, monotone_pruning=False).assign(["x"], 1).values()) == {Arm(0.7, 4)}


def test_finishing_by_the_deadline_costs_nothing_and_missing_it_does():
    alloc = Allocator(SPACE, seed=0, policy="random")
    first = alloc.assign(["a", "b"], 1)
    alloc.observe_round(
        [RoundReport(d, a, round_time_s=4.0, loss_before=1.0, loss_after=0.8) for d, a in first.items()]
    )
    arms = alloc.assign(["a", "b"], 2)
    deadline = alloc.state_dict()["deadline"]
    r = alloc.observe_round(
        [
            RoundReport("a", arms["a"], round_time_s=0.9 * deadline, loss_before=1.0, loss_after=0.8),
            RoundReport("b", arms["b"], round_time_s=2.0 * deadline, loss_before=1.0, loss_after=0.8),
        ]
    )
    assert r["a"] == pytest.approx(1.0) and r["b"] == pytest.approx(0.5)


@pytest.mark.parametrize("target", [0.2, 0.6])
def test_a_sparsity_target_holds_the_fleet_mean_ratio_at_it(target):
    """0.2 is below what the shortest deadline needs on this fleet (the round gets longer),
    0.6 above it (the slowest devices prune more)."""
    fleet = FLEETS["drawn"]
    run = simulate(fleet, Allocator(SPACE, seed=0, reward=RewardConfig(target_ratio=target)), 20, seed=0)
    ratios = np.array([a.ratio for a in SPACE])[run["arms"][10:]]
    assert np.abs(ratios.mean(axis=1) - target).max() <= 0.02, ratios.mean(axis=1)


@pytest.mark.parametrize("target", [0.2, 0.4, 0.6])
def test_at_equal_sparsity_the_slowest_tier_prunes_most_and_the_mean_is_the_target(target):
    """The equal-sparsity experiment's grid (target -0.1 / target / +0.1) on 20 devices: every
    round after the first holds the mean within 0.02, and the tiers are ordered."""
    space = ArmSpace.grid([round(target - 0.1, 2), target, round(target + 0.1, 2)], [4, 8, 16])
    fleet = SyntheticFleet.paper_mix(20, seed=1)
    run = simulate(fleet, Allocator(space, seed=1, reward=RewardConfig(target_ratio=target)), 15, seed=1)
    ratios = np.array([a.ratio for a in space])[run["arms"][1:]]
    assert np.abs(ratios.mean(axis=1) - target).max() <= 0.02, ratios.mean(axis=1)
    tiers = np.array(fleet.tiers)
    tx2, nx, agx = (ratios[:, tiers == t].mean() for t in ("tx2", "nx", "agx"))
    assert tx2 > nx >= agx, (tx2, nx, agx)


def test_state_round_trip_gives_identical_future_choices():
    fleet = FLEETS["drawn"]
    a = Allocator(SPACE, seed=3)
    simulate(fleet, a, 8, seed=1)
    b = Allocator.from_state_dict(json.loads(json.dumps(a.state_dict())))
    ra, rb = simulate(fleet, a, 5, seed=2, first_round=9), simulate(fleet, b, 5, seed=2, first_round=9)
    assert np.array_equal(ra["arms"], rb["arms"])


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"objective": "fastest"}, "objective must be one of ['deadline', 'paper']"),
        ({"deadline_slack": -0.1}, "deadline_slack must be a finite number >= 0.0"),
        ({"explore_factor": 0.5}, "explore_factor must be a finite number >= 1.0"),
        ({"change_factor": 1.0}, "change_factor must be a finite number > 1.0"),
    ],
)
def test_bad_arguments_are_named(kw, needle):
    with pytest.raises(ValueError) as exc:
        Allocator(SPACE, **kw)
    assert needle in str(exc.value)


def test_when_rank_buys_nothing_devices_prune_only_what_the_deadline_needs():
    # rank_half ~ 0: every rank yields the same loss improvement, so pruning to afford a higher
    # rank is waste; the capacity rule (which values rank by log2(2r) whatever it buys) does it.
    fleet = SyntheticFleet.paper_mix(80, seed=10, rank_half=1e-6)
    times = fleet.expected_times(SPACE)
    ratios = np.array([a.ratio for a in SPACE])
    need = np.where(times <= plan(times, SPACE).deadline * (1 + 1e-9), ratios[None, :], np.inf).min(axis=1)

    def pruning(rule):
        runs = [simulate(fleet, Allocator(SPACE, seed=s, ratio_rule=rule), 30, seed=s) for s in (0, 1)]
        return np.mean([ratios[r["arms"][WINDOW]].mean() for r in runs])

    value, by_capacity = pruning("value"), pruning("capacity")
    assert value <= need.mean() + 0.03, (value, need.mean())
    assert by_capacity >= value + 0.05, (by_capacity, value)


def test_value_shrink_is_validated_and_kept_in_the_state():
    with pytest.raises(ValueError, match="value_shrink must be a finite number >= 0.0, got -1"):
        Allocator(SPACE, value_shrink=-1)
    alloc = Allocator(SPACE, seed=0, value_shrink=10.0)
    state = json.loads(json.dumps(alloc.state_dict()))
    assert Allocator.from_state_dict(state).value_shrink == 10.0
    with pytest.raises(ValueError, match="state value_shrink 10.0 differs from 0.0"):
        Allocator(SPACE, seed=0).load_state_dict(state)
    del state["value_shrink"]  # a checkpoint written before the setting existed
    assert Allocator.from_state_dict(state).value_shrink == 0.0


def test_the_fleet_learns_its_round_time_noise_and_a_speed_change_is_not_noise():
    from fedspine.bandit.fleet import FleetModel

    rng = np.random.default_rng(0)
    model = FleetModel(n_arms=2, change_factor=1.5)
    lanes, arms = np.arange(50), np.zeros(50, dtype=int)
    model.add_lanes(50)
    assert model.noise_sigma() == 0.0  # nothing repeated yet
    for _ in range(20):
        model.observe(lanes, arms, rng.lognormal(0.0, 0.1, 50), np.ones(50))
    assert 0.09 < model.noise_sigma() < 0.12  # about sqrt(1 + 1/n) above 0.1
    before = model.noise_sigma()
    model.observe(lanes, arms, 3.0 * rng.lognormal(0.0, 0.1, 50), np.ones(50))  # every device 3x slower
    assert model.noise_sigma() == pytest.approx(before, rel=0.1)


def test_prune_tolerance_keeps_a_device_whose_miss_is_within_the_noise_unpruned():
    """Deadline 1.0. Device 0 misses it unpruned by 5% and device 1 by 20%; both meet it at 0.1.
    With a 10% tolerance device 0 stays unpruned, on its fastest arm there (rank 4, not 8);
    device 1 still prunes; with none (today's rule) both prune."""
    space = ArmSpace.grid([0.0, 0.1], [4, 8])  # arms (0.0, 4), (0.0, 8), (0.1, 4), (0.1, 8)
    safety = Allocator(space, seed=0).safety
    pred = np.array([[1.05, 1.3, 0.9, 0.98], [1.2, 1.5, 0.95, 0.99]])
    flat = np.zeros(len(space))  # every arm worth the same: the least pruning that fits

    def chosen(tolerance):
        _, ok = safety._fit_deadline(pred, 1.0, flat, tolerance)
        return [sorted((space[a].ratio, space[a].rank) for a in np.flatnonzero(row)) for row in ok]

    assert chosen(0.0) == [[(0.1, 4), (0.1, 8)], [(0.1, 4), (0.1, 8)]]
    assert chosen(0.1) == [[(0.0, 4)], [(0.1, 4), (0.1, 8)]]


def test_the_fleet_value_sigma_is_the_residual_of_the_two_factor_fit():
    from fedspine.bandit.fleet import FleetModel

    rng = np.random.default_rng(1)
    n_dev, n_arms = 12, 4
    model = FleetModel(n_arms=n_arms, decay=1.0)
    model.add_lanes(n_dev)
    assert model.value_sigma() == np.inf  # no degrees of freedom yet
    rows = []
    for _ in range(5):
        arms = rng.integers(0, n_arms, n_dev)
        q = np.exp(0.3 * np.arange(n_dev) / n_dev + 0.2 * arms + rng.normal(0, 0.15, n_dev))
        model.observe(np.arange(n_dev), arms, np.ones(n_dev), q)
        rows += [(i, a, np.log(qi)) for i, a, qi in zip(range(n_dev), arms, q, strict=True)]
    # the same fit by ordinary least squares on one dummy column per device and per arm
    x = np.zeros((len(rows), n_dev + n_arms))
    for k, (i, a, _) in enumerate(rows):
        x[k, i] = x[k, n_dev + a] = 1.0
    y = np.array([r[2] for r in rows])
    resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    dof = len(rows) - (n_dev + n_arms - 1)
    assert model.value_sigma() == pytest.approx(np.sqrt(resid @ resid / dof), rel=1e-9)
    assert 0.1 < model.value_sigma() < 0.2


def test_value_confidence_lets_a_rank_buy_pruning_only_on_its_lower_bound():
    """Deadline 1.0: both devices meet it unpruned at rank 4 and at 0.1 with rank 8, which is
    learnt to be worth 35% more than rank 4 unpruned. Without the bound both
    prune for it; with a 95% bound only while the rank's standard error is small."""
    space = ArmSpace.grid([0.0, 0.1], [4, 8])  # arms (0.0, 4), (0.0, 8), (0.1, 4), (0.1, 8)
    safety = Allocator(space, seed=0, value_confidence=1.645).safety
    pred = np.array([[0.9, 1.2, 0.8, 0.95], [0.95, 1.3, 0.85, 0.99]])
    log_worth = np.log(np.array([1.0, 1.5, 0.9, 1.35]))  # rank 8 at 0.1: 1.35 against rank 4's 1.0

    def chosen(worth_se):
        _, ok = safety._fit_deadline(pred, 1.0, log_worth, 0.0, worth_se)
        return [sorted((space[a].ratio, space[a].rank) for a in np.flatnonzero(row)) for row in ok]

    assert chosen(None) == [[(0.1, 8)], [(0.1, 8)]]
    assert chosen(np.array([0.02, 0.02])) == [[(0.1, 8)], [(0.1, 8)]]  # the bound 1.35 - 4.7%: still pays
    assert chosen(np.array([0.1, 0.2])) == [[(0.0, 4)], [(0.0, 4)]]  # 37% off: does not
    assert chosen(np.array([0.02, np.inf])) == [[(0.0, 4)], [(0.0, 4)]]  # rank 8 never played


# settings added within state version 3, each with the fleet statistics it learns
ADDED = {
    "prune_tolerance": (1.0, ("noise_sq", "noise_n"), lambda f: f.noise_sigma()),
    "value_confidence": (1.645, ("value_sq_sum",), lambda f: f.value_sigma()),
}


@pytest.mark.parametrize("name", sorted(ADDED))
def test_added_settings_are_validated_kept_in_the_state_and_off_in_older_states(name):
    value, fleet_keys, learnt = ADDED[name]
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0.0, got -1"):
        Allocator(SPACE, **{name: -1})
    alloc = Allocator(SPACE, seed=0, **{name: value})
    simulate(SyntheticFleet.paper_mix(20, seed=0), alloc, 5, seed=0)
    state = json.loads(json.dumps(alloc.state_dict()))
    again = Allocator.from_state_dict(state)
    assert getattr(again, name) == value and 0 < learnt(again.fleet) == learnt(alloc.fleet) < np.inf
    assert again.assign(range(20), 6) == alloc.assign(range(20), 6)
    del state[name]  # a checkpoint from before the setting existed
    for key in fleet_keys:
        del state["fleet"][key]
    with pytest.raises(ValueError, match=f"state {name} 0.0 differs from {value}"):
        alloc.load_state_dict(state)
    old = Allocator.from_state_dict(state)
    assert getattr(old, name) == 0.0 and 0.0 <= learnt(old.fleet) <= learnt(alloc.fleet)


def test_the_round_effect_learns_what_arms_buy_net_of_a_shift_common_to_each_round():
    """Round 1: every device plays arm 0; later rounds half of them arm 1, while every
    device's quality shrinks by 30% a round (the training phase). Arm 1 is truly worth
    exp(0.4) of arm 0. The two-factor fit reads the shrinkage as arm 1's effect; with the round
    effect the arm contrast is exact (noise-free data)."""
    from fedspine.bandit.fleet import FleetModel

    n_dev = 10
    lanes, device = np.arange(n_dev), 0.1 * np.arange(n_dev)
    models = {on: FleetModel(n_arms=2, decay=0.98, round_effect=on) for on in (False, True)}
    for model in models.values():
        model.add_lanes(n_dev)
        for t in range(6):
            arms = np.zeros(n_dev, dtype=np.int64) if t == 0 else (lanes + t) % 2
            q = np.exp(device + 0.4 * arms + np.log(0.7) * t)
            model.observe(lanes, arms, np.ones(n_dev), q)
    contrast = {on: float(np.diff(m.arm_values()[0])[0]) for on, m in models.items()}
    assert contrast[True] == pytest.approx(0.4, abs=1e-9)
    assert contrast[False] < 0.2  # the shift, read as what arm 1 buys
    assert models[True].value_offset == pytest.approx(5 * np.log(0.7), abs=1e-9)
    # a report outside a whole round takes the last round's shift
    before = models[True].value_offset
    models[True].observe(lanes[:1], np.array([1]), np.ones(1), np.array([9.0]), whole_round=False)
    assert models[True].value_offset == before


def test_value_round_effect_is_validated_kept_in_the_state_and_off_in_older_states():
    with pytest.raises(ValueError, match="value_round_effect must be a bool"):
        Allocator(SPACE, value_round_effect=1)
    alloc = Allocator(SPACE, seed=0, value_round_effect=True)
    simulate(SyntheticFleet.paper_mix(20, seed=0), alloc, 5, seed=0)
    state = json.loads(json.dumps(alloc.state_dict()))
    again = Allocator.from_state_dict(state)
    assert again.value_round_effect and again.fleet.value_offset == alloc.fleet.value_offset != 0.0
    assert again.assign(range(20), 6) == alloc.assign(range(20), 6)
    del state["value_round_effect"]  # a checkpoint from before the setting existed
    del state["fleet"]["round_effect"], state["fleet"]["value_offset"]
    with pytest.raises(ValueError, match="state value_round_effect False differs from True"):
        alloc.load_state_dict(state)
    old = Allocator.from_state_dict(state)
    assert not old.value_round_effect and old.fleet.value_offset == 0.0


def test_with_the_round_effect_the_value_rule_meets_the_planner_capacity_target():
    """The fleet-wide reward scale grows as the best gain seen grows, which without the round
    effect undervalues the ranks the fast devices move to (README, the allocator table)."""
    for name, fleet in FLEETS.items():
        got = cards(fleet, value_round_effect=True)
        assert np.mean([c.capacity_ratio for c in got]) >= 0.9, name
        assert np.mean([c.makespan_ratio for c in got]) <= 1.05, name
