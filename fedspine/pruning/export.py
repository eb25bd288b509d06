"""Save a pruned (and possibly LoRA-tuned) model for deployment, and load it back.

``export_for_deployment`` writes ``save_pretrained`` safetensors, the tokenizer and
``fedspine_pruning.json`` (the kept map and which loader the directory needs). A plain HF config
can describe most pruned models, and then ``AutoModel*.from_pretrained(path)`` is all a device
needs (every model type of ``fedspine.pruning.arch.FAMILIES`` says when, ``plain_loadable``).
It cannot describe:

* BERT and RoBERTa with pruned heads: transformers 5 derives the head size as
  hidden / num_attention_heads;
* LLaMA whose head count does not divide hidden (``LlamaConfig`` validates hidden % heads == 0).

Qwen2, Qwen3 and Mistral keep ``head_dim`` in the config and check nothing else, so every
uniformly pruned shape of theirs reloads with plain ``from_pretrained``.

For those the directory holds the *original* architecture's config, and ``load_pruned`` builds
that model, shrinks it with the saved kept map and loads the weights (ours).

With ``adapter=True`` the LoRA is not merged: the weights are the device's pruned base and
``adapter/`` is its adapter as a plain peft directory, loadable on that base with
``PeftModel.from_pretrained(load_pruned(path), path / "adapter")``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedspine.pruning.arch import family_of
from fedspine.pruning.index_map import KeptIndexMap

META_FILE = "fedspine_pruning.json"
PLAIN = "transformers.from_pretrained"
FALLBACK = "fedspine.pruning.load_pruned"
ADAPTER_DIR = "adapter"  # export_for_deployment(adapter=True): the peft adapter's folder


def export_for_deployment(
    model: nn.Module,
    path: str | Path,
    tokenizer: Any = None,
    kept_map: KeptIndexMap | None = None,
    *,
    adapter: bool = False,
) -> Path:
    """Write ``model`` to ``path`` so that a device can load it with no fedspine state.

    A peft model is merged and unloaded first (this merges the adapters into the caller's base
    weights). ``kept_map`` (``None``: the model is unpruned) is stored next to the weights; the
    JSON's ``loader`` says whether plain ``from_pretrained`` works or ``load_pruned`` is needed.

    ``adapter=True`` (a peft model only) keeps the adapter apart instead, for peft users: the
    weights are the pruned base without the LoRA (a copy is unloaded; the caller's model is left
    as it is) and ``path/adapter`` holds the adapter, its trained head included, as peft's own
    ``save_pretrained`` directory. ``PeftModel.from_pretrained(load_pruned(path), path /
    "adapter")`` is then the tuned model, and its ``merge_and_unload()`` what ``adapter=False``
    writes. The JSON's ``adapter`` names the folder (``None`` without one).
    """
    is_peft = type(model).__module__.startswith("peft.") and hasattr(model, "merge_and_unload")
    if adapter and not is_peft:
        raise ValueError(f"adapter=True needs a peft model (LoRA attached), got {type(model).__name__}")
    tuned = model
    if adapter:
        model = copy.deepcopy(model).unload()
    elif is_peft:
        model = model.merge_and_unload()
    fam = family_of(model)
    shape = fam.arch_shape(model)
    if kept_map is None:
        kept_map = KeptIndexMap.full(shape)
    bad = kept_map.first_mismatch(shape)
    if bad is not None:
        raise ValueError(f"kept_map layer {bad} does not match the model's current sizes {shape}")
    _drop_gguf_marker(model)
    fam.sync_config(model)
    plain = fam.plain_loadable(shape)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if not plain:  # save the original architecture's config; load_pruned shrinks it again
        model.config = fam.config_for_shape(config, kept_map.shape)
    try:
        model.save_pretrained(out)
    finally:
        model.config = config
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if adapter:
        from fedspine.lora.adapters import save_adapter

        save_adapter(tuned, out / ADAPTER_DIR)
    meta = {
        "format": 1,
        "family": fam.name,
        "model_type": fam.model_type,
        "loader": PLAIN if plain else FALLBACK,
        "note": (
            "load with AutoModel*.from_pretrained(path)"
            if plain
            else "a plain HF config cannot describe these pruned widths; load with "
            "fedspine.pruning.load_pruned(path) (config.json describes the unpruned architecture)"
        )
        + (
            f"; the LoRA is not merged: peft.PeftModel.from_pretrained(that model, path/{ADAPTER_DIR!r})"
            if adapter
            else ""
        ),
        "adapter": ADAPTER_DIR if adapter else None,
        "sparsity": kept_map.sparsity(fam.mlp_matrices),
        "kept_map": kept_map.to_dict(),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def load_pruned(path: str | Path) -> nn.Module:
    """Load a directory written by ``export_for_deployment`` (either loader), in eval mode."""
    import transformers
    from safetensors.torch import load_file

    src = Path(path)
    meta = json.loads((src / META_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(src)
    archs = getattr(config, "architectures", None) or []
    if not archs or not hasattr(transformers, archs[0]):
        raise ValueError(f"{src}/config.json names no known architecture ({archs!r})")
    cls = getattr(transformers, archs[0])
    if meta["loader"] == PLAIN:
        return cls.from_pretrained(src).eval()
    if meta["loader"] != FALLBACK:
        raise ValueError(
            f"{src}/{META_FILE}: loader must be {PLAIN!r} or {FALLBACK!r}, got {meta['loader']!r}"
        )

    from fedspine.pruning.structured import prune_model

    kept = KeptIndexMap.from_dict(meta["kept_map"])
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the global RNG
        model = cls(config)
    prune_model(model, KeptIndexMap.full(kept.shape), [(lk.heads, lk.channels) for lk in kept.layers])
    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"{src}: weights do not fit: missing {sorted(set(missing) - tied)}, unexpected {unexpected}"
        )
    if tied:
        model.tie_weights()
    return model.eval()


def _drop_gguf_marker(model: nn.Module) -> None:
    """GGUF checkpoints are dequantized to float at load, but transformers keeps a quantizer
    marker that makes ``save_pretrained`` refuse; dropping it is safe for GGUF only."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        raise ValueError(f"cannot export a {method!r}-quantized model; dequantize it first")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
