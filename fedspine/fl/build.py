"""Check a run config against what it names, before anything is loaded.

``fedspine.config`` is plain data and checks what the values say on their own (names included,
as plain tuples). ``check`` adds what only the registered classes can judge: it resolves the
strategy and builds its typed params from ``strategy.params`` (its ``Params`` dataclass;
FedSpine's policy and policy options by building its allocator, which costs nothing), and
resolves the aggregation rule. Every entry point (``fedspine run``, ``python -m fedspine.flower``
and ``fedspine.fl.simulator.Simulation``, which the others, Flower's apps and the experiment
runner reach) calls it first, so a bad config is refused with the field's name before a model
or data set is loaded. Errors are ``ConfigError`` (a ``ValueError``) naming the field, the
value and what is allowed. numpy only.
"""

from __future__ import annotations

from fedspine.bandit import ArmSpace
from fedspine.config import ConfigError, RunConfig, validate
from fedspine.fl.strategies import STRATEGIES, StrategyContext
from fedspine.lora.aggregate import get_aggregator


def check(cfg: RunConfig) -> RunConfig:
    """``cfg`` if it can run; else ``ConfigError`` on the first problem. Loads nothing."""
    validate(cfg)
    s = cfg.strategy
    space = ArmSpace.grid(list(cfg.arms.ratios), list(cfg.arms.ranks))
    try:
        strategy = STRATEGIES[s.name](StrategyContext(space, {}, cfg.seed, s.params))
    except ValueError as exc:  # the params' own checks name their field; anything else gets the section
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"strategy.params {s.params!r} for strategy {s.name!r}: {exc}") from None
    rule = s.aggregation or strategy.aggregation
    get_aggregator(rule)
    t = cfg.train
    if t.runner == "batched":
        # what fedspine.fl.batched.batchable refuses, said before anything loads
        if t.importance != "lora_gradient":
            raise ConfigError(
                f"train.runner 'batched' needs train.importance 'lora_gradient', got {t.importance!r} "
                "(other criteria score the plain pruned model); use train.runner 'auto' or 'per-device'"
            )
        if rule == "flora":
            raise ConfigError(
                "train.runner 'batched' cannot train with the 'flora' aggregation rule (each device's base "
                "changes); use train.runner 'auto' or 'per-device'"
            )
    if t.device == "cuda" and t.runner == "per-device":
        raise ConfigError(
            "train.device 'cuda' needs train.runner 'batched' or 'auto' "
            "(the per-device path trains on the CPU)"
        )
    return cfg


__all__ = ["check"]
