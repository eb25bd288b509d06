"""A finished run on another fleet, without training it again.

A strategy that never reads the clock (``ArmAssigner.reads_clock`` is False: every baseline)
assigns the same arms on any fleet, and nothing else a round does depends on how fast a device
computes or sends: sampling, data, training and aggregation draw from their own seed streams
(``fedspine.seeds``), and the one profile field that can fail a round, memory, is not a timing
field. So a run on a fleet that differs only in ``TIMING_FIELDS`` learns exactly the same; only its
clock differs. ``retime`` replays the time model over the run's records: per round and device it
rebuilds the round's work from the assigned arm (the kept counts follow from the arm by the
pruner's own schedule, ``kept_after_round``, and never grow back), draws the same jitter factor from
the run's jitter stream in the simulator's order, and prices that work on both fleets. The source
fleet's price must reproduce every recorded round time (to a relative 1e-9) or nothing is
returned: that is the check that the rebuilt work is the run's (ours).

What it refuses (``RetimeError``, naming why): a strategy that reads the clock (FedSpine: its
arms, and so its learning, follow the round times), configs that differ in anything but the timing
fields, and rounds the clock can change the outcome of (a hard ``server.deadline_s``, injected
faults, rejected updates, a failed aggregation).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedspine.config import RunConfig
from fedspine.fl.simulator import summarize, workload
from fedspine.fl.strategies import STRATEGIES
from fedspine.fl.time_model import round_time, round_work_for_map
from fedspine.fl.world import World, fleet_profiles
from fedspine.pruning.index_map import KeptIndexMap
from fedspine.pruning.iterative import kept_after_round
from fedspine.seeds import Seeds

TIMING_FIELDS = ("fleet.compute_spread", "fleet.link_scale")
"""Config fields that change device speed and nothing else a run learns from."""

_TOLERANCE = 1e-9


class RetimeError(ValueError):
    """The run cannot be retimed onto the other fleet; the message says why."""


def timing_free_key(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a config dict without ``TIMING_FIELDS`` and the ``log`` section (where a
    run writes, not what it learns): runs with the same key learn the same when their strategy
    does not read the clock."""
    plain = json.loads(json.dumps(config))
    plain.pop("log", None)
    for dotted in TIMING_FIELDS:
        section, name = dotted.split(".")
        plain.get(section, {}).pop(name, None)
    return json.dumps(plain, sort_keys=True)


def check_retimable(source: RunConfig, target: RunConfig) -> None:
    """Raise ``RetimeError`` unless a run of ``source`` learns what a run of ``target`` would."""
    name = source.strategy.name
    if STRATEGIES[name].reads_clock:
        raise RetimeError(f"strategy {name!r} chooses its arms from the round times; run it on each fleet")
    a, b = source.to_dict(), target.to_dict()
    if timing_free_key(a) != timing_free_key(b):
        differ = sorted(k for k in _differences(a, b) if k not in TIMING_FIELDS and not k.startswith("log."))
        timing = ", ".join(TIMING_FIELDS)
        raise RetimeError(f"the configs differ in more than the fleet's timing ({timing}): {differ}")
    if source.server.deadline_s is not None:
        raise RetimeError("server.deadline_s is set: on another fleet other updates could miss it")
    if source.train.time_budget_s is not None:
        raise RetimeError("train.time_budget_s is set: on another fleet the run would end after other rounds")


def _differences(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def retime(
    records: Sequence[Mapping[str, Any]],
    source: RunConfig,
    target: RunConfig,
    *,
    world: World | None = None,
) -> list[dict[str, Any]]:
    """``records`` (a finished run of ``source``, one per round) as a run of ``target`` would
    write them: the same arms, losses and accuracies, the round times, waiting, makespan, clock
    and energy of ``target``'s fleet. ``world`` (``World.build(target)`` unless given) supplies
    the model's shape and family for the time model; a world of any config with the same
    ``model`` section will do (its fleet is not read)."""
    check_retimable(source, target)
    world = World.build(target) if world is None else world
    before, after = fleet_profiles(source), fleet_profiles(target)
    rng_before, rng_after = Seeds(source.seed).rng("jitter"), Seeds(target.seed).rng("jitter")
    t = source.train
    schedule = dict(
        prune_interval=t.prune_interval,
        steps=t.local_steps,
        round_to=t.round_to,
        mlp_matrices=world.family.mlp_matrices,
    )
    kept = dict.fromkeys(before, KeptIndexMap.full(world.shape))
    clock, out = 0.0, []
    for rec in records:
        rnd = rec["round"]
        odd = {k: rec.get(k) for k in ("faults", "rejected") if rec.get(k)}
        if odd or not rec.get("aggregated", True):
            why = ", ".join(odd) or "a failed aggregation"
            raise RetimeError(f"round {rnd} has {why}: its outcome could depend on the clock")
        failed = {d: r for d, r in rec.get("failures", {}).items() if not r.startswith("out of memory")}
        if failed:
            raise RetimeError(f"round {rnd}: failures other than memory ({failed}) could depend on the clock")
        times, energy = {}, 0.0
        for d, recorded in rec["round_time_s"].items():  # the simulator's draw order
            ratio, rank = rec["arms"][d]
            kept[d] = kept_after_round(kept[d], float(ratio), **schedule)
            work = round_work_for_map(kept[d], workload(target, world, int(rank)))
            was = round_time(before[d], work, rng_before)
            if not math.isclose(was.total_s, recorded, rel_tol=_TOLERANCE):
                raise RetimeError(
                    f"round {rnd}, device {d}: the rebuilt work prices at {was.total_s!r} s on the source "
                    f"fleet, the run recorded {recorded!r} s; the records are not this config's"
                )
            now = round_time(after[d], work, rng_after)
            times[d] = now.total_s
            energy += now.energy_j
        makespan = max(times.values(), default=0.0)
        clock += makespan
        new = copy.deepcopy(dict(rec))
        new.update(
            clock_s=clock,
            makespan_s=makespan,
            round_time_s=times,
            waiting_s={d: makespan - t for d, t in times.items()},
            mean_waiting_s=float(np.mean([makespan - t for t in times.values()])) if times else 0.0,
            energy_j=energy,
        )
        out.append(new)
    return out


def retime_summary(
    records: list[dict[str, Any]], source_summary: Mapping[str, Any], target: RunConfig
) -> dict[str, Any]:
    """The summary of retimed ``records``: the clock's figures recomputed for ``target``, the rest
    (deployed sizes, compute, code) the source run's."""
    return {**source_summary, **summarize(records, target)}


__all__ = ["TIMING_FIELDS", "RetimeError", "check_retimable", "retime", "retime_summary", "timing_free_key"]
