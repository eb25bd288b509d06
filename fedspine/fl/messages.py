"""The engine-neutral wire format between server and devices: arrays plus small config dicts.

Nothing here references a Python object that lives on the other side, so the same messages
travel unchanged through the in-process simulator and through Flower's ArrayRecord /
ConfigRecord (``fedspine.flower.codec``). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedspine.config import ClientConfig

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainIns:
    """What the server sends one device for one round."""

    round: int
    device_id: str
    ratio: float  # pruning ratio to reach by the end of the round (of the original model)
    rank: int  # LoRA rank for this round
    adapter: Arrays  # the global adapter projected to the device's kept channels and its rank
    base_delta: Arrays | None = None  # added to the device's base weights first (FLoRA-style rules)
    config: ClientConfig = field(default_factory=ClientConfig)  # local_steps, lr, prune_interval, ...
    seed: int = 0  # the run's seed; the device's randomness this round is step_seed(seed, device, round)


@dataclass(frozen=True)
class TrainRes:
    """What a device sends back: its adapter in its own coordinates and what it kept."""

    round: int
    device_id: str
    rank: int
    adapter: Arrays
    kept_map: dict[str, Any]  # KeptIndexMap.to_dict(): original indices of the surviving units
    num_samples: int
    loss_before: float
    loss_after: float
    achieved_ratio: float
    update_norm: float  # sum over modules of ||s B A||_F of the returned adapter
    metrics: dict[str, float] = field(default_factory=dict)  # train_time_s, steps, prunes, ...


@dataclass(frozen=True)
class Failure:
    """A device that did not deliver: out of memory, crashed, or past the round's deadline."""

    round: int
    device_id: str
    reason: str
