"""Structured pruning of Hugging Face transformers (whole attention heads, MLP channels)."""

from fedspine.pruning.index_map import ArchShape, KeptIndexMap, LayerKept

__all__ = ["ArchShape", "KeptIndexMap", "LayerKept"]
