"""The server's checks of a device's update, before the allocator credits it or the aggregator
sees it (numpy only). One place for every engine: the round loop calls them for in-process and
Flower runners alike.

``check_update`` is what one update says on its own: it answers the round and rank it was sent,
its scalars are finite, its kept map is a valid map inside the one the server last accepted
(devices only prune further), its keys and shapes are the ones that rank and kept map imply, and
every value is finite. ``NormScreen`` compares sizes: an update whose size exceeds ``k`` times
the low median of the round's sizes and the last few accepted ones is rejected (ours; the median
tolerates up to half the pool being corrupt, and the history is the floor for a round with few
devices; a run's very first lone update has nothing to compare with and passes).
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedspine.fl.messages import TrainIns, TrainRes
from fedspine.lora.coords import LORA_A, LORA_B, split_key
from fedspine.pruning.index_map import KeptIndexMap, ModuleSlice


def expected_shapes(
    slices: Mapping[str, ModuleSlice],
    global_shapes: Mapping[str, tuple[int, int]],
    head_shapes: Mapping[str, tuple[int, ...]],
    rank: int,
) -> dict[str, tuple[int, ...]]:
    """Every adapter key a device with these kept ``slices`` returns at ``rank``, and its shape:
    A ``(rank, kept inputs)``, B ``(kept outputs, rank)``, heads as the global ones."""
    out: dict[str, tuple[int, ...]] = dict(head_shapes)
    for path, (d_out, d_in) in global_shapes.items():
        s = slices.get(path)
        n_out = d_out if s is None or s.out_idx is None else len(s.out_idx)
        n_in = d_in if s is None or s.in_idx is None else len(s.in_idx)
        out[f"{path}.{LORA_A}"] = (rank, n_in)
        out[f"{path}.{LORA_B}"] = (n_out, rank)
    return out


def check_update(
    res: TrainRes,
    ins: TrainIns,
    held: KeptIndexMap,
    shapes_for: Callable[[KeptIndexMap, int], Mapping[str, tuple[int, ...]]],
) -> str:
    """Why ``res`` (the answer to ``ins`` from a device the server believes holds ``held``) cannot
    be used; "" when it can. ``shapes_for(kept, rank)`` gives the keys and shapes to expect."""
    if (res.round, res.device_id) != (ins.round, ins.device_id):
        return f"answers {res.device_id!r} round {res.round}, was sent {ins.device_id!r} round {ins.round}"
    if res.rank != ins.rank:
        return f"rank {res.rank}, was assigned {ins.rank}"
    for name in ("loss_before", "loss_after", "achieved_ratio", "update_norm"):
        v = getattr(res, name)
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            return f"{name} is {v!r}, not a finite number"
    if not isinstance(res.num_samples, numbers.Integral) or res.num_samples < 1:
        return f"num_samples is {res.num_samples!r}, not a positive integer"
    try:
        kept = KeptIndexMap.from_dict(res.kept_map)
    except (KeyError, TypeError, ValueError) as exc:
        return f"kept map does not decode: {exc}"
    if kept.shape != held.shape:
        return f"kept map is of a model shaped {kept.shape}, not {held.shape}"
    grown = _first_regrown(kept, held)
    if grown:
        return f"kept map regrows {grown} the server saw pruned"
    want = shapes_for(kept, res.rank)
    missing, extra = sorted(set(want) - set(res.adapter)), sorted(set(res.adapter) - set(want))
    if missing or extra:
        more = " ..." if len(missing) > 3 else ""
        return f"wrong keys: missing {missing[:3]}{more}, unexpected {extra[:3]}"
    for key, shape in want.items():
        arr = res.adapter[key]
        if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
            return f"{key} is not a float array ({type(arr).__name__} {getattr(arr, 'dtype', '')})"
        if arr.shape != tuple(shape):
            return f"{key} has shape {arr.shape}, expected {tuple(shape)} (rank {res.rank}, its kept map)"
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            return f"{key} has {bad} non-finite value(s) (NaN/Inf)"
    return ""


def _first_regrown(kept: KeptIndexMap, held: KeptIndexMap) -> str:
    for i, (new, old) in enumerate(zip(kept.layers, held.layers, strict=True)):
        for what in ("heads", "kv_heads", "channels"):
            if not set(getattr(new, what)) <= set(getattr(old, what)):
                return f"layer {i} {what}"
    return ""


def update_size(adapter: Mapping[str, np.ndarray], scaling: float) -> float:
    """``sqrt(sum_modules ||s B A||_F^2 + sum_heads ||H||_F^2)`` (ours): the size of the dense
    weight change an adapter makes, plus its heads. ``||B A||_F^2 = sum((B^T B) * (A A^T))``, two
    rank-by-rank products, so no (out x in) matrix is formed. float64."""
    total = 0.0
    for key, arr in adapter.items():
        path, kind = split_key(key)
        a = np.asarray(arr, dtype=np.float64)
        if kind is None:
            total += float(np.sum(a * a))
        elif kind == LORA_A:
            b = np.asarray(adapter[f"{path}.{LORA_B}"], dtype=np.float64)
            total += scaling**2 * float(np.sum((b.T @ b) * (a @ a.T)))
    return math.sqrt(max(total, 0.0))


class NormScreen:
    """Rejects updates far larger than their peers'. ``k`` None: none is rejected for its size."""

    def __init__(self, k: float | None, history: int, scaling: float):
        self.k, self.scaling = k, float(scaling)
        self.history: deque[float] = deque(maxlen=history)

    def screen(self, results: Sequence[TrainRes]) -> tuple[list[TrainRes], dict[str, str]]:
        """(the accepted ``results``, {device: why} for the rejected); the accepted sizes join the
        history."""
        sizes = [update_size(r.adapter, self.scaling) for r in results]
        if self.k is None:
            return list(results), {}
        pool = sorted([*sizes, *self.history])
        ref = pool[(len(pool) - 1) // 2] if pool else 0.0  # the low median: robust to a half
        accepted, rejected = [], {}
        for r, size in zip(results, sizes, strict=True):
            if ref > 0 and size > self.k * ref:
                rejected[r.device_id] = (
                    f"update size {size:.3g} > {self.k:g} x median {ref:.3g} of this round's and recent sizes"
                )
            else:
                accepted.append(r)
                self.history.append(size)
        return accepted, rejected

    def state_dict(self) -> list[float]:
        return list(self.history)

    def load_state_dict(self, history: Sequence[float]) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in history)


__all__ = ["NormScreen", "check_update", "expected_shapes", "update_size"]
