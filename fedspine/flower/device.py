"""What a device keeps between rounds, kept on the device.

A device's state (``LocalState``) is a pure function of what it kept: its base model is the
original model pruned to its kept-index map (pruning is deterministic; ``World.device_state``),
and a FLoRA-style base delta is re-sent whole every round (it is cumulative), so a device rebuilt
without one converges to the same weights. So the durable state is the kept map alone, written to
the device's own disk under its content digest (``state-dir/<device>/kept-<digest>.json``).

The server names the state it expects by that digest (``codec.kept_digest``). That is what makes
stragglers and resume safe: a device whose reply missed the deadline has already pruned further,
but the server did not see it, so next round it asks for the older state, and the device rebuilds
it from its disk. A resumed server asks for the states of its checkpoint's round in the same way.

ClientApp processes are short-lived on a real SuperNode (one per message) and long-lived on the
simulation runtime (a Ray actor serves many virtual devices); ``DeviceHost`` keeps the shared
setup and the last few states in memory there, so most rounds need no rebuild.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

from fedspine.config import RunConfig
from fedspine.fl.client import LocalState, client_step
from fedspine.fl.messages import TrainIns, TrainRes
from fedspine.fl.world import World
from fedspine.flower.codec import kept_digest
from fedspine.pruning.index_map import KeptIndexMap


class DeviceStore:
    """The kept maps one device has produced, on its disk, by digest (a few KB each)."""

    def __init__(self, root: Path, device: str):
        self.dir = Path(root) / device

    def path(self, digest: str) -> Path:
        return self.dir / f"kept-{digest}.json"

    def save(self, kept: KeptIndexMap) -> str:
        digest = kept_digest(kept)
        if not self.path(digest).exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(kept.to_dict(), f)
            os.replace(tmp, self.path(digest))  # atomic: a crash never leaves half a state
        return digest

    def load(self, digest: str) -> KeptIndexMap | None:
        p = self.path(digest)
        return KeptIndexMap.from_dict(json.loads(p.read_text())) if p.exists() else None


class DeviceHost:
    """One ClientApp process's memory: the device side of each run config it has seen (its
    ``World``: model, data, partition, the same build as the server's; no strategy, allocator,
    ``Server`` or aggregator state) and the latest states of the last ``capacity`` devices it
    served."""

    def __init__(self) -> None:
        self._setups: OrderedDict[str, World] = OrderedDict()
        self._states: OrderedDict[tuple[int, str, str], tuple[str, LocalState]] = OrderedDict()

    def setup(self, cfg: RunConfig) -> World:
        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if key not in self._setups:
            self._setups[key] = World.build(cfg)
            while len(self._setups) > 2:
                self._setups.popitem(last=False)
        self._setups.move_to_end(key)
        return self._setups[key]

    def train(
        self,
        cfg: RunConfig,
        partition: int,
        ins: TrainIns,
        held: str,
        *,
        run_id: int,
        store_root: Path,
        capacity: int,
    ) -> TrainRes:
        """Run ``ins`` on device ``partition`` from the state named ``held``; keep the new state.
        States in memory belong to one Flower run (a resumed run rebuilds them from disk)."""
        world = self.setup(cfg)
        device = world.device_ids[partition]
        if ins.device_id != device:
            raise ValueError(
                f"this node is device {device!r} (partition-id {partition}), got {ins.device_id!r}"
            )
        store = DeviceStore(store_root, device)
        key = (run_id, str(store.dir), device)
        state = self._take(key, held) or self._rebuild(world, store, held, device)
        res, new = client_step(ins, state, world.local_data(device))
        self._states[key] = (store.save(new.kept_map), new)
        while len(self._states) > capacity:
            self._states.popitem(last=False)
        return res

    def _take(self, key: tuple[int, str, str], held: str) -> LocalState | None:
        # client_step prunes the model in place: a state is used once, then replaced.
        cached = self._states.pop(key, None)
        return cached[1] if cached is not None and cached[0] == held else None

    @staticmethod
    def _rebuild(world: World, store: DeviceStore, held: str, device: str) -> LocalState:
        full = KeptIndexMap.full(world.shape)
        kept = full if held == kept_digest(full) else store.load(held)
        if kept is None:
            raise ValueError(
                f"device {device!r} has no saved state {held!r} in {store.dir} (the server expects the "
                "state of an earlier round); start the SuperNode with the state-dir it used before"
            )
        return world.device_state(kept)
