"""fedspine.lora.adapters on tiny random LLaMA and BERT: targets, extract/load, merge/detach, and
adapters projected onto a pruned model (pruning simulated by slicing weights by hand)."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedspine.lora import adapters as A
from fedspine.lora.coords import lift, project

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
BERT_TARGETS = {
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
}


@dataclass(frozen=True)
class Slice:
    out_idx: np.ndarray | None
    in_idx: np.ndarray | None


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise(peft_model, seed=0):
    """Non-zero B (peft starts B at 0) so merging and loading actually change something."""
    rng = np.random.default_rng(seed)
    tensors = {
        k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in A.extract(peft_model).items()
    }
    A.load(peft_model, tensors)
    return tensors


@pytest.mark.parametrize(
    ("family", "expected", "head"), [("llama", LLAMA_TARGETS, None), ("bert", BERT_TARGETS, "classifier")]
)
def test_default_targets_and_heads(make_model, family, expected, head):
    peft_model = A.attach(make_model(family), rank=4)
    wrapped = [p for p, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 2 * len(expected)  # each target once per layer, nothing else (no pooler)
    assert {p.split(".", 4)[-1] if family == "bert" else p.rsplit(".", 1)[-1] for p in wrapped} == expected
    keys = A.extract(peft_model).keys()
    assert all("default" not in k for k in keys)
    heads = {k for k in keys if not k.endswith(("lora_A", "lora_B"))}
    assert heads == (set() if head is None else {f"{head}.weight", f"{head}.bias"})
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(keys)  # exactly the adapter (+ head) is trainable
    assert peft_model.peft_config["default"].lora_alpha == A.ALPHA_PER_RANK * 4


def test_attach_is_seeded_and_leaves_global_rng_alone(make_model):
    model = make_model("llama")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    t1 = A.extract(A.attach(model, 4, seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)
    t2 = A.extract(A.attach(make_model("llama"), 4, seed=7))
    t3 = A.extract(A.attach(make_model("llama"), 4, seed=8))
    key = "model.layers.0.self_attn.q_proj.lora_A"
    np.testing.assert_array_equal(t1[key], t2[key])
    assert not np.array_equal(t1[key], t3[key])
    assert not any(v.any() for k, v in t1.items() if k.endswith("lora_B"))  # B = 0: output unchanged


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 4, "alpha": 0.0}, "alpha"),
        ({"rank": 4, "dropout": 1.0}, "dropout"),
        ({"rank": 4, "family": "gpt"}, "family"),
        ({"rank": 4, "targets": "q_proj"}, "targets"),
    ],
)
def test_attach_rejects_bad_arguments(make_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.attach(make_model("llama"), **kwargs)


def test_llama_sequence_classification_keeps_score_trainable():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=128,
        num_labels=3,
        pad_token_id=0,
    )
    keys = A.extract(A.attach(LlamaForSequenceClassification(cfg), rank=2)).keys()
    assert {k for k in keys if not k.endswith(("lora_A", "lora_B"))} == {"score.weight"}


def test_functions_reject_a_plain_model(make_model):
    for fn in (A.extract, A.merge, A.detach, A.adapter_shapes):
        with pytest.raises(ValueError, match="peft_model must be a peft.PeftModel"):
            fn(make_model("llama"))


def test_attach_twice_and_unknown_model_type_raise(make_model):
    peft_model = A.attach(make_model("llama"), 4)
    with pytest.raises(ValueError, match="already has LoRA"):
        A.attach(peft_model, 4)
    with pytest.raises(ValueError, match="already has LoRA"):
        A.attach(peft_model.base_model.model, 4)
    model = make_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="family"):
        A.attach(model, 4)
    assert isinstance(A.attach(model, 4, family="llama"), A.PeftModel)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_extract_load_round_trip_reproduces_logits_exactly(make_model, input_ids, family):
    src = A.attach(make_model(family), rank=4, seed=0)
    tensors = _randomise(src)
    assert all(v.dtype == np.float32 for v in A.extract(src).values())
    dst = A.attach(make_model(family), rank=4, seed=99)
    assert not torch.equal(_logits(src, input_ids), _logits(dst, input_ids))
    assert A.load(dst, tensors) == A.LoadReport([], [])
    assert torch.equal(_logits(src, input_ids), _logits(dst, input_ids))
    for k, v in A.extract(dst).items():
        np.testing.assert_array_equal(v, tensors[k])


def test_strict_load_fails_loudly_and_leaves_the_model_alone(make_model):
    peft_model = A.attach(make_model("bert"), rank=4)
    before = A.extract(peft_model)
    good = {k: np.ones_like(v) for k, v in before.items()}
    key = "bert.encoder.layer.0.attention.self.query.lora_A"

    renamed = dict(good)
    renamed[key.replace("lora_A", "lora_A.default")] = renamed.pop(key)
    with pytest.raises(ValueError, match="missing keys.*self.query.lora_A'.*unexpected keys.*lora_A.default"):
        A.load(peft_model, renamed)
    missing = {k: v for k, v in good.items() if k != "classifier.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['classifier.bias'\], unexpected keys \[\]"):
        A.load(peft_model, missing)
    with pytest.raises(ValueError, match=f"{key}: shape"):
        A.load(peft_model, {**good, key: np.ones((8, 64), np.float32)}, strict=False)
    with pytest.raises(ValueError, match="finite"):
        A.load(peft_model, {**good, key: np.full_like(good[key], np.nan)})
    for k, v in A.extract(peft_model).items():
        np.testing.assert_array_equal(v, before[k])  # nothing was copied on any failure

    report = A.load(peft_model, missing, strict=False)
    assert report == A.LoadReport(["classifier.bias"], [])
    np.testing.assert_array_equal(A.extract(peft_model)[key], good[key])


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merge_keeps_logits_and_gives_a_trainable_plain_model(make_model, input_ids, family):
    peft_model = A.attach(make_model(family), rank=4)
    _randomise(peft_model)
    want = _logits(peft_model, input_ids)
    merged = A.merge(peft_model)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(_logits(merged, input_ids), want, rtol=0, atol=1e-5)
    again = A.attach(merged, rank=2)  # the prune-and-tune cycle re-attaches a fresh adapter
    torch.testing.assert_close(_logits(again, input_ids), want, rtol=0, atol=1e-5)


def test_detach_restores_the_base_and_returns_the_adapter(make_model, input_ids):
    base = make_model("bert")
    base_logits = _logits(base, input_ids)
    peft_model = A.attach(make_model("bert"), rank=4)
    tensors = _randomise(peft_model)
    with_lora = _logits(peft_model, input_ids)
    plain, got = A.detach(peft_model)
    assert got.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k])
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert all(p.requires_grad for p in plain.parameters())
    want = base.state_dict()
    for name, value in plain.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(value, want[name]), name
    # the base is as before; only the trained head copy differs, so re-attaching restores the logits
    assert not torch.equal(_logits(plain, input_ids), base_logits)
    back = A.attach(plain, rank=4)
    A.load(back, got)
    torch.testing.assert_close(_logits(back, input_ids), with_lora, rtol=0, atol=1e-6)


def _prune_llama(model, layer0_channels, layer1_heads):
    """Slice weights by hand: MLP channels of layer 0, query heads (with their KV head) of layer 1.

    Returns the module slices in original coordinates, as fedspine.pruning.arch.module_slices would.
    """
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    ch = torch.as_tensor(layer0_channels)
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in layer1_heads])
    kv = sorted({h // group for h in layer1_heads})
    kv_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kv])

    def cut(parent, name, rows=None, cols=None):
        old = getattr(parent, name)
        w = old.weight.detach()
        w = w if rows is None else w[rows]
        w = w if cols is None else w[:, cols]
        new = nn.Linear(w.shape[1], w.shape[0], bias=False)
        new.weight.data.copy_(w)
        setattr(parent, name, new)

    mlp, attn = model.model.layers[0].mlp, model.model.layers[1].self_attn
    cut(mlp, "gate_proj", rows=ch)
    cut(mlp, "up_proj", rows=ch)
    cut(mlp, "down_proj", cols=ch)
    cut(attn, "q_proj", rows=q_rows)
    cut(attn, "k_proj", rows=kv_rows)
    cut(attn, "v_proj", rows=kv_rows)
    cut(attn, "o_proj", cols=q_rows)
    ch, q_rows, kv_rows = ch.numpy(), q_rows.numpy(), kv_rows.numpy()
    return {
        "model.layers.0.mlp.gate_proj": Slice(ch, None),
        "model.layers.0.mlp.up_proj": Slice(ch, None),
        "model.layers.0.mlp.down_proj": Slice(None, ch),
        "model.layers.1.self_attn.q_proj": Slice(q_rows, None),
        "model.layers.1.self_attn.k_proj": Slice(kv_rows, None),
        "model.layers.1.self_attn.v_proj": Slice(kv_rows, None),
        "model.layers.1.self_attn.o_proj": Slice(None, q_rows),
    }


def test_projected_adapter_on_pruned_model_matches_hand_merge(make_model, input_ids):
    rank_global, rank = 6, 4
    global_peft = A.attach(make_model("llama"), rank=rank_global)
    shapes = A.adapter_shapes(global_peft)
    assert shapes["model.layers.0.mlp.down_proj"] == (64, 96)
    glob = _randomise(global_peft, seed=3)

    channels = np.sort(np.random.default_rng(0).choice(96, size=40, replace=False))
    pruned = make_model("llama")
    slices = _prune_llama(pruned, channels, layer1_heads=[2, 3])
    # reference: the pruned plain model with W + s·B_g[kept, :r]·A_g[:r, kept] written in by hand
    reference = make_model("llama")
    _prune_llama(reference, channels, layer1_heads=[2, 3])
    s = A.ALPHA_PER_RANK  # alpha = 2r, so s = alpha / r = 2 at every rank
    with torch.no_grad():
        for path in shapes:
            sl = slices.get(path, Slice(None, None))
            a, b = glob[f"{path}.lora_A"][:rank], glob[f"{path}.lora_B"][:, :rank]
            a = a if sl.in_idx is None else a[:, sl.in_idx]
            b = b if sl.out_idx is None else b[sl.out_idx]
            reference.get_submodule(path).weight += torch.from_numpy(s * b @ a)

    device = A.attach(pruned, rank=rank)  # LoRA shapes follow the pruned Linear shapes
    assert A.adapter_shapes(device)["model.layers.0.mlp.down_proj"] == (64, 40)
    A.load(device, project(glob, slices, rank=rank))
    torch.testing.assert_close(_logits(device, input_ids), _logits(reference, input_ids), rtol=0, atol=1e-5)

    # and back: the device's adapter lifts to the global one on its coordinates, zero elsewhere
    lifted = lift(A.extract(device), slices, rank=rank, global_shapes=shapes)
    key = "model.layers.1.self_attn.o_proj.lora_A"
    m = lifted.masks[key]
    assert m.sum() == rank * 32 and m[:, 32:].all()
    np.testing.assert_array_equal(lifted.tensors[key][m], glob[key][:rank][m])
    assert not lifted.tensors[key][~m].any()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_keys_match_the_pruning_contract(make_model, family):
    """module_slices (fedspine.pruning, built in parallel) keys every prunable Linear by the same
    path that extract() uses, so lift/project need no renaming. Skipped until it exists."""
    arch = pytest.importorskip("fedspine.pruning.arch")
    if not hasattr(arch, "module_slices"):
        pytest.skip("fedspine.pruning.arch.module_slices not there yet")
    from fedspine.pruning.index_map import KeptIndexMap

    model = make_model(family)
    shape = arch.arch_shape(model)
    kept = KeptIndexMap.full(shape).compose([([1, 2], list(range(0, 96, 3)))] * shape.num_layers)
    slices = arch.module_slices(model, kept)
    peft_model = A.attach(model, rank=2)
    shapes = A.adapter_shapes(peft_model)
    assert set(slices) == set(shapes)
    # a device pruned to `kept` holds exactly these shapes; lift/project accept the real ModuleSlice
    glob = A.extract(peft_model)
    dev = project(glob, slices, rank=2)
    q = next(p for p in shapes if p.endswith(("q_proj", "query")))
    assert dev[f"{q}.lora_B"].shape == (2 * shape.head_dim, 2)
    lifted = lift(dev, slices, rank=2, global_shapes=shapes)
    assert lifted.masks[f"{q}.lora_B"].sum() == 2 * 2 * shape.head_dim


def test_our_names_are_peft_saved_names_without_the_wrapping(make_model):
    peft = pytest.importorskip("peft")
    peft_model = A.attach(make_model("bert"), rank=4)
    theirs = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    ours = A.extract(peft_model)
    assert {A.to_peft_key(k) for k in ours} == set(theirs)
    assert {A.from_peft_key(k) for k in theirs} == set(ours)
    assert A.to_peft_key("bert.pooler.dense.lora_B") == "base_model.model.bert.pooler.dense.lora_B.weight"
    assert A.from_peft_key("base_model.model.classifier.bias") == "classifier.bias"
    for bad in ("classifier.weight", "base_model.model.x.lora_A.bias", "base_model.model.x.lora_A"):
        with pytest.raises(ValueError, match="not a peft LoRA or modules_to_save key"):
            A.from_peft_key(bad)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_saved_adapter_loads_with_plain_peft_and_reproduces_logits(make_model, input_ids, family, tmp_path):
    from peft import PeftModel
    from safetensors.numpy import load_file

    peft_model = A.attach(make_model(family), rank=4)
    tensors = _randomise(peft_model, seed=5)  # the head (bert) is randomised too
    out = A.save_adapter(peft_model, tmp_path / "adapter")
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == {A.to_peft_key(k) for k in tensors}
    for key, value in tensors.items():
        np.testing.assert_array_equal(saved[A.to_peft_key(key)], value)
    reloaded = PeftModel.from_pretrained(make_model(family), out)  # plain peft, a fresh base
    assert torch.equal(_logits(reloaded, input_ids), _logits(peft_model, input_ids))
    with pytest.raises(ValueError, match="peft.PeftModel"):
        A.save_adapter(make_model(family), tmp_path / "x")
