"""Structured pruning of whole attention heads (whole KV groups under GQA) and MLP channels.

The pipeline is four small steps, each usable alone:

1. ``unit_scores(model, importance, calib)``: one score per head unit and per MLP channel, per
   layer. A head unit is a KV group (its KV head and the query heads that read it); without GQA
   that is simply one head.
2. ``plan_counts(kept_map, ratio)``: how many heads / channels every layer keeps.
3. ``select_units(scores, keep_heads, keep_channels)``: which ones (the highest scores).
4. ``prune_model(model, kept_map, positions)``: physically removes the rest through
   torch-pruning's DependencyGraph, syncs the HF config, returns the composed ``KeptIndexMap``.

``prune_to_ratio`` chains them. Hidden size is never pruned, and every layer keeps the same
counts so that a plain HF config still describes the model (ours: FedSpine prunes per device, not
per layer, and uniform widths keep checkpoints loadable).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from fedspine.pruning.arch import Family, LayerRoles, family_of
from fedspine.pruning.index_map import ArchShape, KeptIndexMap, plan_kept_counts

Positions = list[tuple[list[int], list[int]]]  # per layer: (query-head positions, channel positions)


# --- scores and selection ------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitScores:
    """Per layer, one score per head unit and per MLP channel (higher = more important).

    ``group_size`` query heads share one head unit (1 without GQA), so head unit ``u`` covers
    query heads ``u*group_size .. (u+1)*group_size - 1`` of the current model.
    """

    heads: tuple[np.ndarray, ...]
    channels: tuple[np.ndarray, ...]
    group_size: int


def select_units(scores: UnitScores, keep_heads: int, keep_channels: int) -> Positions:
    """Per layer, the positions (in the current model) of the query heads and channels to keep:
    the ``keep_heads // group_size`` best head units and the ``keep_channels`` best channels.

    The same counts in every layer keep the HF config uniform; the indices may differ per layer.
    Ties go to the lower index (stable sort), so the choice is deterministic.
    """
    g = scores.group_size
    if keep_heads < g or keep_heads % g:
        raise ValueError(f"keep_heads must be a positive multiple of the KV group size {g}, got {keep_heads}")
    out: Positions = []
    for i, (hs, cs) in enumerate(zip(scores.heads, scores.channels, strict=True)):
        units = keep_heads // g
        if units > len(hs) or not 1 <= keep_channels <= len(cs):
            raise ValueError(
                f"layer {i}: cannot keep {keep_heads} heads / {keep_channels} channels of "
                f"{len(hs) * g} / {len(cs)}"
            )
        top_units = np.sort(np.argsort(-np.asarray(hs), kind="stable")[:units])
        heads = [int(u) * g + j for u in top_units for j in range(g)]
        chans = np.sort(np.argsort(-np.asarray(cs), kind="stable")[:keep_channels]).tolist()
        out.append((heads, [int(c) for c in chans]))
    return out


StatFn = Callable[[nn.Parameter], torch.Tensor]


def scores_from_stats(model: nn.Module, stat: StatFn, *, l2: bool) -> UnitScores:
    """Sum an elementwise statistic of each prunable weight over every unit's coupled weights.

    A head unit owns its rows of q, k, v (weights and biases) and its columns of o; a channel owns
    its rows of every MLP input matrix and its column of the MLP output matrix. ``l2=True`` takes
    the square root of the sum (for ``stat = w**2``). New criteria only supply ``stat``.
    """
    fam = family_of(model)
    hd = fam.head_dim(model)
    heads, chans, group = [], [], 1

    def rows(m: nn.Linear) -> torch.Tensor:
        s = stat(m.weight).sum(1)
        return s + stat(m.bias) if m.bias is not None else s

    with torch.no_grad():
        for lr in fam.layers(model):
            units = lr.k.out_features // hd
            group = lr.q.out_features // (hd * units)
            h = sum(rows(m).view(units, -1).sum(1) for m in (lr.q, lr.k, lr.v))
            h = h + stat(lr.o.weight).sum(0).view(units, -1).sum(1)
            c = sum(rows(m) for m in lr.mlp_in) + stat(lr.mlp_out.weight).sum(0)
            if l2:
                h, c = h.sqrt(), c.sqrt()
            heads.append(h.double().cpu().numpy())
            chans.append(c.double().cpu().numpy())
    return UnitScores(tuple(heads), tuple(chans), group)


def magnitude_importance(model: nn.Module, calib: Any = None) -> UnitScores:
    """L2 norm of each unit's weights across its coupled modules (``calib`` is unused).

    This is torch-pruning's ``GroupMagnitudeImportance(p=2, group_reduction="sum",
    normalizer=None, bias=True)`` over the DependencyGraph's group, square-rooted and summed over
    each head's rows (``tests/pruning/test_structured.py`` checks them equal; so is
    :func:`taylor_importance` to ``GroupTaylorImportance``). We keep ours, for one reason each:
    under GQA torch-pruning's head groups couple query heads to the wrong KV rows (anchors.md
    §c.2 item 3), so head scores need our role table anyway, and GQA is the usual layout (SmolLM2,
    Qwen2, Mistral); scoring through torch-pruning traces the model first, ours reads the weights;
    and all criteria, FedSpine's LoRA-gradient one included, share ``scores_from_stats``, so each
    unit is summed over the same weights whichever criterion scores it (ours).
    """
    return scores_from_stats(model, lambda p: p.detach().float().pow(2), l2=True)


def taylor_importance(model: nn.Module, calib: Any = None) -> UnitScores:
    """First-order Taylor score sum |w * dL/dw| over each unit's coupled weights (Molchanov et al.
    2019), from one forward/backward on ``calib``.

    It needs gradients of the *base* weights: we switch ``requires_grad`` on for the prunable
    Linears during the call and restore it after (so it also works on a model whose weights peft
    froze). Gradients come from ``torch.autograd.grad``; no ``.grad`` is touched. The model runs
    in eval mode (no dropout) so the score is deterministic (ours). torch-pruning's
    ``GroupTaylorImportance`` gives the same scores but reads ``.grad``, which a peft model's
    frozen base has not got (anchors.md §c.2 item 7); see :func:`magnitude_importance`.
    """
    if calib is None:
        raise ValueError("taylor importance needs calib: a LongTensor of token ids or a dict batch")
    fam = family_of(model)
    params = [
        p for lr in fam.layers(model) for m in _linears(lr) for p in (m.weight, m.bias) if p is not None
    ]
    flags, was_training = [p.requires_grad for p in params], model.training
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        grads = torch.autograd.grad(_calib_loss(model, fam, calib), params, allow_unused=True)
    finally:
        model.train(was_training)
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    by_id = {id(p): g for p, g in zip(params, grads, strict=True)}

    def stat(p: nn.Parameter) -> torch.Tensor:
        g = by_id.get(id(p))
        return torch.zeros_like(p, dtype=torch.float32) if g is None else (p.detach() * g).abs().float()

    return scores_from_stats(model, stat, l2=False)


ImportanceFn = Callable[[nn.Module, Any], UnitScores]

# name -> criterion. Hook for LoRAPrune's "lora_gradient" (paper: FedSpine scores units from LoRA
# gradients): G = dB·A + B·dA - dB·dA, stat = |G ⊙ (W + s·B·A)|, EMA-smoothed over local steps;
# implement it as ``scores_from_stats(model, stat, l2=False)`` and ``register_importance`` it.
IMPORTANCE: dict[str, ImportanceFn] = {"magnitude": magnitude_importance, "taylor": taylor_importance}


def register_importance(name: str, fn: ImportanceFn) -> None:
    """Add a criterion selectable by name in ``unit_scores`` / ``prune_to_ratio``."""
    if name in IMPORTANCE:
        raise ValueError(f"importance {name!r} is already registered")
    IMPORTANCE[name] = fn


def unit_scores(model: nn.Module, importance: str = "magnitude", calib: Any = None) -> UnitScores:
    """Scores by a registered criterion (see ``IMPORTANCE``)."""
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {sorted(IMPORTANCE)}, got {importance!r}")
    _refuse_peft(model)
    return IMPORTANCE[importance](model, calib)


# --- how many to keep ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PrunePlan:
    keep_heads: int  # query heads per layer (whole KV groups)
    keep_channels: int  # MLP channels per layer
    achieved_ratio: float  # KeptIndexMap.sparsity of the resulting map, vs the original model


def plan_counts(
    target: nn.Module | ArchShape | KeptIndexMap,
    ratio: float,
    *,
    round_to: int = 8,
    mlp_matrices: int | None = None,
) -> PrunePlan:
    """Heads and MLP channels to keep per layer so that ``KeptIndexMap.sparsity`` (measured
    against the *original* model) is close to ``ratio``.

    The rule is :func:`fedspine.pruning.index_map.plan_kept_counts`. ``target`` may be a map of
    an already-pruned model (counts never grow back). ``mlp_matrices`` comes from the model's
    family when ``target`` is a model.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    if isinstance(target, nn.Module):
        fam = family_of(target)
        mlp_matrices = fam.mlp_matrices
        kept = KeptIndexMap.full(fam.arch_shape(target))
    else:
        kept = KeptIndexMap.full(target) if isinstance(target, ArchShape) else target
    if mlp_matrices is None:
        raise ValueError("mlp_matrices is required unless target is a model (2 for BERT, 3 for LLaMA)")
    s = kept.shape
    heads, chans = plan_kept_counts(kept, ratio, round_to=round_to, mlp_matrices=mlp_matrices)
    achieved = (
        KeptIndexMap.full(s).compose([(range(heads), range(chans))] * s.num_layers).sparsity(mlp_matrices)
    )
    return PrunePlan(heads, chans, achieved)


# --- surgery -------------------------------------------------------------------------------------
def prune_model(
    model: nn.Module, kept_map: KeptIndexMap, positions: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> KeptIndexMap:
    """Keep, per layer, the query heads and MLP channels at ``positions`` (of the current model),
    remove the rest in place, sync the HF config, and return ``kept_map.compose(positions)``.

    BERT heads and channels, LLaMA MLP channels and multi-head-attention heads go through
    torch-pruning's DependencyGraph (traced with ``rotate_half`` patched for LLaMA); we check that
    each group it returns is exactly the role table (q/k/v rows + o columns for a head; MLP input
    rows + output columns for a channel) and refuse anything touching other modules. Under GQA
    torch-pruning couples query heads to KV heads with the wrong indices, so whole KV groups are
    removed by hand with torch-pruning's low-level ``prune_linear_{out,in}_channels``; so are the
    heads of families with a per-head norm (``Family.heads_by_hand``: Qwen3's q/k norms, whose
    weight torch-pruning couples to the q rows although every head shares it).
    """
    fam = family_of(model)
    _refuse_peft(model)
    new_map = kept_map.compose(positions)  # validates the positions
    cur = fam.arch_shape(model)
    bad = kept_map.first_mismatch(cur)
    if bad is not None:
        lk = kept_map.layers[bad]
        raise ValueError(
            f"kept_map layer {bad} has {len(lk.heads)} heads / {len(lk.kv_heads)} kv heads / "
            f"{len(lk.channels)} channels but the model has {cur.num_heads} / {cur.num_kv_heads} / "
            f"{cur.intermediate_size}: the map does not describe this model"
        )
    counts = {(len(h), len(c)) for h, c in positions}
    if len(counts) != 1:
        raise ValueError(
            f"every layer must keep the same numbers of heads and channels, got {sorted(counts)}"
        )
    g = cur.group_size
    removals = []  # per layer: (removed head units, removed channels), current positions
    for i, (h, c) in enumerate(positions):
        kept_h = sorted({int(x) for x in h})
        units = sorted({x // g for x in kept_h})
        if len(kept_h) != len(units) * g:
            raise ValueError(f"layer {i}: head positions {kept_h} must be whole KV groups of {g} query heads")
        removals.append(
            (
                sorted(set(range(cur.num_kv_heads)) - set(units)),
                sorted(set(range(cur.intermediate_size)) - {int(x) for x in c}),
            )
        )

    layers = fam.layers(model)
    by_hand = g > 1 or fam.heads_by_hand  # heads cut without the DependencyGraph
    need_dg = any(ch or (units and not by_hand) for units, ch in removals)
    if need_dg:
        dg, names = _build_graph(model, fam)
        for lr, (units, ch) in zip(layers, removals, strict=True):
            if ch:
                _prune_coupled(dg, names, _channel_table(lr, ch))
            if units and not by_hand:
                _prune_coupled(dg, names, _head_table(lr, _expand(units, cur.head_dim)))
    if by_hand:
        for lr, (units, _) in zip(layers, removals, strict=True):
            if units:
                q_rows, kv_rows = _expand(units, g * cur.head_dim), _expand(units, cur.head_dim)
                tp.prune_linear_out_channels(lr.q, q_rows)
                tp.prune_linear_out_channels(lr.k, kv_rows)
                tp.prune_linear_out_channels(lr.v, kv_rows)
                tp.prune_linear_in_channels(lr.o, q_rows)

    shape = fam.sync_config(model)
    want = (len(new_map.layers[0].heads), len(new_map.layers[0].kv_heads), len(new_map.layers[0].channels))
    if (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) != want:  # pragma: no cover - guard
        raise RuntimeError(f"after pruning the model has {shape} but the kept map expects {want}")
    return new_map


def prune_to_ratio(
    model: nn.Module,
    ratio: float,
    importance: str = "magnitude",
    *,
    round_to: int = 8,
    kept_map: KeptIndexMap | None = None,
    calib: Any = None,
) -> tuple[KeptIndexMap, float]:
    """Prune ``model`` in place toward ``ratio`` of the original prunable weights removed.

    ``kept_map`` describes what earlier prunes kept (``None``: the model is unpruned); calling
    again with the returned map and a larger ratio prunes further. Returns the new map and its
    achieved ratio. If the plan keeps everything the model still has, nothing is touched.
    """
    fam = family_of(model)
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {sorted(IMPORTANCE)}, got {importance!r}")
    _refuse_peft(model)
    if kept_map is None:
        kept_map = KeptIndexMap.full(fam.arch_shape(model))
    plan = plan_counts(kept_map, ratio, round_to=round_to, mlp_matrices=fam.mlp_matrices)
    cur = fam.arch_shape(model)
    if (plan.keep_heads, plan.keep_channels) == (cur.num_heads, cur.intermediate_size):
        return kept_map, kept_map.sparsity(fam.mlp_matrices)
    positions = select_units(unit_scores(model, importance, calib), plan.keep_heads, plan.keep_channels)
    new_map = prune_model(model, kept_map, positions)
    return new_map, new_map.sparsity(fam.mlp_matrices)


def dependency_groups(model: nn.Module, layer: int = 0) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """What torch-pruning couples with removing head 0 (its q rows) and MLP channel 0 of ``layer``:
    ``{"head": {module path: ("out" | "in", indices)}, "channel": {...}}``. Nothing is pruned; used
    by the tests to check the DependencyGraph against the role table."""
    fam = family_of(model)
    dg, names = _build_graph(model, fam)
    lr = fam.layers(model)[layer]
    hd = fam.head_dim(model)
    head = dg.get_pruning_group(lr.q, tp.prune_linear_out_channels, list(range(hd)))
    chan = dg.get_pruning_group(lr.mlp_in[0], tp.prune_linear_out_channels, [0])
    return {"head": _members(head, names), "channel": _members(chan, names)}


# --- helpers -------------------------------------------------------------------------------------
def _refuse_peft(model: nn.Module) -> None:
    for m in model.modules():
        if type(m).__module__.startswith("peft."):
            raise ValueError(
                f"model has peft modules attached ({type(m).__name__}); merge (merge_and_unload) or "
                "detach the adapters before pruning: torch-pruning would prune lora_B but not the base layer"
            )


def _linears(lr: LayerRoles) -> tuple[nn.Linear, ...]:
    return (lr.q, lr.k, lr.v, lr.o, *lr.mlp_in, lr.mlp_out)


def _calib_loss(model: nn.Module, fam: Family, calib: Any) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": calib} if isinstance(calib, torch.Tensor) else dict(calib)
    if fam.causal_lm and "labels" not in kwargs and hasattr(model, "lm_head"):
        kwargs["labels"] = kwargs["input_ids"]
    loss = getattr(model(**kwargs), "loss", None)
    if loss is None:
        raise ValueError(
            "taylor importance needs a calib batch whose forward returns a loss (include labels)"
        )
    return loss


def _expand(units: Sequence[int], width: int) -> list[int]:
    return [u * width + j for u in units for j in range(width)]


def _build_graph(model: nn.Module, fam: Family) -> tuple[tp.DependencyGraph, dict[nn.Module, str]]:
    """Trace ``model`` once on a fixed 8-token batch (no RNG), in eval mode, without a KV cache."""
    param = next(model.parameters())
    ids = torch.arange(8, device=param.device).remainder(int(model.config.vocab_size)).unsqueeze(0)
    example: dict[str, Any] = {"input_ids": ids}
    if fam.causal_lm:
        example["use_cache"] = False
    was_training = model.training
    model.eval()
    try:
        with fam.tracing(), warnings.catch_warnings():
            # RMSNorm/LayerNorm weights are "unwrapped" to torch-pruning; harmless as hidden is never pruned.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, output_transform=lambda out: out[0]
            )
    finally:
        model.train(was_training)
    return dg, {m: n for n, m in model.named_modules()}


def _members(group: Any, names: Mapping[nn.Module, str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Real modules in a torch-pruning group: path -> (side, sorted indices); op nodes skipped."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for item in group:
        mod = item.dep.target.module
        if type(mod).__module__.startswith("torch_pruning"):
            continue
        side = "out" if item.dep.handler.__name__ == "prune_out_channels" else "in"
        idxs = tuple(sorted(int(getattr(i, "idx", i)) for i in item.idxs))
        out[names.get(mod, type(mod).__name__)] = (side, idxs)
    return out


Table = dict[nn.Module, tuple[str, tuple[int, ...]]]


def _head_table(lr: LayerRoles, rows: list[int]) -> Table:
    r = tuple(rows)
    return {lr.q: ("out", r), lr.k: ("out", r), lr.v: ("out", r), lr.o: ("in", r)}


def _channel_table(lr: LayerRoles, chans: list[int]) -> Table:
    c = tuple(chans)
    return {**{m: ("out", c) for m in lr.mlp_in}, lr.mlp_out: ("in", c)}


def _prune_coupled(dg: tp.DependencyGraph, names: Mapping[nn.Module, str], table: Table) -> None:
    """Remove ``table``'s rows/columns through DependencyGraph groups, refusing any group that
    reaches beyond the table; a role the graph did not couple is pruned through its own group."""
    remaining = dict(table)
    while remaining:
        mod, (side, idxs) = next(iter(remaining.items()))
        fn = tp.prune_linear_out_channels if side == "out" else tp.prune_linear_in_channels
        group = dg.get_pruning_group(mod, fn, list(idxs))
        got = _members(group, names)
        wanted = {names[m]: v for m, v in remaining.items()}
        stray = {p: v for p, v in got.items() if wanted.get(p) != v}
        if stray:
            raise RuntimeError(
                f"torch-pruning coupled {sorted(stray)} with {names[mod]}; refusing to prune them"
            )
        group.prune(record_history=False)
        for m in [m for m in remaining if names[m] in got]:
            del remaining[m]
