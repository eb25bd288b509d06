"""Aggregate LoRA updates of mixed rank and mixed width from pruned devices (numpy only).

Every device k sends a :class:`DeviceUpdate`: its adapter in its *own* coordinates (rank r_k,
only the rows/columns it kept), the original indices of what it kept, and its sample count n_k.
A rule (an :class:`Aggregator`) turns a round of updates into the next global state and hands
each device its share of that state. Pick one by name with :func:`get_aggregator`:

=============  ===============================================  ====================================
name           global state per LoRA module ``p``               source
=============  ===============================================  ====================================
``zero-pad``   ``p.lora_A`` (r_max, d_in), ``p.lora_B``          FederatedLLM ``zero_padding``
``hetlora``    same                                             Cho et al., EMNLP 2024
``flexlora``   ``p.delta`` (d_out, d_in) + its SVD factors      Bai et al., NeurIPS 2024
``flora``      ``p.merged`` (d_out, d_in) + restart A / zero B  Wang et al., NeurIPS 2024
``fedspine``   ``p.lora_A``, ``p.lora_B``                       **ours**
=============  ===============================================  ====================================

Two steps are shared by every rule (anchors.md §b):

1. **Count-normalised scatter over the channel dimensions.** Each device's tensors are lifted
   into original coordinates (:func:`fedspine.lora.coords.lift`, which also gives 0/1 masks M_k
   of what the device holds). Every global coordinate c is then averaged over exactly the devices
   that hold it::

       θ[c] = Σ_k w_k M_k[c] θ_k[c] / Σ_k w_k M_k[c]          (θ[c] unchanged where Σ_k w_k M_k[c] = 0)

   with w_k = n_k × the rule's own weight. Coordinates no device kept this round keep their
   previous global value. This is HeteroFL's / FedMP's (R2SP) rule for sub-models.
2. **Heads.** Non-LoRA tensors (``classifier.weight`` …) are never pruned; they get the plain
   n_k-weighted mean over the devices that sent them.

The global state is a plain ``dict[str, np.ndarray]`` in original coordinates, stored float32
(so it saves as ``npz``); sums are done in float64. Device tensors are float32 on the wire
(``lift`` rounds wider input). Every rule treats ``B·A`` as the update, which assumes one LoRA
scaling s = alpha/r for every device: ``fedspine.lora.adapters`` sets alpha = 2r, so s = 2 for
every rank. Only FLoRA, which folds products into the base weights, needs s itself.

Each rule's ``distribute(global_state, slices, rank)`` returns a :class:`Distribution`: the
device's rank-``rank`` adapter in its kept coordinates (the first ``rank`` components, sliced
to its rows/columns; heads copied) and ``base_delta``. ``base_delta`` is ``None`` except for
FLoRA, whose ``base_delta[p]`` is what the device adds to the **original** pretrained weight of
``p``, sliced to its kept rows/columns, before attaching the adapter. It is cumulative over all
rounds, not just this one, so a device rebuilt from the original checkpoint each round (or a
run resumed from a saved state) still gets the right base.

Pure functions of their inputs: nothing is mutated; rules are frozen dataclasses. No torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

from fedspine.lora.coords import (
    LORA_A,
    LORA_B,
    SliceLike,
    lift,
    pad_rank,
    project,
    split_key,
    take_block,
)

DELTA = "delta"  # FlexLoRA: the aggregated full-size update B·A
MERGED = "merged"  # FLoRA: all products folded into the base so far (weight units, × scaling)
_FULL_SIZE = (DELTA, MERGED)

Shapes = Mapping[str, tuple[int, int]]
State = dict[str, np.ndarray]


# --- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceUpdate:
    """One device's round result, in the device's coordinates.

    ``tensors``: ``"<path>.lora_A"`` (rank, d_in kept), ``"<path>.lora_B"`` (d_out kept, rank), and
    any non-LoRA head tensors. ``slices[path]`` has the original ``out_idx`` / ``in_idx`` the device
    kept (``None`` = unpruned side; a path absent = unpruned). A device may leave a module out
    entirely; it then holds none of that module's coordinates.
    """

    tensors: Mapping[str, np.ndarray]
    slices: Mapping[str, SliceLike]
    rank: int
    num_samples: float

    def __post_init__(self) -> None:
        n = self.num_samples
        if isinstance(n, bool) or not isinstance(n, int | float | np.integer | np.floating):
            raise ValueError(f"num_samples must be a positive number, got {n!r}")
        if not (math.isfinite(n) and n > 0):
            raise ValueError(f"num_samples must be a positive number, got {n!r}")


class Distribution(NamedTuple):
    """What one device receives: its adapter (device coords, its rank) and a base-weight delta."""

    adapter: dict[str, np.ndarray]
    base_delta: dict[str, np.ndarray] | None


class Aggregator(Protocol):
    """A mixed-rank, mixed-width LoRA aggregation rule."""

    name: ClassVar[str]
    #: True if ``distribute`` sends a ``base_delta``: the global model is then the base weights
    #: changed plus an adapter, which a LoRA adapter alone (a peft directory) cannot hold.
    changes_base: ClassVar[bool]

    def init_state(
        self,
        global_shapes: Shapes,
        r_max: int,
        *,
        rng: np.random.Generator | int = 0,
        heads: Mapping[str, np.ndarray] | None = None,
    ) -> State: ...

    def aggregate(
        self,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[DeviceUpdate],
        *,
        global_shapes: Shapes,
        r_max: int,
    ) -> State: ...

    def distribute(
        self, global_state: Mapping[str, np.ndarray], slices: Mapping[str, SliceLike], rank: int
    ) -> Distribution: ...


# --- shared machinery ---------------------------------------------------------------------------
class _Mean:
    """Running count-normalised weighted mean Σ_k w_k M_k θ_k / Σ_k w_k M_k, per key (float64)."""

    def __init__(self) -> None:
        self.num: dict[str, np.ndarray] = {}
        self.den: dict[str, np.ndarray] = {}

    def add(self, key: str, value: np.ndarray, mask: np.ndarray, weight: float) -> None:
        if key in self.num and self.num[key].shape != value.shape:
            raise ValueError(
                f"{key!r}: devices sent different shapes {self.num[key].shape} and {value.shape}"
            )
        m = np.asarray(mask, dtype=np.float64) * weight
        contrib = np.asarray(value, dtype=np.float64) * m
        if key in self.num:
            self.num[key] += contrib
            self.den[key] += m
        else:
            self.num[key], self.den[key] = contrib, m

    def result(self, key: str, previous: np.ndarray | None) -> np.ndarray:
        """The mean where some device held the coordinate; ``previous`` (or 0) elsewhere."""
        num, den = self.num[key], self.den[key]
        out = np.zeros(num.shape) if previous is None else np.array(previous, dtype=np.float64)
        held = den > 0
        out[held] = num[held] / den[held]
        return out.astype(np.float32)


def _check_updates(updates: Sequence[DeviceUpdate], r_max: int) -> None:
    if isinstance(r_max, bool) or not isinstance(r_max, int | np.integer) or r_max < 1:
        raise ValueError(f"r_max must be a positive integer, got {r_max!r}")
    if len(updates) == 0:
        raise ValueError("updates is empty: nothing to aggregate")
    for i, u in enumerate(updates):
        if not isinstance(u, DeviceUpdate):
            raise ValueError(f"updates[{i}] must be a DeviceUpdate, got {type(u).__name__}")
        if isinstance(u.rank, int | np.integer) and not isinstance(u.rank, bool) and u.rank > r_max:
            raise ValueError(f"updates[{i}].rank ({u.rank}) exceeds r_max ({r_max})")
        for key, value in u.tensors.items():
            if not np.all(np.isfinite(np.asarray(value))):
                raise ValueError(f"updates[{i}].tensors[{key!r}] has non-finite values")
        for path in _lora_paths(u.tensors):
            if f"{path}.{LORA_A}" not in u.tensors or f"{path}.{LORA_B}" not in u.tensors:
                raise ValueError(f"updates[{i}]: module {path!r} needs both lora_A and lora_B")


def _lora_paths(tensors: Mapping[str, Any]) -> list[str]:
    return sorted({split_key(k)[0] for k in tensors if split_key(k)[1] is not None})


def _update_paths(updates: Sequence[DeviceUpdate], global_shapes: Shapes) -> list[str]:
    """LoRA module paths any device sent; each must be in ``global_shapes``."""
    paths = sorted({p for u in updates for p in _lora_paths(u.tensors)})
    for path in paths:
        if path not in global_shapes:
            raise ValueError(f"global_shapes has no entry for module {path!r}")
    return paths


def _heads(tensors: Mapping[str, Any]) -> list[str]:
    return [k for k in tensors if split_key(k)[1] is None]


def _check_shape(state: Mapping[str, np.ndarray], key: str, want: tuple[int, ...]) -> np.ndarray | None:
    if key not in state:
        return None
    have = np.shape(state[key])
    if have != want:
        raise ValueError(f"global_state[{key!r}] has shape {have}, expected {want}")
    return np.asarray(state[key])


def _product_norm(a: np.ndarray, b: np.ndarray) -> float:
    """‖B·A‖_F via the r×r Gram matrices: ‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ); never forms B·A."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return math.sqrt(max(float(np.sum((b64.T @ b64) * (a64 @ a64.T))), 0.0))


def _init_factors(global_shapes: Shapes, r_max: int, rng: np.random.Generator | int) -> dict[str, np.ndarray]:
    """A ~ U(-1/√d_in, 1/√d_in) (peft's default kaiming-uniform(a=√5) init of lora_A), B = 0."""
    gen = np.random.default_rng(rng)
    out: dict[str, np.ndarray] = {}
    for path in sorted(global_shapes):
        d_out, d_in = (int(d) for d in global_shapes[path])
        bound = 1.0 / math.sqrt(d_in)
        out[f"{path}.{LORA_A}"] = gen.uniform(-bound, bound, size=(r_max, d_in)).astype(np.float32)
        out[f"{path}.{LORA_B}"] = np.zeros((d_out, r_max), dtype=np.float32)
    return out


def _with_heads(state: State, heads: Mapping[str, np.ndarray] | None) -> State:
    for key, value in (heads or {}).items():
        if split_key(key)[1] is not None:
            raise ValueError(f"heads[{key!r}] is a LoRA key, not a head")
        state[key] = np.array(value, dtype=np.float32)
    return state


def _aggregate_heads(
    out: State, global_state: Mapping[str, np.ndarray], updates: Sequence[DeviceUpdate]
) -> None:
    """Plain n_k-weighted mean of every non-LoRA tensor over the devices that sent it."""
    acc = _Mean()
    for u in updates:
        for key in _heads(u.tensors):
            value = np.asarray(u.tensors[key], dtype=np.float32)
            acc.add(key, value, np.ones(value.shape, dtype=bool), float(u.num_samples))
    for key in acc.num:
        previous = _check_shape(global_state, key, acc.num[key].shape)
        out[key] = acc.result(key, previous)


def _copy_state(global_state: Mapping[str, np.ndarray]) -> State:
    return {k: np.array(v, dtype=np.float32) for k, v in global_state.items()}


def _adapter(global_state: Mapping[str, np.ndarray], slices: Mapping[str, SliceLike], rank: int) -> State:
    """HetLoRA-style distribution: first ``rank`` components, device rows/cols, heads copied."""
    view = {k: v for k, v in global_state.items() if k.rpartition(".")[2] not in _FULL_SIZE}
    return project(view, slices, rank=rank)


@dataclass(frozen=True)
class _Rule:
    """What every rule shares: the round-0 state, the scaffolding of ``aggregate`` (checks, a copy
    of the state, the heads) and HetLoRA-style distribution; subclasses fill in ``_init`` and
    ``_aggregate_modules``."""

    name: ClassVar[str] = ""
    changes_base: ClassVar[bool] = False

    def init_state(
        self,
        global_shapes: Shapes,
        r_max: int,
        *,
        rng: np.random.Generator | int = 0,
        heads: Mapping[str, np.ndarray] | None = None,
    ) -> State:
        """Round-0 state: A ~ U(±1/√d_in) (peft's init), B = 0, so B·A = 0; a full-size rule's own
        matrix ``p.<leaf>`` is 0; ``heads`` copied."""
        return _with_heads(self._init(global_shapes, r_max, rng), heads)

    def aggregate(
        self,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[DeviceUpdate],
        *,
        global_shapes: Shapes,
        r_max: int,
    ) -> State:
        _check_updates(updates, r_max)
        out = _copy_state(global_state)
        self._aggregate_modules(out, global_state, updates, global_shapes, r_max)
        _aggregate_heads(out, global_state, updates)
        return out

    def distribute(
        self, global_state: Mapping[str, np.ndarray], slices: Mapping[str, SliceLike], rank: int
    ) -> Distribution:
        """Truncate to the device's rank (first ``rank`` components), slice to its kept rows/cols."""
        return Distribution(_adapter(global_state, slices, rank), None)

    def _init(self, global_shapes: Shapes, r_max: int, rng: np.random.Generator | int) -> State:
        return _init_factors(global_shapes, r_max, rng)

    def _aggregate_modules(
        self,
        out: State,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[DeviceUpdate],
        global_shapes: Shapes,
        r_max: int,
    ) -> None:
        """Write the LoRA modules' new global tensors into ``out`` (a copy of ``global_state``)."""
        raise NotImplementedError


# --- factorised rules: zero-pad, HetLoRA, ours ----------------------------------------------------
@dataclass(frozen=True)
class _Factorised(_Rule):
    """Average A and B separately after padding to r_max; subclasses choose the weights/masks."""

    rank_aware: ClassVar[bool] = False  # False: padded zeros count in the mean (zero-padding)

    def _module_weights(
        self, updates: Sequence[DeviceUpdate], global_shapes: Shapes
    ) -> list[dict[str, float]]:
        """Per device, per module path, the rule's weight (multiplies n_k). Default: 1."""
        return [dict.fromkeys(_lora_paths(u.tensors), 1.0) for u in updates]

    def _aggregate_modules(self, out, global_state, updates, global_shapes, r_max) -> None:  # see _Rule
        module_weights = self._module_weights(updates, global_shapes)
        acc = _Mean()
        for u, weights in zip(updates, module_weights, strict=True):
            lifted = lift(u.tensors, u.slices, rank=u.rank, global_shapes=global_shapes)
            padded = pad_rank(lifted.tensors, r_max)
            masks = (
                pad_rank(lifted.masks, r_max) if self.rank_aware else _broadcast_masks(lifted.masks, r_max)
            )
            for path, w in weights.items():
                for kind in (LORA_A, LORA_B):
                    key = f"{path}.{kind}"
                    acc.add(key, padded[key], masks[key], float(u.num_samples) * w)
        for key in acc.num:
            path, kind = split_key(key)
            d_out, d_in = (int(d) for d in global_shapes[path])
            want = (r_max, d_in) if kind == LORA_A else (d_out, r_max)
            out[key] = acc.result(key, _check_shape(global_state, key, want))


def _broadcast_masks(masks: Mapping[str, np.ndarray], r_max: int) -> dict[str, np.ndarray]:
    """Channel-only masks: every rank component (padded ones included) counts where the channel is held."""
    out: dict[str, np.ndarray] = {}
    for key, m in masks.items():
        kind = split_key(key)[1]
        if kind == LORA_A:
            out[key] = np.broadcast_to(m[:1], (r_max, m.shape[1]))
        elif kind == LORA_B:
            out[key] = np.broadcast_to(m[:, :1], (m.shape[0], r_max))
        else:
            out[key] = m
    return out


def _norm_weights(updates: Sequence[DeviceUpdate], per_module) -> list[dict[str, float]]:
    """Apply ``per_module(update, path) -> float`` and fall back to 1 for a module where all are 0."""
    raw = [{p: per_module(u, p) for p in _lora_paths(u.tensors)} for u in updates]
    for path in {p for r in raw for p in r}:
        if all(r.get(path, 0.0) == 0.0 for r in raw):
            for r in raw:
                if path in r:
                    r[path] = 1.0
    return raw


def _pair(u: DeviceUpdate, path: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(u.tensors[f"{path}.{LORA_A}"]), np.asarray(u.tensors[f"{path}.{LORA_B}"])


@dataclass(frozen=True)
class ZeroPadRule(_Factorised):
    """Zero-padding ("HeteroLoRA naive"; ATP-1010/FederatedLLM ``zero_padding`` branch).

    Pad A_k with zero rows and B_k with zero columns to r_max, then per coordinate c::

        A[c] = Σ_k n_k M_k[c] Â_k[c] / Σ_k n_k M_k[c]     (same for B)

    where M_k is the device's *channel* mask: a padded (zero) rank component counts wherever the
    device holds the channel, exactly as in plain zero-padding. Distribution: truncation.
    """

    name: ClassVar[str] = "zero-pad"


@dataclass(frozen=True)
class RankAwareRule(_Factorised):
    """**Ours** (the rank rule of RBLA, arXiv 2408.08699, with FedAvg's n_k weights): zero-padding
    in which rank component j is averaged only over the devices that trained it (r_k > j)::

        A[j, c] = Σ_k n_k [j < r_k] [c ∈ C_k] A_k[j, c] / Σ_k n_k [j < r_k] [c ∈ C_k]   (B alike)

    and a component no device trained this round keeps its previous value. Why: under ``zero-pad``
    a component that every device of a round padded becomes A = 0 and B = 0, where both gradients
    vanish (dL/dB ∝ A x, dL/dA ∝ Bᵀ): it is dead for good, and a device given that rank later
    trains exactly what the lower rank trains, at the higher rank's cost. FedSpine starts every
    device at the lowest rank, so under ``zero-pad`` every higher rank dies in round 1 (a test
    pins this). Here an unplayed component stays as initialised (A random, B = 0), trainable by
    the first device that plays it. Distribution: truncation.
    """

    name: ClassVar[str] = "rank-aware"
    rank_aware: ClassVar[bool] = True


@dataclass(frozen=True)
class HetLoRARule(_Factorised):
    """HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): zero-padding with sparsity weights.

    Like ``zero-pad`` (padded zeros count), with device k's weight for module p::

        w_{k,p} = n_k · ‖B_{k,p} A_{k,p}‖_F

    normalised by the count-normalised mean. The paper's weight is the norm alone; we multiply
    by n_k as the brief and FedAvg do. Implementations differ on per-client vs per-module norms;
    we take per module. If every device's product is 0 for a module, the norm factor is 1
    (plain n_k weighting). Distribution: truncation to the device's rank (first r_k components).
    HetLoRA's client-side rank self-pruning is not part of aggregation and is not done here.
    """

    name: ClassVar[str] = "hetlora"

    def _module_weights(
        self, updates: Sequence[DeviceUpdate], global_shapes: Shapes
    ) -> list[dict[str, float]]:
        return _norm_weights(updates, lambda u, p: _product_norm(*_pair(u, p)))


@dataclass(frozen=True)
class FedSpineRule(_Factorised):
    """**Ours.** FedSpine's own rule is not public (paper.md §2.3); this is our reconstruction.

    Count-normalised scatter over channels *and* rank, with a weight that is HetLoRA's update
    importance corrected for pruning. For device k and module p, with R_k / C_k the kept rows /
    columns of p (all of them if unpruned), p of shape (d_out, d_in)::

        ρ_{k,p} = |R_k|·|C_k| / (d_out·d_in)                       (fraction of p the device kept)
        ν_{k,p} = ‖B_{k,p} A_{k,p}‖_F / sqrt(|R_k|·|C_k|)          (RMS of its update, size-free)
        w_{k,p} = n_k · ρ_{k,p}^keep_power · ν_{k,p}

        A[j, c] = Σ_k w_k [j < r_k] [c ∈ C_k] A_k[j, c] / Σ_k w_k [j < r_k] [c ∈ C_k]   (B alike)

    Why: HetLoRA's ‖BA‖_F grows with the number of elements a device kept, so on pruned devices it
    mixes "how much did it learn" with "how much did it keep". ν removes the size; ρ then down-
    weights, explicitly, an update learned on a more heavily pruned (more distorted) sub-network
    for the coordinates it shares with others. Ranks are count-normalised like channels (rank
    component j is averaged only over devices with r_k > j, as in RBLA, arXiv 2408.08699), so a
    high-rank device's extra components are not shrunk by the zeros of low-rank devices (the
    known weakness of zero-padding) and components no device had keep their previous value.
    Zero-norm fallback as in HetLoRA. Distribution: truncation. ``keep_power=0`` drops ρ.
    """

    name: ClassVar[str] = "fedspine"
    rank_aware: ClassVar[bool] = True
    keep_power: float = 1.0

    def __post_init__(self) -> None:
        if not (
            isinstance(self.keep_power, int | float)
            and math.isfinite(self.keep_power)
            and self.keep_power >= 0
        ):
            raise ValueError(f"keep_power must be a finite number >= 0, got {self.keep_power!r}")

    def _module_weights(
        self, updates: Sequence[DeviceUpdate], global_shapes: Shapes
    ) -> list[dict[str, float]]:
        def weight(u: DeviceUpdate, path: str) -> float:
            a, b = _pair(u, path)
            if path not in global_shapes:
                raise ValueError(f"global_shapes has no entry for module {path!r}")
            d_out, d_in = (int(d) for d in global_shapes[path])
            kept = b.shape[0] * a.shape[1]
            if kept == 0:
                return 0.0
            rho = kept / (d_out * d_in)
            return rho**self.keep_power * _product_norm(a, b) / math.sqrt(kept)

        return _norm_weights(updates, weight)


# --- full-size rules: FlexLoRA, FLoRA -------------------------------------------------------------
def _full_size_state(
    global_state: Mapping[str, np.ndarray], path: str, global_shapes: Shapes, r_max: int, leaf: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(A, ``p.<leaf>``) of module ``path`` in ``global_state``, every shape checked (None if absent)."""
    d_out, d_in = (int(d) for d in global_shapes[path])
    prev_a = _check_shape(global_state, f"{path}.{LORA_A}", (r_max, d_in))
    _check_shape(global_state, f"{path}.{LORA_B}", (d_out, r_max))
    return prev_a, _check_shape(global_state, f"{path}.{leaf}", (d_out, d_in))


def _round_product(
    updates: Sequence[DeviceUpdate],
    path: str,
    global_shapes: Shapes,
    weights: Sequence[float],
    previous: np.ndarray | None,
) -> np.ndarray:
    """Count-normalised Σ_k w_k M_k (B_k A_k) / Σ_k w_k M_k per (row, col) element (float64).

    One stacked product (see :func:`_stack`) instead of K full-size scatter-adds; elements no
    device held take ``previous`` (0 if None).
    """
    b_stack, a_stack, den = _stack(updates, path, global_shapes, weights)
    out = np.zeros(den.shape) if previous is None else np.array(previous, dtype=np.float64)
    held = den > 0
    out[held] = (b_stack @ a_stack)[held] / den[held]
    return out


@dataclass(frozen=True)
class _FullSize(_Rule):
    """Aggregate the full-size product per module into ``p.<leaf>``; subclasses choose the device
    weights and what the round's product becomes (``_fold``)."""

    leaf: ClassVar[str] = ""

    def _init(self, global_shapes: Shapes, r_max: int, rng: np.random.Generator | int) -> State:
        state = _init_factors(global_shapes, r_max, rng)
        for path in sorted(global_shapes):
            state[f"{path}.{self.leaf}"] = np.zeros(
                tuple(int(d) for d in global_shapes[path]), dtype=np.float32
            )
        return state

    def _aggregate_modules(self, out, global_state, updates, global_shapes, r_max) -> None:  # see _Rule
        weights = self._weights(updates)
        for path in _update_paths(updates, global_shapes):
            prev_a, full = _full_size_state(global_state, path, global_shapes, r_max, self.leaf)
            product = partial(_round_product, updates, path, global_shapes, weights)
            self._fold(out, path, prev_a, full, product, r_max)

    def _weights(self, updates: Sequence[DeviceUpdate]) -> list[float]:
        raise NotImplementedError

    def _fold(
        self,
        out: State,
        path: str,
        prev_a: np.ndarray | None,
        full: np.ndarray | None,
        product: Callable[[np.ndarray | None], np.ndarray],
        r_max: int,
    ) -> None:
        """Write module ``path``'s new tensors into ``out``, from the previous global A and
        ``p.<leaf>`` (None if absent) and ``product(previous)``: the round's count-normalised
        product (float64), ``previous`` where no device held an element."""
        raise NotImplementedError


@dataclass(frozen=True)
class FlexLoRARule(_FullSize):
    """FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505; alibaba/FederatedScope@FlexLoRA).

    Aggregate the full-size update, count-normalised **per (row, col) element** because with
    pruning device k holds only the block R_k × C_k of B_k A_k::

        ΔW[i, j] = Σ_k n_k [i ∈ R_k][j ∈ C_k] (B_k A_k)[i, j] / Σ_k n_k [i ∈ R_k][j ∈ C_k]

    (elements no device held keep their previous value). Stored as ``p.delta``; its rank-r_max
    truncated SVD ΔW ≈ U_r S_r V_rᵀ is stored beside it as ``p.lora_B`` / ``p.lora_A`` (derived,
    so distribution is a cheap truncation; components past min(d_out, d_in) are zero). Large
    matrices use a seeded randomized SVD, exact when rank(ΔW) ≤ r_max + 10 (see ``_top_svd``).
    Distribution to a rank-r_i device: the first r_i components, sliced to its kept rows / cols,
    so B_i A_i = ΔW[R_i, C_i] exactly when r_i ≥ rank(ΔW).

    Split of S: ``split="b"`` (default, the FlexLoRA code's ``distribute_weight_fast``):
    B = U_r S_r, A = V_rᵀ. ``split="sqrt"``: B = U_r S_r^½, A = S_r^½ V_rᵀ. We default to "b"
    because its A rows are orthonormal even where σ = 0, so a device never gets a dead rank
    component (zero row of A *and* zero column of B have zero gradient forever) when ΔW is
    rank-deficient, e.g. round one or few devices.
    """

    name: ClassVar[str] = "flexlora"
    leaf: ClassVar[str] = DELTA  # ΔW = 0 at init, with peft's factors (an SVD of 0 would give A = I rows)
    split: str = "b"

    def __post_init__(self) -> None:
        if self.split not in ("b", "sqrt"):
            raise ValueError(f"split must be 'b' or 'sqrt', got {self.split!r}")

    def _weights(self, updates: Sequence[DeviceUpdate]) -> list[float]:
        return [float(u.num_samples) for u in updates]

    def _fold(self, out, path, prev_a, full, product, r_max) -> None:  # the arguments: see _FullSize
        delta = product(full)  # elements no device held keep their previous value
        out[f"{path}.{DELTA}"] = delta.astype(np.float32)
        out[f"{path}.{LORA_B}"], out[f"{path}.{LORA_A}"] = self._factors(delta, r_max)

    def _factors(self, delta: np.ndarray, r_max: int) -> tuple[np.ndarray, np.ndarray]:
        u, s, vt = _top_svd(delta.astype(np.float64), r_max)
        k = s.size
        left, right = (s, np.ones(k)) if self.split == "b" else (np.sqrt(s), np.sqrt(s))
        b = np.zeros((delta.shape[0], r_max))
        a = np.zeros((r_max, delta.shape[1]))
        b[:, :k] = u * left
        a[:k] = right[:, None] * vt
        return b.astype(np.float32), a.astype(np.float32)


@dataclass(frozen=True)
class FLoRARule(_FullSize):
    """FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stacking, then fold into the base.

    With p_k = n_k / Σ_j n_j, stacking A = [p_1 A_1; …; p_K A_K] and B = [B_1, …, B_K] (see
    :func:`flora_stack`) gives B·A = Σ_k p_k B_k A_k exactly, for any ranks. With pruning the
    devices' blocks differ, so the round's product is count-normalised per (row, col) element::

        ΔW[i, j] = (B_stack A_stack)[i, j] / Σ_k p_k [i ∈ R_k][j ∈ C_k]    (0 where no device held it)

    which equals Σ_k p_k B_k A_k exactly when every device holds every element. FLoRA sends the
    stacked adapter down and clients merge it into their frozen base; we send the same product
    as ``base_delta``. The server keeps the cumulative base change in weight units::

        p.merged ← p.merged + scaling · ΔW

    and ``distribute`` returns ``base_delta[p] = merged[R_i, C_i]``, to be added to the
    *original* pretrained weight (cumulative, so stateless devices and resumed runs work).
    ``scaling`` is peft's alpha / r (2.0 = ``fedspine.lora.adapters.ALPHA_PER_RANK``).

    Restart: each round the adapter restarts with B = 0 (so the model is unchanged by it) and A:
    with ``rng=None`` (default) A is the previous global A, i.e. the one drawn by ``init_state``
    (peft's U(±1/√d_in) init), reused every round — deterministic and fully recorded in the
    state, so a resumed run is exact. With a ``numpy.random.Generator``, a fresh A is drawn from
    it at every ``aggregate`` (as a fresh peft init would); the caller owns that generator and
    must save its state for exact resumption. The device gets A's first r_i rows at its columns.
    """

    name: ClassVar[str] = "flora"
    leaf: ClassVar[str] = MERGED  # merged = 0 at init
    changes_base: ClassVar[bool] = True
    scaling: float = 2.0
    rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.scaling, int | float) and math.isfinite(self.scaling) and self.scaling > 0):
            raise ValueError(f"scaling must be a positive number, got {self.scaling!r}")
        if self.rng is not None and not isinstance(self.rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator or None, got {type(self.rng).__name__}")

    def _weights(self, updates: Sequence[DeviceUpdate]) -> list[float]:
        total = float(sum(u.num_samples for u in updates))
        return [u.num_samples / total for u in updates]

    def _fold(self, out, path, prev_a, full, product, r_max) -> None:  # the arguments: see _FullSize
        a_key, b_key, m_key = (f"{path}.{k}" for k in (LORA_A, LORA_B, MERGED))
        delta = product(None)  # 0 where no device held an element
        d_out, d_in = delta.shape
        base = np.zeros((d_out, d_in)) if full is None else full.astype(np.float64)
        out[m_key] = (base + self.scaling * delta).astype(np.float32)
        if self.rng is not None:
            bound = 1.0 / math.sqrt(d_in)
            out[a_key] = self.rng.uniform(-bound, bound, size=(r_max, d_in)).astype(np.float32)
        elif prev_a is None:
            raise ValueError(f"global_state has no {a_key!r} to restart from; start from init_state()")
        out[b_key] = np.zeros((d_out, r_max), dtype=np.float32)

    def distribute(
        self, global_state: Mapping[str, np.ndarray], slices: Mapping[str, SliceLike], rank: int
    ) -> Distribution:
        """Restarted adapter (B = 0, A's first ``rank`` rows) and the cumulative merged base delta."""
        base: dict[str, np.ndarray] = {}
        for key, value in global_state.items():
            path, _, leaf = key.rpartition(".")
            if leaf == MERGED:
                base[path] = take_block(value, slices, path)
        return Distribution(_adapter(global_state, slices, rank), base)


_OVERSAMPLE = 10
_POWER_ITERS = 2


def _top_svd(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading min(k, d) singular triplets of ``m`` (U (d_out, k), S (k,), Vᵀ (k, d_in)).

    Small matrices get LAPACK's full SVD. Larger ones get a randomized SVD (Halko, Martinsson &
    Tropp 2011, Alg. 4.4) with ``k + 10`` probe vectors and 2 power iterations, from a fixed seed
    so the result is a pure function of ``m``: exact (to rounding) whenever rank(m) ≤ k + 10, and a
    close approximation of the truncated SVD otherwise. A full SVD of a 4096×11008 matrix per
    module per round would take the server hours; this takes a few matrix products.
    """
    d = min(m.shape)
    width = k + _OVERSAMPLE
    if 2 * width >= d:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    probe = np.random.default_rng(0).standard_normal((m.shape[1], width))
    q = np.linalg.qr(m @ probe)[0]
    for _ in range(_POWER_ITERS):
        q = np.linalg.qr(m.T @ q)[0]
        q = np.linalg.qr(m @ q)[0]
    ub, s, vt = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vt[:k]


def _stack(
    updates: Sequence[DeviceUpdate], path: str, global_shapes: Shapes, weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacked B (d_out, Σr_k), weighted stacked A (Σr_k, d_in), and Σ_k w_k M_k (d_out, d_in)."""
    d_out, d_in = (int(d) for d in global_shapes[path])
    bs, as_ = [np.zeros((d_out, 0))], [np.zeros((0, d_in))]
    row_masks, col_masks = [np.zeros((d_out, 0))], [np.zeros((0, d_in))]
    for u, w in zip(updates, weights, strict=True):
        if f"{path}.{LORA_A}" not in u.tensors and f"{path}.{LORA_B}" not in u.tensors:
            continue
        pair = {k: u.tensors[k] for k in (f"{path}.{LORA_A}", f"{path}.{LORA_B}") if k in u.tensors}
        lifted = lift(pair, u.slices, rank=u.rank, global_shapes=global_shapes)
        bs.append(lifted.tensors[f"{path}.{LORA_B}"].astype(np.float64))
        as_.append(w * lifted.tensors[f"{path}.{LORA_A}"].astype(np.float64))
        row_masks.append(lifted.masks[f"{path}.{LORA_B}"][:, :1].astype(np.float64))
        col_masks.append(w * lifted.masks[f"{path}.{LORA_A}"][:1].astype(np.float64))
    den = np.concatenate(row_masks, axis=1) @ np.concatenate(col_masks, axis=0)  # Σ_k w_k outer(R_k, C_k)
    return np.concatenate(bs, axis=1), np.concatenate(as_, axis=0), den


def flora_stack(
    updates: Sequence[DeviceUpdate], path: str, *, global_shapes: Shapes
) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA's stacked adapter of module ``path`` in original coordinates (float64).

    Returns (B, A) with B = [B̃_1, …, B̃_K] (d_out, Σ r_k) and A = [p_1 Ã_1; …; p_K Ã_K]
    (Σ r_k, d_in), where X̃ is the device tensor lifted to original coordinates and
    p_k = n_k / Σ_j n_j, so B·A = Σ_k p_k B̃_k Ã_k exactly. Devices without ``path`` add nothing.
    """
    _check_updates(updates, max(int(u.rank) for u in updates) if updates else 1)
    if path not in global_shapes:
        raise ValueError(f"global_shapes has no entry for module {path!r}")
    total = float(sum(u.num_samples for u in updates))
    b, a, _ = _stack(updates, path, global_shapes, [u.num_samples / total for u in updates])
    return b, a


# --- registry -------------------------------------------------------------------------------------
AGGREGATORS: dict[str, Aggregator] = {
    rule.name: rule
    for rule in (ZeroPadRule(), RankAwareRule(), HetLoRARule(), FlexLoRARule(), FLoRARule(), FedSpineRule())
}


def get_aggregator(name: str, **options: Any) -> Aggregator:
    """The rule registered as ``name``, with ``options`` (its dataclass fields) replaced.

    ``get_aggregator("flora", rng=np.random.default_rng(0))``; ``get_aggregator("fedspine",
    keep_power=0.5)``. An unknown name or option raises ValueError listing the valid ones.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation rule {name!r}; valid: {', '.join(sorted(AGGREGATORS))}")
    rule = AGGREGATORS[name]
    if not options:
        return rule
    fields = {f.name for f in dataclasses.fields(rule)}  # type: ignore[arg-type]
    bad = sorted(set(options) - fields)
    if bad:
        raise ValueError(f"rule {name!r} has no option(s) {bad}; valid: {sorted(fields) or 'none'}")
    return dataclasses.replace(rule, **options)  # type: ignore[type-var]
