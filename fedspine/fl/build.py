"""Check a run config against what it names, before anything is loaded.

``fedspine.config`` is plain data and checks what the values say on their own (names included,
as plain tuples). ``check`` adds what only the registered classes can judge: it resolves the
strategy and builds its typed params from ``strategy.params`` (its ``Params`` dataclass;
FedSpine's policy and policy options by building its allocator, which costs nothing), and
resolves the aggregation rule. Every entry point (``fedspine run``, ``python -m fedspine.flower``
and ``fedspine.fl.simulator.Simulation``, which the others, Flower's apps and the experiment
runner reach) calls it first, so a bad config is refused with the field's name before a model
or data set is loaded. Errors are ``ValueError`` naming the field, the value and what is
allowed. numpy only.
"""

from __future__ import annotations

from fedspine.bandit import ArmSpace
from fedspine.config import RunConfig, validate
from fedspine.fl.strategies import STRATEGIES, StrategyContext
from fedspine.lora.aggregate import get_aggregator


def check(cfg: RunConfig) -> RunConfig:
    """``cfg`` if it can run; else ``ValueError`` on the first problem. Loads nothing."""
    validate(cfg)
    s = cfg.strategy
    space = ArmSpace.grid(list(cfg.arms.ratios), list(cfg.arms.ranks))
    strategy = STRATEGIES[s.name](StrategyContext(space, {}, cfg.seed, s.params))
    get_aggregator(s.aggregation or strategy.aggregation)
    return cfg


__all__ = ["check"]
