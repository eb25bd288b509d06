"""The world of a run: what the server side and the device side share, built once from a config.

``World.build(cfg)`` makes the base model, the tokenised data, the fleet (device ids, profiles,
tiers) and the partition of the data across devices. Everything in it is a pure function of the
config and its seed, so a Flower ClientApp builds the same world as the ServerApp, and builds
nothing else: the strategy, the allocator, the ``Server`` and the aggregator's state belong to
the server side (``fedspine.fl.simulator.Simulation``), a device's state to its runner
(``fedspine.fl.runners``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedspine.config import DATA_SOURCES, MODELS, ConfigError, RunConfig, require
from fedspine.data.partition import partition, partition_stats
from fedspine.data.tokenize import batches
from fedspine.fl.client import LocalData, LocalState
from fedspine.fl.devices import DeviceProfile, paper_fleet, scaled_link, tiers
from fedspine.models import Task, TaskData, build_data, build_model, get_task
from fedspine.pruning.arch import Family, arch_shape, family_of
from fedspine.pruning.index_map import ArchShape, KeptIndexMap
from fedspine.pruning.structured import prune_model
from fedspine.seeds import Seeds


def fleet_profiles(cfg: RunConfig) -> dict[str, DeviceProfile]:
    """Device id -> profile of ``cfg``'s fleet: a pure function of the ``fleet`` section and the
    seed's fleet stream, with no model or data (the retiming of a run needs two fleets)."""
    f = cfg.fleet
    profiles = paper_fleet(
        f.devices,
        seed=Seeds(cfg.seed).integer("fleet"),
        spread=f.spread,
        link=scaled_link(f.link_scale),
        compute_spread=f.compute_spread,
    )
    return {f"d{i:03d}": p for i, p in enumerate(profiles)}


@dataclass(frozen=True)
class World:
    cfg: RunConfig
    model0: nn.Module  # the original base model; never trained or pruned itself
    data: TaskData
    family: Family
    shape: ArchShape
    device_ids: list[str]
    profiles: dict[str, DeviceProfile]
    tiers: dict[str, str]
    parts: dict[str, np.ndarray]  # device -> indices of its training examples
    partition_stats: Any

    @property
    def task(self) -> Task:
        """The run's task (``fedspine.models.TASKS``): what differs between classification and causal LM."""
        return get_task(self.cfg.model.task)

    @classmethod
    def build(cls, cfg: RunConfig) -> World:
        """The world of ``cfg``. What only the model and the data can tell (the checks of
        :func:`check_model` and :func:`check_data`) is refused here with a ``ConfigError``
        naming the field, before anything is trained or written."""
        seeds = Seeds(cfg.seed)  # one named stream per consumer (fedspine.seeds)
        task = get_task(cfg.model.task)
        with _user_input("model.name", cfg.model.name, local=cfg.model.name not in MODELS):
            model0, tokenizer = build_model(cfg.model.name, 2, seed=seeds.integer("model"), task=task)
        check_model(cfg, model0)
        with _user_input("data.source", cfg.data.source, local=cfg.data.source not in DATA_SOURCES):
            data: TaskData = build_data(
                cfg.data.source,
                tokenizer,
                max_length=cfg.model.max_length,
                test_fraction=cfg.data.test_fraction,
                max_examples=cfg.data.max_examples,
                seed=seeds.integer("data"),
                task=task,
            )
        check_data(cfg, data)
        if task.class_labels and data.num_labels != 2:  # the head is sized by the data's labels
            model0, _ = build_model(cfg.model.name, data.num_labels, seed=seeds.integer("model"), task=task)
        if cfg.data.max_test is not None:
            data.test = {k: v[: cfg.data.max_test] for k, v in data.test.items()}
        fleet = fleet_profiles(cfg)
        device_ids, profiles = list(fleet), list(fleet.values())
        labels = data.partition_labels()  # causal LM: topics stand in for labels
        d = cfg.data
        try:
            parts = partition(  # flwr-datasets' partitioners, seeded by 31 bits of the partition stream
                labels,
                cfg.fleet.devices,
                scheme=d.partition,
                alpha=d.alpha,
                seed=seeds.integer("partition"),
                min_size=d.min_size,
                self_balancing=d.self_balancing,
                classes_per_device=d.classes_per_device,
                class_assignment=d.class_assignment,
                shards_per_device=d.shards_per_device,
            )
        except ValueError as exc:  # the partition's message names the data.* / fleet.devices fields
            raise ConfigError(str(exc)) from None
        return cls(
            cfg=cfg,
            model0=model0,
            data=data,
            family=family_of(model0),
            shape=arch_shape(model0),
            device_ids=device_ids,
            profiles=dict(zip(device_ids, profiles, strict=True)),
            tiers=tiers(profiles, device_ids),
            parts=dict(zip(device_ids, parts, strict=True)),
            partition_stats=partition_stats(labels, parts),
        )

    def local_data(self, device: str) -> LocalData:
        """``device``'s private data: its shuffled batches, its probe batch, its label counts."""
        idx = self.parts[device]
        train, bs = self.data.train, self.cfg.train.batch_size

        def stream(gen: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
            while True:
                yield from batches(train, idx, bs, gen, trim_padding=True)

        task = self.task
        probe_idx = torch.as_tensor(idx[: task.probe_size])
        counts = None  # token labels (causal LM): no label prior (the logit-adjusted loss is refused)
        if task.class_labels:
            counts = np.bincount(
                train["labels"][torch.as_tensor(idx)].numpy(), minlength=self.data.num_labels
            )
        return LocalData(stream, {k: v[probe_idx] for k, v in train.items()}, len(idx), counts)

    def device_state(
        self, kept: KeptIndexMap | None = None, applied: Mapping[str, np.ndarray] | None = None
    ) -> LocalState:
        """A device's state from what it kept (default: everything, a device's first round)."""
        kept = KeptIndexMap.full(self.shape) if kept is None else kept
        return rebuild_local_state(self.model0, kept, applied)


def narrowest_lora_layer(model: nn.Module) -> tuple[str, int]:
    """(path, width) of the prunable Linear (q/k/v/o/MLP, the LoRA targets) with the smallest
    min(in, out): a LoRA rank above it has more components than the layer has directions."""
    fam = family_of(model)
    widths = {
        path: min(int(m.in_features), int(m.out_features))
        for i in range(len(fam.layers(model)))
        for paths in fam.module_paths(model, i).values()
        for path in paths
        for m in [model.get_submodule(path)]
    }
    path = min(widths, key=widths.__getitem__)
    return path, widths[path]


def check_model(cfg: RunConfig, model: nn.Module) -> None:
    """What ``cfg`` asks of the model's shape: every LoRA rank fits the narrowest LoRA-wrapped
    layer of the unpruned model, and ``model.max_length`` fits its position embeddings."""
    m = cfg.model
    path, width = narrowest_lora_layer(model)
    require(
        max(cfg.arms.ranks) <= width,
        "arms.ranks",
        f"each <= {width} (the width of {path}, the narrowest LoRA-wrapped layer of model {m.name!r})",
        list(cfg.arms.ranks),
    )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None:
        require(
            m.max_length <= positions,
            "model.max_length",
            f"<= {positions} (the position embeddings of model {m.name!r})",
            m.max_length,
        )


def check_data(cfg: RunConfig, data: TaskData) -> None:
    """Every device can get ``data.min_size`` training examples (so none is left without data)."""
    d, n_dev = cfg.data, cfg.fleet.devices
    n = len(data.partition_labels())
    if n < n_dev * d.min_size:
        raise ConfigError(
            f"fleet.devices={n_dev} with data.min_size={d.min_size} needs {n_dev * d.min_size} training "
            f"examples, data.source {d.source!r} (data.max_examples={d.max_examples}, "
            f"data.test_fraction={d.test_fraction}) gives {n}: lower fleet.devices or data.min_size, "
            "or use more data"
        )


@contextmanager
def _user_input(field: str, value: str, *, local: bool) -> Iterator[None]:
    """A local file or folder the user named that cannot be read: a ``ConfigError`` naming the
    field. Errors on the packaged names are ours and pass unchanged."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if not local or isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{field} {value!r} cannot be read: {type(exc).__name__}: {exc}") from None


def rebuild_local_state(
    model0: nn.Module, kept: KeptIndexMap, applied: Mapping[str, np.ndarray] | None = None
) -> LocalState:
    """A device's state rebuilt from what it kept: a copy of the original model pruned to ``kept``,
    plus the base delta it had applied (FLoRA-style rules). Pruning is deterministic, so this is
    the model the device had (resume, or a device that restarts)."""
    model = copy.deepcopy(model0)
    full = KeptIndexMap.full(kept.shape)
    if kept != full:
        prune_model(model, full, [(lk.heads, lk.channels) for lk in kept.layers])
    applied = dict(applied or {})
    if applied:
        with torch.no_grad():
            for path, delta in applied.items():
                model.get_submodule(path).weight += torch.as_tensor(delta, dtype=torch.float32)
    return LocalState(model, kept, applied)


__all__ = [
    "World",
    "check_data",
    "check_model",
    "fleet_profiles",
    "narrowest_lora_layer",
    "rebuild_local_state",
]
