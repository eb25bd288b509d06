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
