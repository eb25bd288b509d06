import copy

import numpy as np
import pytest
import torch
from masking import zero_removed
from tiny_models import VOCAB

from fedspine.lora import attach, extract, load
from fedspine.lora.coords import project
from fedspine.pruning import KeptIndexMap, arch_shape, module_slices
from fedspine.pruning.iterative import PruneAndTune, PruneSchedule, cubic_targets, removed_units


def _random_adapter(peft_model, seed=0):
    """Give the adapter non-zero B (a fresh LoRA has B = 0 and would hide slicing mistakes)."""
    rng = np.random.default_rng(seed)
    tensors = {
        k: (0.2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in extract(peft_model).items()
    }
    load(peft_model, tensors)


def _batch(model_name, ids):
    if model_name == "bert":
        return {"input_ids": ids, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "labels": ids}


def test_prune_with_adapter_attached_is_exact_and_carries_the_adapter(tiny_model, ids):
    name, model = tiny_model
    shape = arch_shape(model)
    peft_model = attach(model, 4)
    _random_adapter(peft_model)
    pt = PruneAndTune(peft_model, KeptIndexMap.full(shape), PruneSchedule(0.4, prune_interval=1), 1, rank=4)
    peft_model(**_batch(name, ids)).loss.backward()
    pt.importance.accumulate(pt._lora_modules())
    reference = copy.deepcopy(pt.model)  # same weights and adapter, before the prune
    adapter_before = extract(pt.model)

    assert pt.prune_now(0.4)
    # Expected: the unpruned model with the removed units zeroed, base AND adapter.
    gone = removed_units(KeptIndexMap.full(shape), pt.kept_map)
    positions = [
        ([h for h in range(shape.num_heads) if h not in g_heads], [c for c in range(96) if c not in g_chans])
        for g_heads, g_chans in gone
    ]
    merged = reference.merge_and_unload()  # zeroing W + sBA on the removed units zeroes both
    zero_removed(merged, positions, shape.group_size, shape.head_dim)
    merged.eval(), pt.model.eval()
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        got = pt.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert pt.achieved_ratio >= 0.3
    # The adapter on the kept coordinates is carried exactly, not re-created.
    relative = KeptIndexMap.full(shape).compose(positions)
    slices = module_slices(pt.hf_model, relative)  # paths are the same before and after
    expected_adapter = project(adapter_before, slices, rank=4)
    for key, value in extract(pt.model).items():
        np.testing.assert_array_equal(value, expected_adapter[key])


def test_cubic_schedule():
    assert cubic_targets(0.0, 0.5, 3) == pytest.approx(
        [0.5 - 0.5 * (2 / 3) ** 3, 0.5 - 0.5 * (1 / 3) ** 3, 0.5]
    )
    assert cubic_targets(0.4, 0.2, 2) == [0.4, 0.4]  # never un-prune
    assert cubic_targets(0.0, 0.5, 0) == []
    with pytest.raises(ValueError, match="prune_interval"):
        PruneSchedule(0.5, prune_interval=0)
    with pytest.raises(ValueError, match="target_ratio"):
        PruneSchedule(1.0)


def test_local_training_prunes_every_interval_toward_the_target():
    from tiny_models import tiny_llama

    model = tiny_llama(2)
    peft_model = attach(model, 4)
    steps, interval = 45, 15
    pt = PruneAndTune(
        peft_model,
        KeptIndexMap.full(arch_shape(model)),
        PruneSchedule(0.5, interval, round_to=8),
        steps,
        rank=4,
    )
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (8, 16), generator=gen)
    opt = torch.optim.AdamW([p for p in pt.model.parameters() if p.requires_grad], lr=1e-2)
    ratios, losses = [], []
    for _ in range(steps):
        batch = data[torch.randint(0, 8, (4,), generator=gen)]
        loss = pt.model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        if pt.after_backward():
            opt = torch.optim.AdamW([p for p in pt.model.parameters() if p.requires_grad], lr=1e-2)
            ratios.append(pt.achieved_ratio)
        else:
            opt.step()
        opt.zero_grad()
    assert pt.prunes == 3 and len(ratios) >= 2
    assert ratios == sorted(ratios) and ratios[-1] >= 0.4  # rounded to whole heads / 8 channels
    assert np.isfinite(losses).all()
    shape = arch_shape(pt.hf_model)
    assert shape.num_kv_heads == 1 and shape.num_heads == 2  # one of two KV groups left


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_other_criteria_are_selectable_by_name(importance, ids):
    from tiny_models import tiny_bert

    model = tiny_bert()
    peft_model = attach(model, 4)
    calib = {"input_ids": ids, "labels": torch.tensor([0, 1])}
    pt = PruneAndTune(
        peft_model,
        KeptIndexMap.full(arch_shape(model)),
        PruneSchedule(0.5, 1),
        1,
        rank=4,
        importance=importance,
        calib=calib,
    )
    pt.model(**calib).loss.backward()
    assert pt.after_backward()
    assert pt.achieved_ratio >= 0.4 and arch_shape(pt.hf_model).num_heads == 2
    with pytest.raises(ValueError, match="importance must be one of"):
        PruneAndTune(pt.model, pt.kept_map, PruneSchedule(0.5), 1, rank=4, importance="random")
