"""Work, payload, memory and round time of one device's round (anchors.md §e.3), numpy only.

A round on a device trains a (structurally pruned) transformer with LoRA adapters for ``steps``
steps of ``batch x seq_len`` tokens, then uploads its adapter and kept-index map. This module turns
that into FLOPs, bytes and a memory requirement (``round_work``), and those into seconds on a
``DeviceProfile`` (``round_time``). Everything is analytic and ours unless a source is named; it is
meant to rank arms and devices correctly, not to predict wall time to the percent.

**FLOPs** (per token; the standard accounting of Kaplan et al. 2020 / PaLM appendix B, as in
nanoGPT's ``estimate_mfu``). A matmul of an ``m x k`` by a ``k x n`` matrix costs ``2 m n k``
forward. Backward normally costs 2x forward (gradients of the activations and of the weights);
the base weights are frozen here, so they need only the activation gradients: **1x forward**. So

- frozen base matmuls (q/k/v/o, MLP, LM head): ``2 P`` forward + ``2 P`` backward = ``4 P`` per
  token, ``P`` the pruned weight count (anchors.md §e.3's ``4 P_base``);
- attention scores (``QK^T`` and ``softmax * V``, no weights): ``4 h hd seq`` forward per layer and
  token, 2x that backward (gradients of both operands) = ``12 h hd seq`` (PaLM's ``12 L H Q T``;
  no causal halving, as in PaLM);
- LoRA on a ``d_in -> d_out`` module: ``2 r (d_in + d_out)`` forward, 2x backward (activation and
  weight gradients) = ``6 r (d_in + d_out)``.

Norms, softmax, activations functions and the optimizer step are elementwise and left out (a few
percent at these widths). The LM head (``vocab_size x d``, tied to the embedding) is counted for
every token; ``Workload(lm_head=False)`` for a classification head (negligible FLOPs; the embedding
table still counts in memory).

**Payload**: the device uploads A (``r x d_in``) and B (``d_out x r``) of every adapted module in
its own, pruned coordinates, plus its kept-index map (one integer per kept head / KV head / MLP
channel per layer); it downloads the global adapter projected to the same kept rows / columns and
its rank. fp32 (4 bytes) by default.

**Memory** (one training step's peak, ours): base weights (``weight_dtype_bytes``, fp32 default;
embedding counted once because tied) + LoRA parameters, their gradients and AdamW's two moments
(4 fp32 copies) + activations kept for backward + the LM head's logits and their gradient (fp32,
only with ``lm_head``).
Activations per token and layer, in elements (a reading of Korthikanti et al. 2022, "Reducing
activation recomputation", §4, without dropout masks, adapted to pruned widths)::

    4 d                 norm inputs / outputs, attention input, MLP input
    + 2 (h + kv) hd     q, k, v outputs and o_proj input
    + 2 h seq           attention scores and probabilities (eager attention)
    + 2 (mlp - 1) c     MLP intermediate before / after the activation (4 c with gate and up)
    + r * modules       LoRA ``x A`` outputs

For an unpruned BERT layer (``d = h hd``, ``c = 4 d``) this is ``16 d + 2 h seq``, close to
Korthikanti's ``34 sbh + 5 a s^2 b`` bytes at 2 bytes per element. A device whose requirement
exceeds ``DeviceProfile.memory_bytes`` fails the round.

**Time**: ``compute_s = flops / effective_flops_per_s``, ``comm_s = up / up_bw + down / down_bw``,
``total_s = (compute_s + comm_s) * LogNormal(0, jitter_sigma)``; a measured wall time replaces the
model (same call, no jitter drawn). Energy is ``power_w * total_s`` (the module draws its training
power for the whole round; ours, an upper bound while the radio works).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedspine.fl.devices import DeviceProfile
from fedspine.pruning.index_map import ROLES, ArchShape, KeptIndexMap, plan_kept_counts

Counts = int | Sequence[int] | np.ndarray


# --- plain records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """Bytes a device sends (``up_bytes``) and receives (``down_bytes``) in one round."""

    up_bytes: int
    down_bytes: int


@dataclass(frozen=True)
class RoundWork:
    """What one round asks of a device: FLOPs, bytes each way and peak memory.

    Built by ``round_work`` / ``round_work_for_map``, or directly from measured counts.
    """

    flops: float
    up_bytes: float
    down_bytes: float
    memory_bytes: float

    def __post_init__(self) -> None:
        for name in ("flops", "up_bytes", "down_bytes", "memory_bytes"):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            if not ok:
                raise ValueError(f"RoundWork.{name} must be a finite real number >= 0, got {v!r}")


@dataclass(frozen=True)
class RoundTiming:
    """One device's round.

    Modelled: ``compute_s`` and ``comm_s`` are noise-free, ``total_s`` includes the jitter.
    Measured (``measured=True``): ``total_s`` is the wall time given, the split is unknown (NaN).
    Failed (``failed=True``, e.g. out of memory): all times are NaN and ``energy_j`` is 0; what a
    failure costs the round (its deadline, a timeout) is the simulator's decision.
    """

    compute_s: float
    comm_s: float
    total_s: float
    failed: bool
    reason: str
    energy_j: float
    measured: bool = False


# --- validation helpers --------------------------------------------------------------------------
def _pos_int(name: str, v: Any, *, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} integer, got {v!r}")
    return int(v)


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


def _per_layer(name: str, v: Counts, layers: int, bound: int) -> np.ndarray:
    arr = np.asarray(v)
    if arr.ndim == 0:
        arr = np.full(layers, arr)
    if arr.shape != (layers,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer or {layers} per-layer integers, got {v!r}")
    if arr.min() < 1 or arr.max() > bound:
        raise ValueError(f"{name} must be in [1, {bound}] in every layer, got {v!r}")
    return arr.astype(np.int64)


def _modules(lora_modules: Iterable[str]) -> tuple[str, ...]:
    mods = tuple(lora_modules)
    unknown = sorted(set(mods) - set(ROLES))
    if not mods or unknown or len(set(mods)) != len(mods):
        raise ValueError(f"lora_modules must be distinct names among {ROLES}, got {mods!r}")
    return mods


def _mlp(mlp_matrices: Any) -> int:
    if mlp_matrices not in (2, 3) or isinstance(mlp_matrices, bool):
        raise ValueError(
            f"mlp_matrices must be 2 (BERT: in, out) or 3 (LLaMA: gate, up, down), got {mlp_matrices!r}"
        )
    return int(mlp_matrices)


@dataclass(frozen=True)
class Workload:
    """What one round's work depends on besides the kept widths: the adapter (``lora_rank``,
    ``lora_modules``), the local training (``steps`` of ``batch x seq_len`` tokens), the model
    (``vocab_size``, ``mlp_matrices``: 2 BERT, 3 LLaMA; ``lm_head``: a vocabulary-sized output
    layer, False for a classification head) and the byte widths on the wire and in memory.

    Validated once, here (an error names the field); integers are stored as plain ``int``.
    ``steps`` counts in the FLOPs only (memory is one step's peak); ``vocab_size`` may be 0.
    """

    lora_rank: int
    steps: int
    batch: int
    seq_len: int
    vocab_size: int
    mlp_matrices: int
    lm_head: bool = True
    lora_modules: tuple[str, ...] = ROLES
    adapter_dtype_bytes: int = 4
    index_dtype_bytes: int = 4
    weight_dtype_bytes: int = 4
    act_dtype_bytes: int = 4

    def __post_init__(self) -> None:
        ints = ("lora_rank", "steps", "batch", "seq_len", "vocab_size")
        ints += ("adapter_dtype_bytes", "index_dtype_bytes", "weight_dtype_bytes", "act_dtype_bytes")
        for name in ints:
            value = _pos_int(name, getattr(self, name), allow_zero=name == "vocab_size")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "mlp_matrices", _mlp(self.mlp_matrices))
        object.__setattr__(self, "lora_modules", _modules(self.lora_modules))
        _flag("lm_head", self.lm_head)


@dataclass(frozen=True)
class _Widths:
    """Per-layer kept widths as int64 arrays."""

    d: int
    hd: int
    h: np.ndarray
    kv: np.ndarray
    c: np.ndarray
    mlp: int

    def module_dims(self, role: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(d_in, d_out) per layer of each Linear that plays ``role`` (mlp_in: gate and up for LLaMA)."""
        d = np.full_like(self.h, self.d)
        q, kv = self.h * self.hd, self.kv * self.hd
        return {
            "q": [(d, q)],
            "k": [(d, kv)],
            "v": [(d, kv)],
            "o": [(q, d)],
            "mlp_in": [(d, self.c)] * (self.mlp - 1),
            "mlp_out": [(self.c, d)],
        }[role]

    def base_params(self) -> np.ndarray:
        """Prunable (attention + MLP) weights per layer."""
        return self.d * self.hd * (2 * self.h + 2 * self.kv) + self.mlp * self.d * self.c

    def lora_widths(self, mods: tuple[str, ...]) -> np.ndarray:
        """Sum of (d_in + d_out) over adapted Linears, per layer (LoRA params = rank x this)."""
        return sum((di + do for m in mods for di, do in self.module_dims(m)), np.zeros_like(self.h))

    def lora_count(self, mods: tuple[str, ...]) -> int:
        return sum(len(self.module_dims(m)) for m in mods)


def _widths(
    shape: ArchShape, kept_heads: Counts, kept_kv_heads: Counts, kept_channels: Counts, mlp_matrices: int
) -> _Widths:
    if not isinstance(shape, ArchShape):
        raise ValueError(f"shape must be an ArchShape, got {type(shape).__name__}")
    L = shape.num_layers
    return _Widths(
        d=shape.hidden_size,
        hd=shape.head_dim,
        h=_per_layer("kept_heads", kept_heads, L, shape.num_heads),
        kv=_per_layer("kept_kv_heads", kept_kv_heads, L, shape.num_kv_heads),
        c=_per_layer("kept_channels", kept_channels, L, shape.intermediate_size),
        mlp=_mlp(mlp_matrices),
    )


# --- counts --------------------------------------------------------------------------------------
def layer_counts(kept_map: KeptIndexMap) -> dict[str, np.ndarray]:
    """Per-layer kept heads / KV heads / channels of a map, as keyword arguments for this module's
    functions: ``train_flops(km.shape, workload, **layer_counts(km))``."""
    return {
        "kept_heads": np.array([len(lk.heads) for lk in kept_map.layers], dtype=np.int64),
        "kept_kv_heads": np.array([len(lk.kv_heads) for lk in kept_map.layers], dtype=np.int64),
        "kept_channels": np.array([len(lk.channels) for lk in kept_map.layers], dtype=np.int64),
    }


def kept_counts(shape: ArchShape, ratio: float, *, mlp_matrices: int, round_to: int = 8) -> dict[str, int]:
    """Heads / KV heads / channels every layer keeps when an *unpruned* model is pruned to ``ratio``.

    The pruner's own rule (:func:`fedspine.pruning.index_map.plan_kept_counts`, numpy only), so the
    server prices an arm exactly as the device will prune it.
    """
    ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0.0 <= ratio < 1.0
    if not ok:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    round_to = _pos_int("round_to", round_to)
    mlp = _mlp(mlp_matrices)
    heads, chans = plan_kept_counts(
        KeptIndexMap.full(shape), float(ratio), round_to=round_to, mlp_matrices=mlp
    )
    return {"kept_heads": heads, "kept_kv_heads": heads // shape.group_size, "kept_channels": chans}


def train_flops(
    shape: ArchShape, workload: Workload, *, kept_heads: Counts, kept_kv_heads: Counts, kept_channels: Counts
) -> float:
    """Forward + backward FLOPs of ``workload.steps`` LoRA training steps on the pruned model (see
    the module docstring: 4 P per token for frozen weights, 12 h hd seq for attention,
    6 r (d_in + d_out) per adapted Linear)."""
    w = _widths(shape, kept_heads, kept_kv_heads, kept_channels, workload.mlp_matrices)
    r, seq = workload.lora_rank, workload.seq_len
    tokens = workload.steps * workload.batch * seq
    per_token = (
        4 * (int(w.base_params().sum()) + (w.d * workload.vocab_size if workload.lm_head else 0))
        + 12 * int(w.h.sum()) * w.hd * seq
        + 6 * r * int(w.lora_widths(workload.lora_modules).sum())
    )
    return float(tokens * per_token)


def payload_bytes(
    shape: ArchShape, workload: Workload, *, kept_heads: Counts, kept_kv_heads: Counts, kept_channels: Counts
) -> Payload:
    """Adapter bytes at the device's rank and kept widths, each way; the kept-index map (one
    ``index_dtype_bytes`` integer per kept head, KV head and channel, every layer) goes up only."""
    w = _widths(shape, kept_heads, kept_kv_heads, kept_channels, workload.mlp_matrices)
    widths = int(w.lora_widths(workload.lora_modules).sum())
    adapter = workload.lora_rank * widths * workload.adapter_dtype_bytes
    index = int((w.h + w.kv + w.c).sum()) * workload.index_dtype_bytes
    return Payload(up_bytes=adapter + index, down_bytes=adapter)


def memory_bytes(
    shape: ArchShape, workload: Workload, *, kept_heads: Counts, kept_kv_heads: Counts, kept_channels: Counts
) -> int:
    """Peak training memory of one step (``workload.steps`` does not count): weights + LoRA state
    (x4: params, grads, AdamW m and v, fp32) + activations + logits (see the module docstring for
    the activation factor)."""
    w = _widths(shape, kept_heads, kept_kv_heads, kept_channels, workload.mlp_matrices)
    r, mods, vocab = workload.lora_rank, workload.lora_modules, workload.vocab_size
    b, s = workload.batch, workload.seq_len
    weights = (int(w.base_params().sum()) + vocab * w.d) * workload.weight_dtype_bytes
    lora = 4 * r * int(w.lora_widths(mods).sum()) * 4
    act_per_token = (
        4 * w.d * shape.num_layers
        + 2 * int((w.h + w.kv).sum()) * w.hd
        + 2 * int(w.h.sum()) * s
        + 2 * (w.mlp - 1) * int(w.c.sum())
        + r * w.lora_count(mods) * shape.num_layers
    )
    acts = b * s * act_per_token * workload.act_dtype_bytes
    logits = 2 * b * s * vocab * 4 if workload.lm_head else 0
    return weights + lora + acts + logits


def round_work(
    shape: ArchShape, workload: Workload, *, kept_heads: Counts, kept_kv_heads: Counts, kept_channels: Counts
) -> RoundWork:
    """FLOPs, payload and memory of one round, in one record for ``round_time``."""
    kept = {"kept_heads": kept_heads, "kept_kv_heads": kept_kv_heads, "kept_channels": kept_channels}
    flops = train_flops(shape, workload, **kept)
    pay = payload_bytes(shape, workload, **kept)
    mem = memory_bytes(shape, workload, **kept)
    return RoundWork(flops=flops, up_bytes=pay.up_bytes, down_bytes=pay.down_bytes, memory_bytes=mem)


def round_work_for_map(kept_map: KeptIndexMap, workload: Workload) -> RoundWork:
    """``round_work`` for the model a ``KeptIndexMap`` describes (per-layer kept counts)."""
    return round_work(kept_map.shape, workload, **layer_counts(kept_map))


def round_work_for_ratio(
    shape: ArchShape, ratio: float, workload: Workload, *, round_to: int = 8
) -> RoundWork:
    """``round_work`` for an unpruned model pruned to ``ratio`` (see ``kept_counts``)."""
    counts = kept_counts(shape, ratio, mlp_matrices=workload.mlp_matrices, round_to=round_to)
    return round_work(shape, workload, **counts)


# --- time ----------------------------------------------------------------------------------------
def expected_round_time_s(profile: DeviceProfile, work: RoundWork) -> tuple[float, float]:
    """Noise-free (compute_s, comm_s) of ``work`` on ``profile``."""
    compute_s = work.flops / profile.effective_flops_per_s
    comm_s = work.up_bytes / profile.up_bytes_per_s + work.down_bytes / profile.down_bytes_per_s
    return compute_s, comm_s


def fits(profile: DeviceProfile, work: RoundWork) -> bool:
    """Whether the round's modelled memory fits the device."""
    return work.memory_bytes <= profile.memory_bytes


def round_time(
    profile: DeviceProfile,
    work: RoundWork,
    rng: np.random.Generator,
    *,
    measured_s: float | None = None,
) -> RoundTiming:
    """One round of ``work`` on ``profile``.

    Modelled (``measured_s is None``): exactly one log-normal jitter factor is drawn from ``rng``,
    even when the round fails for memory, so a device's failure never shifts the random stream of
    the devices after it. Measured (real devices): ``measured_s`` is the wall time, nothing is
    drawn and no memory check is made (the device ran).
    """
    if measured_s is not None:
        ok = isinstance(measured_s, numbers.Real) and not isinstance(measured_s, bool)
        if not ok or not math.isfinite(measured_s) or measured_s < 0:
            raise ValueError(f"measured_s must be a finite number of seconds >= 0, got {measured_s!r}")
        t = float(measured_s)
        return RoundTiming(math.nan, math.nan, t, False, "", profile.power_w * t, measured=True)
    factor = float(rng.lognormal(0.0, profile.jitter_sigma))
    if not fits(profile, work):
        reason = (
            f"out of memory: needs {work.memory_bytes / 2**30:.2f} GiB, "
            f"{profile.name} has {profile.memory_bytes / 2**30:.2f} GiB"
        )
        return RoundTiming(math.nan, math.nan, math.nan, True, reason, 0.0)
    compute_s, comm_s = expected_round_time_s(profile, work)
    total_s = (compute_s + comm_s) * factor
    return RoundTiming(compute_s, comm_s, total_s, False, "", profile.power_w * total_s)
