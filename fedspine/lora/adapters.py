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
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from fedspine.lora.coords import LORA_A, LORA_B

#: Default LoRA targets per family: every prunable Linear of a block (attention and MLP).
#: peft matches a string target as a *suffix* of the module path (``name == t or
#: name.endswith("." + t)``). For BERT, ``"output.dense"`` therefore matches both
#: ``attention.output.dense`` and the block's ``output.dense``, but never ``pooler.dense``
#: (the suffix is just ``dense``) nor ``cls.predictions.transform.dense``; a test pins the set.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}

#: HF ``config.model_type`` -> family whose module names it shares.
FAMILY_OF_MODEL_TYPE: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "bert": "bert",
    "roberta": "bert",
}

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


def family_of(model: nn.Module) -> str:
    """The target-name family (``"llama"`` / ``"bert"``) of an HF model, from ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"model_type {model_type!r} has no default LoRA targets; pass family= one of "
            f"{sorted(DEFAULT_TARGETS)} or targets= explicitly"
        )
    return FAMILY_OF_MODEL_TYPE[model_type]


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
    ``family`` (itself read from ``config.model_type`` when None). Sequence- and
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
        fam = family_of(model) if family is None else family
        if fam not in DEFAULT_TARGETS:
            raise ValueError(f"family must be one of {sorted(DEFAULT_TARGETS)}, got {fam!r}")
        targets = DEFAULT_TARGETS[fam]
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
    return reattach(model, config, seed=seed)


def reattach(
    model: nn.Module, config: LoraConfig, *, seed: int = 0, adapter_name: str = "default"
) -> PeftModel:
    """Wrap a plain model with a fresh adapter of exactly ``config`` (a copy: rank, alpha,
    dropout, targets, heads, rsLoRA and the rest stay the user's), lora_A drawn in a forked RNG
    seeded with ``seed`` (see :func:`attach`)."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 calls a property transformers 5.x deprecated; not actionable for our users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, copy.deepcopy(config), adapter_name=adapter_name)


#: LoraConfig fields whose non-default value adds tensors or per-module settings that extract /
#: load / project do not carry: an adapter with any of them cannot be moved across a prune.
_NOT_CARRIED = {
    "use_dora": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def adapter_config(peft_model: PeftModel) -> LoraConfig:
    """The active adapter's ``LoraConfig`` if fedspine can carry the adapter across a prune
    (:func:`detach`, slice, :func:`reattach`, :func:`load`); else ``ValueError`` saying what is not
    supported. Checks only; changes nothing."""
    hf = _hf_model(peft_model)
    names = sorted(peft_model.peft_config)
    if len(names) != 1:
        raise ValueError(f"peft_model must hold exactly one adapter, got {names}")
    config = peft_model.peft_config[names[0]]
    if not isinstance(config, LoraConfig):
        raise ValueError(f"peft_model's adapter must be a LoRA (LoraConfig), got {type(config).__name__}")
    for name, default in _NOT_CARRIED.items():
        value = getattr(config, name, default)
        if value is not None and value != default:
            raise ValueError(
                f"LoraConfig.{name}={value!r} is not supported here (its tensors or per-module settings are "
                f"not carried across a prune); allowed: {default!r}"
            )
    for path, module in hf.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
            raise ValueError(
                f"LoRA on {path} ({type(module).__name__}) is not supported here: only LoRA on nn.Linear "
                "layers is carried across a prune"
            )
    return config


def _hf_model(peft_model: PeftModel) -> nn.Module:
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    return peft_model.base_model.model


def _adapter_params(peft_model: PeftModel) -> dict[str, nn.Parameter]:
    """Stable name -> live parameter for the active adapter (LoRA A/B and modules_to_save heads)."""
    hf = _hf_model(peft_model)
    name = peft_model.active_adapter
    out: dict[str, nn.Parameter] = {}
    for path, module in hf.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            out[f"{path}.{LORA_A}"] = module.lora_A[name].weight
            out[f"{path}.{LORA_B}"] = module.lora_B[name].weight
        elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            for pname, p in module.modules_to_save[name].named_parameters():
                out[f"{path}.{pname}"] = p
    return out


def extract(peft_model: PeftModel) -> dict[str, np.ndarray]:
    """The active adapter's tensors as float32 numpy copies under stable names (module docstring)."""
    return {
        k: p.detach().to("cpu", torch.float32).numpy().copy() for k, p in _adapter_params(peft_model).items()
    }


class LoadReport(NamedTuple):
    """Keys that :func:`load` could not match (both empty after a strict load)."""

    missing: list[str]  # adapter tensors of the model that ``tensors`` did not provide
    unexpected: list[str]  # keys of ``tensors`` that the model has no adapter tensor for


def load(peft_model: PeftModel, tensors: Mapping[str, np.ndarray], *, strict: bool = True) -> LoadReport:
    """Copy ``tensors`` (names as from :func:`extract`) into the active adapter, in place.

    With ``strict`` any missing or unexpected key raises ``ValueError`` listing both: the known
    silent bug of heterogeneous-LoRA code is ``load_state_dict(strict=False)`` dropping renamed
    keys so the global adapter is never applied (anchors.md §d). Shape mismatches and non-finite
    values always raise. Everything is checked before anything is copied, so on error the model
    is left as it was. Returns the unmatched keys (useful with ``strict=False``).
    """
    params = _adapter_params(peft_model)
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
            arrays[key] = arr
    if problems:
        raise ValueError("tensors do not fit the adapter: " + "; ".join(problems))
    with torch.no_grad():
        for key, arr in arrays.items():
            p = params[key]
            p.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(p.device, p.dtype))
    return LoadReport(missing, unexpected)


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
