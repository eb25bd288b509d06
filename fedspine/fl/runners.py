"""Where a round's client steps run: the seam between the round loop and the devices.

The loop (``fedspine.fl.simulator``) decides who takes part, what each device gets and how long
the round took; a ``DeviceRunner`` only delivers the instructions and brings the replies back.
``InProcessRunner`` runs every device's ``client_step`` here and owns the devices' local state
(each device's pruned model, its kept map, its applied base delta). The Flower runner
(``fedspine.flower.server_app.GridRunner``) sends them to Flower nodes, where each device keeps
its own state. The loop never looks at device state: it knows only what the devices reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

from fedspine.fl.client import LocalState, client_step
from fedspine.fl.messages import TrainIns, TrainRes
from fedspine.fl.world import World
from fedspine.pruning.index_map import KeptIndexMap

LOG = logging.getLogger("fedspine")
APPLIED = "applied/"  # checkpoint array prefix of a device's applied base delta: applied/<device>/<path>


@dataclass(frozen=True)
class Reply:
    """One device's answer to its ``TrainIns``: a result, or why there is none; on real devices
    also the wall time the round took there. ``timed_out``: no reply came before the round's
    deadline (the server waited that long for it)."""

    result: TrainRes | None = None
    failure: str = ""
    measured_s: float | None = None
    timed_out: bool = False


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
        holds (its last accepted kept map), including participants that get no ``ins`` (they
        failed before sending); a device whose state moved on unseen (it crashed, was late, or
        its update was rejected) goes back to that state first. A device missing from the
        answer failed; a device that raises fails, the others' replies stand."""
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
    takes part in a round (even one it fails before training, as it always did), and a new one
    when the server's ``held`` map is not what it holds (its last round did not count)."""

    modelled = True

    def __init__(self, world: World):
        self.world = world
        self.states: dict[str, LocalState] = {}

    def available(self, fleet: Sequence[str]) -> list[str]:
        return list(fleet)

    def execute(
        self, rnd: int, ins: Mapping[str, TrainIns], held: Mapping[str, KeptIndexMap]
    ) -> dict[str, Reply]:
        for d, kept in held.items():
            state = self.states.get(d)
            if state is None or state.kept_map != kept:
                # applied deltas start over: a base delta is cumulative and sent whole each round
                self.states[d] = self.world.device_state(kept)
        out = {}
        for d, i in ins.items():
            try:
                res, self.states[d] = client_step(i, self.states[d], self.world.local_data(d))
            except Exception as exc:  # a failing device fails alone
                del self.states[d]  # pruned in place part-way: rebuilt from held next time
                out[d] = failed_reply(rnd, d, exc)
            else:
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


def failed_reply(rnd: int, device: str, exc: BaseException) -> Reply:
    """The failure a device that raised ``exc`` reports (and a warning in the log)."""
    LOG.warning("round %d: device %s raised %s: %s", rnd, device, type(exc).__name__, exc)
    return Reply(failure=f"raised {type(exc).__name__}: {exc}")


__all__ = ["DeviceRunner", "InProcessRunner", "Reply", "failed_reply"]
