"""Atomic checkpoints of a simulation, and exact resume.

A checkpoint holds everything a later round depends on: the global adapter (npz), each
device's kept-index map and (FLoRA-style rules) the base delta it has applied, the strategy's
state (the allocator's, RNG included), the simulator's RNG streams, the simulated clock, the
round and the records so far. Device base models are not stored: they are the original model
pruned to the device's kept map, rebuilt on load. Client randomness is a function of (seed,
device, round), so it needs no snapshot. The directory is written next to the final one and
renamed into place, so a crash mid-write never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"


def save(path: str | Path, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.savez(tmp / ARRAYS_FILE, **arrays)
    (tmp / STATE_FILE).write_text(json.dumps(state, default=_json_default))
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    p = Path(path)
    if not (p / STATE_FILE).exists():
        raise ValueError(f"no checkpoint at {str(p)!r} (expected {STATE_FILE} and {ARRAYS_FILE})")
    state = json.loads((p / STATE_FILE).read_text())
    with np.load(p / ARRAYS_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return state, arrays


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
