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

import dataclasses

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
    rule = s.aggregation or strategy.aggregation
    if get_aggregator(rule).changes_base and (cfg.log.save_adapter_rounds or cfg.log.save_adapter_final):
        raise ValueError(
            f"log.save_adapter_rounds / log.save_adapter_final cannot save the global model of aggregation "
            f"rule {rule!r} as a peft adapter: it folds each round into the base weights, which an adapter "
            "does not hold; use another rule or leave both unset"
        )
    t = cfg.train
    if t.runner == "batched":
        # what fedspine.fl.batched.batchable refuses, said before anything loads
        if t.importance != "lora_gradient":
            raise ValueError(
                f"train.runner 'batched' needs train.importance 'lora_gradient', got {t.importance!r} "
                "(other criteria score the plain pruned model); use train.runner 'auto' or 'per-device'"
            )
        if rule == "flora":
            raise ValueError(
                "train.runner 'batched' cannot train with the 'flora' aggregation rule (each device's base "
                "changes); use train.runner 'auto' or 'per-device'"
            )
    if t.device == "cuda" and t.runner == "per-device":
        raise ValueError(
            "train.device 'cuda' needs train.runner 'batched' or 'auto' "
            "(the per-device path trains on the CPU)"
        )
    return cfg


def effective(cfg: RunConfig) -> RunConfig:
    """``cfg``, checked, with ``strategy.params`` written out in full: the strategy's typed
    params with every default (what ``fedspine config show`` prints). It runs exactly as ``cfg``.
    ``strategy.aggregation`` stays as given: filled in, it would outlive a change of strategy."""
    check(cfg)
    params = dataclasses.asdict(STRATEGIES[cfg.strategy.name].parse_params(cfg.strategy.params))
    return dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, params=params))


__all__ = ["check", "effective"]
