"""Kept-index maps: which heads and MLP channels of the *original* model a pruned model still has.

The server aggregates LoRA updates from devices that kept different channels, so every device
reports, per layer, the original indices of the units it kept. Maps compose across repeated
prunes (each prune picks positions among the units still present) and serialise to plain JSON.
This module is pure Python + numpy: the server needs it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ArchShape:
    """Sizes of the original, unpruned model (the global coordinate system)."""

    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; == num_heads without grouped-query attention
    head_dim: int
    intermediate_size: int
    hidden_size: int

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "hidden_size",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ArchShape.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ArchShape.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ModuleSlice:
    """Original indices of the output rows / input columns a pruned Linear still has.

    ``None`` means that side is never pruned (e.g. the hidden-size inputs of q_proj). Adapters
    trained on the pruned model scatter into original coordinates with ``W[out_idx][:, in_idx]``.
    """

    out_idx: np.ndarray | None
    in_idx: np.ndarray | None


# Which KeptIndexMap index set each role's rows / columns follow (ours; the roles are the same for
# every family: see fedspine.pruning.arch for the module paths).
ROLES: tuple[str, ...] = ("q", "k", "v", "o", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class LayerKept:
    """Original indices of the units one layer still has, sorted ascending."""

    heads: tuple[int, ...]  # query heads
    kv_heads: tuple[int, ...]  # key/value heads
    channels: tuple[int, ...]  # MLP intermediate channels


@dataclass(frozen=True)
class KeptIndexMap:
    """Per layer, the original heads / KV heads / MLP channels that survive pruning."""

    shape: ArchShape
    layers: tuple[LayerKept, ...]

    def __post_init__(self) -> None:
        s = self.shape
        if len(self.layers) != s.num_layers:
            raise ValueError(f"expected {s.num_layers} layers, got {len(self.layers)}")
        for i, layer in enumerate(self.layers):
            for name, values, bound in (
                ("heads", layer.heads, s.num_heads),
                ("kv_heads", layer.kv_heads, s.num_kv_heads),
                ("channels", layer.channels, s.intermediate_size),
            ):
                if not values:
                    raise ValueError(f"layer {i}: no {name} left (at least one must be kept)")
                if list(values) != sorted(set(values)) or values[0] < 0 or values[-1] >= bound:
                    raise ValueError(
                        f"layer {i}: {name} must be distinct, sorted and in [0, {bound}), got {values}"
                    )
            # A query head needs its key/value head: query head h reads kv head h // group_size.
            needed = sorted({h // s.group_size for h in layer.heads})
            if needed != list(layer.kv_heads):
                raise ValueError(
                    f"layer {i}: kv_heads {layer.kv_heads} do not match the query heads' groups {needed}"
                )

    @classmethod
    def full(cls, shape: ArchShape) -> KeptIndexMap:
        """Nothing pruned yet."""
        layer = LayerKept(
            tuple(range(shape.num_heads)),
            tuple(range(shape.num_kv_heads)),
            tuple(range(shape.intermediate_size)),
        )
        return cls(shape, (layer,) * shape.num_layers)

    def compose(self, positions: Sequence[tuple[Sequence[int], Sequence[int]]]) -> KeptIndexMap:
        """The map after a further prune that kept, per layer, the query heads and channels at
        ``positions[layer] = (head_positions, channel_positions)`` of the *current* model.

        KV heads follow the kept query heads (a KV head survives while any of its query heads
        does), so grouped-query models stay consistent.
        """
        if len(positions) != len(self.layers):
            raise ValueError(
                f"positions must have one entry per layer ({len(self.layers)}), got {len(positions)}"
            )
        new = []
        for i, (layer, (head_pos, chan_pos)) in enumerate(zip(self.layers, positions, strict=True)):
            heads = _take(layer.heads, head_pos, f"layer {i} head positions")
            channels = _take(layer.channels, chan_pos, f"layer {i} channel positions")
            kv = tuple(sorted({h // self.shape.group_size for h in heads}))
            new.append(LayerKept(heads, kv, channels))
        return KeptIndexMap(self.shape, tuple(new))

    # --- original coordinates of kept rows/columns ----------------------------------------------
    def head_rows(self, layer: int) -> np.ndarray:
        """Original row indices of q_proj (and columns of o_proj) that survive."""
        return _expand(self.layers[layer].heads, self.shape.head_dim)

    def kv_rows(self, layer: int) -> np.ndarray:
        """Original row indices of k_proj / v_proj that survive."""
        return _expand(self.layers[layer].kv_heads, self.shape.head_dim)

    def channel_idx(self, layer: int) -> np.ndarray:
        """Original MLP intermediate channels that survive (rows of up/gate, columns of down)."""
        return np.asarray(self.layers[layer].channels, dtype=np.int64)

    def role_slices(self, layer: int) -> dict[str, ModuleSlice]:
        """Per role (see ``ROLES``), the original rows / columns kept in ``layer``.

        ``mlp_in`` covers every MLP input matrix (BERT ``intermediate.dense``; LLaMA gate and up).
        """
        heads, kv, chans = self.head_rows(layer), self.kv_rows(layer), self.channel_idx(layer)
        return {
            "q": ModuleSlice(heads, None),
            "k": ModuleSlice(kv, None),
            "v": ModuleSlice(kv, None),
            "o": ModuleSlice(None, heads),
            "mlp_in": ModuleSlice(chans, None),
            "mlp_out": ModuleSlice(None, chans),
        }

    def sparsity(self, mlp_matrices: int) -> float:
        """Fraction of the prunable weights (q/k/v/o and the MLP matrices) removed.

        ``mlp_matrices`` is 2 for BERT (in, out) and 3 for LLaMA (gate, up, down). Embeddings,
        norms and heads are not prunable here, so this is the structured-pruning ratio proper.
        """
        s = self.shape
        hd = s.hidden_size * s.head_dim
        total = s.num_layers * (
            2 * s.num_heads * hd
            + 2 * s.num_kv_heads * hd
            + mlp_matrices * s.hidden_size * s.intermediate_size
        )
        kept = sum(
            2 * len(lk.heads) * hd
            + 2 * len(lk.kv_heads) * hd
            + mlp_matrices * s.hidden_size * len(lk.channels)
            for lk in self.layers
        )
        return 1.0 - kept / total

    # --- serialisation ---------------------------------------------------------------------------
    def first_mismatch(self, shape: ArchShape) -> int | None:
        """The first layer whose kept heads / KV heads / channels are not ``shape``'s per-layer
        sizes (None: the map describes a model of that shape, e.g. the one it was pruned to)."""
        want = (shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
        for i, lk in enumerate(self.layers):
            if (len(lk.heads), len(lk.kv_heads), len(lk.channels)) != want:
                return i
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape.__dict__.copy(),
            "layers": [
                {"heads": list(lk.heads), "kv_heads": list(lk.kv_heads), "channels": list(lk.channels)}
                for lk in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> KeptIndexMap:
        shape = ArchShape(**state["shape"])
        layers = tuple(
            LayerKept(tuple(lk["heads"]), tuple(lk["kv_heads"]), tuple(lk["channels"]))
            for lk in state["layers"]
        )
        return cls(shape, layers)


def _take(current: tuple[int, ...], positions: Sequence[int], what: str) -> tuple[int, ...]:
    pos = sorted(int(p) for p in positions)
    if len(set(pos)) != len(pos) or not pos or pos[0] < 0 or pos[-1] >= len(current):
        raise ValueError(
            f"{what} must be distinct, non-empty and in [0, {len(current)}), got {list(positions)}"
        )
    return tuple(current[p] for p in pos)


def _expand(units: Sequence[int], width: int) -> np.ndarray:
    u = np.asarray(units, dtype=np.int64)
    return (u[:, None] * width + np.arange(width)[None, :]).reshape(-1)


def plan_kept_counts(
    kept: KeptIndexMap, ratio: float, *, round_to: int, mlp_matrices: int
) -> tuple[int, int]:
    """(query heads, MLP channels) every layer keeps so that the sparsity against the *original*
    model is close to ``ratio``. The one source of this rule: the pruner uses it to prune, the
    server's time model (no torch) to price an arm.

    Our rule: heads lose the same fraction as the whole, rounded to whole KV groups (at least one);
    MLP channels then absorb the rounding error, rounded to a multiple of ``round_to`` (at least
    ``round_to``). Counts never exceed what ``kept`` still has, so a ratio below the current one
    keeps everything.
    """
    s = kept.shape
    g = s.group_size
    cap_units = min(len(lk.heads) for lk in kept.layers) // g
    cap_chans = min(len(lk.channels) for lk in kept.layers)
    units = min(cap_units, max(1, math.floor((1.0 - ratio) * s.num_kv_heads + 0.5)))
    heads = units * g

    def attn(h: int) -> int:  # prunable attention weights per layer with h query heads
        return (2 * h + 2 * (h // g)) * s.hidden_size * s.head_dim

    per_channel = mlp_matrices * s.hidden_size
    total = attn(s.num_heads) + per_channel * s.intermediate_size
    need = ((1.0 - ratio) * total - attn(heads)) / per_channel
    chans = round_to * math.floor(need / round_to + 0.5)
    return heads, min(cap_chans, max(min(round_to, cap_chans), chans))
