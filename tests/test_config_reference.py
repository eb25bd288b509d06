"""The config on display: ``fedspine config show`` prints every effective value and reads back,
``fedspine run --help`` lists every section and field, and the README's tables of fields are
the dataclasses' (a field missing, extra or with another default fails here)."""

import re
from pathlib import Path

import pytest
import yaml

from fedspine.cli import main
from fedspine.config import field_defaults, load_config, yaml_value
from fedspine.fl.build import check, effective
from fedspine.fl.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "configs" / "smoke.yaml")


def test_config_show_prints_every_effective_value_and_reads_back(tmp_path, capsys):
    overrides = ["train.rounds=2", "strategy.params.explore_factor=1.5"]
    assert main(["config", "show", "--config", SMOKE, *overrides]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    want = load_config(SMOKE, overrides)
    assert shown["train"]["rounds"] == 2 and shown["model"]["max_length"] == 32  # override, file
    assert shown["train"]["lr"] == 0.002 and shown["train"]["head_lr"] is None  # file, default
    params = shown["strategy"]["params"]  # the strategy's typed params, every default written out
    assert params["explore_factor"] == 1.5 and params["prune_elasticity"] == 0.8
    assert set(params["reward"]) >= {"base_weight", "time_quantile"}
    assert "# strategy.aggregation null: the rule of strategy 'fedspine', 'zero-pad'" in out
    path = tmp_path / "shown.yaml"
    path.write_text(out)
    again = check(load_config(path))
    assert again == effective(want)
    cls = STRATEGIES[want.strategy.name]
    assert cls.parse_params(again.strategy.params) == cls.parse_params(want.strategy.params)


def test_config_show_refuses_what_run_refuses(capsys):
    assert main(["config", "show", "fleet.devices=0"]) == 2
    assert "fleet.devices must be >= 1, got 0" in capsys.readouterr().err
    assert main(["config", "show", "strategy.params.objective=fast"]) == 2
    assert "strategy.params.objective must be one of" in capsys.readouterr().err


def test_run_help_lists_every_section_and_field(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    epilog = text[text.index("config sections and their fields") :]
    for name in field_defaults():
        section, _, leaf = name.rpartition(".")
        line = re.search(rf"^  {re.escape(section or '(top level)')} +(.*(?:\n {{4,}}\S.*)*)", epilog, re.M)
        assert line and re.search(rf"\b{leaf}\b", line.group(1)), name


def readme_fields() -> dict[str, str]:
    """``{field: default}`` from the README's configuration tables."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Configuration\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    rows = re.findall(r"^\| `([\w.]+)` \| `(.*?)` \| (.*?) \|$", section, re.M)
    assert all(meaning.strip() for _, _, meaning in rows), "every row says what the field sets"
    fields = [name for name, _, _ in rows]
    assert len(fields) == len(set(fields)), "a field is listed twice"
    return {name: default for name, default, _ in rows}


def test_readme_tables_are_the_dataclasses_fields():
    listed = readme_fields()
    fields = {name: yaml_value(value) for name, value in field_defaults().items()}
    missing = [f"| `{n}` | `{d}` | ... |" for n, d in fields.items() if n not in listed]
    assert not missing, "README.md's configuration tables lack:\n" + "\n".join(missing)
    extra = sorted(set(listed) - set(fields))
    assert not extra, f"README.md lists fields the config does not have: {extra}"
    wrong = {n: (listed[n], d) for n, d in fields.items() if listed[n] != d}
    assert not wrong, f"README.md shows other defaults (README, config): {wrong}"
