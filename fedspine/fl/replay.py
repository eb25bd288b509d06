"""A finished run's allocation replayed under other strategy parameters, without training.

What a strategy assigns depends only on what it was told: each round's participants, and for
the strategies that read the clock (FedSpine) what came back, the round times, each device's
report (probe losses before and after, achieved sparsity, update norm) and the failures. A
finished run records all of it (``metrics.jsonl``: ``tiers`` in the order the server asked the
strategy, ``arms``, ``round_time_s``, ``reports``, ``failures``), so a strategy with other
parameters can be fed the same observations round by round. Training sees only the arms and the
seed streams, so if the other strategy assigns every device the recorded arm in every round, its
run *is* the recorded run, record for record; the first round where it assigns another arm is
where a real run would part from the recorded one (ours).

What it refuses (``ReplayError``, naming why): configs that differ in anything but the strategy's
parameters (and where the run logs), and runs whose records predate per-device ``reports``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedspine.bandit import ArmSpace
from fedspine.config import RunConfig
from fedspine.fl.devices import tiers
from fedspine.fl.messages import Failure
from fedspine.fl.strategies import StrategyContext, make_strategy
from fedspine.fl.world import fleet_profiles
from fedspine.seeds import Seeds


class ReplayError(ValueError):
    """The run cannot be replayed under the other config; the message says why."""


@dataclass(frozen=True)
class _Report:
    """The fields of a ``TrainRes`` a strategy reads in ``observe``, as a run recorded them."""

    device_id: str
    loss_before: float
    loss_after: float
    achieved_ratio: float
    update_norm: float


def params_free_key(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a config dict without ``strategy.params`` and the ``log`` section (where a
    run writes): runs with the same key can be replayed into one another."""
    return json.dumps(_params_free(config), sort_keys=True)


def _params_free(config: Mapping[str, Any]) -> dict[str, Any]:
    plain = json.loads(json.dumps(config, default=str))
    plain.pop("log", None)
    plain.get("strategy", {}).pop("params", None)
    return plain


def check_replayable(source: RunConfig, target: RunConfig) -> None:
    """Raise ``ReplayError`` unless ``source`` and ``target`` differ only in ``strategy.params``."""
    a, b = _params_free(source.to_dict()), _params_free(target.to_dict())
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if x != y:
            keys = sorted(set(x) | set(y)) if isinstance(x, dict) and isinstance(y, dict) else []
            field = next((f"{section}.{k}" for k in keys if x.get(k) != y.get(k)), section)
            raise ReplayError(f"the configs differ in {field!r}, not only in strategy.params: cannot replay")


def first_divergence(records: Sequence[dict[str, Any]], source: RunConfig, target: RunConfig) -> int | None:
    """The first round in which ``target``'s strategy, fed the observations in ``records`` (a
    finished run of ``source``), assigns some device another arm than the run did; None when it
    assigns every arm the run did, every round: the records are then ``target``'s run."""
    check_replayable(source, target)
    s = target.strategy
    space = ArmSpace.grid(list(target.arms.ratios), list(target.arms.ranks))
    profiles = fleet_profiles(target)
    fleet_tiers = tiers(list(profiles.values()), list(profiles))
    ctx = StrategyContext(space, fleet_tiers, Seeds(target.seed).integer("strategy"), s.params)
    strategy = make_strategy(s.name, ctx)
    r_max = max(target.arms.ranks)
    for rec in records:
        rnd = rec["round"]
        if "reports" not in rec:
            raise ReplayError(f"round {rnd} has no per-device reports (the run predates them): cannot replay")
        devices = list(rec["tiers"])  # the participants, in the order the server asked for arms
        arms = strategy.configure(rnd, devices)
        if {d: [arms[d].ratio, min(arms[d].rank, r_max)] for d in devices} != rec["arms"]:
            return rnd
        reports = [_Report(d, **fields) for d, fields in rec["reports"].items()]
        failures = [Failure(rnd, d, why) for d, why in rec["failures"].items()]
        strategy.observe(rnd, reports, failures, rec["round_time_s"])  # type: ignore[arg-type]
    return None


__all__ = ["ReplayError", "check_replayable", "first_divergence", "params_free_key"]
