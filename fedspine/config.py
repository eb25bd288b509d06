"""One typed run configuration: small frozen dataclasses, loaded from YAML/TOML with ``a.b=c``
overrides and validated before any work starts (errors name the field and the allowed values)."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODELS = ("tiny-bert", "tiny-llama", "all-minilm-l6-v2", "smollm2-135m")
DATA_SOURCES = ("synthetic", "rotten-tomatoes")  # or a path to a local file / saved dataset
TASKS = ("classification", "causal-lm")  # == fedspine.models.TASKS (kept here: no torch import)
LM_DATA_SOURCES = ("synthetic", "chatterbot")  # task causal-lm: prompt/answer pairs (fedspine.data.causal)
LM_MODELS = ("tiny-llama", "smollm2-135m")  # decoders; or a local HF causal-LM directory
PARTITIONS = ("iid", "dirichlet")
WANDB_MODES = ("disabled", "offline", "online")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny-bert"  # one of MODELS, or a local HF model directory
    max_length: int = 64
    task: str = "classification"  # or "causal-lm": next-token loss on answer tokens (fedspine.models)


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # one of DATA_SOURCES or a local path
    test_fraction: float = 0.1
    max_examples: int | None = None  # subsample (seeded) for quick runs
    max_test: int | None = 500  # evaluate on at most this many test examples
    partition: str = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration (ours; the paper's is unknown)
    min_size: int = 8


@dataclass(frozen=True)
class FleetConfig:
    devices: int = 8  # split 30:40:10 into TX2 / Xavier NX / AGX Xavier tiers, as in the paper
    spread: float = 0.15  # +- variation of speed and bandwidth within a tier
    participation: float = 1.0  # fraction of devices sampled each round


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = 3
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    head_lr: float | None = None  # the task head's learning rate; None = lr, 0 = frozen (fedspine.fl.client)
    prune_interval: int = 20  # paper [S]: 20 local iterations between prunes worked best
    round_to: int = 8
    importance: str = "lora_gradient"
    loss: str = "ce"  # or "logit-adjusted" (ours, FedLC-style; fedspine.fl.client)
    server_lr: float = 1.0  # server step on the aggregate (ours, FedAvgM; fedspine.fl.server)
    server_momentum: float = 0.0  # 0 = plain aggregation


@dataclass(frozen=True)
class ArmsConfig:
    """The (ratio, rank) choices; r_max (the global adapter's rank) is the largest rank."""

    ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    ranks: tuple[int, ...] = (4, 8, 16)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedspine"
    params: dict[str, Any] = field(default_factory=dict)
    aggregation: str | None = None  # override the strategy's own rule (ablations); None = its own


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate the global model every N rounds (and always after the last)
    devices: bool = False  # also evaluate each device's own pruned model (slower)
    target_accuracy: float | None = None  # for time-to-accuracy


@dataclass(frozen=True)
class LogConfig:
    dir: str = "runs"
    name: str | None = None  # default: <strategy>-<seed>
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "fedspine"
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arms: ArmsConfig = field(default_factory=ArmsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint_every: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field that can be checked without loading anything; raise on the first problem."""
    from fedspine.fl.strategies import STRATEGIES  # numpy-only import

    def need(ok: bool, name: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")

    m, d, f, t, a = cfg.model, cfg.data, cfg.fleet, cfg.train, cfg.arms
    need(
        m.name in MODELS or Path(m.name).is_dir(),
        "model.name",
        f"one of {list(MODELS)} or a local model dir",
        m.name,
    )
    need(m.max_length >= 8, "model.max_length", ">= 8", m.max_length)
    need(m.task in TASKS, "model.task", f"one of {list(TASKS)}", m.task)
    if m.task == "causal-lm":
        need(
            m.name in LM_MODELS or Path(m.name).is_dir(),
            "model.name",
            f"one of {list(LM_MODELS)} or a local model dir for model.task 'causal-lm'",
            m.name,
        )
        need(
            d.source in LM_DATA_SOURCES,
            "data.source",
            f"one of {list(LM_DATA_SOURCES)} for model.task 'causal-lm'",
            d.source,
        )
        # No task head and no class labels: the logit adjustment and a head learning rate have
        # nothing to act on, so we refuse them rather than ignore them silently.
        need(
            t.loss == "ce",
            "train.loss",
            "'ce' for model.task 'causal-lm' (logit-adjusted needs class labels)",
            t.loss,
        )
        need(
            t.head_lr is None,
            "train.head_lr",
            "None for model.task 'causal-lm' (a causal LM has no task head)",
            t.head_lr,
        )
    else:
        need(
            d.source in DATA_SOURCES or Path(d.source).exists(),
            "data.source",
            f"one of {list(DATA_SOURCES)} or a path",
            d.source,
        )
    need(0 < d.test_fraction < 1, "data.test_fraction", "in (0, 1)", d.test_fraction)
    need(d.partition in PARTITIONS, "data.partition", f"one of {list(PARTITIONS)}", d.partition)
    need(d.alpha > 0, "data.alpha", "> 0", d.alpha)
    need(d.max_examples is None or d.max_examples >= 20, "data.max_examples", "None or >= 20", d.max_examples)
    need(f.devices >= 1, "fleet.devices", ">= 1", f.devices)
    need(0 < f.participation <= 1, "fleet.participation", "in (0, 1]", f.participation)
    need(0 <= f.spread < 1, "fleet.spread", "in [0, 1)", f.spread)
    need(t.rounds >= 1, "train.rounds", ">= 1", t.rounds)
    need(t.local_steps >= 1, "train.local_steps", ">= 1", t.local_steps)
    need(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    need(t.lr > 0, "train.lr", "> 0", t.lr)
    need(t.head_lr is None or t.head_lr >= 0, "train.head_lr", "None or >= 0", t.head_lr)
    need(t.server_lr > 0, "train.server_lr", "> 0", t.server_lr)
    need(0 <= t.server_momentum < 1, "train.server_momentum", "in [0, 1)", t.server_momentum)
    need(t.prune_interval >= 1, "train.prune_interval", ">= 1", t.prune_interval)
    need(
        t.importance in ("lora_gradient", "magnitude", "taylor"),
        "train.importance",
        "one of ['lora_gradient', 'magnitude', 'taylor']",
        t.importance,
    )
    from fedspine.fl.client import LOSSES  # the client step owns its losses

    need(t.loss in LOSSES, "train.loss", f"one of {list(LOSSES)}", t.loss)
    need(
        len(a.ratios) > 0 and all(0 <= r < 1 for r in a.ratios),
        "arms.ratios",
        "non-empty, each in [0, 1)",
        a.ratios,
    )
    need(
        len(a.ranks) > 0 and all(isinstance(r, int) and r >= 1 for r in a.ranks),
        "arms.ranks",
        "non-empty positive integers",
        a.ranks,
    )
    need(cfg.strategy.name in STRATEGIES, "strategy.name", f"one of {sorted(STRATEGIES)}", cfg.strategy.name)
    if cfg.strategy.aggregation is not None:
        from fedspine.lora.aggregate import AGGREGATORS

        rules = sorted(AGGREGATORS)
        need(
            cfg.strategy.aggregation in rules,
            "strategy.aggregation",
            f"None or one of {rules}",
            cfg.strategy.aggregation,
        )
    need(cfg.eval.every >= 1, "eval.every", ">= 1", cfg.eval.every)
    need(cfg.log.wandb in WANDB_MODES, "log.wandb", f"one of {list(WANDB_MODES)}", cfg.log.wandb)
    need(cfg.checkpoint_every >= 1, "checkpoint_every", ">= 1", cfg.checkpoint_every)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML/TOML file, then ``section.field=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"config file {str(p)!r} does not exist")
        text = p.read_text()
        raw = (tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level")
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        parsed[key.strip()] = yaml.safe_load(value)
    return config_from_mapping(raw, parsed)


def config_from_mapping(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A validated config from a nested mapping plus ``{"section.field": value}`` overrides."""
    raw = copy.deepcopy(dict(raw))
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}={value!r}: {part!r} is not a section")
        node[parts[-1]] = copy.deepcopy(value)
    return validate(_build(RunConfig, raw, ""))


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s) {[f'{where}{u}' for u in unknown]}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, name) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be float, got {value!r}") from None
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ValueError(f"{name} must be {hint.__name__}, got {value!r}")
    return value
