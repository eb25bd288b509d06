"""fedspine on Flower's real runtimes, as separate processes on 127.0.0.1 (fedspine.flower.local):
the simulation runtime (SuperLink --simulation, Ray) and the deployment runtime (SuperLink plus one
SuperNode per device). Each test checks that no process it started is left behind."""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc")

from fedspine.config import load_config  # noqa: E402
from fedspine.fl import checkpoint  # noqa: E402
from fedspine.fl.simulator import Simulation, run  # noqa: E402
from fedspine.flower.local import LocalFederation, _descendants  # noqa: E402
from fedspine.logging import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]  # the Flower app: [tool.flwr.app] in pyproject.toml
# train.runner=per-device: the in-process simulator on the path Flower devices run (fedspine.fl.client)
TINY = (
    "train.local_steps=4 train.prune_interval=2 data.max_examples=240 log.progress=false "
    "train.runner=per-device"
)


def app_config(tmp_path, devices, rounds, **extra):
    return {
        "config": "",
        "overrides": f"fleet.devices={devices} train.rounds={rounds} {TINY}",
        "run-dir": str(tmp_path / "run"),
        "state-dir": str(tmp_path / "devices"),
        "wait": 120,
        **extra,
    }


def test_simulation_runtime_matches_the_in_process_simulator(tmp_path):
    """4 virtual devices, 2 rounds, one Ray actor per CPU: the allocator sees every device every
    round, the global adapter learns, and arms and metrics equal the in-process run's."""
    rc = app_config(tmp_path, 4, 2)
    with LocalFederation(tmp_path / "fed", simulation=True) as fed:
        out = fed.run(ROOT, rc, federation_config={"num-supernodes": 4, "client-resources-num-cpus": 1})
    assert fed.leftovers() == []
    assert out.ok, out.log[-4000:]

    cfg = load_config(None, rc["overrides"].split())
    records = read_metrics(tmp_path / "run")
    state, arrays = checkpoint.load(tmp_path / "run" / "checkpoint")
    alloc = state["server"]["strategy"]["allocator"]
    lanes = dict(alloc["lanes"])
    seen = np.asarray(alloc["fleet"]["weight"])  # times per device, each round's decayed by 0.98
    assert sorted(lanes) == ["d000", "d001", "d002", "d003"] and alloc["pending"] == []
    # one observation per round
    assert np.allclose([seen[lanes[d]].sum() for d in sorted(lanes)], [1.98] * 4)
    start = Simulation(cfg).server.state
    assert any(not np.array_equal(arrays[f"global/{k}"], v) for k, v in start.items())

    local = run(cfg).records
    assert [r["arms"] for r in records] == [r["arms"] for r in local]
    for a, b in zip(records, local, strict=True):
        assert a["failures"] == b["failures"] == {}
        for key in ("clock_s", "loss_before", "loss_after", "accuracy", "mean_sparsity", "bytes_up"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["round_time_s"] == pytest.approx(b["round_time_s"], rel=1e-5)


def nodes(tmp_path, n):
    return [
        {"partition-id": i, "num-partitions": n, "state-dir": str(tmp_path / f"node{i}")} for i in range(n)
    ]


@pytest.mark.slow
def test_deployment_runtime_two_supernodes_two_rounds_then_a_clean_shutdown(tmp_path):
    rc = app_config(tmp_path, 2, 2, **{"round-timeout": 120})
    with LocalFederation(tmp_path / "fed", simulation=False, nodes=nodes(tmp_path, 2)) as fed:
        out = fed.run(ROOT, rc)
        started = [p.pid for p in fed.procs.values()]
        assert fed.leftovers(), "the federation should be running here"
    assert fed.leftovers() == []
    assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in started)
    assert out.ok, out.log[-4000:]
    r1, r2 = read_metrics(tmp_path / "run")
    for r in (r1, r2):
        assert sorted(r["round_time_s"]) == ["d000", "d001"] and not r["failures"]
        assert min(r["round_time_s"].values()) > 0.5  # measured: includes the ClientApp process start
    for i in range(2):  # each device kept its state on its own disk
        assert list((tmp_path / f"node{i}" / f"d00{i}").glob("kept-*.json"))


@pytest.mark.slow
def test_deployment_runtime_finishes_its_rounds_when_a_supernode_dies_mid_round(tmp_path):
    rc = app_config(tmp_path, 2, 3, **{"round-timeout": 60})
    with LocalFederation(tmp_path / "fed", simulation=False, nodes=nodes(tmp_path, 2)) as fed:
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(out=fed.run(ROOT, rc)))
        runner.start()
        metrics = tmp_path / "run" / "metrics.jsonl"
        _wait(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 300, "round 1", runner)
        node1 = fed.procs["supernode1"].pid
        training = lambda: any(_is_clientapp(p) for p in _descendants(node1))  # noqa: E731
        _wait(training, 120, "device d001 training round 2", runner)
        fed.kill_node(1)
        runner.join(timeout=600)
        assert not runner.is_alive()
    assert fed.leftovers() == []
    out = outcome["out"]
    assert out.ok, out.log[-4000:]
    r1, r2, r3 = read_metrics(tmp_path / "run")
    assert sorted(r1["round_time_s"]) == ["d000", "d001"]
    assert list(r2["round_time_s"]) == ["d000"] and list(r2["failures"]) == ["d001"]
    assert list(r3["round_time_s"]) == ["d000"] and set(r3["failures"]) <= {"d001"}


def _wait(check, timeout_s, what, thread):
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError(f"no {what} (the run ended or {timeout_s} s passed)")
        time.sleep(0.2)


def _is_clientapp(pid):
    try:
        return b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_deployment_runtime_rejects_a_supernode_that_sends_corrupt_updates(tmp_path):
    """SuperNode 1 runs with ``--node-config 'corrupt=nan'``: every update it sends has a NaN.
    The server screens it out (a failure for the allocator, nothing aggregated from it) and the
    run goes on with the honest node, its global state finite."""
    rc = app_config(tmp_path, 2, 2, **{"round-timeout": 120})
    cfgs = nodes(tmp_path, 2)
    cfgs[1]["corrupt"] = "nan"
    with LocalFederation(tmp_path / "fed", simulation=False, nodes=cfgs) as fed:
        out = fed.run(ROOT, rc)
    assert fed.leftovers() == []
    assert out.ok, out.log[-4000:]
    for r in read_metrics(tmp_path / "run"):
        assert list(r["rejected"]) == ["d001"] and "non-finite" in r["rejected"]["d001"]
        assert r["failures"] == {"d001": f"rejected: {r['rejected']['d001']}"}
        assert list(r["round_time_s"]) == ["d000"] and r["aggregated"]
    _, arrays = checkpoint.load(tmp_path / "run" / "checkpoint")
    assert all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("global/"))
