"""``fedspine.fl.build.check``: a bad config is refused, naming the field, before anything loads;
and the names ``fedspine.config`` keeps as plain tuples are exactly the registries' names."""

import dataclasses
from pathlib import Path

import pytest

from fedspine import config
from fedspine.cli import main
from fedspine.config import RunConfig, StrategyConfig, load_config
from fedspine.fl import simulator, world
from fedspine.fl.build import check

ROOT = Path(__file__).resolve().parents[2]


def test_config_name_tuples_equal_the_registries():
    from fedspine.data.partition import CLASS_ASSIGNMENTS, SCHEMES
    from fedspine.data.sources import packaged_sources
    from fedspine.fl.client import LOSSES
    from fedspine.fl.strategies import STRATEGIES
    from fedspine.lora.aggregate import AGGREGATORS
    from fedspine.models import TASKS
    from fedspine.pruning.iterative import importance_names

    assert sorted(config.STRATEGY_NAMES) == sorted(STRATEGIES)
    assert sorted(config.AGGREGATION_RULES) == sorted(AGGREGATORS)
    assert sorted(config.IMPORTANCES) == importance_names()
    assert config.TASKS == tuple(TASKS) and config.PARTITIONS == SCHEMES and config.LOSSES == LOSSES
    assert sorted(set(config.DATA_SOURCES) - {"synthetic"}) == packaged_sources()
    assert config.CLASS_ASSIGNMENTS == CLASS_ASSIGNMENTS


@pytest.fixture
def no_loading(monkeypatch):
    """Model and data loaders that fail the test if anything reaches them."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model or data set was loaded for a config that should be refused")

    for name in ("build_model", "build_data"):
        monkeypatch.setattr(world, name, refuse)  # the World loads them (fedspine.fl.world)
    return calls


BAD = [
    (
        ["strategy.name=fixed-prune", "strategy.params={ratio: 1.5}"],
        r"strategy.params.ratio must be in \[0, 1\)",
    ),
    (["strategy.params={policy: ucb2}"], r"strategy.params.policy must be None or one of \[.*\], got 'ucb2'"),
    (["strategy.params={policy_params: {cc: 1.0}}"], r"unknown parameter\(s\) \['cc'\] for policy '"),
    (["strategy.name=hetlora", "strategy.params={tier_rank: {tx2: 4}}"], r"\['strategy.params.tier_rank'\]"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_strategy_params_are_refused_before_the_model_or_data_is_loaded(overrides, message, no_loading):
    cfg = load_config(None, overrides)  # plain data: the params are checked by check(), not here
    with pytest.raises(ValueError, match=message):
        check(cfg)
    with pytest.raises(ValueError, match=message):
        simulator.run(cfg)  # the simulator (and so every engine) checks first
    assert no_loading == []


def test_bad_registry_names_are_refused_before_the_model_or_data_is_loaded(no_loading):
    cases = {
        "strategy.name": StrategyConfig(name="fedsp1ne"),
        "strategy.aggregation": StrategyConfig(aggregation="mean"),
    }
    for field, strategy in cases.items():  # built in code, past load_config's own validation
        cfg = dataclasses.replace(RunConfig(), strategy=strategy)
        with pytest.raises(ValueError, match=rf"{field} must be (None or )?one of \["):
            simulator.Simulation(cfg)
    with pytest.raises(ValueError, match=r"train.importance must be one of \['lora_gradient'"):
        dataclasses.replace(RunConfig().train, importance="gradient")  # refused on construction
    assert no_loading == []


def test_cli_names_the_bad_param_and_loads_nothing(no_loading, capsys):
    assert main(["run", "strategy.name=fixed-prune", "strategy.params={rank: 0}"]) == 2
    assert "strategy.params.rank must be >= 1, got 0" in capsys.readouterr().err
    assert main(["run", "strategy.name=fedprox"]) == 2
    assert "strategy.name must be one of" in capsys.readouterr().err
    assert no_loading == []


def test_every_committed_config_passes_check():
    from fedspine.experiments import load_experiment, plan

    specs = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
    checked = 0
    for path in specs:
        if "experiment:" not in path.read_text():
            check(load_config(path))
            checked += 1
            continue
        exp = load_experiment(path)
        for size in exp.size_names():
            for cell in plan(exp, size=size, seeds=1):
                check(cell.cfg)
                checked += 1
    assert checked > len(specs)
