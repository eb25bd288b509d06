"""Faulty devices: injected faults (fedspine.fl.faults), the server's checks of every update
(fedspine.fl.screening) and what a failed device or round does to the run (fedspine.fl.simulator)."""

import dataclasses

import numpy as np
import pytest

from fedspine.config import CORRUPT_KINDS, FaultConfig, load_config
from fedspine.fl.faults import KINDS, FaultInjector, corrupt
from fedspine.fl.messages import TrainRes
from fedspine.fl.screening import update_size
from fedspine.fl.simulator import Simulation, run
from fedspine.lora.adapters import ALPHA_PER_RANK
from fedspine.pruning.index_map import KeptIndexMap

TINY = [
    "log.progress=false",
    "fleet.devices=5",
    "train.rounds=2",
    "train.local_steps=4",
    "train.prune_interval=2",
    "data.max_examples=240",
    "model.max_length=16",
]


def strip(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def honest(sim, rnd=1):
    """What each device of round ``rnd`` would send back untrained: its adapter slice, its kept map."""
    ins = sim.server.configure(rnd, sim.world.device_ids)
    res = {
        d: TrainRes(rnd, d, i.rank, i.adapter, sim.server.kept_map(d).to_dict(), 40, 0.7, 0.6, 0.0, 1.0)
        for d, i in ins.items()
    }
    return ins, res


def test_fault_and_defence_settings_are_validated_naming_field_value_and_range():
    with pytest.raises(ValueError, match=r"faults.crash must be a probability in \[0, 1\], got 1.5"):
        load_config(None, ["faults.crash=1.5"])
    with pytest.raises(ValueError, match=r"faults must be probabilities summing to at most 1 .* got 1.2"):
        load_config(None, ["faults.crash=0.6", "faults.dropout=0.6"])
    with pytest.raises(
        ValueError, match=r"faults.corrupt_kinds must be a non-empty list of .*'nan'.*got \('zero',\)"
    ):
        load_config(None, ["faults.corrupt_kinds=[zero]"])
    with pytest.raises(ValueError, match="server.norm_k must be None or a number > 1, got 0.5"):
        load_config(None, ["server.norm_k=0.5"])
    with pytest.raises(ValueError, match="server.min_success must be >= 1, got 0"):
        load_config(None, ["server.min_success=0"])
    with pytest.raises(ValueError, match="server.deadline_s must be None or a number of seconds > 0, got -1"):
        load_config(None, ["server.deadline_s=-1"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['faults.drop'\]"):
        load_config(None, ["faults.drop=0.1"])


def test_fault_draws_are_seeded_per_device_and_round_at_the_configured_rates():
    cfg = FaultConfig(dropout=0.1, crash=0.05, straggle=0.05, corrupt=0.2, corrupt_kinds=("nan", "norm"))
    devices = [f"d{i:03d}" for i in range(50)]
    inj = FaultInjector(cfg, seed=7)
    plans = [inj.draw(r, devices) for r in range(1, 101)]
    assert plans == [FaultInjector(cfg, seed=7).draw(r, devices) for r in range(1, 101)]
    assert plans[0] == FaultInjector(cfg, 7).draw(1, devices[::-1])  # order-free
    assert plans != [FaultInjector(cfg, 8).draw(r, devices) for r in range(1, 101)]
    kinds = [k.split(":")[0] for p in plans for k in p.values()]
    n = len(devices) * len(plans)
    for kind, rate in zip(KINDS, (0.1, 0.05, 0.05, 0.2), strict=True):
        assert kinds.count(kind) / n == pytest.approx(rate, abs=0.015), kind  # 5000 draws: ~3 sigma
    assert {k for p in plans for k in p.values() if k.startswith("corrupt")} == {
        "corrupt:nan",
        "corrupt:norm",
    }
    assert FaultInjector(FaultConfig(), 7).draw(1, devices) == {}


def test_every_corruption_is_rejected_with_its_reason_and_honest_updates_pass():
    sim = Simulation(load_config(None, TINY))
    ins, res = honest(sim)
    server = sim.server
    assert all(server.check(r, ins[d]) == "" for d, r in res.items())
    r = res["d001"]
    rng = np.random.default_rng(0)
    reasons = {how: server.check(corrupt(r, how, rng), ins["d001"]) for how in CORRUPT_KINDS}
    assert "non-finite" in reasons["nan"] and "non-finite" in reasons["inf"]
    assert "has shape" in reasons["shape"] and "wrong keys" in reasons["keys"]
    assert reasons["norm"] == ""  # a size is judged against the round's: NormScreen
    assert "rank 8, was assigned" in server.check(dataclasses.replace(r, rank=8), ins["d001"])
    assert "not a finite number" in server.check(dataclasses.replace(r, loss_after=float("nan")), ins["d001"])
    assert "does not decode" in server.check(dataclasses.replace(r, kept_map={"shape": {}}), ins["d001"])
    # a kept map inside the full one passes; one that regrows what the server saw pruned does not
    full = KeptIndexMap.full(sim.world.shape)
    pruned = full.compose([((0,), (0, 1)) for _ in full.layers])
    server.kept["d001"] = pruned
    i = ins["d001"]
    i = dataclasses.replace(
        i, adapter=server.rule.distribute(server.state, server.slices("d001"), i.rank).adapter
    )
    small = dataclasses.replace(r, adapter=i.adapter, kept_map=pruned.to_dict())
    assert server.check(small, i) == ""
    assert "regrows layer 0 heads" in server.check(dataclasses.replace(small, kept_map=full.to_dict()), i)
    assert "has shape" in server.check(
        dataclasses.replace(small, kept_map=pruned.to_dict(), adapter=r.adapter), i
    )
    del server.kept["d001"]

    # the norm bound: one update 1e6 x too large among honest ones is rejected, and alone (round
    # of one) too, against the sizes accepted before
    others = [x for d, x in res.items() if d != "d001"]
    big = corrupt(r, "norm", rng, norm_factor=1e6)
    assert update_size(big.adapter, ALPHA_PER_RANK) == pytest.approx(
        1e6 * update_size(r.adapter, ALPHA_PER_RANK), rel=1e-4
    )
    accepted, rejected = server.screen([*others, big], ins)
    assert [x.device_id for x in accepted] == [x.device_id for x in others]
    assert (
        list(rejected) == ["d001"]
        and "update size" in rejected["d001"]
        and "> 10 x median" in rejected["d001"]
    )
    assert server.screen([big], ins)[1].keys() == {"d001"}
    assert server.screen([r], ins) == ([r], {})


# The fastest tiny config we found (ours). It barely learns in 4 rounds: final accuracy 0.51, 0.59,
# 0.51 for seeds 0-2 on 100 test examples.
LEARN = [
    *TINY,
    "train.rounds=4",
    "train.local_steps=8",
    "train.prune_interval=4",
    "train.lr=0.01",
    "train.head_lr=0.05",
    "data.max_examples=1000",
]
TOL = 0.1  # measured: see test_each_fault_kind_at_20_percent_completes_finite_and_close_to_the_fault_free_run


@pytest.fixture(scope="module")
def fault_free():
    return run(load_config(None, LEARN)).records


@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_kind_at_20_percent_completes_finite_and_close_to_the_fault_free_run(kind, fault_free):
    """20% of device-rounds get ``kind``; the run completes, each fault is in its round's record
    (and a failure or rejection), the global state stays finite, and the final accuracy is
    within TOL of the fault-free run's.

    TOL = 0.1, measured over seeds 0, 1, 2 and the four kinds (12 pairs; /tmp script in the
    branch's report): the largest |final accuracy with faults - without| was 0.09 (seed 1), the
    median 0.02. That is the fault-free run's own spread over seeds (0.51-0.59). On this config
    accuracy stays near chance, so TOL catches a collapse, not a small loss; a poisoned global
    state is caught by the finiteness and magnitude checks."""
    cfg = load_config(None, [*LEARN, f"faults.{kind}=0.2"])
    sim = Simulation(cfg)
    records = []
    for _ in range(cfg.train.rounds):
        records.append(sim.run_round())
        held = {d: sim.server.kept_map(d) for d in sim.world.device_ids}
        sim.runner.execute(sim.round, {}, held)  # a failed device is brought back to the server's view
        kept = getattr(sim.runner, "kept", None) or {d: s.kept_map for d, s in sim.runner.states.items()}
        assert kept == held
    faults = {(r["round"], d): f for r in records for d, f in r["faults"].items()}
    assert faults and all(f.split(":")[0] == kind for f in faults.values())
    for (rnd, d), _ in faults.items():
        failed = records[rnd - 1]["failures"].get(d, "")
        assert failed, (rnd, d, records[rnd - 1])
        if kind == "corrupt":
            assert failed.startswith("rejected: ") and d in records[rnd - 1]["rejected"]
    assert all(np.isfinite(v).all() for v in sim.server.state.values())
    assert max(float(np.abs(v).max()) for v in sim.server.state.values()) < 10
    assert abs(records[-1]["accuracy"] - fault_free[-1]["accuracy"]) <= TOL


def test_fault_free_records_are_the_same_with_the_sections_at_defaults_and_with_checks_off(fault_free):
    """The faults draw from their own stream and the checks pass every honest update: a run with
    ``faults`` at its defaults (all zero) is the run with no checks at all (today's loop)."""
    off = run(load_config(None, [*LEARN, "server.validate=false", "server.norm_k=null"])).records
    assert strip(off) == strip(fault_free)
    assert all(r["faults"] == {} and r["rejected"] == {} and r["aggregated"] for r in fault_free)


@pytest.mark.parametrize("runner", ["per-device", "batched"])
def test_a_client_that_raises_mid_training_is_a_failed_device_not_a_crashed_run(runner, monkeypatch):
    from fedspine.fl.world import World

    sim = Simulation(load_config(None, [*TINY, f"train.runner={runner}"]))
    real = World.local_data

    def local_data(world, d):
        data = real(world, d)
        if d != "d002":
            return data

        def batches(gen):
            it = data.batches(gen)
            yield next(it)
            raise RuntimeError("device d002 lost power")

        return dataclasses.replace(data, batches=batches)

    monkeypatch.setattr(World, "local_data", local_data)
    before = {k: v.copy() for k, v in sim.server.state.items()}
    r1, r2 = sim.run_round(), sim.run_round()
    for r in (r1, r2):
        assert r["aggregated"] and sorted(r["round_time_s"]) == ["d000", "d001", "d003", "d004"]
        assert r["failures"] == {"d002": "raised RuntimeError: device d002 lost power"}
    assert any(not np.array_equal(before[k], v) for k, v in sim.server.state.items())


def test_a_round_below_min_success_keeps_the_global_state_and_a_failed_round_costs_its_deadline():
    sim = Simulation(load_config(None, [*TINY, "server.min_success=6"]))
    before = {k: v.copy() for k, v in sim.server.state.items()}
    r = sim.run_round()
    assert not r["aggregated"] and len(r["round_time_s"]) == 5 and not r["failures"]
    assert all(np.array_equal(before[k], v) for k, v in sim.server.state.items())
    assert r["makespan_s"] >= max(r["round_time_s"].values())

    sim = Simulation(load_config(None, [*TINY, "faults.dropout=1.0"]))
    r = sim.run_round()
    assert not r["aggregated"] and r["round_time_s"] == {} and len(r["failures"]) == 5
    assert set(r["faults"].values()) == {"dropout"}
    assert r["makespan_s"] > 0 and r["clock_s"] == r["makespan_s"]
    assert all(np.array_equal(before[k], v) for k, v in sim.server.state.items())

    sim = Simulation(load_config(None, [*TINY, "server.deadline_s=1e-6"]))  # too short for anyone
    r = sim.run_round()
    assert not r["aggregated"] and r["makespan_s"] == 1e-6
    assert all(f.startswith("past the round deadline") for f in r["failures"].values())


def test_a_killed_and_resumed_faulty_run_ends_with_the_same_records(tmp_path):
    cfg = load_config(None, [*TINY, "train.rounds=3", "faults.corrupt=0.3", "faults.crash=0.2"])
    whole = run(cfg).records
    run(cfg, checkpoint_dir=tmp_path, stop_after=2)
    resumed = run(cfg, checkpoint_dir=tmp_path, resume=True).records
    assert strip(resumed) == strip(whole)
    assert any(r["rejected"] for r in whole)
