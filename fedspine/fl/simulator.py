"""The in-process simulator: many heterogeneous devices on one machine with a modelled clock.

The round loop lives here and only here; strategies, the client step and the server are the
same objects a Flower deployment uses. Time is simulated: each device's round time comes from
its profile and the work of the model it actually trained (``fedspine.fl.time_model``), so
pruning and rank choices change the clock exactly as they change the work.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fedspine.bandit import ArmSpace
from fedspine.config import RunConfig
from fedspine.data.partition import partition, partition_stats
from fedspine.data.tokenize import batches
from fedspine.fl import checkpoint
from fedspine.fl.client import LocalData, LocalState, client_step
from fedspine.fl.devices import DeviceProfile, paper_fleet, tiers
from fedspine.fl.messages import Failure, TrainIns, TrainRes
from fedspine.fl.server import Server
from fedspine.fl.strategies import StrategyContext, make_strategy
from fedspine.fl.time_model import fits, round_time, round_work_for_map, round_work_for_ratio
from fedspine.logging import RunLogger
from fedspine.lora import adapter_shapes, attach, extract, load
from fedspine.lora.coords import split_key
from fedspine.models import TaskData, build_data, build_model, evaluate
from fedspine.pruning.arch import arch_shape, family_of
from fedspine.pruning.index_map import KeptIndexMap
from fedspine.pruning.structured import prune_model

PROBE_SIZE = 32  # examples in a device's fixed probe batch (loss before/after, for the reward)
# Causal LM (ours): the probe runs twice a round and every token costs a vocabulary-sized output
# (49k for SmolLM2), so it is smaller; answer tokens per example are many, so 8 still average well.
LM_PROBE_SIZE = 8


@dataclass
class RunResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """One device's answer to its ``TrainIns``: a result, or why there is none; on real devices
    also the wall time the round took there."""

    result: TrainRes | None = None
    failure: str = ""
    measured_s: float | None = None


class DeviceRunner(Protocol):
    """Runs the round's client steps outside this process (``fedspine.flower``'s grid runner), so
    the loop below, its clock, checkpoints and records stay the same on every engine."""

    modelled: bool  # True: the time model prices rounds and checks memory; False: measured wall times

    def available(self, fleet: Sequence[str]) -> Sequence[str]:
        """Which of the ``fleet``'s devices are reachable now."""
        ...

    def execute(
        self, rnd: int, ins: Mapping[str, TrainIns], held: Mapping[str, KeptIndexMap]
    ) -> Mapping[str, Reply]:
        """Deliver ``ins``; ``held`` is what the server believes each device holds (its last
        reported kept map). A device missing from the answer failed."""
        ...


class Simulation:
    """Builds everything from a validated ``RunConfig`` and runs rounds."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        streams = np.random.SeedSequence(cfg.seed).spawn(4)  # partition, sampling, jitter, strategy
        self.rng_sampling = np.random.default_rng(streams[1])
        self.rng_jitter = np.random.default_rng(streams[2])
        self.task = cfg.model.task
        model0, tokenizer = build_model(cfg.model.name, 2, seed=cfg.seed, task=self.task)
        self.data: TaskData = build_data(
            cfg.data.source,
            tokenizer,
            max_length=cfg.model.max_length,
            test_fraction=cfg.data.test_fraction,
            max_examples=cfg.data.max_examples,
            seed=cfg.seed,
            task=self.task,
        )
        if self.task == "classification" and self.data.num_labels != 2:
            model0, _ = build_model(cfg.model.name, self.data.num_labels, seed=cfg.seed)
        if cfg.data.max_test:
            self.data.test = {k: v[: cfg.data.max_test] for k, v in self.data.test.items()}
        self.model0 = model0
        self.family = family_of(model0)
        self.shape = arch_shape(model0)
        self.device_ids = [f"d{i:03d}" for i in range(cfg.fleet.devices)]
        profiles = paper_fleet(cfg.fleet.devices, seed=cfg.seed, spread=cfg.fleet.spread)
        self.profiles: dict[str, DeviceProfile] = dict(zip(self.device_ids, profiles, strict=True))
        self.tiers = tiers(profiles, self.device_ids)
        labels = self.data.partition_labels()  # causal LM: topics stand in for labels
        parts = partition(
            labels,
            cfg.fleet.devices,
            scheme=cfg.data.partition,
            alpha=cfg.data.alpha,
            seed=np.random.default_rng(streams[0]),
            min_size=cfg.data.min_size,
        )
        self.parts = dict(zip(self.device_ids, parts, strict=True))
        self.partition_stats = partition_stats(labels, parts)
        space = ArmSpace.grid(list(cfg.arms.ratios), list(cfg.arms.ranks))
        strategy = make_strategy(
            cfg.strategy.name, StrategyContext(space, self.tiers, cfg.seed, cfg.strategy.params)
        )
        r_max = max(cfg.arms.ranks)
        reference = attach(copy.deepcopy(model0), r_max, seed=cfg.seed)
        heads = {k: v for k, v in extract(reference).items() if split_key(k)[1] is None}
        module_roles = {
            path: (i, role)
            for i in range(self.shape.num_layers)
            for role, paths in self.family.module_paths(model0, i).items()
            for path in paths
        }
        global_shapes = adapter_shapes(reference)
        module_roles = {p: lr for p, lr in module_roles.items() if p in global_shapes}
        t = cfg.train
        self.server = Server(
            strategy,
            shape=self.shape,
            module_roles=module_roles,
            global_shapes=global_shapes,
            heads=heads,
            r_max=r_max,
            seed=cfg.seed,
            aggregation=cfg.strategy.aggregation,
            server_lr=t.server_lr,
            server_momentum=t.server_momentum,
            client_config={
                "local_steps": t.local_steps,
                "lr": t.lr,
                "prune_interval": t.prune_interval,
                "round_to": t.round_to,
                "importance": t.importance,
                "loss": t.loss,
                "head_lr": t.head_lr,
                "seed": cfg.seed,
            },
        )
        self.local: dict[str, LocalState] = {}
        self.clock_s = 0.0
        self.round = 0
        # The time model counts the vocabulary-sized output layer only for a causal LM.
        self.lm_head = self.task == "causal-lm"
        self.last_metrics: dict[str, float] = {}  # the latest evaluate_global's full metrics

    # --- per-device data ---------------------------------------------------------------------
    def local_data(self, device: str) -> LocalData:
        idx = self.parts[device]
        train, bs = self.data.train, self.cfg.train.batch_size

        def stream(gen: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
            while True:
                yield from batches(train, idx, bs, gen, trim_padding=True)

        if self.task == "causal-lm":  # token labels: no label prior (the logit-adjusted loss is refused)
            probe_idx, counts = torch.as_tensor(idx[:LM_PROBE_SIZE]), None
        else:
            probe_idx = torch.as_tensor(idx[:PROBE_SIZE])
            counts = np.bincount(
                train["labels"][torch.as_tensor(idx)].numpy(), minlength=self.data.num_labels
            )
        return LocalData(stream, {k: v[probe_idx] for k, v in train.items()}, len(idx), counts)

    def local_state(self, device: str) -> LocalState:
        if device not in self.local:  # devices get their copy of the base model when first needed
            self.local[device] = LocalState(copy.deepcopy(self.model0), KeptIndexMap.full(self.shape))
        return self.local[device]

    # --- one round -----------------------------------------------------------------------------
    def participants(self, available: Sequence[str] | None = None) -> list[str]:
        """The round's sample, from ``available`` devices (default: the whole fleet)."""
        pool = list(self.device_ids) if available is None else [d for d in self.device_ids if d in available]
        k = max(1, round(self.cfg.fleet.participation * len(self.device_ids)))
        if k >= len(pool):
            return pool
        return sorted(self.rng_sampling.choice(pool, size=k, replace=False).tolist())

    def work(self, kept: KeptIndexMap | None, ratio: float, rank: int):
        t, m = self.cfg.train, self.cfg.model
        kw = dict(
            lora_rank=rank,
            steps=t.local_steps,
            batch=t.batch_size,
            seq_len=m.max_length,
            vocab_size=int(self.model0.config.vocab_size),
            mlp_matrices=self.family.mlp_matrices,
            lm_head=self.lm_head,
        )
        if kept is not None:
            return round_work_for_map(kept, **kw)
        return round_work_for_ratio(self.shape, ratio, round_to=t.round_to, **kw)

    def run_round(self, runner: DeviceRunner | None = None) -> dict[str, Any]:
        """One round; the client steps run here, or wherever ``runner`` sends them."""
        self.round += 1
        rnd = self.round
        wall = time.perf_counter()
        devices = self.participants(None if runner is None else runner.available(self.device_ids))
        ins = self.server.configure(rnd, devices)
        results: list[TrainRes] = []
        failures: list[Failure] = []
        times: dict[str, float] = {}
        bytes_up = bytes_down = energy = 0.0
        modelled = runner is None or runner.modelled
        held: dict[str, KeptIndexMap] = {}
        for d in devices:
            held[d] = self.local_state(d).kept_map if runner is None else self.server.kept_map(d)
            ratio = max(ins[d].ratio, held[d].sparsity(self.family.mlp_matrices))
            planned = self.work(None, ratio, ins[d].rank)
            if modelled and not fits(self.profiles[d], planned):
                failures.append(Failure(rnd, d, "out of memory"))
                del held[d]
        sent = {d: ins[d] for d in held}
        replies = self._run_here(sent) if runner is None else runner.execute(rnd, sent, held)
        for d in sent:  # device order: the jitter stream is drawn the same way on every engine
            reply = replies.get(d) or Reply(failure="no reply")
            if reply.result is None:
                failures.append(Failure(rnd, d, reply.failure or "no reply"))
                continue
            res = reply.result
            work = self.work(KeptIndexMap.from_dict(res.kept_map), 0.0, res.rank)
            measured = None if modelled else reply.measured_s
            timing = round_time(self.profiles[d], work, self.rng_jitter, measured_s=measured)
            results.append(res)
            times[d] = timing.total_s
            bytes_up += work.up_bytes
            bytes_down += work.down_bytes
            energy += timing.energy_j
        self.server.finish(rnd, results, failures, times)
        makespan = max(times.values(), default=0.0)
        self.clock_s += makespan
        record: dict[str, Any] = {
            "round": rnd,
            "clock_s": self.clock_s,
            "makespan_s": makespan,
            "wall_s": 0.0,
            "arms": {d: [i.ratio, i.rank] for d, i in ins.items()},
            "tiers": {d: self.tiers[d] for d in devices},
            "round_time_s": times,
            "waiting_s": {d: makespan - t for d, t in times.items()},
            "mean_waiting_s": float(np.mean([makespan - t for t in times.values()])) if times else 0.0,
            "failures": {f.device_id: f.reason for f in failures},
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "energy_j": energy,
            "loss_before": float(np.mean([r.loss_before for r in results])) if results else None,
            "loss_after": float(np.mean([r.loss_after for r in results])) if results else None,
            "mean_sparsity": float(np.mean([r.achieved_ratio for r in results])) if results else None,
        }
        if rnd % self.cfg.eval.every == 0 or rnd == self.cfg.train.rounds:
            record["accuracy"] = self.evaluate_global()
            if "perplexity" in self.last_metrics:  # causal LM (accuracy = answer-token accuracy)
                record["perplexity"] = self.last_metrics["perplexity"]
            if self.cfg.eval.devices:
                accs = [self.evaluate_device(d) for d in sorted(self.local)]
                record["device_accuracy_mean"] = float(np.mean(accs))
                record["device_accuracy_min"] = float(np.min(accs))
        record["wall_s"] = time.perf_counter() - wall
        return record

    def _run_here(self, ins: Mapping[str, TrainIns]) -> dict[str, Reply]:
        out = {}
        for d, i in ins.items():
            res, self.local[d] = client_step(i, self.local_state(d), self.local_data(d))
            out[d] = Reply(res)
        return out

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self, records: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        server = self.server.state_dict()
        arrays = {f"global/{k}": v for k, v in server.pop("global").items()}
        arrays.update({f"momentum/{k}": v for k, v in server.pop("momentum").items()})
        for d, st in self.local.items():
            arrays.update({f"applied/{d}/{p}": v for p, v in st.applied_delta.items()})
        state = {
            "round": self.round,
            "clock_s": self.clock_s,
            "rng_sampling": self.rng_sampling.bit_generator.state,
            "rng_jitter": self.rng_jitter.bit_generator.state,
            "server": server,
            "devices": {d: st.kept_map.to_dict() for d, st in self.local.items()},
            "records": records,
            "config": self.cfg.to_dict(),
        }
        return state, arrays

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Bring a freshly built simulation (same config) to the checkpointed round."""
        saved = copy.deepcopy(state["config"])
        saved.get("model", {}).setdefault("task", "classification")  # written before model.task existed
        if saved != json.loads(json.dumps(self.cfg.to_dict())):
            raise ValueError("the checkpoint was written with a different configuration; refusing to resume")
        server = dict(state["server"])
        for part in ("global", "momentum"):
            server[part] = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(part + "/")}
        self.server.load_state_dict(server)
        self.round, self.clock_s = int(state["round"]), float(state["clock_s"])
        self.rng_sampling.bit_generator.state = state["rng_sampling"]
        self.rng_jitter.bit_generator.state = state["rng_jitter"]
        self.local = {}
        for d, kept_dict in state["devices"].items():
            prefix = f"applied/{d}/"
            applied = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            self.local[d] = rebuild_local_state(self.model0, KeptIndexMap.from_dict(kept_dict), applied)
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

    def evaluate_global(self) -> float:
        """The unpruned model with the global adapter (at r_max). Returns the accuracy (causal LM:
        next-token accuracy on the test answers); every metric is kept in ``last_metrics``."""
        model = self._with_adapter(
            copy.deepcopy(self.model0), self.server.r_max, self.server.full_model_adapter()
        )
        self.last_metrics = evaluate(model, self.data.test, self.task)
        return self.last_metrics["accuracy"]

    def evaluate_device(self, device: str) -> float:
        """A device's own pruned model with the global adapter projected onto what it kept."""
        state = self.local[device]
        rank = self.server.r_max
        dist = self.server.rule.distribute(self.server.state, self.server.slices(device), rank)
        model = self._with_adapter(copy.deepcopy(state.model), rank, dist)
        return evaluate(model, self.data.test, self.task)["accuracy"]


def rebuild_local_state(
    model0: nn.Module, kept: KeptIndexMap, applied: Mapping[str, np.ndarray] | None = None
) -> LocalState:
    """A device's state rebuilt from what it kept: a copy of the original model pruned to ``kept``,
    plus the base delta it had applied (FLoRA-style rules). Pruning is deterministic, so this is
    the model the device had (resume, or a device that restarts)."""
    model = copy.deepcopy(model0)
    full = KeptIndexMap.full(kept.shape)
    if kept != full:
        prune_model(model, full, [(lk.heads, lk.channels) for lk in kept.layers])
    applied = dict(applied or {})
    if applied:
        with torch.no_grad():
            for path, delta in applied.items():
                model.get_submodule(path).weight += torch.as_tensor(delta, dtype=torch.float32)
    return LocalState(model, kept, applied)


def run(
    cfg: RunConfig,
    logger: Any = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    verbose: bool = False,
    runner: DeviceRunner | None = None,
) -> RunResult:
    """Run the rounds of ``cfg`` and return per-round records and a summary.

    With ``checkpoint_dir`` a checkpoint is written atomically every ``cfg.checkpoint_every``
    rounds; ``resume=True`` continues from it and ends with exactly the records an
    uninterrupted run would have. ``stop_after`` ends early after that round (to test resume).
    ``runner`` runs the client steps elsewhere (Flower); the loop is the same.
    """
    start = time.perf_counter()
    sim = Simulation(cfg)
    out = RunResult()
    if verbose:
        from fedspine.data.partition import format_stats

        print(format_stats(sim.partition_stats, label_names=sim.data.label_names, max_devices=10))
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir")
        out.records = sim.restore(*checkpoint.load(checkpoint_dir))
        if logger is not None:
            logger.replace(out.records)
    progress = _progress(cfg.train.rounds, enabled=cfg.log.progress)
    progress.update(sim.round)
    while sim.round < cfg.train.rounds and (stop_after is None or sim.round < stop_after):
        record = sim.run_round(runner)
        out.records.append(record)
        if logger is not None:
            logger.log_round(record)
        if checkpoint_dir is not None and (
            sim.round % cfg.checkpoint_every == 0 or sim.round == cfg.train.rounds
        ):
            checkpoint.save(checkpoint_dir, *sim.checkpoint_state(out.records))
        progress.update(1)
        progress.set_postfix(acc=record.get("accuracy"), clock=f"{sim.clock_s:.0f}s")
    progress.close()
    out.summary = summarize(out.records, cfg)
    sizes = [sum(p.numel() for p in st.model.parameters()) for st in sim.local.values()]
    if sizes:  # what each device would deploy (its pruned base, adapter merged: same size)
        full = sum(p.numel() for p in sim.model0.parameters())
        out.summary.update(
            deployed_params_mean=float(np.mean(sizes)),
            deployed_params_min=int(min(sizes)),
            deployed_params_max=int(max(sizes)),
            original_params=int(full),
        )
    out.summary["wall_s"] = time.perf_counter() - start  # this process's part of the run
    if logger is not None:
        logger.finish(out.summary)
    return out


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
    ``summary.json`` and ``checkpoint/``. ``resume=True`` continues the run's checkpoint. What the
    CLI, the experiments and the Flower ServerApp all do; W&B settings default to ``cfg.log``'s
    and the W&B name to the folder's."""
    run_dir = Path(run_dir)
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
        cfg, logger, checkpoint_dir=run_dir / "checkpoint", resume=resume, runner=runner, verbose=verbose
    )


def summarize(records: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    accs = [(r["clock_s"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    target = cfg.eval.target_accuracy
    tta = next((c for c, a in accs if target is not None and a >= target), None)
    return {
        "strategy": cfg.strategy.name,
        "rounds": len(records),
        "final_accuracy": accs[-1][1] if accs else None,
        "best_accuracy": max((a for _, a in accs), default=None),
        "clock_s": records[-1]["clock_s"] if records else 0.0,
        "time_to_target_s": tta,
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
    "DeviceRunner",
    "Reply",
    "RunResult",
    "Simulation",
    "default_run_dir",
    "rebuild_local_state",
    "run",
    "run_in_dir",
    "summarize",
]
