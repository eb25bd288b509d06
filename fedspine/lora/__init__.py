"""LoRA adapters for pruned devices: peft attach/extract/load/merge, and coordinate maps.

``fedspine.lora.coords`` (lift/project between a pruned device's coordinates and the original
model's, rank padding/truncation) is numpy only, so the server can import it without torch.
The peft functions (``attach``, ``extract``, ``load``, ``merge``, ``detach``, ``adapter_shapes``,
``save_adapter`` and the key maps ``to_peft_key`` / ``from_peft_key``) live in
``fedspine.lora.adapters`` and are loaded on first access, so ``import fedspine.lora`` alone does
not import torch. ``fedspine.lora.aggregate`` (mixed-rank, mixed-width aggregation rules
picked by name with ``get_aggregator``) is numpy only too.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedspine.lora.aggregate import (
    AGGREGATORS,
    Aggregator,
    DeviceUpdate,
    Distribution,
    flora_stack,
    get_aggregator,
)
from fedspine.lora.coords import Lifted, SliceLike, lift, pad_rank, project, rank_of, truncate_rank

_ADAPTERS = (
    "ALPHA_PER_RANK",
    "DEFAULT_TARGETS",
    "LoadReport",
    "adapter_shapes",
    "attach",
    "detach",
    "extract",
    "load",
    "merge",
    "save_adapter",
    "to_peft_key",
    "from_peft_key",
)

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "DeviceUpdate",
    "Distribution",
    "flora_stack",
    "get_aggregator",
    "Lifted",
    "SliceLike",
    "lift",
    "pad_rank",
    "project",
    "rank_of",
    "truncate_rank",
    *_ADAPTERS,
]


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        return getattr(importlib.import_module("fedspine.lora.adapters"), name)
    raise AttributeError(f"module 'fedspine.lora' has no attribute {name!r}")
