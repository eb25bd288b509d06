import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import tiny_bert, tiny_llama
from transformers import BertModel, LlamaModel

from fedspine.pruning import (
    ArchShape,
    KeptIndexMap,
    arch_shape,
    dependency_groups,
    family_of,
    layer_roles,
    module_slices,
    sync_config,
)


def test_arch_shape_reads_bare_and_headed_models():
    llama = tiny_llama(2)
    assert arch_shape(llama) == ArchShape(2, 4, 2, 16, 96, 64)
    assert arch_shape(LlamaModel(llama.config)) == ArchShape(2, 4, 2, 16, 96, 64)
    bert = tiny_bert()
    assert arch_shape(bert) == ArchShape(2, 4, 4, 16, 96, 64)
    assert arch_shape(BertModel(bert.config)) == ArchShape(2, 4, 4, 16, 96, 64)
    assert len(layer_roles(BertModel(bert.config))[1].mlp_in) == 1 and len(layer_roles(llama)[0].mlp_in) == 2


def test_module_slices_cover_every_prunable_linear_with_original_indices():
    llama = tiny_llama(2)
    kept = KeptIndexMap.full(arch_shape(llama)).compose([([2, 3], [1, 5]), ([0, 1, 2, 3], [0])])
    sl = module_slices(llama, kept)
    names = dict(llama.named_modules())
    assert all(isinstance(names[p], torch.nn.Linear) for p in sl)
    np.testing.assert_array_equal(sl["model.layers.0.self_attn.q_proj"].out_idx, np.arange(32, 64))
    np.testing.assert_array_equal(sl["model.layers.0.self_attn.k_proj"].out_idx, np.arange(16, 32))
    np.testing.assert_array_equal(sl["model.layers.0.self_attn.o_proj"].in_idx, np.arange(32, 64))
    assert (
        sl["model.layers.0.self_attn.o_proj"].out_idx is None
        and sl["model.layers.0.self_attn.q_proj"].in_idx is None
    )
    for p in ("gate_proj", "up_proj"):
        np.testing.assert_array_equal(sl[f"model.layers.0.mlp.{p}"].out_idx, [1, 5])
    np.testing.assert_array_equal(sl["model.layers.1.mlp.down_proj"].in_idx, [0])
    bert = sorted(module_slices(tiny_bert(), KeptIndexMap.full(arch_shape(tiny_bert()))))
    assert bert[:3] == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.query",
    ]


@pytest.mark.parametrize("make", [tiny_bert, lambda: tiny_llama(4)], ids=["bert", "llama-mha"])
def test_dependency_graph_groups_equal_the_role_table(make):
    model = make()
    groups = dependency_groups(model, layer=1)
    fam = family_of(model)
    paths = fam.module_paths(model, 1)
    head = tuple(range(16))
    assert groups["head"] == {
        paths["q"][0]: ("out", head),
        paths["k"][0]: ("out", head),
        paths["v"][0]: ("out", head),
        paths["o"][0]: ("in", head),
    }
    assert groups["channel"] == {
        **{p: ("out", (0,)) for p in paths["mlp_in"]},
        paths["mlp_out"][0]: ("in", (0,)),
    }


def test_sync_config_writes_config_and_attention_attributes():
    llama = tiny_llama(4)
    for lr in layer_roles(llama):  # shrink by hand to 2 query heads on 1 KV head, 40 channels
        lr.q.weight.data = lr.q.weight.data[:32]
        lr.q.out_features = 32
        for m in (lr.k, lr.v):
            m.weight.data, m.out_features = m.weight.data[:16], 16
        lr.o.weight.data, lr.o.in_features = lr.o.weight.data[:, :32], 32
        for m in lr.mlp_in:
            m.weight.data, m.out_features = m.weight.data[:40], 40
        lr.mlp_out.weight.data, lr.mlp_out.in_features = lr.mlp_out.weight.data[:, :40], 40
    shape = sync_config(llama)
    assert shape == ArchShape(2, 2, 1, 16, 40, 64)
    c = llama.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 16, 40)
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in llama.model.layers)
    llama(torch.zeros(1, 3, dtype=torch.long))


def test_index_map_stays_importable_without_torch():
    code = (
        "import sys, fedspine.pruning.index_map, fedspine.pruning\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr
