"""The Flower ``ServerApp``: fedspine's own round loop, with the client steps on Flower nodes.

``main`` runs ``fedspine.fl.simulator.run_in_dir``, the loop the in-process simulator runs: the same
strategy and allocator pick each device's arm, the same ``Server`` projects the global adapter
and aggregates, the same checkpoints make a run resumable, the same records are written. Only
where the client steps run changes: ``GridRunner`` sends each device its own message (its arm
and its adapter slice) through the Grid and waits for the replies until the round timeout.

Why not Flower's ``Strategy.start``: its loop keeps no checkpoint and always starts at round 1;
fedspine's loop already owns resume, and a second loop would be duplicated logic.

Time. On the simulation runtime every virtual device runs on the same hardware, so the round
time of each device comes from the time model and its Jetson profile, drawn in the same order as
in-process (same seed: same arms, same clock). On real SuperNodes the allocator gets the measured
wall time from sending a device its message to receiving its reply (``time`` option).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedspine.config import RunConfig
from fedspine.fl.messages import TrainIns
from fedspine.fl.runners import Reply
from fedspine.fl.simulator import RunResult, run_in_dir
from fedspine.flower import codec
from fedspine.flower.options import FlowerOptions, read_run_config, run_dir
from fedspine.pruning.index_map import KeptIndexMap

LOG = logging.getLogger("flwr").getChild("fedspine")  # shows up in `flwr run --stream` / `flwr log`
QUERY_TIMEOUT_S = 60.0  # a new node has this long to say which device it is (a process start)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, opts = read_run_config(context.run_config)
    serve(grid, cfg, opts)


def serve(grid: Grid, cfg: RunConfig, opts: FlowerOptions) -> RunResult:
    """Run ``cfg`` to its last round over ``grid``; metrics and checkpoints go to ``run_dir``."""
    if cfg.eval.devices:
        raise ValueError(
            "eval.devices must be false on Flower: each device's pruned model stays on the device"
        )
    out = run_dir(cfg, opts).resolve()
    runner = GridRunner(grid, cfg.fleet.devices, opts)
    runner.wait_for_devices()
    LOG.info("fedspine: %s, %s round times, writing %s", cfg.strategy.name, runner.time_source, out)
    result = run_in_dir(cfg, out, resume=opts.resume, runner=runner)
    LOG.info("fedspine summary: %s", json.dumps(result.summary, default=float))
    return result


class GridRunner:
    """The Flower runner: a round's client steps on Flower nodes (``fedspine.fl.runners.DeviceRunner``).

    Nodes say which fleet device they are (a QUERY message answered with their ``partition-id``)
    when they first appear; a node that leaves is forgotten, and a restarted SuperNode is found
    again as a new node. A device that errs, is unreachable or misses ``round-timeout`` fails the
    round: the allocator records the failure and its update is not aggregated. A reply's update
    is screened by the round loop (``Server.screen``), as in-process.
    """

    def __init__(self, grid: Grid, fleet_size: int, opts: FlowerOptions):
        self.grid, self.opts, self.fleet_size = grid, opts, fleet_size
        simulated = _on_simulation_runtime(grid)
        self.modelled = opts.time == "modelled" or (opts.time == "auto" and simulated)
        self.time_source = "modelled" if self.modelled else "measured"
        self.node_of: dict[int, int] = {}  # partition-id -> node id
        self._asked: set[int] = set()  # nodes that answered the identity query
        self._errors: dict[int, str] = {}  # nodes that cannot serve this run, and why
        self._partition: dict[str, int] = {}  # device id -> partition-id, from the fleet

    # --- DeviceRunner ------------------------------------------------------------------------------
    def available(self, fleet: Sequence[str]) -> list[str]:
        self._partition = {d: i for i, d in enumerate(fleet)}
        self._discover()
        return [fleet[p] for p in sorted(self.node_of) if p < len(fleet)]

    def execute(
        self, rnd: int, ins: Mapping[str, TrainIns], held: Mapping[str, KeptIndexMap]
    ) -> dict[str, Reply]:
        messages = {
            d: Message(
                codec.encode_ins(i, held[d]),
                dst_node_id=self.node_of[self._partition[d]],
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
                ttl=self.opts.round_timeout_s,  # a late message expires instead of starting a stale round
            )
            for d, i in ins.items()
        }
        got, missed = self._exchange(messages, self.opts.round_timeout_s)
        wait = None if self.modelled else self.opts.round_timeout_s  # measured: the wait itself
        out = {
            d: Reply(
                failure=f"no reply within round-timeout ({self.opts.round_timeout_s:g} s)",
                measured_s=wait,
                timed_out=True,
            )
            for d in missed
        }
        for d, (reply, seconds) in got.items():
            out[d] = self._reply(rnd, d, reply, seconds)
        for d, r in out.items():
            if r.result is None:
                LOG.warning("round %d: device %s failed: %s", rnd, d, r.failure)
        return out

    def device_models(self) -> dict[str, Any]:
        return {}  # each device's pruned model stays on its node

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {}  # each device keeps its own state on its node's disk (fedspine.flower.device)

    def load_state_dict(self, devices: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
        """Nothing to load: a resumed server asks each device for its checkpointed kept map by
        digest, and the device rebuilds that state from its own disk."""

    # --- nodes -------------------------------------------------------------------------------------
    def wait_for_devices(self) -> None:
        """Wait up to ``wait`` seconds for ``min-devices`` devices (default: the whole fleet)."""
        want = self.opts.min_devices or self.fleet_size
        deadline = time.monotonic() + self.opts.wait_s
        while True:
            self._discover()
            if len(self.node_of) >= want or time.monotonic() >= deadline:
                break
            if not self.node_of and self._errors and self._asked >= set(self.grid.get_node_ids()):
                node, why = next(iter(self._errors.items()))
                raise RuntimeError(f"no node can serve this run; node {node}: {why}")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if not self.node_of:
            raise RuntimeError(f"no fedspine device connected within wait={self.opts.wait_s:g} s")
        if len(self.node_of) < want:
            LOG.warning("starting with %d of %d devices", len(self.node_of), want)

    def _discover(self) -> None:
        nodes = set(self.grid.get_node_ids())
        self.node_of = {p: n for p, n in self.node_of.items() if n in nodes}
        self._asked &= nodes
        self._errors = {n: e for n, e in self._errors.items() if n in nodes}
        new = sorted(nodes - self._asked)
        if not new:
            return
        query = {
            n: Message(
                RecordDict({codec.IDENTITY: ConfigRecord({})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
                ttl=QUERY_TIMEOUT_S,
            )
            for n in new
        }
        got, _ = self._exchange(query, min(QUERY_TIMEOUT_S, self.opts.round_timeout_s))
        for n, (reply, _) in got.items():
            self._asked.add(n)  # an error is not retried: the node's config is wrong until it restarts
            try:
                if reply.has_error():
                    raise ValueError(reply.error.reason)
                p = codec.decode_identity(reply.content)
            except ValueError as exc:
                LOG.error("node %d cannot serve this run: %s", n, exc)
                self._errors[n] = str(exc)
                continue
            if p in self.node_of:
                LOG.warning("partition-id %d: node %d replaces node %d", p, n, self.node_of[p])
            self.node_of[p] = n

    def _exchange(
        self, messages: Mapping[Hashable, Message], timeout_s: float
    ) -> tuple[dict[Any, tuple[Message, float]], list[Any]]:
        """Push ``messages``, then poll until each has a reply or ``timeout_s`` passes. Returns
        ({key: (reply, seconds since the push)}, keys without a reply). Polling every ``poll``
        seconds (not ``Grid.send_and_receive``'s fixed interval) is what times each reply."""
        start = time.monotonic()
        pushed = set(self.grid.push_messages(list(messages.values())))
        pending = {m.metadata.message_id: k for k, m in messages.items() if m.metadata.message_id in pushed}
        unsent = [k for k, m in messages.items() if m.metadata.message_id not in pushed]
        got: dict[Any, tuple[Message, float]] = {}
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is not None:
                    got[key] = (reply, time.monotonic() - start)
            if not pending or time.monotonic() - start >= timeout_s:
                break
            time.sleep(self.opts.poll_s)
        return got, unsent + list(pending.values())

    def _reply(self, rnd: int, device: str, reply: Message, seconds: float) -> Reply:
        if reply.has_error():
            return Reply(failure=f"error reply ({reply.error.code}): {reply.error.reason}")
        try:
            res = codec.decode_res(reply.content)
        except (ValueError, KeyError) as exc:
            return Reply(failure=f"malformed reply: {exc}")
        if (res.round, res.device_id) != (rnd, device):
            return Reply(
                failure=f"reply for {res.device_id!r} round {res.round}, expected {device!r} round {rnd}"
            )
        return Reply(res, measured_s=None if self.modelled else seconds)


def _on_simulation_runtime(grid: Grid) -> bool:
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)
