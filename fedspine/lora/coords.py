"""Move LoRA tensors between a pruned device's coordinates and the original model's (numpy only).

For a LoRA layer W + s·B·A with A: (r, d_in) and B: (d_out, r), a device that pruned the layer
holds B only for its kept output rows and A only for its kept input columns. ``slices[path]``
gives the *original* indices of those rows (``out_idx``) and columns (``in_idx``); ``None`` means
that side is unpruned. Any object with these two attributes works (``fedspine.pruning`` defines
``ModuleSlice``); a module path absent from ``slices`` is unpruned on both sides.

:func:`lift` scatters a device's tensors into zeros of the global shape and returns a 0/1 mask
of the global coordinates the device actually holds, for count-normalised averaging
θ = Σ_k p_k M_k ⊙ θ̃_k / Σ_k p_k M_k (anchors.md §b "extra"). :func:`project` is the reverse. The
rank stays each device's own; reconciling ranks is the aggregator's job, with :func:`pad_rank` /
:func:`truncate_rank` as the HetLoRA-style helpers.

Tensor names follow :mod:`fedspine.lora.adapters`: ``"<path>.lora_A"``, ``"<path>.lora_B"``;
any other key (a ``modules_to_save`` head such as ``classifier.weight``) is never pruned and
passes through unchanged, with an all-ones mask.

Pure functions: inputs are never mutated, outputs are fresh arrays. No torch import, so the
server can aggregate without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

import numpy as np

LORA_A = "lora_A"
LORA_B = "lora_B"


class SliceLike(Protocol):
    """Original indices a pruned device still has for one Linear; ``None`` = that side unpruned."""

    @property
    def out_idx(self) -> np.ndarray | None: ...

    @property
    def in_idx(self) -> np.ndarray | None: ...


class Lifted(NamedTuple):
    """A device's adapter tensors in original coordinates, plus which coordinates it holds."""

    tensors: dict[str, np.ndarray]  # zeros where the device holds nothing
    masks: dict[str, np.ndarray]  # bool, same shapes; True where the device holds a value


def split_key(key: str) -> tuple[str, str | None]:
    """``"a.b.lora_A"`` -> ``("a.b", "lora_A")``; a non-LoRA key -> ``(key, None)``."""
    path, _, leaf = key.rpartition(".")
    if leaf in (LORA_A, LORA_B) and path:
        return path, leaf
    return key, None


def _indices(idx: np.ndarray | None, size: int, what: str) -> np.ndarray | None:
    if idx is None:
        return None
    arr = np.asarray(idx)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{what} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size == 0 or arr.min() < 0 or arr.max() >= size or np.unique(arr).size != arr.size:
        raise ValueError(f"{what} must be non-empty, distinct and in [0, {size}), got {arr.tolist()}")
    return arr


def _slice_of(
    slices: Mapping[str, SliceLike], path: str, shape: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    s = slices.get(path)
    if s is None:
        return None, None
    return (
        _indices(s.out_idx, shape[0], f"slices[{path!r}].out_idx"),
        _indices(s.in_idx, shape[1], f"slices[{path!r}].in_idx"),
    )


def take_block(matrix: np.ndarray, slices: Mapping[str, SliceLike], path: str) -> np.ndarray:
    """The rows and columns of module ``path``'s full-size (d_out, d_in) ``matrix`` that the slice
    keeps (all of them without a slice for ``path``), as float32."""
    arr = np.asarray(matrix)
    rows, cols = _slice_of(slices, path, arr.shape)
    arr = arr if rows is None else arr[rows]
    return np.array(arr if cols is None else arr[:, cols], dtype=np.float32)


def _check_rank(rank: int, what: str = "rank") -> None:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"{what} must be a positive integer, got {rank!r}")


def _pairs(tensors: Mapping[str, np.ndarray], what: str) -> list[str]:
    """LoRA module paths of ``tensors``; each must have both A and B."""
    paths: dict[str, set[str]] = {}
    for key in tensors:
        path, kind = split_key(key)
        if kind is not None:
            paths.setdefault(path, set()).add(kind)
    for path, kinds in paths.items():
        if kinds != {LORA_A, LORA_B}:
            raise ValueError(f"{what}: module {path!r} has {sorted(kinds)} but needs both lora_A and lora_B")
    return sorted(paths)


def lift(
    tensors: Mapping[str, np.ndarray],
    slices: Mapping[str, SliceLike],
    *,
    rank: int,
    global_shapes: Mapping[str, tuple[int, int]],
) -> Lifted:
    """Scatter a device's rank-``rank`` adapter into the original model's coordinates.

    B (len(out_idx), r) goes to rows ``out_idx`` of a zero (d_out, r) matrix, A (r, len(in_idx))
    to columns ``in_idx`` of a zero (r, d_in) matrix, with (d_out, d_in) = ``global_shapes[path]``
    (see ``fedspine.lora.adapters.adapter_shapes``). Every shape is checked against the slice and
    the rank, so a device that reports indices inconsistent with its tensors fails here, loudly.
    """
    _check_rank(rank)
    paths = _pairs(tensors, "tensors")
    out_t: dict[str, np.ndarray] = {}
    out_m: dict[str, np.ndarray] = {}
    for path in paths:
        if path not in global_shapes:
            raise ValueError(f"global_shapes has no entry for module {path!r}")
        d_out, d_in = (int(d) for d in global_shapes[path])
        rows, cols = _slice_of(slices, path, (d_out, d_in))
        a = np.asarray(tensors[f"{path}.{LORA_A}"])
        b = np.asarray(tensors[f"{path}.{LORA_B}"])
        want_a = (rank, d_in if cols is None else cols.size)
        want_b = (d_out if rows is None else rows.size, rank)
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(
                f"tensors for {path!r}: lora_A {a.shape} / lora_B {b.shape} do not match rank {rank} "
                f"and the slice (expected {want_a} / {want_b})"
            )
        ga = np.zeros((rank, d_in), dtype=np.float32)
        gb = np.zeros((d_out, rank), dtype=np.float32)
        ma = np.zeros((rank, d_in), dtype=bool)
        mb = np.zeros((d_out, rank), dtype=bool)
        at_cols = slice(None) if cols is None else cols
        at_rows = slice(None) if rows is None else rows
        ga[:, at_cols] = a
        ma[:, at_cols] = True
        gb[at_rows, :] = b
        mb[at_rows, :] = True
        out_t[f"{path}.{LORA_A}"], out_t[f"{path}.{LORA_B}"] = ga, gb
        out_m[f"{path}.{LORA_A}"], out_m[f"{path}.{LORA_B}"] = ma, mb
    for key, value in tensors.items():
        if split_key(key)[1] is None:
            arr = np.asarray(value, dtype=np.float32)
            out_t[key] = arr.copy()
            out_m[key] = np.ones(arr.shape, dtype=bool)
    return Lifted(out_t, out_m)


def project(
    global_tensors: Mapping[str, np.ndarray],
    slices: Mapping[str, SliceLike],
    *,
    rank: int,
) -> dict[str, np.ndarray]:
    """A device's rank-``rank`` view of a global adapter: B[out_idx, :rank] and A[:rank, in_idx].

    Taking the *first* ``rank`` components is HetLoRA's truncation; the global rank must be at
    least ``rank``. Non-LoRA keys are copied unchanged. ``project(lift(t, s, ...).tensors, s,
    rank=r) == t`` exactly.
    """
    _check_rank(rank)
    paths = _pairs(global_tensors, "global_tensors")
    out: dict[str, np.ndarray] = {}
    for path in paths:
        a = np.asarray(global_tensors[f"{path}.{LORA_A}"])
        b = np.asarray(global_tensors[f"{path}.{LORA_B}"])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"global_tensors for {path!r}: lora_A {a.shape} and lora_B {b.shape} disagree")
        if a.shape[0] < rank:
            raise ValueError(f"rank {rank} exceeds the global rank {a.shape[0]} of module {path!r}")
        rows, cols = _slice_of(slices, path, (b.shape[0], a.shape[1]))
        out[f"{path}.{LORA_A}"] = np.array(a[:rank] if cols is None else a[:rank, cols], dtype=np.float32)
        out[f"{path}.{LORA_B}"] = np.array(b[:, :rank] if rows is None else b[rows, :rank], dtype=np.float32)
    for key, value in global_tensors.items():
        if split_key(key)[1] is None:
            out[key] = np.array(value, dtype=np.float32)
    return out


def rank_of(tensors: Mapping[str, np.ndarray]) -> int:
    """The common LoRA rank of ``tensors``; ValueError if modules disagree or there are none."""
    ranks = {np.shape(tensors[f"{p}.{LORA_A}"])[0] for p in _pairs(tensors, "tensors")}
    if len(ranks) != 1:
        raise ValueError(f"tensors must have exactly one LoRA rank, got {sorted(ranks)}")
    return int(ranks.pop())


def pad_rank(tensors: Mapping[str, np.ndarray], r_max: int) -> dict[str, np.ndarray]:
    """Zero-pad every A with rows and every B with columns up to rank ``r_max`` (HetLoRA, §b).

    B·A is unchanged. Works on masks too (bool arrays pad with False), so the aggregator can
    choose whether padded rank components count in the average. Non-LoRA keys are copied.
    """
    _check_rank(r_max, "r_max")

    def pad(key: str, arr: np.ndarray, is_a: bool, r: int) -> np.ndarray:
        if r > r_max:
            raise ValueError(f"r_max ({r_max}) is below the rank {r} of {key!r}; use truncate_rank")
        return np.pad(arr, ((0, r_max - r), (0, 0)) if is_a else ((0, 0), (0, r_max - r)))

    return _map_rank_axis(tensors, pad)


def truncate_rank(tensors: Mapping[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """Keep the first ``r`` rank components: A[:r] and B[:, :r] (HetLoRA's distribution rule, §b)."""
    _check_rank(r, "r")

    def truncate(key: str, arr: np.ndarray, is_a: bool, have: int) -> np.ndarray:
        if r > have:
            raise ValueError(f"r ({r}) exceeds the rank {have} of {key!r}; use pad_rank")
        return (arr[:r] if is_a else arr[:, :r]).copy()

    return _map_rank_axis(tensors, truncate)


def _map_rank_axis(
    tensors: Mapping[str, np.ndarray], fn: Callable[[str, np.ndarray, bool, int], np.ndarray]
) -> dict[str, np.ndarray]:
    """``fn(key, array, is_a, rank)`` for every LoRA tensor, the rank being A's rows or B's
    columns; any other key is copied unchanged."""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        arr = np.asarray(value)
        kind = split_key(key)[1]
        if kind is None:
            out[key] = arr.copy()
        else:
            is_a = kind == LORA_A
            out[key] = fn(key, arr, is_a, arr.shape[0] if is_a else arr.shape[1])
    return out
