"""Attach, extract, load and remove peft LoRA adapters on (possibly pruned) HF models.

A device prunes its *plain* model, attaches LoRA, trains, and sends back the adapter tensors.
Pruning with LoRA attached breaks the model (torch-pruning treats the rank as a channel and
leaves ``base_layer`` unpruned; anchors.md §c.2 item 5), so the only supported cycle is
``attach -> train -> merge (or detach) -> prune -> attach`` (item 6).

Adapter tensors travel as ``dict[str, np.ndarray]`` (float32) under stable names that carry no
peft adapter-name noise:

- ``"<module path>.lora_A"``: shape (r, d_in); ``"<module path>.lora_B"``: shape (d_out, r);
- ``"<module path>.<param>"`` (e.g. ``"classifier.weight"``) for heads kept trainable through
  ``modules_to_save`` -- the same names as in the plain HF ``state_dict``.

Module paths are relative to the HF model (``model.layers.0.self_attn.q_proj``), the same keys as
``fedspine.pruning.arch.module_slices``, so :mod:`fedspine.lora.coords` can map them between a
pruned device's coordinates and the original model's.

These names are peft's own saved names without peft's wrapping: :func:`to_peft_key` /
:func:`from_peft_key` map between the two (``"x.lora_A"`` <-> ``"base_model.model.x.lora_A.weight"``),
and :func:`extract` / :func:`load` are peft's ``get_peft_model_state_dict`` /
``set_peft_model_state_dict`` under those names. What peft does not do, and so stays ours: the
numpy wire format, the strict all-or-nothing checks of :func:`load`, and moving tensors across
prunes (:mod:`fedspine.lora.coords`). :func:`save_adapter` writes a plain peft adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from fedspine.lora.coords import split_key
from fedspine.pruning.arch import FAMILIES, family_of

#: Where peft's saved names put the HF model (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."

#: Default LoRA targets per family (``"bert"``, ``"llama"``): every prunable Linear of a block
#: (attention and MLP). Read from the one model-family registry,
#: :data:`fedspine.pruning.arch.FAMILIES` (``Family.lora_targets``), which also says which HF
#: ``model_type`` belongs to which family.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {f.name: f.lora_targets for f in FAMILIES.values()}

#: Task heads that stay fully trainable (``modules_to_save``) for classification models:
#: BERT-style models call it ``classifier``, LLaMA-style ``score``.
HEAD_NAMES: tuple[str, ...] = ("classifier", "score")

#: ``alpha = ALPHA_PER_RANK * rank`` unless given (ours). peft scales the update by alpha / r,
#: so this keeps the scaling s = 2 for *every* rank. With mixed ranks in one federation that
#: matters: B·A from a rank-4 and a rank-32 device are then on the same scale, so zero-padding,
#: truncation and averaging of A and B (anchors.md §b) act on s·B·A consistently. A fixed
#: alpha (s = alpha / r) would make a truncated global adapter change its effective scale on
#: every device. The factor 2 is the common "alpha = 2r" heuristic.
ALPHA_PER_RANK = 2.0


def attach(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    family: str | None = None,
    seed: int = 0,
) -> PeftModel:
    """Wrap a plain (possibly pruned) HF model with a fresh peft LoRA adapter of rank ``rank``.

    LoRA shapes follow the model's current Linear shapes, so attaching after pruning gives the
    device's narrow adapter. ``alpha`` defaults to ``ALPHA_PER_RANK * rank`` (scaling 2 for every
    rank; see :data:`ALPHA_PER_RANK`). ``targets`` defaults to :data:`DEFAULT_TARGETS` of
    ``family`` (when None, the family of ``config.model_type`` in the registry
    :data:`fedspine.pruning.arch.FAMILIES`; other model types are refused). Sequence- and
    token-classification heads (``classifier`` / ``score``) stay trainable via
    ``modules_to_save``. peft draws lora_A from torch's RNG; we draw it inside a forked RNG seeded
    with ``seed`` so attaching is deterministic and leaves the global RNG as it was. lora_B starts
    at zero (peft's default), so a fresh adapter does not change the model's output.

    Note that peft freezes the base weights in place and mutates ``model`` (it becomes the base of
    the returned PeftModel); :func:`merge` / :func:`detach` give the plain model back.
    """
    if isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("model already has LoRA attached; merge() or detach() it first")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if alpha is None:
        alpha = ALPHA_PER_RANK * rank
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if targets is None:
        if family is None:
            try:
                family = family_of(model).name
            except ValueError as e:
                raise ValueError(
                    f"{e}; to attach LoRA anyway pass family= one of {sorted(DEFAULT_TARGETS)} or targets="
                ) from None
        if family not in DEFAULT_TARGETS:
            raise ValueError(f"family must be one of {sorted(DEFAULT_TARGETS)}, got {family!r}")
        targets = DEFAULT_TARGETS[family]
    elif isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of module-name suffixes, got {targets!r}")

    cls_name = type(model).__name__
    task_type = None
    modules_to_save = None
    if cls_name.endswith("ForCausalLM"):
        task_type = "CAUSAL_LM"
    elif cls_name.endswith(("ForSequenceClassification", "ForTokenClassification")):
        task_type = "SEQ_CLS" if cls_name.endswith("ForSequenceClassification") else "TOKEN_CLS"
        modules_to_save = [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)]
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(targets),
        modules_to_save=modules_to_save,
        bias="none",
        task_type=task_type,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 calls a property transformers 5.x deprecated; not actionable for our users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def _hf_model(peft_model: PeftModel) -> nn.Module:
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    return peft_model.base_model.model


def to_peft_key(key: str) -> str:
    """Our name -> peft's saved name: ``"x.lora_A"`` -> ``"base_model.model.x.lora_A.weight"``;
    a head (``"classifier.weight"``) -> ``"base_model.model.classifier.weight"``."""
    kind = split_key(key)[1]
    return PEFT_PREFIX + (f"{key}.weight" if kind is not None else key)


def from_peft_key(key: str) -> str:
    """peft's saved name -> ours (the inverse of :func:`to_peft_key`); any other key is refused."""
    inner = key.removeprefix(PEFT_PREFIX)
    stem, _, leaf = inner.rpartition(".")
    lora = split_key(stem)[1] is not None
    if inner == key or (lora and leaf != "weight") or split_key(inner)[1] is not None:
        raise ValueError(
            f"{key!r} is not a peft LoRA or modules_to_save key (expected "
            f"'{PEFT_PREFIX}<path>.lora_A.weight', '...lora_B.weight' or '{PEFT_PREFIX}<head>.<param>')"
        )
    return stem if lora else inner


def _peft_state(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """peft's own state dict of the active adapter (LoRA A/B and modules_to_save heads), our names.

    ``save_embedding_layers=False``: we never target embeddings, and peft's "auto" would look the
    base model's config up by name (on the hub, for a hub id).
    """
    _hf_model(peft_model)
    state = get_peft_model_state_dict(
        peft_model, adapter_name=peft_model.active_adapter, save_embedding_layers=False
    )
    return {from_peft_key(k): v for k, v in state.items()}


def extract(peft_model: PeftModel) -> dict[str, np.ndarray]:
    """The active adapter's tensors as float32 numpy copies under stable names (module docstring)."""
    return {k: t.detach().to("cpu", torch.float32).numpy().copy() for k, t in _peft_state(peft_model).items()}


class LoadReport(NamedTuple):
    """Keys that :func:`load` could not match (both empty after a strict load)."""

    missing: list[str]  # adapter tensors of the model that ``tensors`` did not provide
    unexpected: list[str]  # keys of ``tensors`` that the model has no adapter tensor for


def load(peft_model: PeftModel, tensors: Mapping[str, np.ndarray], *, strict: bool = True) -> LoadReport:
    """Copy ``tensors`` (names as from :func:`extract`) into the active adapter, in place.

    With ``strict`` any missing or unexpected key raises ``ValueError`` listing both: the known
    silent bug of heterogeneous-LoRA code is ``load_state_dict(strict=False)`` dropping renamed
    keys so the global adapter is never applied (anchors.md §d), and peft's
    ``set_peft_model_state_dict`` is exactly that call. Shape mismatches and non-finite values
    always raise. Everything is checked before peft copies anything, so on error the model is
    left as it was. Returns the unmatched keys (useful with ``strict=False``).
    """
    params = _peft_state(peft_model)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    problems = []
    if strict and (missing or unexpected):
        problems.append(f"missing keys {missing}, unexpected keys {unexpected}")
    arrays = {}
    for key in sorted(set(params) & set(tensors)):
        arr = np.asarray(tensors[key])
        if arr.shape != tuple(params[key].shape):
            problems.append(f"{key}: shape {arr.shape} != the model's {tuple(params[key].shape)}")
        elif not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            problems.append(f"{key}: must be finite floating point (dtype {arr.dtype})")
        else:
            arrays[to_peft_key(key)] = torch.from_numpy(np.ascontiguousarray(arr))
    if problems:
        raise ValueError("tensors do not fit the adapter: " + "; ".join(problems))
    # peft needs every modules_to_save key; a key left out (strict=False) keeps its value.
    arrays.update({to_peft_key(k): params[k].detach().clone() for k in missing})
    with torch.no_grad():
        result = set_peft_model_state_dict(peft_model, arrays, adapter_name=peft_model.active_adapter)
    left = [k for k in result.unexpected_keys if k in arrays]
    if left:  # a peft key map we did not expect; never let a tensor be dropped silently
        raise RuntimeError(f"peft did not load {left}")
    return LoadReport(missing, unexpected)


def save_adapter(peft_model: PeftModel, path: str | Path) -> Path:
    """Write the active adapter as a peft adapter directory, loadable with plain peft on the
    same (pruned or unpruned) base: ``PeftModel.from_pretrained(base, path)``. Returns it.

    peft's own ``save_pretrained`` (safetensors, ``adapter_config.json``, a model card). Heads
    kept through ``modules_to_save`` are in it, so a classifier loads with its trained head.
    peft puts an adapter not named ``"default"`` (``attach``'s) in a subfolder of its name.
    """
    _hf_model(peft_model)
    name = peft_model.active_adapter
    peft_model.save_pretrained(path, selected_adapters=[name], save_embedding_layers=False)
    return Path(path) if name == "default" else Path(path) / name


def adapter_shapes(peft_model: PeftModel) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every LoRA-wrapped Linear, by module path; rank-independent.

    Read it from the *unpruned* model with LoRA attached to get ``global_shapes`` for
    :func:`fedspine.lora.coords.lift`.
    """
    hf = _hf_model(peft_model)
    return {
        path: (int(m.out_features), int(m.in_features))
        for path, m in hf.named_modules()
        if isinstance(m, LoraLayer) and peft_model.active_adapter in m.lora_A
    }


def _unwrap(peft_model: PeftModel, *, merge: bool) -> nn.Module:
    model = peft_model.merge_and_unload() if merge else peft_model.unload()
    # peft froze every base weight; a plain HF model is fully trainable, and gradient-based
    # importance (e.g. Taylor, anchors.md §c.2 item 7) needs base-weight grads again.
    model.requires_grad_(True)
    return model


def merge(peft_model: PeftModel) -> nn.Module:
    """Fold W <- W + s·B·A into the base weights and return the plain, fully trainable HF model.

    modules_to_save heads are replaced by their trained copies. The result can be pruned and
    re-attached (anchors.md §c.2 item 6).
    """
    _hf_model(peft_model)
    return _unwrap(peft_model, merge=True)


def detach(peft_model: PeftModel) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """Remove LoRA *without* merging: the plain model (base weights as before) plus the adapter
    tensors, e.g. to prune the base and re-attach a projected adapter later.

    The plain model keeps the trained copies of modules_to_save heads (they are in the tensors too).
    """
    tensors = extract(peft_model)
    return _unwrap(peft_model, merge=False), tensors
