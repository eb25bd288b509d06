"""A baseline's run retimed onto another fleet equals the run trained on that fleet."""

import math

import pytest

from fedspine.config import load_config
from fedspine.fl.retime import RetimeError, check_retimable, retime, timing_free_key
from fedspine.fl.simulator import run
from fedspine.fl.strategies import STRATEGIES, ArmAssigner

BASE = [
    "log.progress=false",
    "fleet.devices=6",
    "train.rounds=3",
    "train.local_steps=4",
    "train.prune_interval=2",
    "data.max_examples=240",
]
OTHER_FLEET = ["fleet.compute_spread=8.0", "fleet.link_scale=0.2"]


def _learnt(records):
    keys = ("arms", "accuracy", "loss_before", "loss_after", "mean_sparsity", "bytes_up", "failures")
    return [{k: r.get(k) for k in keys} for r in records]


@pytest.mark.parametrize("name", ["random-arm", "hetlora"])
def test_a_retimed_run_is_the_run_on_the_other_fleet(name):
    """random-arm changes every device's ratio each round (kept counts that must never grow
    back), hetlora its rank by tier: both exercise the rebuilt work."""
    here = load_config(None, [*BASE, f"strategy.name={name}"])
    there = load_config(None, [*BASE, f"strategy.name={name}", *OTHER_FLEET])
    ran_here, ran_there = run(here).records, run(there).records
    retimed = retime(ran_here, here, there)
    assert _learnt(ran_there) == _learnt(ran_here) == _learnt(retimed)  # the fleet changed no learning
    assert ran_there[-1]["clock_s"] != pytest.approx(ran_here[-1]["clock_s"], rel=0.05)  # but the clock
    for got, want in zip(retimed, ran_there, strict=True):
        for key in ("clock_s", "makespan_s", "mean_waiting_s", "energy_j"):
            assert math.isclose(got[key], want[key], rel_tol=1e-12), key
        assert got["round_time_s"].keys() == want["round_time_s"].keys()
        assert all(
            math.isclose(got["round_time_s"][d], t, rel_tol=1e-12) for d, t in want["round_time_s"].items()
        )


def test_retime_refuses_what_it_cannot_vouch_for():
    base = load_config(None, [*BASE, "strategy.name=fixed-prune"])
    with pytest.raises(RetimeError, match="'fedspine' chooses its arms from the round times"):
        check_retimable(load_config(None, BASE), load_config(None, [*BASE, *OTHER_FLEET]))
    with pytest.raises(RetimeError, match=r"differ in more than the fleet's timing .*\['train.lr'\]"):
        check_retimable(base, load_config(None, [*BASE, "strategy.name=fixed-prune", "train.lr=0.01"]))
    with pytest.raises(RetimeError, match="server.deadline_s"):
        deadline = load_config(None, [*BASE, "strategy.name=fixed-prune", "server.deadline_s=100"])
        check_retimable(deadline, deadline)
    with pytest.raises(RetimeError, match="train.time_budget_s"):
        budget = load_config(None, [*BASE, "strategy.name=fixed-prune", "train.time_budget_s=10"])
        check_retimable(budget, budget)
    assert timing_free_key(base.to_dict()) == timing_free_key(
        load_config(None, [*BASE, "strategy.name=fixed-prune", *OTHER_FLEET, "log.dir=elsewhere"]).to_dict()
    )

    records = run(base).records
    tampered = [dict(r) for r in records]
    tampered[1] = {**tampered[1], "round_time_s": {d: 2 * t for d, t in tampered[1]["round_time_s"].items()}}
    with pytest.raises(
        RetimeError, match="round 2, device d000: the rebuilt work prices at .* the run recorded"
    ):
        retime(tampered, base, base)
    other_seed = load_config(None, [*BASE, "strategy.name=fixed-prune", "seed=1"])
    with pytest.raises(RetimeError, match=r"\['seed'\]"):
        retime(records, base, other_seed)


def test_every_strategy_that_learns_from_round_times_says_so():
    """``reads_clock`` is what lets a run be retimed; a strategy that overrides ``observe`` (the
    only place round times reach it) without declaring it would be retimed wrongly."""
    for name, cls in STRATEGIES.items():
        if cls.observe is not ArmAssigner.observe:
            assert cls.reads_clock, name
    assert STRATEGIES["fedspine"].reads_clock and not STRATEGIES["tier-prune"].reads_clock
