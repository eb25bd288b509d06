"""Structured pruning of Hugging Face transformers (whole attention heads, MLP channels).

``index_map`` is pure numpy (the server imports it without torch); the torch-based parts
(``arch``, ``structured``, ``export``) load lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedspine.pruning.index_map import ArchShape, KeptIndexMap, LayerKept, ModuleSlice

_LAZY = {
    "arch": ("FAMILIES", "arch_shape", "family_of", "layer_roles", "module_slices", "sync_config"),
    "structured": (
        "IMPORTANCE",
        "PrunePlan",
        "UnitScores",
        "dependency_groups",
        "magnitude_importance",
        "plan_counts",
        "prune_model",
        "prune_to_ratio",
        "register_importance",
        "scores_from_stats",
        "select_units",
        "taylor_importance",
        "unit_scores",
    ),
    "export": ("export_for_deployment", "load_pruned"),
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = ["ArchShape", "KeptIndexMap", "LayerKept", "ModuleSlice", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"fedspine.pruning.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fedspine.pruning' has no attribute {name!r}")
