import subprocess
import sys

CHECK = """
import sys, numpy as np
before = np.geterr()
import fedspine, fedspine.bandit, fedspine.bandit.synthetic
heavy = sorted(m for m in ("torch", "transformers", "peft", "wandb", "flwr", "datasets") if m in sys.modules)
assert not heavy, heavy
assert np.geterr() == before, "importing fedspine changed numpy's error state"
print("ok")
"""


def test_bandit_imports_without_torch_or_side_effects():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


CONFIG_CHECK = """
import sys
import fedspine.config
mine = ("fedspine", "fedspine.config")
loaded = sorted(m for m in sys.modules if m.startswith("fedspine") and m not in mine)
assert not loaded, loaded
assert "torch" not in sys.modules, "importing fedspine.config imported torch"
print("ok")
"""


def test_config_is_plain_data_importing_nothing_from_fedspine_and_no_torch():
    out = subprocess.run([sys.executable, "-c", CONFIG_CHECK], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# The layers of docs/architecture.md, bottom up. A module may import its own layer and the ones
# below, never one above.
LAYERS = [
    {"bandit", "lora", "pruning", "data", "assets", "config", "seeds"},
    {"models", "logging"},
    {"fl"},
    {"flower", "experiments", "cli"},
]


def test_the_import_graph_runs_one_way():
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "fedspine"
    rank = {part: i for i, layer in enumerate(LAYERS) for part in layer}

    def part_of(module: str) -> str:
        return module.split(".")[1] if module.count(".") else ""

    upward = []
    for path in sorted(pkg.rglob("*.py")):
        here = part_of(".".join(path.relative_to(pkg.parent).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                there = part_of(name) if name.startswith("fedspine.") else None
                if here in rank and there in rank and rank[there] > rank[here]:
                    upward.append(f"{path.relative_to(pkg.parent)} imports {name}")
    assert not upward, upward
