"""Where a round's client steps run: the seam between the round loop and the devices.

The loop (``fedspine.fl.simulator``) decides who takes part, what each device gets and how long
the round took; a ``DeviceRunner`` only delivers the instructions and brings the replies back.
``InProcessRunner`` runs every device's ``client_step`` here and owns the devices' local state
(each device's pruned model, its kept map, its applied base delta). The Flower runner
(``fedspine.flower.server_app.GridRunner``) sends them to Flower nodes, where each device keeps
its own state. The loop never looks at device state: it knows only what the devices reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

from fedspine.fl.client import LocalState, client_step
from fedspine.fl.messages import TrainIns, TrainRes
from fedspine.fl.world import World
from fedspine.pruning.index_map import KeptIndexMap

APPLIED = "applied/"  # checkpoint array prefix of a device's applied base delta: applied/<device>/<path>


@dataclass(frozen=True)
class Reply:
    """One device's answer to its ``TrainIns``: a result, or why there is none; on real devices
    also the wall time the round took there."""

    result: TrainRes | None = None
    failure: str = ""
    measured_s: float | None = None


class DeviceRunner(Protocol):
    """Runs the round's client steps, here or elsewhere, so that the loop, its clock, checkpoints
    and records stay the same on every engine."""

    modelled: bool  # True: the time model prices rounds and checks memory; False: measured wall times

    def available(self, fleet: Sequence[str]) -> Sequence[str]:
        """Which of the ``fleet``'s devices are reachable now."""
        ...

    def execute(
        self, rnd: int, ins: Mapping[str, TrainIns], held: Mapping[str, KeptIndexMap]
    ) -> Mapping[str, Reply]:
        """Deliver ``ins``. ``held`` is what the server believes each of the round's participants
        holds (its last reported kept map), including participants that get no ``ins`` (they
        failed before sending). A device missing from the answer failed."""
        ...

    def device_models(self) -> Mapping[str, nn.Module]:
        """The pruned base models of the devices whose state lives in this process (for device
        evaluation and deployed sizes); empty where devices keep their own."""
        ...

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a checkpoint keeps of the devices: (JSON part, arrays)."""
        ...

    def load_state_dict(self, devices: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Bring the devices back to a checkpoint's ``state_dict``."""
        ...


class InProcessRunner:
    """Every device in this process, one after the other, with modelled round times.

    Owns each device's ``LocalState``. A device gets its copy of the base model when it first
    takes part in a round (even one it fails before training, as it always did)."""

    modelled = True

    def __init__(self, world: World):
        self.world = world
        self.states: dict[str, LocalState] = {}

    def available(self, fleet: Sequence[str]) -> list[str]:
        return list(fleet)

    def execute(
        self, rnd: int, ins: Mapping[str, TrainIns], held: Mapping[str, KeptIndexMap]
    ) -> dict[str, Reply]:
        for d in held:
            if d not in self.states:
                self.states[d] = self.world.device_state()
        out = {}
        for d, i in ins.items():
            res, self.states[d] = client_step(i, self.states[d], self.world.local_data(d))
            out[d] = Reply(res)
        return out

    def device_models(self) -> dict[str, nn.Module]:
        return {d: st.model for d, st in self.states.items()}

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {
            f"{APPLIED}{d}/{p}": v for d, st in self.states.items() for p, v in st.applied_delta.items()
        }
        return {d: st.kept_map.to_dict() for d, st in self.states.items()}, arrays

    def load_state_dict(self, devices: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.states = {}
        for d, kept in devices.items():
            prefix = f"{APPLIED}{d}/"
            applied = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            self.states[d] = self.world.device_state(KeptIndexMap.from_dict(kept), applied)


__all__ = ["DeviceRunner", "InProcessRunner", "Reply"]
