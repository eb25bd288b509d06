"""Model families fedspine understands, keyed by ``model.config.model_type``: the one registry.

``FAMILIES`` is the only list of supported models. Pruning, export, the batched runner and
``fedspine.lora.attach`` (its default LoRA targets) all read it, so they cannot disagree; any
other ``model_type`` is refused by :func:`family_of`, naming it and the supported list.

Two families, six model types: ``bert`` (BERT, RoBERTa) and ``llama`` (LLaMA, Qwen2 with q/k/v
biases, Qwen3 with per-head q/k norms, Mistral). ``Family.name`` is the family,
``Family.model_type`` the HF model type.

A family knows where each layer's modules are, by *role* (q, k, v, o, mlp_in, mlp_out), how big
the model is now (``arch_shape``), how to make the HF config and the attention modules'
attributes agree with the weights after a prune (``sync_config``), whether a plain HF config can
describe a pruned shape (``plain_loadable``), and which Linears LoRA adapts (``lora_targets``).
Pruning and importance code only ever talk to roles, so adding a model type is one small class
and one registry entry (ours).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedspine.pruning.index_map import ROLES, ArchShape, KeptIndexMap, ModuleSlice


@dataclass(frozen=True)
class LayerRoles:
    """One transformer layer's prunable Linears, by role."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_in: tuple[nn.Linear, ...]  # BERT: (intermediate.dense,); LLaMA: (gate_proj, up_proj)
    mlp_out: nn.Linear


class Family:
    """Base class: subclasses fill in the paths and the config fields."""

    name: str = ""  # the family: "bert" or "llama" (what the batched runner's mask recipe keys on)
    model_type: str = ""  # the HF ``config.model_type`` this entry is registered under
    lora_targets: tuple[str, ...] = ()  # default LoRA targets: peft module-name suffixes
    mlp_matrices: int = 0  # MLP matrices per layer, for KeptIndexMap.sparsity
    layer_prefixes: tuple[str, ...] = ()  # candidate paths of the layer list, first match wins
    role_paths: dict[str, tuple[str, ...]] = {}  # role -> module paths inside one layer
    causal_lm: bool = False
    heads_by_hand: bool = False  # remove heads without the DependencyGraph even without GQA

    # --- locating modules ------------------------------------------------------------------------
    def layer_prefix(self, model: nn.Module) -> str:
        """Path of the layer list (``bert.encoder.layer`` for BertFor*, ``encoder.layer`` for BertModel)."""
        for prefix in self.layer_prefixes:
            try:
                model.get_submodule(prefix)
            except AttributeError:
                continue
            return prefix
        raise ValueError(f"{self.name}: none of {list(self.layer_prefixes)} found in {type(model).__name__}")

    def layers(self, model: nn.Module) -> list[LayerRoles]:
        out = []
        for layer in model.get_submodule(self.layer_prefix(model)):
            mods = {
                role: tuple(layer.get_submodule(p) for p in paths) for role, paths in self.role_paths.items()
            }
            out.append(
                LayerRoles(
                    q=mods["q"][0],
                    k=mods["k"][0],
                    v=mods["v"][0],
                    o=mods["o"][0],
                    mlp_in=mods["mlp_in"],
                    mlp_out=mods["mlp_out"][0],
                )
            )
        return out

    def module_paths(self, model: nn.Module, layer: int) -> dict[str, tuple[str, ...]]:
        """Role -> full module paths (relative to ``model``) in one layer."""
        prefix = self.layer_prefix(model)
        return {
            role: tuple(f"{prefix}.{layer}.{p}" for p in paths) for role, paths in self.role_paths.items()
        }

    # --- sizes and config ------------------------------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        raise NotImplementedError

    def arch_shape(self, model: nn.Module) -> ArchShape:
        """Current sizes, read from the weights (== the original sizes for an unpruned model).

        Every layer must have the same sizes: a HF config has one value per field.
        """
        hd = self.head_dim(model)
        sizes = {
            (lr.q.out_features // hd, lr.k.out_features // hd, lr.mlp_in[0].out_features)
            for lr in self.layers(model)
        }
        if len(sizes) != 1:
            raise ValueError(
                f"{self.name}: layers differ in size {sorted(sizes)}; a HF config needs them equal"
            )
        heads, kv, inter = sizes.pop()
        return ArchShape(
            num_layers=len(self.layers(model)),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=hd,
            intermediate_size=inter,
            hidden_size=int(model.config.hidden_size),
        )

    def write_config(self, config: Any, shape: ArchShape) -> None:
        """Set the config fields that describe ``shape`` (in place)."""
        raise NotImplementedError

    def sync_modules(self, model: nn.Module, shape: ArchShape) -> None:
        """Set the attention/MLP module attributes that cache sizes."""

    def sync_config(self, model: nn.Module) -> ArchShape:
        """Make the HF config and module attributes match the (pruned) weights; returns the shape."""
        shape = self.arch_shape(model)
        self.write_config(model.config, shape)
        self.sync_modules(model, shape)
        return shape

    def config_for_shape(self, config: Any, shape: ArchShape) -> Any:
        """A copy of ``config`` describing ``shape`` (used to save the original architecture)."""
        new = copy.deepcopy(config)
        self.write_config(new, shape)
        return new

    def plain_loadable(self, shape: ArchShape) -> bool:
        """Whether ``from_pretrained`` rebuilds a model of this shape from a plain config."""
        raise NotImplementedError

    def tracing(self) -> contextlib.AbstractContextManager[None]:
        """Context to hold while torch-pruning traces the model (a no-op unless a family needs one)."""
        return contextlib.nullcontext()


class BertFamily(Family):
    name = "bert"
    model_type = "bert"
    mlp_matrices = 2
    layer_prefixes = ("bert.encoder.layer", "encoder.layer")
    # peft matches a target as a suffix of the module path (``name == t or name.endswith("." + t)``):
    # "output.dense" matches attention.output.dense and the block's output.dense, never pooler.dense
    # nor a classification head's dense (their suffix is just "dense"); a test pins the set.
    lora_targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    role_paths = {
        "q": ("attention.self.query",),
        "k": ("attention.self.key",),
        "v": ("attention.self.value",),
        "o": ("attention.output.dense",),
        "mlp_in": ("intermediate.dense",),
        "mlp_out": ("output.dense",),
    }

    def _self_attn(self, model: nn.Module) -> list[nn.Module]:
        prefix = self.layer_prefix(model)
        return [layer.attention.self for layer in model.get_submodule(prefix)]

    def head_dim(self, model: nn.Module) -> int:
        return int(self._self_attn(model)[0].attention_head_size)

    def write_config(self, config: Any, shape: ArchShape) -> None:
        config.num_attention_heads = shape.num_heads
        config.intermediate_size = shape.intermediate_size

    def sync_modules(self, model: nn.Module, shape: ArchShape) -> None:
        for sa in self._self_attn(model):
            sa.num_attention_heads = shape.num_heads
            sa.all_head_size = shape.num_heads * shape.head_dim

    def plain_loadable(self, shape: ArchShape) -> bool:
        # transformers 5 BertSelfAttention derives head size as hidden_size / num_attention_heads,
        # so a BERT with pruned heads cannot be described by a plain BertConfig.
        return shape.hidden_size == shape.num_heads * shape.head_dim


class RobertaFamily(BertFamily):
    """RoBERTa (the FedSpine paper's main model): BERT's layer, under ``roberta.``.

    Its embeddings differ (position ids start at ``padding_idx + 1``), but they are never pruned.
    """

    model_type = "roberta"
    layer_prefixes = ("roberta.encoder.layer", "encoder.layer")


class LlamaFamily(Family):
    name = "llama"
    model_type = "llama"
    modeling = "transformers.models.llama.modeling_llama"  # where this model type's rotate_half lives
    mlp_matrices = 3
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layer_prefixes = ("model.layers", "layers")
    role_paths = {
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.o_proj",),
        "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp_out": ("mlp.down_proj",),
    }
    causal_lm = True

    def head_dim(self, model: nn.Module) -> int:
        return int(model.get_submodule(self.layer_prefix(model))[0].self_attn.head_dim)

    def write_config(self, config: Any, shape: ArchShape) -> None:
        config.head_dim = shape.head_dim  # explicit: hidden_size // heads no longer gives it
        config.num_attention_heads = shape.num_heads
        config.num_key_value_heads = shape.num_kv_heads
        config.intermediate_size = shape.intermediate_size

    def sync_modules(self, model: nn.Module, shape: ArchShape) -> None:
        for layer in model.get_submodule(self.layer_prefix(model)):
            layer.self_attn.num_key_value_groups = shape.group_size
            layer.mlp.intermediate_size = shape.intermediate_size

    def plain_loadable(self, shape: ArchShape) -> bool:
        # head_dim is explicit in the config, but LlamaConfig still validates hidden % heads == 0.
        return shape.hidden_size % shape.num_heads == 0

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Replace RoPE's ``rotate_half`` by the identity while torch-pruning traces.

        torch-pruning 1.6.1 never returns from ``get_pruning_group`` on q/k through
        ``rotate_half`` (slice + cat; VainF/Torch-Pruning#527). We prune whole heads only, so the
        rotation's index shuffling inside a head does not matter for dependencies. Each model type
        has its own copy of ``rotate_half``, in its modeling module (``modeling``).
        """
        modeling = importlib.import_module(self.modeling)
        orig = modeling.rotate_half
        modeling.rotate_half = lambda x: x
        try:
            yield
        finally:
            modeling.rotate_half = orig


class Qwen2Family(LlamaFamily):
    """Qwen2: LLaMA's layer with biases on q/k/v (sliced with their rows), usually GQA.

    ``Qwen2Config`` has no ``head_dim`` field, but ``Qwen2Attention`` reads ``config.head_dim``
    when set, the config saves it, and nothing checks hidden % heads: any uniform shape loads.
    """

    model_type = "qwen2"
    modeling = "transformers.models.qwen2.modeling_qwen2"

    def plain_loadable(self, shape: ArchShape) -> bool:
        return True


class MistralFamily(LlamaFamily):
    """Mistral: LLaMA's layer with GQA and a sliding window (only the attention mask uses it)."""

    model_type = "mistral"
    modeling = "transformers.models.mistral.modeling_mistral"

    def plain_loadable(self, shape: ArchShape) -> bool:
        return True  # MistralConfig keeps head_dim explicit and does not check hidden % heads


class Qwen3Family(LlamaFamily):
    """Qwen3: LLaMA's layer with an RMSNorm over ``head_dim`` on q and k (``q_norm``/``k_norm``).

    That norm's weight is shared by every head, so removing heads leaves it as it is; but
    torch-pruning's graph couples it to the q rows, so heads are cut by hand (``heads_by_hand``).
    ``Qwen3Config`` keeps ``head_dim`` explicit and checks no hidden % heads.
    """

    model_type = "qwen3"
    modeling = "transformers.models.qwen3.modeling_qwen3"
    heads_by_hand = True

    def plain_loadable(self, shape: ArchShape) -> bool:
        return True


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (BertFamily(), RobertaFamily(), LlamaFamily(), Qwen2Family(), Qwen3Family(), MistralFamily())
}


def family_of(model: nn.Module) -> Family:
    """The registry entry of a HF model (or a peft wrapper around one), by ``config.model_type``.

    The one refusal for models fedspine does not know: it names the model type and the list.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def arch_shape(model: nn.Module) -> ArchShape:
    """The model's sizes read from its weights: the original sizes for an unpruned model, the
    current (pruned) sizes otherwise. Keep the original ones in ``KeptIndexMap.shape``."""
    return family_of(model).arch_shape(model)


def sync_config(model: nn.Module) -> ArchShape:
    """Make ``model.config`` and the attention modules' attributes match the weights."""
    return family_of(model).sync_config(model)


def layer_roles(model: nn.Module) -> list[LayerRoles]:
    """Per layer, the prunable Linears by role."""
    return family_of(model).layers(model)


def module_slices(model: nn.Module, kept_map: KeptIndexMap) -> dict[str, ModuleSlice]:
    """For every q/k/v/o/MLP Linear (keyed by its path in ``model``), the original indices of its
    kept output rows / input columns. The LoRA code scatters adapters into original coordinates
    with these."""
    fam = family_of(model)
    if len(kept_map.layers) != len(fam.layers(model)):
        raise ValueError(f"kept_map has {len(kept_map.layers)} layers, the model {len(fam.layers(model))}")
    out: dict[str, ModuleSlice] = {}
    for i in range(len(kept_map.layers)):
        slices = kept_map.role_slices(i)
        paths = fam.module_paths(model, i)
        for role in ROLES:
            for path in paths[role]:
                out[path] = slices[role]
    return out
