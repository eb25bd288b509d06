"""Train the devices of a round together: one shared frozen base, each device's pruning as masks.

Why: at batch 16 one device's step is too small for the matmul units (AMX, a GPU), and Python,
peft's wrappers and small kernels dominate it. Here the frozen base runs once per step on the
concatenated batches of K devices.

How (ours):

- **Pruning is a mask.** Device d's removed heads are zeroed at the input of its attention
  output projection, its removed MLP channels at the input of its MLP output projection. That
  is what removing them computes: a head's scores never leave the head, a channel's activation
  feeds only the output projection. The physically pruned model (``fedspine.fl.client``) stays
  the deployment path and the reference; a device's pruned model is rebuilt from its kept map
  when one is asked for.
- **LoRA at full width.** Device d's factors sit in ``A (K, R, in)`` / ``B (K, out, R)``, R the
  group's largest rank, zero outside its kept rows/columns and beyond its rank; those zeros get
  zero gradients, so they stay zero. The update runs as two batched matmuls per module; the
  scaling is the same for every rank (``ALPHA_PER_RANK``).
- **Real tokens only** (``PACKING``: the BERT- and LLaMA-family heads). The token-wise work (every Linear,
  norm, activation, dropout and LoRA) runs on the packed real tokens of the K devices, each
  device's block padded only to the group's largest real-token count, not every sequence to
  the batch's width. Attention scatters the tokens back to the padded layout and runs there; the
  classification head reads each sequence's pooled token and the LM head only the labelled
  positions. Other models run padded, through HF's own forward.
- **Everything else per device**: AdamW moments and step counts (a prune resets the device's,
  as a new optimizer does), the LoRA-gradient importance from its own factors, and
  ``plan_counts`` / ``select_units`` as in ``PruneAndTune``, so each device's prune decisions
  are its own. Its batches come from its own generator, as on the per-device path.

What is equal to the per-device path, and how closely (``tests/fl/test_batched.py``): in fp32
with dropout off, the same kept maps and arms, and adapters and probe losses equal up to float
summation order (tested to 1e-4 relative). With dropout on, each device's dropout masks are
drawn from this runner's own stream, seeded per (seed, round, group), so trajectories agree in
distribution only. bf16 (``train.precision``) computes the base's matmuls in bf16; adapters,
gradients and optimizer moments stay fp32. Work is that of the unpruned model for every
device (the masked units are still computed), which the modelled clock does not see: it prices
the model each device really kept.

Not batched (they run on the per-device path, ``client_step``): importance criteria other than
``lora_gradient`` (they score the plain pruned model), devices with a base delta (FLoRA-style
rules change each device's base), and families without a mask recipe.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedspine.config import ClientConfig
from fedspine.fl.client import Batch, LocalData, LocalState, client_step, step_seed, update_norm
from fedspine.fl.messages import TrainIns, TrainRes
from fedspine.fl.placement import resolve_device, resolve_precision
from fedspine.lora.adapters import ALPHA_PER_RANK
from fedspine.lora.coords import LORA_A, LORA_B, split_key
from fedspine.pruning.arch import Family
from fedspine.pruning.index_map import KeptIndexMap
from fedspine.pruning.iterative import LORA_GRADIENT, UNIT_AXIS, round_interval, round_targets
from fedspine.pruning.lora_grad import LoRAGradientImportance, lora_element_scores
from fedspine.pruning.structured import UnitScores, plan_counts, select_units

# Where each family's MLP activation lives, relative to a layer: the channel mask is applied to
# its output (for LLaMA act(gate) * up, zeroing act(gate) zeroes the product, and up's removed
# rows get zero gradients just the same). Keyed by ``Family.name``, so every model type of a
# family in ``fedspine.pruning.arch.FAMILIES`` batches (RoBERTa as BERT; Qwen2, Qwen3, Mistral
# as LLaMA; tests/fl/test_batched.py checks each against the per-device path).
_ACTIVATION = {"bert": ("intermediate", "intermediate_act_fn"), "llama": ("mlp", "act_fn")}
BATCHED_FAMILIES = ("bert", "llama")
# Models whose forward runs packed (real tokens only; the others run padded): the kind of head
PACKING = {
    "BertForSequenceClassification": "bert",
    "RobertaForSequenceClassification": "roberta",
    **{f"{m}ForSequenceClassification": "llama" for m in ("Llama", "Qwen2", "Qwen3", "Mistral")},
    **{f"{m}ForCausalLM": "causal-lm" for m in ("Llama", "Qwen2", "Qwen3", "Mistral")},
}
ATTENTION = "fedspine_batched"  # the attention function of the shared base (dropout from our stream)


def batchable(ins: TrainIns, applied: Mapping[str, np.ndarray], family: Family) -> str:
    """Why this device's round cannot run batched ("" when it can)."""
    if ins.config.importance != LORA_GRADIENT:
        return f"importance {ins.config.importance!r} scores the plain pruned model"
    if ins.base_delta or applied:
        return "a base delta makes its base its own"
    if family.name not in BATCHED_FAMILIES:
        return f"family {family.name!r} has no mask recipe"
    return ""


# --- fast dropout ---------------------------------------------------------------------------------
_U15 = 1 << 15


def _keep_mask(
    shape: torch.Size, p: float, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, float]:
    """A Bernoulli keep-mask from 15 random bits per element (four per random int64: several
    times faster than ``bernoulli_`` on a CPU). The drop probability is ``round(p * 2^15) / 2^15``
    (0.100006 for 0.1); the kept values are scaled by the exact inverse keep probability."""
    n = int(np.prod(shape))
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(generator=gen)
    bits = words.view(torch.int16)[:n].view(shape) & (_U15 - 1)
    threshold = round(p * _U15)
    return bits >= threshold, _U15 / (_U15 - threshold)


class _MaskedActivation(nn.Module):
    """The MLP activation times the devices' channel masks."""

    def __init__(self, act: nn.Module, layer: int, owner: BatchedTrainer):
        super().__init__()
        self.act, self.layer, self._owner = act, layer, [owner]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ps = self._owner[0]._pass
        y = self.act(x)
        if ps is not None:
            y = (y.reshape(ps.k, -1, y.shape[-1]) * ps.channel_masks[self.layer]).reshape(y.shape)
        return y


class _Dropout(nn.Module):
    """``nn.Dropout`` drawing from the runner's generator."""

    def __init__(self, p: float, owner: BatchedTrainer):
        super().__init__()
        self.p, self._owner = p, [owner]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(x, self.p, self.training, self._owner[0].dropout_gen)


def _dropout(x: torch.Tensor, p: float, training: bool, gen: torch.Generator | None) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    keep, scale = _keep_mask(x.shape, p, gen, x.device)
    return x * keep * scale


# --- packed tokens: the base runs on real tokens only --------------------------------------------
@dataclass
class _Packed:
    """Where the real tokens of a padded batch of K device blocks sit in the packed layout.

    Packed: device i's real tokens in row-major order, then filler up to ``per_device`` (the
    largest real-token count of the K), so every token-wise op still sees K equal blocks
    (the LoRA and mask hooks reshape to ``(K, -1, width)``). Attention scatters the packed
    tokens back to the padded ``(rows, width)`` layout, runs there, and gathers them again.
    """

    ids: torch.Tensor  # (K * per_device,) token ids (pad for filler)
    positions: torch.Tensor  # (K * per_device,) position of each token in its sequence
    to_padded: torch.Tensor  # (K * per_device,) index into the flat padded layout; filler -> trash
    key_valid: torch.Tensor  # (rows_total, width) bool: the keys a query may attend to
    rows_total: int
    width: int
    per_device: int

    def to(self, device: torch.device) -> _Packed:
        return _Packed(
            self.ids.to(device),
            self.positions.to(device),
            self.to_padded.to(device),
            self.key_valid.to(device),
            self.rows_total,
            self.width,
            self.per_device,
        )

    @property
    def trash(self) -> int:
        return self.rows_total * self.width

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``(N, H, d)`` -> padded ``(rows_total, H, width, d)`` (zeros where no token)."""
        buf = x.new_zeros(self.trash + 1, *x.shape[1:]).index_copy(0, self.to_padded, x)
        return buf[: self.trash].view(self.rows_total, self.width, *x.shape[1:]).transpose(1, 2)

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """Padded ``(rows_total, H, width, d)`` -> packed ``(N, H, d)`` (filler reads zeros)."""
        flat = y.transpose(1, 2).reshape(self.trash, *y.shape[1:2], y.shape[-1])
        return torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])]).index_select(0, self.to_padded)

    def rows_of(self, padded_index: torch.Tensor) -> torch.Tensor:
        """Packed rows of the given flat padded positions (the trash row, -> zeros, where absent)."""
        lookup = torch.full((self.trash + 1,), self.ids.numel(), dtype=torch.int64, device=self.ids.device)
        lookup[self.to_padded] = torch.arange(self.ids.numel(), device=self.ids.device)
        return lookup[padded_index]


def _pack(
    ids: torch.Tensor,
    mask: torch.Tensor,
    sizes: list[int],
    pad_id: int,
    positions: torch.Tensor | None = None,
) -> _Packed:
    """The packed layout of a concatenated ``(K * rows, width)`` batch; only the first
    ``sizes[i]`` rows of device i's block are real. ``positions`` (same shape) are the position
    ids the model would give each token (default: its index in the row)."""
    k = len(sizes)
    rows = ids.shape[0] // k
    width = ids.shape[1]
    real = mask.view(k, rows, width).clone().bool()
    for i, n in enumerate(sizes):
        real[i, n:] = False
    flat = real.view(k, -1)
    counts = flat.sum(1)
    per = max(1, int(counts.max()))
    to_padded = torch.full((k, per), k * rows * width, dtype=torch.int64)
    for i in range(k):
        where = torch.nonzero(flat[i]).view(-1)
        to_padded[i, : where.numel()] = where + i * rows * width
    to_padded = to_padded.view(-1)
    ids_ext = torch.cat([ids.reshape(-1), torch.full((1,), pad_id, dtype=ids.dtype)])
    pos = torch.arange(width).repeat(k * rows) if positions is None else positions.reshape(-1)
    pos_ext = torch.cat([pos, torch.zeros(1, dtype=pos.dtype)])
    key_valid = real.view(k * rows, width).clone()
    key_valid[:, 0] = True  # a row without tokens attends to its first slot: no all-masked softmax
    return _Packed(ids_ext[to_padded], pos_ext[to_padded], to_padded, key_valid, k * rows, width, per)


_GEN: list[torch.Generator | None] = [None]  # the attention function's stream (set per pass)
_PACKED: list[_Packed | None] = [None]  # the packed layout of the forward running now, if any


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, except with dropout: then the math path with our dropout on the probabilities.

    In a packed forward (``_PACKED``) the tokens come packed as ``(1, H, N, d)``: they are
    scattered to the padded layout, attend there under the padding (and causal) mask, and are
    gathered back; the mask HF built is not used (our mask function gives none)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    packed = _PACKED[0]
    if packed is None and dropout == 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    causal = bool(getattr(module, "is_causal", False))
    if causal and dropout != 0.0:
        raise ValueError("attention dropout in a causal model is not supported by the batched runner")
    if packed is not None:
        query, key, value = (packed.scatter(t[0].transpose(0, 1)) for t in (query, key, value))
        valid = packed.key_valid[:, None, None, :]
        if causal:
            at = torch.arange(packed.width, device=valid.device)
            behind = at[:, None] - at[None, :]  # query position - key position
            window = kwargs.get("sliding_window")
            valid = valid & ((behind >= 0) if window is None else ((behind >= 0) & (behind < window)))
        attention_mask = valid
    rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, rep), repeat_kv(value, rep)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if dropout == 0.0:
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale
        )
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = _dropout(probs, dropout, True, _GEN[0])
        out = torch.matmul(probs, value)
    if packed is not None:
        return packed.gather(out)[None], None
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, **kwargs):
    """HF's SDPA mask, or none in a packed forward (the attention builds its own)."""
    from transformers.masking_utils import sdpa_mask

    return None if _PACKED[0] is not None else sdpa_mask(*args, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, _mask)


# --- one pass: the state of the K devices trained together ---------------------------------------
@dataclass
class _Device:
    ins: TrainIns
    data: LocalData
    kept: KeptIndexMap
    targets: list[float]  # the round's prune targets (cubic schedule)
    scored: bool  # whether any target can change what it keeps (else importance is never read)
    batches: Iterator[Batch] | None = None
    prunes: int = 0  # prune events passed
    pruned: int = 0  # prunes that changed the model
    loss_before: float = 0.0


@dataclass
class _Pass:
    k: int
    rows: int  # rows per device in the current concatenated batch (set by _concat)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (A (K,R,in), B (K,out,R)) leaves
    heads: dict[str, torch.Tensor]  # head param name -> (K, ...) leaf
    masks: dict[str, torch.Tensor]  # attention output projection's path -> (K, 1, in) head mask
    channel_masks: list[torch.Tensor]  # per layer, (K, 1, intermediate) channel mask
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> (K, units-axis width)
    fresh: torch.Tensor | None = None  # (K,) bool: the device's EMA restarts at the next step
    packed: _Packed | None = None  # the current batch's packed layout (set by _concat when packing)


class BatchedTrainer:
    """The batched local training of one process: a shared base with our hooks, and the math.

    ``train(jobs)`` runs one round for several devices (``(TrainIns, kept map, LocalData)``)
    that share a ``ClientConfig`` and returns a ``TrainRes`` and new kept map for each.
    """

    def __init__(self, model0: nn.Module, family: Family, cfg: ClientConfig):
        import copy

        self.family = family
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        base = copy.deepcopy(model0).to(self.device)
        for p in base.parameters():
            p.requires_grad_(False)
        _register_attention()
        base.config._attn_implementation = ATTENTION
        for mod in list(base.modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, nn.Dropout):
                    setattr(mod, child_name, _Dropout(child.p, self))
        self.dropout_gen: torch.Generator | None = None
        self.base = base
        self.num_layers = len(family.layers(base))
        self.paths = {
            i: {role: paths for role, paths in family.module_paths(base, i).items()}
            for i in range(self.num_layers)
        }
        self.role_of = {p: (i, role) for i, rp in self.paths.items() for role, ps in rp.items() for p in ps}
        # fp32 copies of the adapted weights, for the importance (W + s B A) in any precision
        self.w32 = {p: base.get_submodule(p).weight.detach().float().clone() for p in self.role_of}
        # bf16: the whole frozen base in bf16 (norms and softmax accumulate in fp32 inside their
        # kernels), so activations are not cast around every op; the factors are cast to bf16
        # where they enter a matmul and get fp32 gradients through the cast.
        base.to(self.dtype)
        holder, attr = _ACTIVATION[family.name]
        prefix = family.layer_prefix(base)
        for i, layer in enumerate(base.get_submodule(prefix)):
            mlp = layer.get_submodule(holder)
            setattr(mlp, attr, _MaskedActivation(getattr(mlp, attr), i, self))
        self.scaling = float(ALPHA_PER_RANK)
        self._pass: _Pass | None = None
        for path in self.role_of:
            mod = base.get_submodule(path)
            mod.register_forward_hook(self._lora_hook(path))
            if self.role_of[path][1] == "o":
                mod.register_forward_pre_hook(self._mask_hook(path))
        self._head_hooks: dict[str, Any] = {}
        self.pad_id = getattr(base.config, "pad_token_id", None) or 0
        self.packing = PACKING.get(type(base).__name__)
        # seconds per phase (and device-steps, real tokens) summed over passes: for benchmarks
        self.timing: dict[str, float] = {}

    # --- hooks ------------------------------------------------------------------------------------
    def _lora_hook(self, path: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            ps = self._pass
            if ps is None or path not in ps.lora:
                return out
            a, b = ps.lora[path]
            x = args[0].reshape(ps.k, -1, args[0].shape[-1])
            u = torch.bmm(x, a.transpose(1, 2).to(x.dtype))
            # in place: the frozen Linear's backward does not read its output, and no copy of it
            out.view(ps.k, -1, out.shape[-1]).baddbmm_(u, b.transpose(1, 2).to(x.dtype), alpha=self.scaling)
            return out

        return hook

    def _mask_hook(self, path: str):
        def hook(mod: nn.Module, args: tuple) -> tuple:
            ps = self._pass
            if ps is None:
                return args
            x = args[0]
            masked = (x.reshape(ps.k, -1, x.shape[-1]) * ps.masks[path]).reshape(x.shape)
            return (masked, *args[1:])

        return hook

    def _install_head(self, module_path: str) -> None:
        if module_path in self._head_hooks:
            return

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            ps = self._pass
            w = ps.heads[f"{module_path}.weight"]
            x = args[0].reshape(ps.k, -1, args[0].shape[-1])
            y = torch.bmm(x, w.transpose(1, 2).to(x.dtype))
            bias = ps.heads.get(f"{module_path}.bias")
            if bias is not None:
                y = y + bias[:, None, :].to(y.dtype)
            return y.reshape(*out.shape[:-1], y.shape[-1])

        self._head_hooks[module_path] = self.base.get_submodule(module_path).register_forward_hook(hook)

    # --- one round for a group of devices ----------------------------------------------------------
    def train(
        self, jobs: Sequence[tuple[TrainIns, KeptIndexMap, LocalData]], *, dropout_seed: int
    ) -> list[tuple[TrainRes, KeptIndexMap]]:
        start = time.perf_counter()
        cfg = jobs[0][0].config
        if any(j[0].config != cfg for j in jobs):
            raise ValueError("a batched pass needs one ClientConfig for all its devices")
        devs = [self._device(ins, kept, data, cfg) for ins, kept, data in jobs]
        ps = self._build_pass(devs)
        self._pass = ps
        self.dropout_gen = torch.Generator(device=self.device).manual_seed(dropout_seed)
        _GEN[0] = self.dropout_gen
        clock = self.timing
        try:
            t0 = time.perf_counter()
            before = self._probe_losses(devs)
            for d, loss in zip(devs, before, strict=True):
                d.loss_before = loss
            t1 = time.perf_counter()
            self._train_steps(devs, ps, cfg)
            t2 = time.perf_counter()
            after = self._probe_losses(devs)
            out = [self._result(i, d, ps, loss) for i, (d, loss) in enumerate(zip(devs, after, strict=True))]
            t3 = time.perf_counter()
            clock["setup"] = clock.get("setup", 0.0) + (t0 - start)
            clock["probe"] = clock.get("probe", 0.0) + (t1 - t0) + (t3 - t2)
        finally:
            self._pass = None
            _GEN[0] = None
        share = (time.perf_counter() - start) / len(devs)
        for res, _ in out:
            res.metrics["train_time_s"] = share
        return out

    def _device(self, ins: TrainIns, kept: KeptIndexMap, data: LocalData, cfg: ClientConfig) -> _Device:
        start = kept.sparsity(self.family.mlp_matrices)
        targets = round_targets(start, ins.ratio, cfg.prune_interval, cfg.local_steps)
        counts = self._counts(kept)
        scored = any(
            (p.keep_heads, p.keep_channels) != counts
            for p in (
                plan_counts(kept, t, round_to=cfg.round_to, mlp_matrices=self.family.mlp_matrices)
                for t in targets
            )
        )
        return _Device(ins, data, kept, targets, scored)

    @staticmethod
    def _counts(kept: KeptIndexMap) -> tuple[int, int]:
        """Query heads and channels per layer now (every layer has the same counts)."""
        return len(kept.layers[0].heads), len(kept.layers[0].channels)

    def _build_pass(self, devs: list[_Device]) -> _Pass:
        k, r = len(devs), max(d.ins.rank for d in devs)
        dev = self.device
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        heads: dict[str, list[np.ndarray]] = {}
        adapter0 = devs[0].ins.adapter
        lora_paths = sorted({split_key(key)[0] for key in adapter0 if split_key(key)[1] == LORA_A})
        for path in lora_paths:
            if path not in self.role_of:
                raise ValueError(f"adapter module {path!r} is not a prunable module of this model")
            w = self.w32[path]
            a = torch.zeros(k, r, w.shape[1])
            b = torch.zeros(k, w.shape[0], r)
            layer, role = self.role_of[path]
            for i, d in enumerate(devs):
                sl = d.kept.role_slices(layer)[role]
                rows = torch.arange(w.shape[0]) if sl.out_idx is None else torch.as_tensor(sl.out_idx)
                cols = torch.arange(w.shape[1]) if sl.in_idx is None else torch.as_tensor(sl.in_idx)
                ad = d.ins.adapter
                a_d = torch.as_tensor(np.asarray(ad[f"{path}.{LORA_A}"], dtype=np.float32))
                b_d = torch.as_tensor(np.asarray(ad[f"{path}.{LORA_B}"], dtype=np.float32))
                if a_d.shape != (d.ins.rank, len(cols)) or b_d.shape != (len(rows), d.ins.rank):
                    raise ValueError(
                        f"device {d.ins.device_id}: adapter {path!r} has shapes {tuple(a_d.shape)} / "
                        f"{tuple(b_d.shape)}, its kept map and rank {d.ins.rank} need "
                        f"{(d.ins.rank, len(cols))} / {(len(rows), d.ins.rank)}"
                    )
                a[i, : d.ins.rank][:, cols] = a_d
                b[i][rows, : d.ins.rank] = b_d
            lora[path] = (a.to(dev).requires_grad_(), b.to(dev).requires_grad_())
        for key in adapter0:
            path, kind = split_key(key)
            if kind is None:
                heads.setdefault(key, [])
        for key in heads:
            for d in devs:
                if key not in d.ins.adapter:
                    raise ValueError(f"device {d.ins.device_id}: adapter lacks {key!r}")
                heads[key].append(np.asarray(d.ins.adapter[key], dtype=np.float32))
            self._install_head(key.rsplit(".", 1)[0])
        head_t = {key: torch.as_tensor(np.stack(v)).to(dev).requires_grad_() for key, v in heads.items()}
        masks, channel_masks = {}, []
        for path, (layer, role) in self.role_of.items():
            if role == "o":
                m = torch.zeros(k, 1, self.w32[path].shape[1])
                for i, d in enumerate(devs):
                    m[i, 0, torch.as_tensor(d.kept.head_rows(layer))] = 1.0
                masks[path] = m.to(dev, self.dtype)
        for layer in range(self.num_layers):
            m = torch.zeros(k, 1, devs[0].kept.shape.intermediate_size)
            for i, d in enumerate(devs):
                m[i, 0, torch.as_tensor(d.kept.channel_idx(layer))] = 1.0
            channel_masks.append(m.to(dev, self.dtype))
        return _Pass(k, 0, lora, head_t, masks, channel_masks, fresh=torch.ones(k, dtype=torch.bool))

    # --- batches and losses -----------------------------------------------------------------------
    def _concat(self, batches: list[Batch]) -> tuple[Batch, list[int]]:
        """One batch of K blocks of equal rows and width (right padding; padded rows attend to
        their first token only and are left out of every loss)."""
        rows = max(len(b["input_ids"]) for b in batches)
        width = max(b["input_ids"].shape[1] for b in batches)
        pad_id = self.pad_id
        ids = torch.full((len(batches), rows, width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(batches), rows, width), dtype=torch.int64)
        mask[:, :, 0] = 1
        token_labels = batches[0]["labels"].ndim == 2
        labels = (
            torch.full((len(batches), rows, width), -100, dtype=torch.int64)
            if token_labels
            else torch.zeros((len(batches), rows), dtype=torch.int64)
        )
        for i, b in enumerate(batches):
            n, w = b["input_ids"].shape
            ids[i, :n, :w] = b["input_ids"]
            mask[i, :n, :w] = b["attention_mask"]
            if token_labels:
                labels[i, :n, :w] = b["labels"]
            else:
                labels[i, :n] = b["labels"]
        self._pass.rows = rows
        dev = self.device
        sizes = [len(b["input_ids"]) for b in batches]
        if self.packing is not None:
            ids2, positions = ids.view(-1, width), None
            if self.packing == "roberta":  # RoBERTa's own rule: count non-pad ids from padding_idx + 1
                real = ids2.ne(pad_id).to(torch.int64)
                positions = torch.cumsum(real, dim=1) * real + pad_id
            self._pass.packed = _pack(ids2, mask.view(-1, width), sizes, pad_id, positions).to(dev)
        out = {
            "input_ids": ids.view(-1, width).to(dev),
            "attention_mask": mask.view(-1, width).to(dev),
            "labels": labels.view(len(batches) * rows, *labels.shape[2:]).to(dev),
        }
        return out, sizes

    def _losses(
        self, batch: Batch, sizes: list[int], kinds: list[tuple[str, torch.Tensor | None]]
    ) -> list[torch.Tensor]:
        if self.packing == "causal-lm":
            return self._packed_lm_losses(batch, sizes)
        k, rows = len(sizes), self._pass.rows
        if self.packing is not None:
            logits = self._packed_class_logits(batch, k * rows)
        else:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = self.base(**inputs).logits
        logits = logits.float().view(k, rows, *logits.shape[1:])
        labels = batch["labels"].view(k, rows, *batch["labels"].shape[1:])
        out = []
        for i, (n, (kind, log_prior)) in enumerate(zip(sizes, kinds, strict=True)):
            lg, lb = logits[i, :n], labels[i, :n]
            if lb.ndim == 2:  # causal LM: next-token loss on the labelled tokens
                lg, lb = lg[:, :-1].reshape(-1, lg.shape[-1]), lb[:, 1:].reshape(-1)
                out.append(nn.functional.cross_entropy(lg, lb, ignore_index=-100))
            elif kind == "logit-adjusted":
                out.append(nn.functional.cross_entropy(lg + log_prior.to(lg.device), lb))
            else:
                out.append(nn.functional.cross_entropy(lg, lb))
        return out

    def _packed_hidden(self) -> torch.Tensor:
        """The base's last hidden states ``(N, hidden)`` of the current batch's packed tokens."""
        pk = self._pass.packed
        _PACKED[0] = pk
        try:
            ids, pos = pk.ids[None], pk.positions[None]
            if self.packing in ("bert", "roberta"):
                encoder = getattr(self.base, self.packing)
                types = torch.zeros_like(ids)
                emb = encoder.embeddings(input_ids=ids, position_ids=pos, token_type_ids=types)
                hidden = encoder.encoder(emb, attention_mask=None).last_hidden_state
            else:
                hidden = self.base.model(input_ids=ids, position_ids=pos).last_hidden_state
        finally:
            _PACKED[0] = None
        return hidden[0]

    def _packed_class_logits(self, batch: Batch, rows_total: int) -> torch.Tensor:
        """Classification logits ``(rows_total, C)`` from the packed forward, pooled as HF pools:
        BERT / RoBERTa at each row's first token, LLaMA-style models at its last non-pad token."""
        pk = self._pass.packed
        hidden = self._packed_hidden()
        hidden = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])])  # the rows_of miss row
        starts = torch.arange(rows_total, device=self.device) * pk.width
        if self.packing == "bert":
            first = hidden[pk.rows_of(starts)]
            pooled = self.base.bert.pooler(first[:, None, :])
            return self.base.classifier(self.base.dropout(pooled))
        if self.packing == "roberta":  # its classification head reads the first token itself
            return self.base.classifier(hidden[pk.rows_of(starts)][:, None, :])
        nonpad = (batch["input_ids"] != self.pad_id).to(torch.int64)
        last = (torch.arange(pk.width, device=self.device) * nonpad).argmax(-1)
        return self.base.score(hidden[pk.rows_of(starts + last)])

    def _packed_lm_losses(self, batch: Batch, sizes: list[int]) -> list[torch.Tensor]:
        """Causal LM: the LM head on the labelled positions only (a token whose next token has a
        label), one mean next-token loss per device, as ``cross_entropy(..., ignore_index=-100)``."""
        pk = self._pass.packed
        k, width = len(sizes), pk.width
        labels = batch["labels"]
        nxt = torch.full_like(labels, -100)
        nxt[:, :-1] = labels[:, 1:]
        flat = nxt.view(-1)
        at = torch.nonzero(flat != -100).view(-1)  # padded positions, in device order
        hidden = self._packed_hidden()
        logits = self.base.lm_head(hidden[pk.rows_of(at)]).float()
        targets = flat[at]
        counts = torch.bincount(at // (labels.shape[0] // k * width), minlength=k).tolist()
        return [
            nn.functional.cross_entropy(lg, tg)
            for lg, tg in zip(logits.split(counts), targets.split(counts), strict=True)
        ]

    @torch.no_grad()
    def _probe_losses(self, devs: list[_Device]) -> list[float]:
        self.base.eval()
        batch, sizes = self._concat([d.data.probe for d in devs])
        losses = self._losses(batch, sizes, [("ce", None)] * len(devs))
        return [float(v) for v in losses]

    def _train_steps(self, devs: list[_Device], ps: _Pass, cfg: ClientConfig) -> None:
        steps = cfg.local_steps
        interval = round_interval(cfg.prune_interval, steps)
        for d in devs:
            gen = torch.Generator().manual_seed(step_seed(d.ins.seed, d.ins.device_id, d.ins.round))
            d.batches = d.data.batches(gen)
        kinds = [(cfg.loss, _log_prior(d.data) if cfg.loss == "logit-adjusted" else None) for d in devs]
        opt = _StackedAdamW(
            ps, lr=float(cfg.lr), head_lr=float(cfg.lr if cfg.head_lr is None else cfg.head_lr)
        )
        last_event = [min(len(d.targets), steps // interval) * interval if d.scored else 0 for d in devs]
        self.base.train()
        clock = self.timing
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            batch, sizes = self._concat([next(d.batches) for d in devs])
            t1 = time.perf_counter()
            losses = self._losses(batch, sizes, kinds)
            t2 = time.perf_counter()
            torch.stack(losses).sum().backward()
            t3 = time.perf_counter()
            scoring = [i for i, d in enumerate(devs) if step <= last_event[i]]
            if scoring:
                self._accumulate(ps, scoring)
            t4 = time.perf_counter()
            reset = torch.zeros(len(devs), dtype=torch.bool)
            if step % interval == 0:
                for i, d in enumerate(devs):
                    if d.prunes < len(d.targets):
                        ratio = d.targets[d.prunes]
                        d.prunes += 1
                        if self._prune(i, d, ps, ratio, cfg):
                            reset[i] = True
            t5 = time.perf_counter()
            opt.step(skip=reset)
            opt.zero_grad()
            t6 = time.perf_counter()
            for name, dt in (
                ("batches", t1 - t0),
                ("forward", t2 - t1),
                ("backward", t3 - t2),
                ("importance", t4 - t3),
                ("prune", t5 - t4),
                ("optimizer", t6 - t5),
            ):
                clock[name] = clock.get(name, 0.0) + dt
            clock["device_steps"] = clock.get("device_steps", 0.0) + len(devs)
            clock["tokens"] = clock.get("tokens", 0.0) + float(
                sum(
                    int(
                        batch["attention_mask"]
                        .view(len(devs), -1, batch["attention_mask"].shape[-1])[i, :n]
                        .sum()
                    )
                    for i, n in enumerate(sizes)
                )
            )

    # --- importance and pruning -------------------------------------------------------------------
    @torch.no_grad()
    def _accumulate(self, ps: _Pass, idx: list[int]) -> None:
        """LoRA-gradient scores (``fedspine.pruning.lora_grad``) of the devices ``idx``, per row
        (out-axis modules) or column (in-axis), normalised per device and module, EMA'd."""
        sel = torch.as_tensor(idx, device=self.device)
        every = len(idx) == ps.k  # then no gathers (copies) of the factors and gradients

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if every else t[sel]

        beta = LoRAGradientImportance().beta
        fresh = ps.fresh[idx].to(self.device)
        for path, (a, b) in ps.lora.items():
            role = self.role_of[path][1]
            a_, b_ = rows(a.detach()), rows(b.detach())
            elem = lora_element_scores(self.w32[path], a_, b_, rows(a.grad), rows(b.grad), self.scaling)
            s = elem.sum(dim=2 if UNIT_AXIS[role] == "out" else 1)
            norm = torch.linalg.vector_norm(s, dim=1, keepdim=True)
            now = torch.where(norm > 0, s / torch.where(norm > 0, norm, 1.0), s)
            old = ps.ema.get(path)
            if old is None:
                old = torch.zeros(ps.k, s.shape[1], device=self.device)
                ps.ema[path] = old
            prev = old[sel]
            old[sel] = torch.where(fresh[:, None], now, beta * prev + (1.0 - beta) * now)
        ps.fresh[idx] = False

    def _unit_scores(self, i: int, d: _Device, ps: _Pass) -> UnitScores:
        """Device i's head and channel scores in its current coordinates (``PruneAndTune.unit_scores``)."""
        kept, shape = d.kept, d.kept.shape
        heads, chans = [], []
        for layer in range(self.num_layers):
            sl = kept.role_slices(layer)
            units = len(kept.layers[layer].kv_heads)
            h = torch.zeros(units)
            c = torch.zeros(len(kept.layers[layer].channels))
            for role, paths in self.paths[layer].items():
                for path in paths:
                    if path not in ps.ema:
                        continue
                    idx = sl[role].out_idx if UNIT_AXIS[role] == "out" else sl[role].in_idx
                    s = ps.ema[path][i].cpu()[torch.as_tensor(idx)]
                    if role in ("mlp_in", "mlp_out"):
                        c += s
                    else:
                        h += s.view(units, -1).sum(1)
            heads.append(h.double().numpy())
            chans.append(c.double().numpy())
        return UnitScores(tuple(heads), tuple(chans), shape.group_size)

    @torch.no_grad()
    def _prune(self, i: int, d: _Device, ps: _Pass, ratio: float, cfg: ClientConfig) -> bool:
        plan = plan_counts(d.kept, ratio, round_to=cfg.round_to, mlp_matrices=self.family.mlp_matrices)
        if (plan.keep_heads, plan.keep_channels) == self._counts(d.kept):
            return False
        positions = select_units(self._unit_scores(i, d, ps), plan.keep_heads, plan.keep_channels)
        d.kept = d.kept.compose(positions)
        d.pruned += 1
        for layer in range(self.num_layers):
            sl = d.kept.role_slices(layer)
            for role, paths in self.paths[layer].items():
                for path in paths:
                    keep = sl[role].out_idx if UNIT_AXIS[role] == "out" else sl[role].in_idx
                    if path in ps.lora:
                        a, b = ps.lora[path]
                        width = b.shape[1] if UNIT_AXIS[role] == "out" else a.shape[2]
                        drop = torch.ones(width, dtype=torch.bool)
                        drop[torch.as_tensor(keep)] = False
                        if UNIT_AXIS[role] == "out":
                            b[i, drop.to(b.device)] = 0.0
                        else:
                            a[i, :, drop.to(a.device)] = 0.0
                    if role == "o":
                        ps.masks[path][i] = 0.0
                        ps.masks[path][i, 0, torch.as_tensor(sl[role].in_idx, device=self.device)] = 1.0
            ps.channel_masks[layer][i] = 0.0
            ps.channel_masks[layer][i, 0, torch.as_tensor(d.kept.channel_idx(layer), device=self.device)] = (
                1.0
            )
        ps.fresh[i] = True
        return True

    # --- results ------------------------------------------------------------------------------------
    def _result(self, i: int, d: _Device, ps: _Pass, loss_after: float) -> tuple[TrainRes, KeptIndexMap]:
        adapter: dict[str, np.ndarray] = {}
        for path, (a, b) in ps.lora.items():
            layer, role = self.role_of[path]
            sl = d.kept.role_slices(layer)[role]
            a_d, b_d = a.detach()[i, : d.ins.rank].cpu(), b.detach()[i][:, : d.ins.rank].cpu()
            if sl.in_idx is not None:
                a_d = a_d[:, torch.as_tensor(sl.in_idx)]
            if sl.out_idx is not None:
                b_d = b_d[torch.as_tensor(sl.out_idx)]
            adapter[f"{path}.{LORA_A}"] = a_d.numpy().copy()
            adapter[f"{path}.{LORA_B}"] = b_d.numpy().copy()
        for key, t in ps.heads.items():
            adapter[key] = t.detach()[i].cpu().numpy().copy()
        cfg = d.ins.config
        res = TrainRes(
            round=d.ins.round,
            device_id=d.ins.device_id,
            rank=d.ins.rank,
            adapter=adapter,
            kept_map=d.kept.to_dict(),
            num_samples=d.data.num_samples,
            loss_before=d.loss_before,
            loss_after=loss_after,
            achieved_ratio=d.kept.sparsity(self.family.mlp_matrices),
            update_norm=update_norm(adapter, scaling=self.scaling),
            metrics={
                "train_time_s": 0.0,
                "steps": float(cfg.local_steps),
                "prunes": float(d.pruned),
                "bf16": float(self.dtype == torch.bfloat16),
                "batched": float(ps.k),
            },
        )
        return res, d.kept


def _log_prior(data: LocalData) -> torch.Tensor:
    counts = torch.as_tensor(np.asarray(data.label_counts, dtype=np.float64))
    return torch.log((counts + 1.0) / (counts.sum() + len(counts))).float()


class _StackedAdamW:
    """AdamW (weight decay 0, as ``fedspine.fl.client._optimizer``) over stacked per-device
    parameters, with per-device step counts: torch's update formula, one device per row."""

    def __init__(self, ps: _Pass, *, lr: float, head_lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups = [(t, lr) for ab in ps.lora.values() for t in ab] + [
            (t, head_lr) for t in ps.heads.values()
        ]
        self.m = [torch.zeros_like(t) for t, _ in self.groups]
        self.v = [torch.zeros_like(t) for t, _ in self.groups]
        self.k = ps.k
        self.steps = torch.zeros(ps.k, dtype=torch.float64)
        self.b1, self.b2 = betas
        self.eps = eps

    @torch.no_grad()
    def step(self, skip: torch.Tensor) -> None:
        """One update for every device not in ``skip``; a skipped device (it just pruned) gets
        fresh moments and step count, as the per-device path's new optimizer."""
        keep = ~skip
        self.steps = torch.where(keep, self.steps + 1, torch.zeros_like(self.steps))
        t = self.steps.clamp(min=1)
        bc1 = 1 - self.b1**t
        bc2_sqrt = torch.sqrt(1 - self.b2**t)
        for (p, lr), m, v in zip(self.groups, self.m, self.v, strict=True):
            shape = (self.k,) + (1,) * (p.dim() - 1)
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            km = keep.to(p.device).view(shape)
            m.mul_(km)
            v.mul_(km)
            step_size = (lr / bc1).to(p.device, torch.float32).view(shape)
            denom = (v.sqrt() / bc2_sqrt.to(p.device, torch.float32).view(shape)).add_(self.eps)
            p.sub_(step_size * m / denom * km)

    def zero_grad(self) -> None:
        for p, _ in self.groups:
            p.grad = None


class BatchedRunner:
    """A ``DeviceRunner``: the round's devices trained in groups of at most ``group_size`` on one
    shared base (``BatchedTrainer``); the devices it cannot batch (``batchable``) on the
    per-device path. Owns the devices' kept maps and applied base deltas; a device's physically
    pruned model is rebuilt from its kept map when asked for (``device_models``)."""

    modelled = True

    def __init__(self, world: Any, *, group_size: int = 16, only_batched: bool = False):
        self.world = world
        self.group_size = group_size
        self.only_batched = only_batched
        self.kept: dict[str, KeptIndexMap] = {}
        self.applied: dict[str, dict[str, np.ndarray]] = {}
        self._models: dict[str, tuple[KeptIndexMap, nn.Module]] = {}
        self._trainer: BatchedTrainer | None = None
        self._trainer_key: tuple | None = None
        self.last_groups: list[list[str]] = []  # the batched groups of the last round (for tests, logs)

    def available(self, fleet: Sequence[str]) -> list[str]:
        return list(fleet)

    def trainer(self, cfg: ClientConfig) -> BatchedTrainer:
        key = (cfg.precision, cfg.device)
        if self._trainer is None or self._trainer_key != key:
            self._trainer = BatchedTrainer(self.world.model0, self.world.family, cfg)
            self._trainer_key = key
        return self._trainer

    def execute(self, rnd: int, ins: Mapping[str, TrainIns], held: Mapping[str, KeptIndexMap]) -> dict:
        from fedspine.fl.runners import LOG, Reply

        for d, kept in held.items():
            if self.kept.get(d) != kept:  # new, or its last round did not count: the server's view
                self.kept[d], self.applied[d] = kept, {}
                self._models.pop(d, None)
        out: dict[str, Any] = {}
        batch: dict[ClientConfig, list[str]] = {}
        for d, i in ins.items():
            why = batchable(i, self.applied[d], self.world.family)
            if why and self.only_batched:
                raise ValueError(f"train.runner 'batched' cannot train device {d}: {why}")
            if why:
                out[d] = self._per_device(rnd, d, i)
            else:
                batch.setdefault(i.config, []).append(d)
        self.last_groups = []
        for cfg, devices in batch.items():
            for start in range(0, len(devices), self.group_size):
                group = devices[start : start + self.group_size]
                self.last_groups.append(group)
                jobs = [(ins[d], self.kept[d], self.world.local_data(d)) for d in group]
                seed = zlib.crc32(f"{ins[group[0]].seed}:{rnd}:dropout:{','.join(group)}".encode())
                try:
                    trained = self.trainer(cfg).train(jobs, dropout_seed=seed)
                except Exception as exc:  # which device raised is unknown: each alone, per device
                    LOG.warning(
                        "round %d: a batched pass raised %s: %s; per device", rnd, type(exc).__name__, exc
                    )
                    out.update({d: self._per_device(rnd, d, ins[d]) for d in group})
                    continue
                for d, (res, kept) in zip(group, trained, strict=True):
                    self.kept[d] = kept
                    out[d] = Reply(res)
        return out

    def _per_device(self, rnd: int, d: str, ins: TrainIns) -> Any:
        from fedspine.fl.runners import Reply, failed_reply

        state = self._state(d)
        try:
            res, new = client_step(ins, state, self.world.local_data(d))
        except Exception as exc:  # a failing device fails alone
            self._models.pop(d, None)  # pruned in place part-way: rebuilt from its kept map
            return failed_reply(rnd, d, exc)
        self.kept[d], self.applied[d] = new.kept_map, dict(new.applied_delta)
        self._models[d] = (new.kept_map, new.model)
        return Reply(res)

    def _state(self, d: str) -> LocalState:
        cached = self._models.get(d)
        if cached is not None and cached[0] == self.kept[d] and not self.applied[d]:
            return LocalState(cached[1], self.kept[d], {})
        return self.world.device_state(self.kept[d], self.applied[d])

    def device_models(self) -> dict[str, nn.Module]:
        out = {}
        for d in self.kept:
            cached = self._models.get(d)
            if cached is None or cached[0] != self.kept[d]:
                self._models[d] = (self.kept[d], self._state(d).model)
            out[d] = self._models[d][1]
        return out

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        from fedspine.fl.runners import APPLIED

        arrays = {f"{APPLIED}{d}/{p}": v for d, ap in self.applied.items() for p, v in ap.items()}
        return {d: k.to_dict() for d, k in self.kept.items()}, arrays

    def load_state_dict(self, devices: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        from fedspine.fl.runners import APPLIED

        self.kept, self.applied, self._models = {}, {}, {}
        for d, kept in devices.items():
            prefix = f"{APPLIED}{d}/"
            self.kept[d] = KeptIndexMap.from_dict(kept)
            self.applied[d] = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


__all__ = ["BATCHED_FAMILIES", "BatchedRunner", "BatchedTrainer", "batchable"]
