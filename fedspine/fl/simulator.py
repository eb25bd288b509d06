"""The round loop: many heterogeneous devices, one server, a modelled (or measured) clock.

The round loop lives here and only here, on every engine. ``Simulation`` is the server side of a
run: the ``World`` it shares with the devices (``fedspine.fl.world``), the strategy (and so the
allocator), the ``Server`` with the aggregator's state, the sampling and jitter RNGs, the clock,
the records and the checkpoint schema. Where the client steps run is a ``DeviceRunner``
(``fedspine.fl.runners``): in this process by default, on Flower nodes from a ServerApp.
Time is simulated: each device's round time comes from its profile and the work of the model it
actually trained (``fedspine.fl.time_model``), so pruning and rank choices change the clock
exactly as they change the work.

``run_in_dir`` runs one config into one run directory, for the CLI, the experiments and Flower.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from fedspine.bandit import ArmSpace
from fedspine.config import RunConfig
from fedspine.fl import checkpoint
from fedspine.fl.build import check
from fedspine.fl.faults import DROPOUT, FaultInjector
from fedspine.fl.messages import Failure, TrainRes
from fedspine.fl.runners import DeviceRunner, InProcessRunner, Reply
from fedspine.fl.server import Server
from fedspine.fl.strategies import StrategyContext, make_strategy, resolved_params
from fedspine.fl.time_model import (
    Workload,
    expected_round_time_s,
    fits,
    round_time,
    round_work_for_map,
    round_work_for_ratio,
)
from fedspine.fl.world import World
from fedspine.logging import RunLogger
from fedspine.lora import adapter_shapes, attach, extract, load, save_adapter
from fedspine.lora.adapters import ALPHA_PER_RANK
from fedspine.lora.coords import split_key
from fedspine.provenance import source_fingerprint
from fedspine.pruning.index_map import KeptIndexMap
from fedspine.seeds import Seeds

LOG = logging.getLogger("fedspine")


@dataclass
class RunResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def workload(cfg: RunConfig, world: World, rank: int, *, lm_head: bool | None = None) -> Workload:
    """What one round of ``cfg`` asks of a device at LoRA rank ``rank``, besides its kept widths.
    The time model counts the vocabulary-sized output layer (``lm_head``) only for a causal LM
    unless told otherwise."""
    t = cfg.train
    return Workload(
        lora_rank=rank,
        steps=t.local_steps,
        batch=t.batch_size,
        seq_len=cfg.model.max_length,
        vocab_size=int(world.model0.config.vocab_size),
        mlp_matrices=world.family.mlp_matrices,
        lm_head=world.task.lm_head if lm_head is None else lm_head,
    )


class Simulation:
    """The server side of a run, from a validated ``RunConfig``, and its rounds. ``world`` is
    built from the config unless given; ``runner`` (default: ``InProcessRunner``) runs the client
    steps."""

    def __init__(self, cfg: RunConfig, *, world: World | None = None, runner: DeviceRunner | None = None):
        self.cfg = check(cfg)  # a bad config is refused here, before any model or data is loaded
        seeds = Seeds(cfg.seed)  # one named stream per consumer (fedspine.seeds)
        self.rng_sampling = seeds.rng("sampling")
        self.rng_jitter = seeds.rng("jitter")
        self.world = world = World.build(cfg) if world is None else world
        self.runner: DeviceRunner = default_runner(cfg, world) if runner is None else runner
        model0, shape, family = world.model0, world.shape, world.family
        space = ArmSpace.grid(list(cfg.arms.ratios), list(cfg.arms.ranks))
        strategy = make_strategy(
            cfg.strategy.name,
            StrategyContext(space, world.tiers, seeds.integer("strategy"), cfg.strategy.params),
        )
        r_max = max(cfg.arms.ranks)
        reference = attach(copy.deepcopy(model0), r_max, seed=seeds.integer("init"))
        heads = {k: v for k, v in extract(reference).items() if split_key(k)[1] is None}
        module_roles = {
            path: (i, role)
            for i in range(shape.num_layers)
            for role, paths in family.module_paths(model0, i).items()
            for path in paths
        }
        global_shapes = adapter_shapes(reference)
        module_roles = {p: lr for p, lr in module_roles.items() if p in global_shapes}
        t = cfg.train
        self.server = Server(
            strategy,
            shape=shape,
            module_roles=module_roles,
            global_shapes=global_shapes,
            heads=heads,
            r_max=r_max,
            seed=seeds.integer("clients"),
            init_seed=seeds.integer("init"),
            aggregation=cfg.strategy.aggregation,
            server_lr=t.server_lr,
            server_momentum=t.server_momentum,
            client_config=t.client(),
            norm_k=cfg.server.norm_k,
            norm_history=cfg.server.norm_history,
            min_success=cfg.server.min_success,
            scaling=ALPHA_PER_RANK,
        )
        self.faults = FaultInjector(cfg.faults, seeds.integer("faults"))
        self.clock_s = 0.0
        self.round = 0
        # The time model counts the vocabulary-sized output layer only for a causal LM.
        self.lm_head = world.task.lm_head
        self.last_metrics: dict[str, float] = {}  # the latest evaluate_global's full metrics

    # --- one round -----------------------------------------------------------------------------
    def participants(self, available: Sequence[str] | None = None) -> list[str]:
        """The round's sample, from ``available`` devices (default: the whole fleet)."""
        fleet = self.world.device_ids
        pool = list(fleet) if available is None else [d for d in fleet if d in available]
        k = max(1, round(self.cfg.fleet.participation * len(fleet)))
        if k >= len(pool):
            return pool
        return sorted(self.rng_sampling.choice(pool, size=k, replace=False).tolist())

    def deadline(self, expected: Mapping[str, float]) -> float:
        """The round's deadline: ``server.deadline_s``, or ``server.deadline_factor`` times the
        slowest participant's ``expected`` (noise-free modelled) round time (ours). Measured
        rounds without ``deadline_s`` have none of their own: they cost what they waited."""
        fixed = self.cfg.server.deadline_s
        if fixed is not None:
            return float(fixed)
        if not self.runner.modelled:
            return 0.0
        return self.cfg.server.deadline_factor * max(expected.values(), default=0.0)

    def work(self, kept: KeptIndexMap | None, ratio: float, rank: int):
        load = workload(self.cfg, self.world, rank, lm_head=self.lm_head)
        if kept is not None:
            return round_work_for_map(kept, load)
        return round_work_for_ratio(self.world.shape, ratio, load, round_to=self.cfg.train.round_to)

    @property
    def finished(self) -> bool:
        """Whether the run is over: ``train.rounds`` done, or ``train.time_budget_s`` spent."""
        budget = self.cfg.train.time_budget_s
        return self.round >= self.cfg.train.rounds or (budget is not None and self.clock_s >= budget)

    def run_round(self) -> dict[str, Any]:
        """One round; the client steps run wherever the runner sends them.

        Faults (``cfg.faults``) are injected on the runner's replies; every reply is screened
        (``Server.screen``) before the allocator or the aggregator sees it. The server waits for
        replies until the round's deadline (``deadline``): a missed reply, and a round with
        fewer than ``server.min_success`` accepted updates, cost it on the clock."""
        self.round += 1
        rnd = self.round
        wall = time.perf_counter()
        world, runner = self.world, self.runner
        devices = self.participants(runner.available(world.device_ids))
        ins = self.server.configure(rnd, devices)
        results: list[TrainRes] = []
        failures: list[Failure] = []
        times: dict[str, float] = {}
        bytes_up = bytes_down = energy = 0.0
        modelled = runner.modelled
        held = {d: self.server.kept_map(d) for d in devices}  # what each device last reported
        sent, expected = {}, {}
        for d in devices:
            ratio = max(ins[d].ratio, held[d].sparsity(world.family.mlp_matrices))
            planned = self.work(None, ratio, ins[d].rank)
            expected[d] = sum(expected_round_time_s(world.profiles[d], planned))
            if modelled and not fits(world.profiles[d], planned):
                failures.append(Failure(rnd, d, "out of memory"))
            else:
                sent[d] = ins[d]
        deadline = self.deadline(expected)
        faults = self.faults.draw(rnd, list(sent))
        replies = runner.execute(rnd, {d: i for d, i in sent.items() if faults.get(d) != DROPOUT}, held)
        replies = self.faults.apply(rnd, replies, faults)
        got: dict[str, Reply] = {}
        waited = [0.0]  # how long the server waited for replies it does not use
        for d in sent:
            reply = replies.get(d) or Reply(failure="no reply", timed_out=True)
            if reply.result is None:
                failures.append(Failure(rnd, d, reply.failure or "no reply"))
                if reply.timed_out:
                    waited.append(deadline if reply.measured_s is None else reply.measured_s)
            else:
                got[d] = reply
        rejected: dict[str, str] = {}
        if self.cfg.server.validate:
            _, rejected = self.server.screen([r.result for r in got.values()], ins)
        for d in sent:  # device order: the jitter stream is drawn the same way on every engine
            if d not in got:
                continue
            reply = got[d]
            if d in rejected:
                LOG.warning("round %d: update of device %s rejected: %s", rnd, d, rejected[d])
                failures.append(Failure(rnd, d, f"rejected: {rejected[d]}"))
                waited.append(expected[d] if reply.measured_s is None else reply.measured_s)
                continue
            res = reply.result
            work = self.work(KeptIndexMap.from_dict(res.kept_map), 0.0, res.rank)
            measured = None if modelled else reply.measured_s
            timing = round_time(world.profiles[d], work, self.rng_jitter, measured_s=measured)
            hard = self.cfg.server.deadline_s
            if hard is not None and timing.total_s > hard:
                why = f"past the round deadline ({timing.total_s:.3g} s > {hard:g} s)"
                failures.append(Failure(rnd, d, why))
                waited.append(hard)
                continue
            results.append(res)
            times[d] = timing.total_s
            bytes_up += work.up_bytes
            bytes_down += work.down_bytes
            energy += timing.energy_j
        aggregated = self.server.finish(rnd, results, failures, times)
        makespan = max(max(times.values(), default=0.0), *waited)
        if not aggregated:
            makespan = max(makespan, deadline)  # a failed round costs its deadline
            LOG.warning(
                "round %d: %d of %d updates accepted (server.min_success=%d): the global state is kept",
                rnd,
                len(results),
                len(devices),
                self.server.min_success,
            )
        self.clock_s += makespan
        record: dict[str, Any] = {
            "round": rnd,
            "clock_s": self.clock_s,
            "makespan_s": makespan,
            "wall_s": 0.0,
            "arms": {d: [i.ratio, i.rank] for d, i in ins.items()},
            "tiers": {d: world.tiers[d] for d in devices},
            "round_time_s": times,
            "waiting_s": {d: makespan - t for d, t in times.items()},
            "mean_waiting_s": float(np.mean([makespan - t for t in times.values()])) if times else 0.0,
            "failures": {f.device_id: f.reason for f in failures},
            "faults": faults,
            "rejected": rejected,
            "aggregated": aggregated,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "energy_j": energy,
            "loss_before": float(np.mean([r.loss_before for r in results])) if results else None,
            "loss_after": float(np.mean([r.loss_after for r in results])) if results else None,
            "mean_sparsity": float(np.mean([r.achieved_ratio for r in results])) if results else None,
            # what each device reported (the allocator's inputs besides its round time), so that
            # a run can be analysed, or its allocation replayed, device by device
            "reports": {
                r.device_id: {
                    "loss_before": r.loss_before,
                    "loss_after": r.loss_after,
                    "achieved_ratio": r.achieved_ratio,
                    "update_norm": r.update_norm,
                }
                for r in results
            },
        }
        if rnd % self.cfg.eval.every == 0 or self.finished:
            record["accuracy"] = self.evaluate_global()
            if "perplexity" in self.last_metrics:  # causal LM (accuracy = answer-token accuracy)
                record["perplexity"] = self.last_metrics["perplexity"]
            if self.cfg.eval.devices:
                models = runner.device_models()
                accs = [self.evaluate_device(d, models[d]) for d in sorted(models)]
                record["device_accuracy_mean"] = float(np.mean(accs))
                record["device_accuracy_min"] = float(np.min(accs))
        record["wall_s"] = time.perf_counter() - wall
        return record

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self, records: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        server = self.server.state_dict()
        arrays = {f"global/{k}": v for k, v in server.pop("global").items()}
        arrays.update({f"momentum/{k}": v for k, v in server.pop("momentum").items()})
        devices, device_arrays = self.runner.state_dict()
        arrays.update(device_arrays)
        state = {
            "round": self.round,
            "clock_s": self.clock_s,
            "rng_sampling": self.rng_sampling.bit_generator.state,
            "rng_jitter": self.rng_jitter.bit_generator.state,
            "server": server,
            "devices": devices,
            "records": records,
            "config": self.cfg.to_dict(),
        }
        return state, arrays

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Bring a freshly built simulation (same config) to the checkpointed round."""
        saved = copy.deepcopy(state["config"])
        saved.get("model", {}).setdefault("task", "classification")  # written before model.task existed
        for section in ("faults", "server"):  # written before faults and defences existed
            saved.setdefault(section, json.loads(json.dumps(self.cfg.to_dict()[section])))
        if saved != json.loads(json.dumps(self.cfg.to_dict())):
            raise ValueError("the checkpoint was written with a different configuration; refusing to resume")
        server = dict(state["server"])
        for part in ("global", "momentum"):
            server[part] = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(part + "/")}
        self.server.load_state_dict(server)
        self.round, self.clock_s = int(state["round"]), float(state["clock_s"])
        self.rng_sampling.bit_generator.state = state["rng_sampling"]
        self.rng_jitter.bit_generator.state = state["rng_jitter"]
        self.runner.load_state_dict(state["devices"], arrays)
        return list(state["records"])

    # --- evaluation ----------------------------------------------------------------------------
    def _with_adapter(self, model: nn.Module, rank: int, dist) -> nn.Module:
        if dist.base_delta:
            with torch.no_grad():
                for path, delta in dist.base_delta.items():
                    model.get_submodule(path).weight += torch.as_tensor(delta, dtype=torch.float32)
        peft_model = attach(model, rank, seed=0)
        load(peft_model, dist.adapter, strict=True)
        return peft_model

    def global_model(self) -> nn.Module:
        """ "The global model": a copy of the unpruned base with the global adapter (at r_max)."""
        return self._with_adapter(
            copy.deepcopy(self.world.model0), self.server.r_max, self.server.full_model_adapter()
        )

    def evaluate_global(self) -> float:
        """The global model's accuracy (causal LM: next-token accuracy on the test answers); every
        metric is kept in ``last_metrics``."""
        self.last_metrics = self.world.task.evaluate(_merged(self.global_model()), self.world.data.test)
        return self.last_metrics["accuracy"]

    def save_global_adapter(self, path: str | Path) -> Path:
        """The global adapter as a peft adapter directory for the unpruned base: rank r_max,
        alpha 2·r_max, the head as ``modules_to_save``. ``PeftModel.from_pretrained(base, path)``
        on the run's base (``World.build(cfg).model0``) is the model ``evaluate_global`` scores.
        A rule that changes the base weights (FLoRA) is refused: an adapter cannot hold that."""
        if self.server.rule.changes_base:
            raise ValueError(
                f"aggregation rule {self.server.rule.name!r} changes the base weights; its global model "
                "is not a peft adapter on the unpruned base"
            )
        return save_adapter(self.global_model(), path)

    def device_model(self, device: str, pruned: nn.Module | None = None) -> nn.Module:
        """A copy of a device's own pruned model (default: the runner's) with the global adapter
        projected onto what it kept, at r_max. ``fedspine.pruning.export_for_deployment(model,
        path, kept_map=self.server.kept_map(device), adapter=True)`` writes it as a pruned base
        plus a peft adapter."""
        if pruned is None:
            models = self.runner.device_models()
            if device not in models:
                raise ValueError(f"device {device!r} has no model in this process; here: {sorted(models)}")
            pruned = models[device]
        rank = self.server.r_max
        dist = self.server.rule.distribute(self.server.state, self.server.slices(device), rank)
        return self._with_adapter(copy.deepcopy(pruned), rank, dist)

    def evaluate_device(self, device: str, pruned: nn.Module) -> float:
        """The accuracy of :meth:`device_model` on the test set."""
        model = _merged(self.device_model(device, pruned))
        return self.world.task.evaluate(model, self.world.data.test)["accuracy"]


def _merged(model: nn.Module) -> nn.Module:
    """A peft model with its LoRA merged into the (copied) weights: the same function, evaluated
    without the adapter's extra matmuls."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def _compute(runner: DeviceRunner, cfg: RunConfig) -> dict[str, str]:
    """What ``train.precision`` / ``train.device`` resolved to on this machine ("auto" is bf16 on
    one CPU and fp32 on another, so a record says which it got)."""
    import torch

    from fedspine.fl.placement import resolve_device, resolve_precision

    batched = type(runner).__name__ == "BatchedRunner"
    device = resolve_device(cfg.train.device) if batched else torch.device("cpu")
    dtype = resolve_precision(cfg.train.precision, device)
    return {"compute_device": device.type, "precision": "bf16" if dtype == torch.bfloat16 else "fp32"}


def default_runner(cfg: RunConfig, world: World) -> DeviceRunner:
    """The in-process runner ``train.runner`` names ("auto": batched where it can be)."""
    if cfg.train.runner == "per-device":
        return InProcessRunner(world)
    from fedspine.fl.batched import BatchedRunner

    return BatchedRunner(
        world, group_size=cfg.train.batch_devices, only_batched=cfg.train.runner == "batched"
    )


def run(
    cfg: RunConfig,
    logger: Any = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    verbose: bool = False,
    runner: DeviceRunner | None = None,
    adapter_dir: str | Path | None = None,
    world: World | None = None,
) -> RunResult:
    """Run the rounds of ``cfg`` and return per-round records and a summary.

    With ``checkpoint_dir`` a checkpoint is written atomically at round 0 and every
    ``cfg.checkpoint_every`` rounds (``fl/checkpoint.py``, docs/checkpoints.md); ``resume=True``
    continues from the newest one that verifies and ends with exactly the records an
    uninterrupted run would have. ``stop_after`` ends early after that round (to test resume).
    ``runner`` runs the client steps elsewhere (Flower); the loop is the same. ``adapter_dir``
    receives the peft adapters that ``log.save_adapter_rounds`` / ``log.save_adapter_final`` ask for.
    ``world`` is built from ``cfg`` unless given.
    """
    if adapter_dir is None and (cfg.log.save_adapter_rounds or cfg.log.save_adapter_final):
        raise ValueError("log.save_adapter_rounds / log.save_adapter_final need adapter_dir (run_in_dir's)")
    start = time.perf_counter()
    if checkpoint_dir is not None and not resume:  # a kill while this run builds its World must
        checkpoint.clear(checkpoint_dir)  # not resume a previous run's generations
    sim = Simulation(cfg, runner=runner, world=world)
    out = RunResult()
    if verbose:
        from fedspine.data.partition import format_stats

        world = sim.world
        print(format_stats(world.partition_stats, label_names=world.data.label_names, max_devices=10))
    restored = False
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir")
        try:
            out.records, restored = sim.restore(*checkpoint.load(checkpoint_dir)), True
        except checkpoint.NoCheckpoint as exc:  # killed before round 0 was saved: nothing is lost
            warnings.warn(f"{exc}; starting from round 0", checkpoint.CheckpointWarning, stacklevel=2)
        if logger is not None:
            logger.replace(out.records)
    if checkpoint_dir is not None and not restored:  # round 0: a kill in round 1 resumes from here
        checkpoint.save(checkpoint_dir, *sim.checkpoint_state(out.records))
    progress = _progress(cfg.train.rounds, enabled=cfg.log.progress)
    progress.update(sim.round)
    while not sim.finished and (stop_after is None or sim.round < stop_after):
        record = sim.run_round()
        out.records.append(record)
        if logger is not None:
            logger.log_round(record)
        if adapter_dir is not None:
            _save_adapters(sim, Path(adapter_dir))
        if checkpoint_dir is not None and (sim.round % cfg.checkpoint_every == 0 or sim.finished):
            checkpoint.save(checkpoint_dir, *sim.checkpoint_state(out.records))
        progress.update(1)
        progress.set_postfix(acc=record.get("accuracy"), clock=f"{sim.clock_s:.0f}s")
    progress.close()
    out.summary = summarize(out.records, cfg)
    sizes = [sum(p.numel() for p in m.parameters()) for m in sim.runner.device_models().values()]
    if sizes:  # what each device would deploy (its pruned base, adapter merged: same size)
        full = sum(p.numel() for p in sim.world.model0.parameters())
        out.summary.update(
            deployed_params_mean=float(np.mean(sizes)),
            deployed_params_min=int(min(sizes)),
            deployed_params_max=int(max(sizes)),
            original_params=int(full),
        )
    out.summary.update(_compute(sim.runner, cfg))
    out.summary["strategy_params"] = resolved_params(cfg.strategy.name, cfg.strategy.params)
    out.summary["code"] = source_fingerprint()
    out.summary["wall_s"] = time.perf_counter() - start  # this process's part of the run
    if logger is not None:
        logger.finish(out.summary)
    return out


def _save_adapters(sim: Simulation, adapter_dir: Path) -> None:
    """After a round: ``round-NNNN`` if ``log.save_adapter_rounds`` names it, ``final`` after the last."""
    log = sim.cfg.log
    if sim.round in log.save_adapter_rounds:
        sim.save_global_adapter(adapter_dir / f"round-{sim.round:04d}")
    if log.save_adapter_final and sim.finished:
        sim.save_global_adapter(adapter_dir / "final")


def default_run_dir(cfg: RunConfig) -> Path:
    """``<log.dir>/<log.name>``, the name defaulting to ``<strategy>-seed<seed>``."""
    return Path(cfg.log.dir) / (cfg.log.name or f"{cfg.strategy.name}-seed{cfg.seed}")


def run_in_dir(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    runner: DeviceRunner | None = None,
    wandb_mode: str | None = None,
    project: str | None = None,
    name: str | None = None,
    group: str | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run ``cfg`` into ``run_dir``: ``config.json``, ``metrics.jsonl`` (one record a round),
    ``summary.json``, ``checkpoint/`` and the peft adapters ``cfg.log`` asks for under
    ``adapters/``. ``resume=True`` continues the run's checkpoint. What the
    CLI, the experiments and the Flower ServerApp all do; W&B settings default to ``cfg.log``'s
    and the W&B name to the folder's. The config is checked and the world built (refusing what
    the model and data cannot run) before anything is written to ``run_dir``."""
    run_dir = Path(run_dir)
    world = World.build(check(cfg))
    logger = RunLogger(
        run_dir,
        config=cfg.to_dict(),
        wandb_mode=cfg.log.wandb if wandb_mode is None else wandb_mode,
        project=cfg.log.wandb_project if project is None else project,
        name=name or run_dir.name,
        group=group,
        resume=resume,
    )
    return run(
        cfg,
        logger,
        checkpoint_dir=run_dir / "checkpoint",
        resume=resume,
        runner=runner,
        verbose=verbose,
        adapter_dir=run_dir / "adapters",
        world=world,
    )


SUSTAIN_WINDOW = 3
"""Evaluations averaged by the sustained time to target (ours): at the powered CPU size test
accuracy moves by 0.03-0.06 between rounds near the target, so a single crossing is noisy."""


def time_to_target(
    records: Sequence[Mapping[str, Any]], target: float | None, window: int = 1
) -> float | None:
    """Simulated clock at the first evaluation where the mean test accuracy of it and the
    ``window - 1`` evaluations before it reaches ``target`` (window 1: the first crossing); None
    when it never does. Rounds without an evaluation are skipped."""
    if target is None:
        return None
    accs = [(r["clock_s"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    for i in range(window - 1, len(accs)):
        if np.mean([a for _, a in accs[i - window + 1 : i + 1]]) >= target:
            return accs[i][0]
    return None


def summarize(records: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    accs = [(r["clock_s"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    target = cfg.eval.target_accuracy
    tta = time_to_target(records, target)
    return {
        "strategy": cfg.strategy.name,
        "rounds": len(records),
        "final_accuracy": accs[-1][1] if accs else None,
        "best_accuracy": max((a for _, a in accs), default=None),
        "clock_s": records[-1]["clock_s"] if records else 0.0,
        "time_to_target_s": tta,
        "sustained_time_to_target_s": time_to_target(records, target, SUSTAIN_WINDOW),
        "mean_waiting_s": float(np.mean([r["mean_waiting_s"] for r in records])) if records else 0.0,
        "bytes_total": float(sum(r["bytes_up"] + r["bytes_down"] for r in records)),
        "final_mean_sparsity": records[-1]["mean_sparsity"] if records else None,
    }


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="rounds", unit="round")


__all__ = [
    "SUSTAIN_WINDOW",
    "RunResult",
    "Simulation",
    "default_run_dir",
    "default_runner",
    "run",
    "run_in_dir",
    "summarize",
    "time_to_target",
    "workload",
]
