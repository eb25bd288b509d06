"""Injected device faults, so that a user can study how a run copes with unreliable devices.

``FaultInjector`` sits at the runner seam of the round loop (``fedspine.fl.simulator``), so every
runner gets the same faults: the in-process ones and Flower's. Per device and round it draws at
most one fault (``faults.dropout`` / ``crash`` / ``straggle`` / ``corrupt`` of ``FaultConfig``):

- dropout: the device is not reached and never replies; the server waits until the deadline.
- crash: the device fails mid-training with an error reply; what it trained is lost.
- straggle: the device trains, but its reply arrives past the round's deadline and is dropped.
- corrupt: the device's reply carries a corrupted update (``corrupt``: NaN, Inf, a wrong shape,
  wrong keys, or a norm ``faults.norm_factor`` times too large), for the server's checks.

A crashed or late device has advanced its own state, but the server did not see it; the runners
bring each device back to the state the server last accepted from it before its next round
(``held``), as a Flower device rebuilds it from its disk. Draws come from their own stream,
seeded per (run seed, device, round) (ours): no other random stream of the run moves, the
faults do not depend on execution order, and a resumed run needs no RNG snapshot.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from fedspine.config import CORRUPT_KINDS, FaultConfig
from fedspine.fl.messages import TrainRes
from fedspine.fl.runners import Reply
from fedspine.lora.coords import LORA_A, split_key

DROPOUT, CRASH, STRAGGLE, CORRUPT = "dropout", "crash", "straggle", "corrupt"
KINDS = (DROPOUT, CRASH, STRAGGLE, CORRUPT)


class FaultInjector:
    """The faults of ``cfg`` for a run seeded ``seed`` (``Seeds(seed).integer("faults")``)."""

    def __init__(self, cfg: FaultConfig, seed: int):
        self.cfg, self.seed = cfg, int(seed)
        self.rates = [getattr(cfg, k) for k in KINDS]

    @property
    def active(self) -> bool:
        return any(r > 0 for r in self.rates)

    def _rng(self, device: str, rnd: int, use: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, rnd, zlib.crc32(device.encode()), use])

    def draw(self, rnd: int, devices: Sequence[str]) -> dict[str, str]:
        """{device: fault} for the round's devices that get one: a kind of ``KINDS``, a corrupt
        one as ``"corrupt:<how>"``."""
        if not self.active:
            return {}
        edges = np.cumsum(self.rates)
        out = {}
        for d in devices:
            rng = self._rng(d, rnd, 0)
            i = int(np.searchsorted(edges, rng.random(), side="right"))
            if i < len(KINDS):
                kind = KINDS[i]
                if kind == CORRUPT:
                    how = self.cfg.corrupt_kinds
                    kind = f"{CORRUPT}:{how[int(rng.integers(len(how)))]}"
                out[d] = kind
        return out

    def apply(self, rnd: int, replies: Mapping[str, Reply], plan: Mapping[str, str]) -> dict[str, Reply]:
        """The replies the server gets: ``replies`` (from the runner) with ``plan``'s faults."""
        out = dict(replies)
        for d, fault in plan.items():
            if fault == DROPOUT:
                out[d] = Reply(failure="no reply (injected dropout)", timed_out=True)
                continue
            reply = out.get(d)
            if reply is None or reply.result is None:
                continue  # it failed on its own
            if fault == CRASH:
                step = int(self._rng(d, rnd, 1).integers(1, reply.result.metrics.get("steps", 1) + 1))
                out[d] = Reply(failure=f"crashed mid-training at step {step} (injected)")
            elif fault == STRAGGLE:
                out[d] = Reply(failure="straggled past the round deadline (injected)", timed_out=True)
            else:
                how = fault.split(":", 1)[1]
                res = corrupt(reply.result, how, self._rng(d, rnd, 2), norm_factor=self.cfg.norm_factor)
                out[d] = dataclasses.replace(reply, result=res)
        return out


def corrupt(res: TrainRes, how: str, rng: np.random.Generator, *, norm_factor: float = 1e6) -> TrainRes:
    """``res`` with its update corrupted ``how`` (one of ``config.CORRUPT_KINDS``); a new message.

    "norm" multiplies every LoRA A factor and every other array (a head) by ``norm_factor``, so
    each module's ``s B A`` and the update's size grow exactly ``norm_factor`` times."""
    adapter = {k: np.array(v, copy=True) for k, v in res.adapter.items()}
    keys = sorted(adapter)
    key = keys[int(rng.integers(len(keys)))]
    if how in ("nan", "inf"):
        arr = adapter[key].astype(np.float32, copy=False)
        arr.flat[int(rng.integers(arr.size))] = np.nan if how == "nan" else np.inf
        adapter[key] = arr
    elif how == "shape":
        arr = adapter[key]
        adapter[key] = arr[:-1] if arr.shape[0] > 1 else np.concatenate([arr, arr])
    elif how == "keys":
        adapter[f"{key}.unexpected"] = adapter.pop(key)
    elif how == "norm":
        for k in keys:
            if split_key(k)[1] in (LORA_A, None):
                adapter[k] = adapter[k] * np.float32(norm_factor)
    else:
        raise ValueError(f"corruption must be one of {list(CORRUPT_KINDS)}, got {how!r}")
    return dataclasses.replace(res, adapter=adapter)


__all__ = ["CORRUPT", "CRASH", "DROPOUT", "KINDS", "STRAGGLE", "FaultInjector", "corrupt"]
