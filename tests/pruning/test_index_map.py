import json

import numpy as np
import pytest

from fedspine.pruning.index_map import ArchShape, KeptIndexMap

SHAPE = ArchShape(num_layers=2, num_heads=6, num_kv_heads=3, head_dim=4, intermediate_size=10, hidden_size=24)


def test_three_successive_prunes_compose_to_original_indices():
    m = KeptIndexMap.full(SHAPE)
    # prune 1: drop KV group 1 (query heads 2, 3) in layer 0, channels 0 and 9 everywhere
    m = m.compose([([0, 1, 4, 5], range(1, 9)), ([0, 1, 2, 3, 4, 5], range(1, 9))])
    # prune 2: positions refer to the current model
    m = m.compose([([2, 3], [0, 2, 4, 6]), ([0, 1, 2, 3], [1, 2, 3, 4, 5, 6, 7])])
    # prune 3
    m = m.compose([([0, 1], [3]), ([2, 3], [0, 6])])
    assert m.layers[0].heads == (4, 5) and m.layers[0].kv_heads == (2,)
    assert m.layers[0].channels == (7,)  # current [1,2,...,8] -> [1,3,5,7] -> [7]
    assert m.layers[1].heads == (2, 3) and m.layers[1].kv_heads == (1,)
    assert m.layers[1].channels == (2, 8)
    np.testing.assert_array_equal(m.head_rows(0), [16, 17, 18, 19, 20, 21, 22, 23])
    np.testing.assert_array_equal(m.kv_rows(1), [4, 5, 6, 7])
    assert KeptIndexMap.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_sparsity_counts_removed_prunable_weights():
    full = KeptIndexMap.full(SHAPE)
    assert full.sparsity(mlp_matrices=3) == 0.0
    half = full.compose([(range(3), range(5))] * 2)  # MHA-style positions in a GQA model: kv follows
    assert half.layers[0].kv_heads == (0, 1)
    hd = 24 * 4
    total = 2 * (2 * 6 * hd + 2 * 3 * hd + 3 * 24 * 10)
    kept = 2 * (2 * 3 * hd + 2 * 2 * hd + 3 * 24 * 5)
    assert half.sparsity(3) == pytest.approx(1 - kept / total)


def test_invalid_maps_and_positions_are_rejected_with_reasons():
    full = KeptIndexMap.full(SHAPE)
    with pytest.raises(ValueError, match="layer 0 head positions"):
        full.compose([([7], [0]), ([0], [0])])
    with pytest.raises(ValueError, match="one entry per layer"):
        full.compose([([0], [0])])
    with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
        ArchShape(1, 5, 2, 4, 8, 20)
    bad = full.to_dict()
    bad["layers"][0]["kv_heads"] = [0]
    with pytest.raises(ValueError, match="do not match the query heads' groups"):
        KeptIndexMap.from_dict(bad)


def test_first_mismatch_names_the_first_layer_that_differs_from_a_shape():
    full = KeptIndexMap.full(SHAPE)
    assert full.first_mismatch(SHAPE) is None
    pruned = full.compose([([0, 1, 2, 3, 4, 5], range(10)), ([0, 1, 4, 5], range(1, 9))])
    assert pruned.first_mismatch(SHAPE) == 1
