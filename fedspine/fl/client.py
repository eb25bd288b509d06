"""The device side of one round: receive (ratio, rank, adapter), prune while tuning, report back.

One function, used by every strategy and every engine (in-process simulator or Flower), so all
methods get exactly the same local training: only what the server sends differs.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedspine.config import LOSSES, ClientConfig
from fedspine.fl.messages import TrainIns, TrainRes
from fedspine.fl.placement import autocast, resolve_precision
from fedspine.lora.adapters import ALPHA_PER_RANK, attach, detach, extract, load
from fedspine.lora.coords import LORA_A, LORA_B, split_key
from fedspine.pruning.arch import module_slices
from fedspine.pruning.index_map import KeptIndexMap
from fedspine.pruning.iterative import PruneAndTune, PruneSchedule, round_interval

Batch = dict[str, torch.Tensor]

__all__ = ["LOSSES", "LocalData", "LocalState", "client_step", "step_seed", "update_norm"]


@dataclass
class LocalState:
    """What persists on a device between rounds: its (pruned) plain base model, what it kept,
    and (FLoRA-style rules only) the cumulative base delta already added to its weights, in its
    current coordinates."""

    model: nn.Module
    kept_map: KeptIndexMap
    applied_delta: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalData:
    """A device's private data: shuffled training batches from a generator, a fixed probe batch
    (loss before/after the round, for the allocator's reward), the number of examples and, for
    classification, how many of them carry each label (the logit-adjusted loss needs it)."""

    batches: Callable[[torch.Generator], Iterator[Batch]]
    probe: Batch
    num_samples: int
    label_counts: np.ndarray | None = None


def step_seed(seed: int, device_id: str, rnd: int) -> int:
    """A device's randomness for one round depends only on (seed, device, round): results do not
    change with execution order or evaluation frequency, and a resumed run needs no RNG snapshot."""
    return zlib.crc32(f"{seed}:{device_id}:{rnd}".encode())


def client_step(ins: TrainIns, state: LocalState, data: LocalData) -> tuple[TrainRes, LocalState]:
    """Run one round on a device with the settings of ``ins.config`` (a ``ClientConfig``).
    ``state.model`` is modified in place (pruned) and returned.

    Dropout draws from torch's global RNG; we run the round in a forked RNG seeded per (seed,
    device, round), so the caller's RNG is untouched and the round is reproducible.
    """
    if not isinstance(ins.config, ClientConfig):
        raise ValueError(f"TrainIns.config must be a ClientConfig, got {type(ins.config).__name__}")
    if ins.config.loss == "logit-adjusted" and data.label_counts is None:
        raise ValueError("loss 'logit-adjusted' needs LocalData.label_counts")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(ins.seed, ins.device_id, ins.round))
        return _client_step(ins, state, data, ins.config)


def _client_step(
    ins: TrainIns, state: LocalState, data: LocalData, cfg: ClientConfig
) -> tuple[TrainRes, LocalState]:
    seed = step_seed(ins.seed, ins.device_id, ins.round)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model = state.model
    applied = dict(state.applied_delta)
    if ins.base_delta:
        # base_delta is cumulative (relative to the pretrained weights); add only what is new.
        _add_to_base(model, {p: d - applied.get(p, 0.0) for p, d in ins.base_delta.items()})
        applied.update({p: np.array(d, dtype=np.float32) for p, d in ins.base_delta.items()})
    peft_model = attach(model, ins.rank, seed=seed)
    load(peft_model, ins.adapter, strict=True)
    # This path trains on the CPU (train.device picks the batched runner's device); bf16 autocasts
    # the matmuls and keeps the fp32 weights, adapters and optimizer state.
    cpu = torch.device("cpu")
    dtype = resolve_precision(cfg.precision, cpu)
    with autocast(cpu, dtype):
        loss_before = _probe_loss(peft_model, data.probe)

    steps = cfg.local_steps
    # At least one prune per round when the target asks for more than the device has (ours).
    interval = round_interval(cfg.prune_interval, steps)
    tuner = PruneAndTune(
        peft_model,
        state.kept_map,
        PruneSchedule(ins.ratio, interval, round_to=cfg.round_to),
        steps,
        rank=ins.rank,
        seed=seed,
        importance=cfg.importance,
        calib=data.probe,
    )
    tuner.model.train()
    opt = _optimizer(tuner.model, cfg)
    batches = data.batches(gen)
    loss_fn = _loss_fn(cfg.loss, data.label_counts)
    for _ in range(steps):
        with autocast(cpu, dtype):
            loss = loss_fn(tuner.model, next(batches))
        loss.backward()
        if tuner.after_backward():
            opt = _optimizer(tuner.model, cfg)  # new parameters after a prune
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    with autocast(cpu, dtype):
        loss_after = _probe_loss(tuner.model, data.probe)
    adapter = extract(tuner.model)
    base, _ = detach(tuner.model)
    res = TrainRes(
        round=ins.round,
        device_id=ins.device_id,
        rank=ins.rank,
        adapter=adapter,
        kept_map=tuner.kept_map.to_dict(),
        num_samples=data.num_samples,
        loss_before=loss_before,
        loss_after=loss_after,
        achieved_ratio=tuner.achieved_ratio,
        update_norm=update_norm(adapter, scaling=float(ALPHA_PER_RANK)),
        metrics={
            "train_time_s": time.perf_counter() - start,
            "steps": float(steps),
            "prunes": float(tuner.prunes),
            "bf16": float(dtype == torch.bfloat16),
        },
    )
    if applied:
        applied = _reslice(applied, module_slices(base, state.kept_map), module_slices(base, tuner.kept_map))
    return res, LocalState(base, tuner.kept_map, applied)


def update_norm(adapter: dict[str, np.ndarray], scaling: float) -> float:
    """Sum over adapted modules of ||s B A||_F: the size of the device's low-rank update."""
    total = 0.0
    for key in adapter:
        path, kind = split_key(key)
        if kind == LORA_A:
            total += float(np.linalg.norm(scaling * adapter[f"{path}.{LORA_B}"] @ adapter[key]))
    return total


def _loss_fn(kind: str, label_counts: np.ndarray | None) -> Callable[[nn.Module, Batch], torch.Tensor]:
    if kind == "ce":
        return lambda model, batch: model(**batch).loss
    counts = torch.as_tensor(np.asarray(label_counts, dtype=np.float64))
    # Add-one smoothing: a label the device never saw gets a finite (very negative) offset.
    log_prior = torch.log((counts + 1.0) / (counts.sum() + len(counts))).float()

    def adjusted(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if logits.shape[-1] != len(log_prior):
            raise ValueError(f"{logits.shape[-1]} logits but label_counts has {len(log_prior)} labels")
        return nn.functional.cross_entropy(logits + log_prior, batch["labels"])

    return adjusted


def _optimizer(model: nn.Module, cfg: ClientConfig) -> torch.optim.Optimizer:
    lr = float(cfg.lr)
    head_lr = lr if cfg.head_lr is None else float(cfg.head_lr)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if ".modules_to_save." in n]
    rest = [p for n, p in named if ".modules_to_save." not in n]
    groups = [{"params": rest, "lr": lr}] + ([{"params": head, "lr": head_lr}] if head else [])
    # No weight decay (AdamW's default is 0.01): the adapter starts each round from the global
    # state, and decay towards zero would pull it back to the base model between aggregations.
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


@torch.no_grad()
def _probe_loss(model: nn.Module, probe: Batch) -> float:
    was_training = model.training
    model.eval()
    loss = float(model(**probe).loss)
    model.train(was_training)
    return loss


def _reslice(arrays: dict[str, np.ndarray], old: dict, new: dict) -> dict[str, np.ndarray]:
    """Cut arrays held in the old kept coordinates down to the new (smaller) ones."""
    out = {}
    for path, arr in arrays.items():
        o, n = old[path], new[path]
        rows = slice(None) if o.out_idx is None else np.searchsorted(o.out_idx, n.out_idx)
        cols = slice(None) if o.in_idx is None else np.searchsorted(o.in_idx, n.in_idx)
        out[path] = arr[rows][:, cols]
    return out


@torch.no_grad()
def _add_to_base(model: nn.Module, delta: dict[str, np.ndarray]) -> None:
    for path, value in delta.items():
        weight = model.get_submodule(path).weight
        t = torch.as_tensor(value, dtype=weight.dtype)
        if t.shape != weight.shape:
            raise ValueError(
                f"base_delta for {path!r} has shape {tuple(t.shape)}, the weight {tuple(weight.shape)}"
            )
        weight += t
