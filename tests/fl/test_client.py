import dataclasses

import numpy as np
import pytest
import tiny_models
import torch

from fedspine.config import ClientConfig, from_mapping
from fedspine.fl.client import LocalData, LocalState, client_step
from fedspine.fl.messages import TrainIns
from fedspine.lora import attach, extract
from fedspine.lora.coords import project
from fedspine.pruning import KeptIndexMap, arch_shape, module_slices

VOCAB = 64


def tiny_bert(seed=0):
    return tiny_models.tiny_bert(
        seed, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=32
    )


def local_data(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 12), generator=g)
    labels = (ids[:, 0] % 2).long()  # learnable signal

    def batches(gen):
        while True:
            idx = torch.randint(0, n, (8,), generator=gen)
            yield {"input_ids": ids[idx], "labels": labels[idx]}

    return LocalData(batches, {"input_ids": ids[:16], "labels": labels[:16]}, n)


def global_adapter(rank=8):
    """The server's initial adapter at r_max on the unpruned model (B = 0)."""
    return extract(attach(tiny_bert(), rank, seed=123))


def ins_for(state, rank, ratio, rnd=1, seed=0, **config):
    slices = module_slices(state.model, state.kept_map)
    return TrainIns(
        rnd,
        "dev-1",
        ratio,
        rank,
        project(global_adapter(), slices, rank=rank),
        config=ClientConfig(**{"local_steps": 6, "prune_interval": 3, "lr": 1e-2, **config}),
        seed=seed,
    )


def fresh_state():
    model = tiny_bert()
    return LocalState(model, KeptIndexMap.full(arch_shape(model)))


def test_client_step_prunes_trains_and_reports_in_its_own_coordinates():
    state = fresh_state()
    res, state = client_step(ins_for(state, 4, 0.5), state, local_data())
    kept = KeptIndexMap.from_dict(res.kept_map)
    assert kept == state.kept_map and res.achieved_ratio >= 0.4
    assert arch_shape(state.model).num_heads == len(kept.layers[0].heads) < 4
    slices = module_slices(state.model, kept)
    for key, value in res.adapter.items():
        path, kind = key.rsplit(".", 1)
        if kind == "lora_B" and slices[path].out_idx is not None:
            assert value.shape == (len(slices[path].out_idx), 4)
        if kind == "lora_A" and slices[path].in_idx is not None:
            assert value.shape == (4, len(slices[path].in_idx))
    assert np.isfinite([res.loss_before, res.loss_after]).all() and res.update_norm > 0
    assert res.num_samples == 32 and res.metrics["prunes"] >= 1
    # the next round starts from the pruned base, and asks for no more than it already has
    res2, state2 = client_step(ins_for(state, 2, 0.5, rnd=2), state, local_data())
    assert res2.achieved_ratio == pytest.approx(res.achieved_ratio) and res2.rank == 2


def test_client_step_is_reproducible_for_the_same_seed_device_and_round():
    a, _ = client_step(ins_for(fresh_state(), 4, 0.3), fresh_state(), local_data())
    b, _ = client_step(ins_for(fresh_state(), 4, 0.3), fresh_state(), local_data())
    assert a.kept_map == b.kept_map and a.loss_after == b.loss_after
    for key in a.adapter:
        np.testing.assert_array_equal(a.adapter[key], b.adapter[key])
    c, _ = client_step(ins_for(fresh_state(), 4, 0.3, seed=1), fresh_state(), local_data())
    assert any(not np.array_equal(a.adapter[k], c.adapter[k]) for k in a.adapter)


def test_client_config_is_typed_and_checked_field_by_field():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['config.local_stpes'\]"):
        from_mapping(ClientConfig, {"local_stpes": 3}, "config.")  # as a message decodes it
    with pytest.raises(ValueError, match="client.local_steps must be >= 1, got 0"):
        ClientConfig(local_steps=0)
    ins = dataclasses.replace(ins_for(fresh_state(), 4, 0.3), config={"local_steps": 3})
    with pytest.raises(ValueError, match="TrainIns.config must be a ClientConfig, got dict"):
        client_step(ins, fresh_state(), local_data())


def skewed_data(n=64, minority=6):
    """A device with label skew: ``n - minority`` examples of label 0, ``minority`` of label 1."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (n, 12), generator=g)
    labels = torch.zeros(n, dtype=torch.long)
    labels[:minority] = 1

    def batches(gen):
        while True:
            idx = torch.randint(0, n, (8,), generator=gen)
            yield {"input_ids": ids[idx], "labels": labels[idx]}

    counts = np.array([n - minority, minority])
    return LocalData(batches, {"input_ids": ids[:16], "labels": labels[:16]}, n, counts)


def head_bias_shift(loss):
    state = fresh_state()
    ins = ins_for(state, 4, 0.0, loss=loss, local_steps=12)
    res, _ = client_step(ins, state, skewed_data())
    bias = res.adapter["classifier.bias"]
    return float(bias[0] - bias[1])


def test_logit_adjusted_loss_keeps_a_skewed_device_from_learning_its_label_prior():
    plain, adjusted = head_bias_shift("ce"), head_bias_shift("logit-adjusted")
    assert plain > 0.02  # plain CE pushes the head towards the device's only label
    assert abs(adjusted) < 0.25 * plain


def test_logit_adjusted_loss_needs_label_counts_and_bad_losses_are_named():
    state = fresh_state()
    with pytest.raises(ValueError, match="needs LocalData.label_counts"):
        client_step(ins_for(state, 4, 0.0, loss="logit-adjusted"), state, local_data())
    with pytest.raises(ValueError, match=r"loss must be one of \['ce', 'logit-adjusted'\], got 'focal'"):
        client_step(ins_for(state, 4, 0.0, loss="focal"), state, local_data())


def test_head_gets_its_own_learning_rate():
    def head_step(head_lr):
        state = fresh_state()
        start = extract(attach(tiny_bert(), 8, seed=123))["classifier.weight"]
        ins = ins_for(state, 4, 0.0, lr=1e-3, head_lr=head_lr)
        res, _ = client_step(ins, state, local_data())
        return float(np.abs(res.adapter["classifier.weight"] - start).max())

    same, faster = head_step(None), head_step(1e-2)
    assert same <= 1e-3 * 6 * 1.01  # Adam moves a weight at most ~lr per step
    assert faster > 3 * same
