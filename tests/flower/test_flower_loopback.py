"""The Flower adapter in one process: the real ServerApp loop, codec and ClientApp over a loopback
Grid (tests/flower/loopback.py). Seconds, no SuperLink; the process tests are in test_flower_runtime.py."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from loopback import LoopbackGrid  # noqa: E402

from fedspine.config import ClientConfig  # noqa: E402
from fedspine.fl import checkpoint  # noqa: E402
from fedspine.fl.messages import Failure, TrainIns, TrainRes  # noqa: E402
from fedspine.fl.simulator import Simulation, run  # noqa: E402
from fedspine.fl.world import World  # noqa: E402
from fedspine.flower import client_app, codec  # noqa: E402
from fedspine.flower.options import ALLOWED_KEYS, node_corruption, partition_of, read_run_config  # noqa: E402
from fedspine.flower.server_app import serve  # noqa: E402
from fedspine.pruning.index_map import ArchShape, KeptIndexMap  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The in-process simulator on the per-device path: what Flower devices run (fedspine.fl.client).
TINY = (
    "fleet.devices=4 train.local_steps=4 train.prune_interval=2 data.max_examples=240 log.progress=false "
    "train.runner=per-device"
)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages created outside a Flower runtime need a task identity; devices start cold."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    client_app._host.cache_clear()
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    client_app._host.cache_clear()


def run_config(tmp_path, rounds, **extra):
    return {
        "config": "",
        "overrides": f"{TINY} train.rounds={rounds}",
        "run-dir": str(tmp_path / "run"),
        "state-dir": str(tmp_path / "devices"),
        "time": "modelled",
        **extra,
    }


def strip(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def flower_run(tmp_path, rc, fate=None):
    grid = LoopbackGrid(rc, 4, str(tmp_path / "devices"), fate)
    return serve(grid, *read_run_config(rc)), grid


def test_codec_round_trip_is_exact():
    rng = np.random.default_rng(0)
    arrays = {"bert.encoder.layer.0.attention.self.query.lora_A": rng.normal(size=(4, 64)).astype(np.float32)}
    ins = TrainIns(
        3,
        "d002",
        0.3,
        4,
        arrays,
        {"w": rng.normal(size=(2, 2))},
        ClientConfig(lr=5e-4, local_steps=4, head_lr=None, loss="logit-adjusted"),
        seed=7,
    )
    full = KeptIndexMap.full(ArchShape(2, 4, 4, 16, 128, 64))
    back, held = codec.decode_ins(codec.encode_ins(ins, full))
    assert held == codec.kept_digest(full)
    assert (back.round, back.device_id, back.ratio, back.rank, back.seed) == (3, "d002", 0.3, 4, 7)
    assert back.config == ins.config and isinstance(back.config, ClientConfig)
    assert all(
        np.array_equal(back.adapter[k], v) and back.adapter[k].dtype == v.dtype for k, v in arrays.items()
    )
    assert np.array_equal(back.base_delta["w"], ins.base_delta["w"])
    res = TrainRes(3, "d002", 4, arrays, full.to_dict(), 60, 0.7, 0.5, 0.25, 1.5, {"train_time_s": 0.1})
    assert codec.decode_res(codec.encode_res(res)).__dict__.keys() == res.__dict__.keys()
    again = codec.decode_res(codec.encode_res(res))
    assert again.kept_map == res.kept_map and again.metrics == res.metrics and again.loss_after == 0.5
    with pytest.raises(ValueError, match="no 'fedspine.res' record"):
        codec.decode_res(RecordDict({}))


def test_bad_run_and_node_config_names_the_key():
    with pytest.raises(ValueError, match=r"unknown Flower run config key\(s\) \['round-timout'\]"):
        read_run_config({"round-timout": 5})
    with pytest.raises(ValueError, match="run config 'round-timeout' must be float, got 'soon'"):
        read_run_config({"round-timeout": "soon"})
    with pytest.raises(
        ValueError, match=r"run config 'time' must be one of \['auto', 'modelled', 'measured'\]"
    ):
        read_run_config({"time": "guessed"})
    with pytest.raises(ValueError, match="strategy.name must be one of"):
        read_run_config({"overrides": "strategy.name=fedsp1ne"})
    with pytest.raises(ValueError, match="'config': 'nope.yaml' not found"):
        read_run_config({"config": "nope.yaml"})
    cfg, _ = read_run_config({"overrides": "fleet.devices=4"})
    with pytest.raises(ValueError, match="needs 'partition-id'"):
        partition_of({}, cfg)
    with pytest.raises(ValueError, match=r"'partition-id' must be an integer in \[0, 4\)"):
        partition_of({"partition-id": 4}, cfg)
    with pytest.raises(ValueError, match="'num-partitions' is 8 but the run's fleet.devices is 4"):
        partition_of({"partition-id": 1, "num-partitions": 8}, cfg)
    with pytest.raises(ValueError, match=r"node config 'corrupt' must be '' or one of \['nan', 'inf'"):
        node_corruption({"corrupt": "nans"})
    assert node_corruption({}) == "" and node_corruption({"corrupt": "norm"}) == "norm"


def test_flower_loop_gives_the_in_process_simulator_records_exactly(tmp_path):
    rc = run_config(tmp_path, 2)
    result, grid = flower_run(tmp_path, rc)
    local = run(read_run_config(rc)[0])
    assert strip(result.records) == strip(local.records)
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 4 * 2 and len({m.metadata.dst_node_id for m in trains}) == 4  # one message each


def test_a_straggler_fails_the_round_and_its_update_is_not_aggregated(tmp_path):
    late = lambda p, m: "drop" if p == 1 and m.metadata.message_type == "train" else "ok"  # noqa: E731
    rc = run_config(tmp_path, 1, **{"round-timeout": 0.5})
    result, grid = flower_run(tmp_path, rc, late)
    (record,) = result.records
    assert record["failures"] == {"d001": "no reply within round-timeout (0.5 s)"}
    assert sorted(record["round_time_s"]) == ["d000", "d002", "d003"]
    # The server's global adapter is exactly the aggregate of the three replies that arrived.
    state, arrays = checkpoint.load(tmp_path / "run" / "checkpoint")
    sim = Simulation(read_run_config(rc)[0])
    sim.server.configure(1, sim.world.device_ids)
    arrived = [codec.decode_res(m.content) for m in grid.produced if m.metadata.message_type == "train"]
    arrived = [r for r in arrived if r.device_id != "d001"]
    assert len(arrived) == 3
    sim.server.finish(1, arrived, [Failure(1, "d001", "late")], record["round_time_s"])
    for key, value in sim.server.state.items():
        np.testing.assert_array_equal(arrays[f"global/{key}"], value)
    assert "d001" not in state["server"]["kept"]  # its pruning is unknown to the server
    assert state["server"]["strategy"]["allocator"]["pending"] == []  # the failure was observed


def test_a_device_whose_reply_was_lost_rebuilds_the_state_the_server_expects(tmp_path):
    def late(p, m):
        return (
            "drop" if p == 1 and m.metadata.group_id == "1" and m.metadata.message_type == "train" else "ok"
        )

    rc = run_config(
        tmp_path, 2, **{"round-timeout": 0.5, "overrides": f"{TINY} train.rounds=2 arms.ratios=[0.5]"}
    )
    result, grid = flower_run(tmp_path, rc, late)
    r1, r2 = result.records
    assert "d001" in r1["failures"] and "d001" in r2["round_time_s"] and not r2["failures"]
    held = [codec.decode_ins(m.content) for m in grid.sent if m.metadata.message_type == "train"]
    full = codec.kept_digest(KeptIndexMap.full(World.build(read_run_config(rc)[0]).shape))
    assert [h for ins, h in held if ins.device_id == "d001"] == [
        full,
        full,
    ]  # round 2 asks for round 0's state
    assert len(list((tmp_path / "devices" / "d001").glob("kept-*.json"))) == 2  # the lost round's state stays


def test_a_resumed_server_ends_with_the_uninterrupted_records(tmp_path):
    """The server dies in round 3 after the devices trained (they are one round ahead of the
    checkpoint); the devices restart too (cold memory). Resume asks each for its round-2 state."""
    crash = lambda p, m: "crash-server" if m.metadata.group_id == "3" else "ok"  # noqa: E731
    rc = run_config(tmp_path, 4)
    with pytest.raises(RuntimeError, match="the server died"):
        flower_run(tmp_path, rc, crash)
    assert checkpoint.load(tmp_path / "run" / "checkpoint")[0]["round"] == 2
    client_app._host.cache_clear()
    resumed, _ = flower_run(tmp_path, {**rc, "resume": True})
    assert [r["round"] for r in resumed.records] == [1, 2, 3, 4]
    assert strip(resumed.records) == strip(run(read_run_config(rc)[0]).records)


def test_a_clientapp_builds_only_the_device_side_of_the_world(tmp_path, monkeypatch):
    """A device trains from its World alone: no strategy, Allocator, Server or aggregator state
    is built in a ClientApp (on a real SuperNode, every round). Its reply is the in-process one."""
    from flwr.app import MessageType

    from fedspine.bandit import Allocator
    from fedspine.fl.server import Server
    from fedspine.fl.strategies import ArmAssigner as Strategy
    from fedspine.lora.aggregate import AGGREGATORS

    rc = run_config(tmp_path, 1)
    cfg = read_run_config(rc)[0]
    sim = Simulation(cfg)  # the server side, built before anything is refused
    ins = sim.server.configure(1, sim.world.device_ids)
    (expected,) = sim.runner.execute(1, {"d002": ins["d002"]}, {"d002": sim.server.kept_map("d002")}).values()

    def refuse(what):
        def built(*args, **kwargs):
            raise AssertionError(f"a ClientApp built {what}")

        return built

    rules = {k for r in AGGREGATORS.values() for k in type(r).__mro__ if "init_state" in vars(k)}
    for cls, what in [
        (Server, "a Server"),
        (Allocator, "an Allocator"),
        (Strategy, "a strategy"),
        (Simulation, "a Simulation"),
    ]:
        monkeypatch.setattr(cls, "__init__", refuse(what))
    for cls in rules:
        monkeypatch.setattr(cls, "init_state", refuse(f"aggregator state ({cls.__name__})"))

    grid = LoopbackGrid(rc, 4, str(tmp_path / "devices"))
    held = KeptIndexMap.full(sim.world.shape)
    msg = grid.create_message(codec.encode_ins(ins["d002"], held), MessageType.TRAIN, 1002, "1")
    grid.push_messages([msg])
    (reply,) = grid.produced
    assert not reply.has_error(), reply.error.reason
    res = codec.decode_res(reply.content)
    assert (res.round, res.device_id) == (1, "d002")
    assert res.kept_map == expected.result.kept_map and res.loss_after == expected.result.loss_after
    for key, value in expected.result.adapter.items():
        np.testing.assert_array_equal(res.adapter[key], value)


def test_nodes_that_cannot_serve_the_run_stop_it_at_once_with_the_reason(tmp_path):
    rc = run_config(tmp_path, 1, wait=60)
    grid = LoopbackGrid(rc, 2, str(tmp_path / "devices"))  # 2 SuperNodes for a fleet of 4
    with pytest.raises(RuntimeError, match="'num-partitions' is 2 but the run's fleet.devices is 4"):
        serve(grid, *read_run_config(rc))


def test_the_repository_app_section_lists_every_key_with_valid_defaults(tmp_path):
    import tomllib

    from fedspine.flower.local import write_app

    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    made = tomllib.loads((write_app(tmp_path) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert ours["components"] == made["components"]
    assert sorted(ours["config"]) == sorted(made["config"]) == sorted(ALLOWED_KEYS)
    cfg, opts = read_run_config(ours["config"])  # the smoke config, found relative to the app
    assert cfg.model.name == "tiny-bert" and opts.round_timeout_s == 600


def test_a_node_that_returns_a_corrupt_update_is_rejected_and_the_run_continues(tmp_path, monkeypatch):
    """Node 1 (device d001) puts a NaN in every update it sends, through the real codec: the
    round loop's screening (the one the in-process simulator runs) rejects it, the allocator
    records a failure, the other three are aggregated, and the global state stays finite."""
    from flwr.app import Message, MessageType

    from fedspine.fl.faults import corrupt

    real = client_app.app

    def app(msg, context):
        reply = real(msg, context)
        bad = context.node_config["partition-id"] == 1 and msg.metadata.message_type == MessageType.TRAIN
        if bad and not reply.has_error():
            res = corrupt(codec.decode_res(reply.content), "nan", np.random.default_rng(0))
            reply = Message(codec.encode_res(res), reply_to=msg)
        return reply

    monkeypatch.setattr(client_app, "app", app)
    rc = run_config(tmp_path, 2)
    result, _ = flower_run(tmp_path, rc)
    for r in result.records:
        assert list(r["rejected"]) == ["d001"] and "non-finite" in r["rejected"]["d001"]
        assert r["failures"] == {"d001": f"rejected: {r['rejected']['d001']}"}
        assert sorted(r["round_time_s"]) == ["d000", "d002", "d003"] and r["aggregated"]
    state, arrays = checkpoint.load(tmp_path / "run" / "checkpoint")
    assert all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("global/"))
    assert "d001" not in state["server"]["kept"] and state["server"]["strategy"]["allocator"]["pending"] == []
