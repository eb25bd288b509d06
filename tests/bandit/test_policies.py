"""Every registered policy, one table of checks (plus the drift checks the UCB variants need)."""

import json

import numpy as np
import pytest

from fedspine.bandit import POLICIES, ArmSpace, make_policy

SPACE = ArmSpace.grid([round(0.1 * i, 1) for i in range(8)], [4, 8, 16, 32])
SMALL = ArmSpace.grid([0.0, 0.2, 0.4, 0.6], [4, 16])  # 8 arms: regret tests at a horizon CI affords
LEARNERS = sorted(set(POLICIES) - {"random"})


def smooth_means(space: ArmSpace, peak: tuple[float, float]) -> np.ndarray:
    """A single-peaked reward surface over the (ratio, rank) plane, in [0.1, 0.9]."""
    p = np.array([a.ratio for a in space])
    r = np.log2([a.rank for a in space])
    d2 = ((p - peak[0]) / 0.7) ** 2 + ((r - np.log2(peak[1])) / 3.0) ** 2
    return 0.1 + 0.8 * np.exp(-4.0 * d2)


def play(policy_name: str, means_by_step, steps: int, seed: int, noise: float = 0.1, space=SMALL, **params):
    """One bandit (one lane) against Gaussian rewards clipped to [0, 1]; returns arms played."""
    pol = make_policy(policy_name, space, **params)
    pol.add_lanes(1)
    rng = np.random.default_rng(seed)
    env = np.random.default_rng(seed + 1000)
    arms = np.empty(steps, dtype=np.int64)
    for t in range(steps):
        a = int(pol.select([0], rng)[0])
        mu = means_by_step(t)
        pol.update([0], [a], [float(np.clip(mu[a] + noise * env.standard_normal(), 0.0, 1.0))])
        arms[t] = a
    return arms


@pytest.mark.parametrize("name", LEARNERS)
def test_stationary_regret_clearly_below_uniform_random(name):
    means = smooth_means(SMALL, peak=(0.4, 16))
    steps, seeds = 2000, range(3)
    regret = {
        n: np.mean([np.sum(means.max() - means[play(n, lambda t: means, steps, s)]) for s in seeds])
        for n in (name, "random")
    }
    assert regret[name] < 0.5 * regret["random"], regret


def test_discounted_and_sliding_window_recover_after_a_change_point_where_ucb1_does_not():
    # The best arm collapses at step 2000 (0.9 -> 0.1); arm 1 (0.5) becomes the best.
    before = np.array([0.9, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1])
    after = before.copy()
    after[0] = 0.1
    steps, change = 3000, 2000

    def tail(name: str) -> tuple[float, float]:
        """Share of the collapsed arm, and regret, over the last 500 steps."""
        arms = play(name, lambda t: before if t < change else after, steps, seed=0)[-500:]
        return float(np.mean(arms == 0)), float(np.sum(after.max() - after[arms]))

    ucb1_stuck, ucb1_regret = tail("ucb1")
    assert ucb1_stuck > 0.5  # UCB1's average for arm 0 still remembers 2000 good pulls
    for name in ("discounted-ucb", "sliding-window-ucb"):
        stuck, regret = tail(name)
        assert stuck < 0.15, (name, stuck)
        assert regret < 0.75 * ucb1_regret, (name, regret, ucb1_regret)  # they keep exploring, a price paid


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_round_trip_gives_identical_future_choices(name):
    pol = make_policy(name, SPACE)
    pol.add_lanes(5)
    rng = np.random.default_rng(3)
    means = smooth_means(SPACE, (0.3, 16))
    lanes = np.arange(5)
    for _ in range(40):
        arms = pol.select(lanes, rng)
        pol.update(lanes, arms, np.clip(means[arms] + 0.1 * rng.standard_normal(5), 0, 1))
    clone = make_policy(name, SPACE)
    clone.load_state_dict(json.loads(json.dumps(pol.state_dict())))
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(30):
        a, b = pol.select(lanes, rng_a), clone.select(lanes, rng_b)
        np.testing.assert_array_equal(a, b)
        rewards = np.clip(means[a] + 0.1 * rng.standard_normal(5), 0, 1)
        pol.update(lanes, a, rewards)
        clone.update(lanes, b, rewards)
    assert json.dumps(pol.state_dict()) == json.dumps(clone.state_dict())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_allowed_mask_is_respected(name):
    pol = make_policy(name, SPACE)
    pol.add_lanes(50)
    rng = np.random.default_rng(0)
    lanes = np.arange(50)
    allowed = rng.random((50, len(SPACE))) < 0.2
    allowed[np.arange(50), rng.integers(0, len(SPACE), 50)] = True
    for _ in range(20):
        arms = pol.select(lanes, rng, allowed)
        assert allowed[lanes, arms].all()
        pol.update(lanes, arms, rng.random(50))
    with pytest.raises(ValueError, match="at least one arm"):
        pol.select(lanes, rng, np.zeros((50, len(SPACE)), dtype=bool))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_bad_updates_are_rejected_without_touching_state(name):
    pol = make_policy(name, SPACE)
    pol.add_lanes(2)
    before = json.dumps(pol.state_dict())
    for lanes, arms, rewards, needle in [
        ([0], [0], [1.5], "rewards"),
        ([0], [0], [float("nan")], "rewards"),
        ([0], [len(SPACE)], [0.5], "arms"),
        ([2], [0], [0.5], "lanes"),
        ([0, 0], [0, 1], [0.5, 0.5], "repeat"),
        ([0, 1], [0], [0.5, 0.5], "same length"),
    ]:
        with pytest.raises(ValueError, match=needle):
            pol.update(lanes, arms, rewards)
    assert json.dumps(pol.state_dict()) == before


def test_make_policy_names_what_is_allowed():
    with pytest.raises(ValueError, match=r"policy must be one of \[.*'s-ucb'.*\], got 'ucb2'"):
        make_policy("ucb2", SPACE)
    with pytest.raises(
        ValueError, match=r"unknown parameter\(s\) \['cc'\] for policy 'ucb1'; allowed: \['c'\]"
    ):
        make_policy("ucb1", SPACE, cc=1.0)
    with pytest.raises(ValueError, match=r"gamma must be in \(0.0, 1.0\), got 1.5"):
        make_policy("discounted-ucb", SPACE, gamma=1.5)
    with pytest.raises(ValueError, match="window must be an integer"):
        make_policy("sliding-window-ucb", SPACE, window=2.5)
    with pytest.raises(ValueError, match="Cartesian"):
        make_policy("s-ucb", SPACE.refine(SPACE[5]))


def test_sucb_zooms_into_the_best_region():
    means = smooth_means(SPACE, (0.6, 8))
    pol = make_policy("s-ucb", SPACE)
    pol.add_lanes(1)
    rng, env = np.random.default_rng(0), np.random.default_rng(1)
    assert len(pol.leaves(0)) == 4  # the initial 2 x 2 partition
    for _ in range(400):
        a = int(pol.select([0], rng)[0])
        pol.update([0], [a], [float(np.clip(means[a] + 0.05 * env.standard_normal(), 0, 1))])
    leaves = pol.leaves(0)
    # The partition is still a partition of the whole grid ...
    assert sum(
        (SPACE.ratios.index(c["ratios"][1]) - SPACE.ratios.index(c["ratios"][0]) + 1)
        * (SPACE.ranks.index(c["ranks"][1]) - SPACE.ranks.index(c["ranks"][0]) + 1)
        for c in leaves
    ) == len(SPACE)
    # ... refined most where the reward is best: the most-played leaf is small and holds the peak.
    top = max(leaves, key=lambda c: c["n"])
    assert top["ratios"][0] <= 0.6 <= top["ratios"][1] and top["ranks"][0] <= 8 <= top["ranks"][1]
    assert (SPACE.ratios.index(top["ratios"][1]) - SPACE.ratios.index(top["ratios"][0]) + 1) <= 2


@pytest.mark.parametrize("center", [False, True])
def test_pooled_centring_keeps_a_round_effect_out_of_the_arm_contrast(center):
    """Round 1: every lane plays arm 0; round 2: half switch to arm 1, and every reward halves
    (the phase of training, shared by all arms). Both arms bought the same, so a round-centred
    fit must find no contrast; an uncentred one blames arm 1 for the round."""
    space = ArmSpace.grid([0.0], [4, 8])
    pol = make_policy("pooled-ucb", space, center=center)
    pol.add_lanes(8)
    lanes = np.arange(8)
    pol.update(lanes, np.zeros(8, dtype=int), np.full(8, 0.6))
    arms2 = np.array([0, 1] * 4)
    pol.update(lanes, arms2, np.full(8, 0.3))
    _, effect, _ = pol._fit()
    gap = effect[0] - effect[1]
    if center:
        assert abs(gap) < 0.05
    else:
        assert gap > 0.2  # what the centring removes: arm 1 looks ~half as good


def test_pooled_centring_leaves_failures_penalised_and_lone_updates_alone():
    space = ArmSpace.grid([0.0], [4, 8])
    pol = make_policy("pooled-ucb", space, center=True)
    pol.add_lanes(3)
    pol.update([0, 1, 2], [0, 0, 1], [0.5, 0.5, 0.0])  # lane 2 failed on arm 1
    logs = pol._state["log_sum"]
    assert logs[0, 0] == pytest.approx(0.0) and logs[1, 0] == pytest.approx(0.0)  # the round's mean
    assert logs[2, 1] == pytest.approx(np.log(1e-3) - np.log(0.5))  # the failure stays a failure
    one = make_policy("pooled-ucb", space, center=True)
    one.add_lanes(1)
    one.update([0], [0], [0.5])
    assert one._state["log_sum"][0, 0] == pytest.approx(np.log(0.5))
    with pytest.raises(ValueError, match="center must be True or False, got 1"):
        make_policy("pooled-ucb", space, center=1)
