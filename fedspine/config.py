"""One typed run configuration: small frozen dataclasses, loaded from YAML/TOML with ``a.b=c``
overrides and validated before any work starts (errors name the field and the allowed values).

Plain data: this module imports nothing from fedspine (and so no torch). ``validate`` checks what
the values say on their own: types, ranges and names. The names other modules register
(strategies, aggregation rules, importance criteria, tasks, partitions) are plain tuples here,
each kept equal to its registry by a contract test (``tests/fl/test_build.py``). What only the
registered classes can judge, a strategy's typed ``strategy.params`` above all, is checked by
``fedspine.fl.build.check``, which every entry point calls before loading a model or data.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

MODELS = ("tiny-bert", "tiny-llama", "all-minilm-l6-v2", "smollm2-135m")
DATA_SOURCES = ("synthetic", "rotten-tomatoes")  # or a path to a local file / saved dataset
TASKS = ("classification", "causal-lm")  # == fedspine.models.TASKS (a contract test keeps them equal)
LM_DATA_SOURCES = ("synthetic", "chatterbot")  # task causal-lm: prompt/answer pairs (fedspine.data.causal)
LM_MODELS = ("tiny-llama", "smollm2-135m")  # decoders; or a local HF causal-LM directory
PARTITIONS = ("iid", "dirichlet", "pathological", "shard")  # == fedspine.data.partition.SCHEMES
CLASS_ASSIGNMENTS = ("random", "deterministic", "first-deterministic")  # == partition.CLASS_ASSIGNMENTS
PRECISIONS = ("auto", "fp32", "bf16")  # ClientConfig.precision (fedspine.fl.placement)
DEVICES = ("auto", "cpu", "cuda")  # ClientConfig.device (fedspine.fl.placement)
RUNNERS = ("auto", "per-device", "batched")  # TrainConfig.runner (fedspine.fl.runners / batched)
WANDB_MODES = ("disabled", "offline", "online")
LOSSES = ("ce", "logit-adjusted")  # ClientConfig.loss; the client step implements each
# == the keys of fedspine.fl.strategies.STRATEGIES, fedspine.lora.aggregate.AGGREGATORS and
# fedspine.pruning.iterative.importance_names()
STRATEGY_NAMES = (
    "fedspine",
    "fedavg-lora",
    "hetlora",
    "flexlora",
    "flora",
    "fixed-prune",
    "tier-prune",
    "random-arm",
)
AGGREGATION_RULES = ("zero-pad", "rank-aware", "hetlora", "flexlora", "flora", "fedspine")
IMPORTANCES = ("lora_gradient", "magnitude", "taylor")
# FaultConfig.corrupt_kinds (fedspine.fl.faults): what a corrupt update gets wrong
CORRUPT_KINDS = ("nan", "inf", "shape", "keys", "norm")


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
    # Device partitions are flwr-datasets' partitioners (fedspine.data.partition); each field
    # below says which of their arguments it is.
    partition: str = "dirichlet"  # one of PARTITIONS
    alpha: float = 0.5  # dirichlet: alpha (ours; the paper's is unknown)
    min_size: int = 8  # every scheme: examples a device must hold (dirichlet: min_partition_size)
    self_balancing: bool = False  # dirichlet: self_balancing
    classes_per_device: int = 2  # pathological: num_classes_per_partition
    class_assignment: str = "random"  # pathological: class_assignment_mode, one of CLASS_ASSIGNMENTS
    shards_per_device: int = 2  # shard: num_shards_per_partition (shard size follows)


@dataclass(frozen=True)
class FleetConfig:
    devices: int = 8  # split 30:40:10 into TX2 / Xavier NX / AGX Xavier tiers, as in the paper
    spread: float = 0.15  # +- variation of speed and bandwidth within a tier
    participation: float = 1.0  # fraction of devices sampled each round
    # Effective compute of the fastest tier over the slowest's (AGX over TX2); None = our per-tier
    # utilisations, 4.4x (fedspine.fl.devices). The spec-sheet peaks' ratio is about 8.3x.
    compute_spread: float | None = None
    link_scale: float = 1.0  # every device's link throughput times this (1 = Wi-Fi 20 / 50 Mbit/s)


@dataclass(frozen=True)
class ClientConfig:
    """A device's local training in one round: the one definition of these settings and their
    defaults. The server sends it to every device in ``TrainIns.config``; the ``train`` section of
    a run config holds the same fields (``TrainConfig`` extends this class) plus the run's own."""

    local_steps: int = 10
    lr: float = 5e-4
    # The task head's (modules_to_save) learning rate; None = lr. 0 freezes the fresh random head
    # for the whole federation (FedBABU, Oh et al. ICLR 2022): under label skew the head is what
    # drifts most, and a fixed head gives every device the same target for its features.
    head_lr: float | None = None
    prune_interval: int = 20  # paper [S]: 20 local iterations between prunes worked best
    round_to: int = 8
    importance: str = "lora_gradient"  # one of IMPORTANCES (fedspine.pruning)
    # "logit-adjusted" (ours, after FedLC, Zhang et al. 2022): local cross-entropy on logits +
    # log(local label prior). Under label skew a device then cannot lower its loss by just
    # predicting its majority class, so its update carries features, not a bias that the average
    # cancels. Sequence classification only; "ce" is plain cross-entropy.
    loss: str = "ce"
    # Compute precision of the frozen base: "auto" = bf16 where the hardware has it (a CPU with
    # AMX-BF16 / AVX-512-BF16, a CUDA GPU with bf16), else fp32. Adapters, their gradients and
    # the optimizer state stay fp32 in every mode (fedspine.fl.placement).
    precision: str = "auto"
    device: str = "auto"  # "auto" = cuda when available, else cpu

    _section: ClassVar[str] = "client."  # how errors name the fields

    def __post_init__(self) -> None:
        where = self._section
        require(self.local_steps >= 1, f"{where}local_steps", ">= 1", self.local_steps)
        require(finite(self.lr) and self.lr > 0, f"{where}lr", "a finite number > 0", self.lr)
        require(
            self.head_lr is None or (finite(self.head_lr) and self.head_lr >= 0),
            f"{where}head_lr",
            "None or a finite number >= 0",
            self.head_lr,
        )
        require(self.prune_interval >= 1, f"{where}prune_interval", ">= 1", self.prune_interval)
        require(self.round_to >= 1, f"{where}round_to", ">= 1", self.round_to)
        require(self.loss in LOSSES, f"{where}loss", f"one of {list(LOSSES)}", self.loss)
        require(
            self.precision in PRECISIONS, f"{where}precision", f"one of {list(PRECISIONS)}", self.precision
        )
        require(self.device in DEVICES, f"{where}device", f"one of {list(DEVICES)}", self.device)
        require(
            self.importance in IMPORTANCES,
            f"{where}importance",
            f"one of {list(IMPORTANCES)}",
            self.importance,
        )

    def client(self) -> ClientConfig:
        """Just the device's settings (a ``TrainConfig`` without the run's own fields)."""
        return ClientConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ClientConfig)})


@dataclass(frozen=True)
class TrainConfig(ClientConfig):
    """The ``train`` section: the device's settings (``ClientConfig``) and the run's."""

    _section: ClassVar[str] = "train."

    rounds: int = 3
    # Stop after the first round at whose end the simulated clock has reached this many seconds;
    # train.rounds is then the most rounds (ours: compares strategies at an equal time budget
    # rather than an equal number of rounds). None = run all train.rounds.
    time_budget_s: float | None = None
    batch_size: int = 16  # each device's batches come from its own data stream, not the message
    server_lr: float = 1.0  # server step on the aggregate (ours, FedAvgM; fedspine.fl.server)
    server_momentum: float = 0.0  # 0 = plain aggregation
    # Where a simulation trains its devices: "per-device" (one peft model per device, the
    # reference path), "batched" (the devices of a round together on one shared base,
    # fedspine.fl.batched), or "auto" (batched for every device it can take, per-device for
    # the rest). Flower devices always train on their own.
    runner: str = "auto"
    batch_devices: int = 16  # at most this many devices in one batched pass (memory grows with it)


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
    # The global adapter (original coordinates, rank r_max, the head included) as a peft adapter
    # directory, <run dir>/adapters/round-NNNN, after each of these rounds; with
    # save_adapter_final also <run dir>/adapters/final after the last round. It loads with
    # PeftModel.from_pretrained on the unpruned base (fedspine.fl.simulator, README).
    save_adapter_rounds: tuple[int, ...] = ()
    save_adapter_final: bool = False


@dataclass(frozen=True)
class FaultConfig:
    """Injected device faults, to study robustness (``fedspine.fl.faults``). Each is a probability
    per device and round; a device gets at most one fault a round. Drawn from their own stream
    (seeded per run, device and round), so they never shift another random draw of the run."""

    dropout: float = 0.0  # no reply at all: the server waits until the round's deadline
    crash: float = 0.0  # an error reply mid-training; the device's state stays where the server saw it
    straggle: float = 0.0  # the reply arrives past the round's deadline and is dropped
    corrupt: float = 0.0  # the reply's update is corrupted in one of ``corrupt_kinds``
    corrupt_kinds: tuple[str, ...] = CORRUPT_KINDS  # nan, inf, shape, keys, norm (x norm_factor)
    norm_factor: float = 1e6  # a "norm" corruption multiplies the update's size by this


@dataclass(frozen=True)
class ServerConfig:
    """The server's defences against faulty devices (``fedspine.fl.screening``, the round loop)."""

    validate: bool = True  # check every update (finite, keys, shapes, norm) before it is used
    # Reject an update whose size exceeds norm_k x the low median of the round's update sizes and
    # the last norm_history accepted ones (ours; the history is the floor for rounds with few
    # devices). None = no norm bound.
    norm_k: float | None = 10.0
    norm_history: int = 16
    min_success: int = 1  # fewer accepted updates: the round keeps the previous global state
    # The round deadline in seconds (simulated or measured): a reply later than it is dropped.
    # None: no reply is dropped for its time; missed replies and failed rounds cost
    # deadline_factor x the slowest participant's noise-free modelled round time.
    deadline_s: float | None = None
    deadline_factor: float = 2.0


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
    faults: FaultConfig = field(default_factory=FaultConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    checkpoint_every: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: RunConfig) -> RunConfig:
    """Check what the values say on their own; raise on the first problem. A strategy's typed
    params are ``fedspine.fl.build.check``'s."""
    need = require
    m, d, f, t, a = cfg.model, cfg.data, cfg.fleet, cfg.train, cfg.arms
    need(cfg.seed >= 0, "seed", "an integer >= 0", cfg.seed)
    need(
        m.name in MODELS or Path(m.name).is_dir(),
        "model.name",
        f"one of {list(MODELS)} or a local model dir",
        m.name,
    )
    if m.name not in MODELS:  # a local HF model directory: what transformers needs to read it
        need(
            (Path(m.name) / "config.json").is_file(),
            "model.name",
            "a model dir holding config.json (a transformers save_pretrained folder)",
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
            d.source != "chatterbot" or m.name not in ("tiny-bert", "tiny-llama"),
            "model.name",
            "a model with a tokenizer for data.source 'chatterbot' (the tiny random models have none)",
            m.name,
        )
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
        if d.source not in DATA_SOURCES:
            src = Path(d.source)
            need(
                not src.is_file() or src.stat().st_size > 0,
                "data.source",
                "a non-empty file (this one has 0 bytes)",
                d.source,
            )
            need(
                not src.is_dir() or any(src.iterdir()),
                "data.source",
                "a saved dataset folder with files in it (this one is empty)",
                d.source,
            )
            need(
                m.name not in ("tiny-bert", "tiny-llama"),
                "model.name",
                f"a model with a tokenizer for data.source {d.source!r} (the tiny random models have none)",
                m.name,
            )
    need(0 < d.test_fraction < 1, "data.test_fraction", "in (0, 1)", d.test_fraction)
    need(d.partition in PARTITIONS, "data.partition", f"one of {list(PARTITIONS)}", d.partition)
    need(finite(d.alpha) and d.alpha > 0, "data.alpha", "a finite number > 0", d.alpha)
    need(d.classes_per_device >= 1, "data.classes_per_device", ">= 1", d.classes_per_device)
    allowed = f"one of {list(CLASS_ASSIGNMENTS)}"
    need(d.class_assignment in CLASS_ASSIGNMENTS, "data.class_assignment", allowed, d.class_assignment)
    need(d.shards_per_device >= 1, "data.shards_per_device", ">= 1", d.shards_per_device)
    need(d.max_examples is None or d.max_examples >= 20, "data.max_examples", "None or >= 20", d.max_examples)
    need(d.max_test is None or d.max_test >= 1, "data.max_test", "None (all) or >= 1", d.max_test)
    need(d.min_size >= 1, "data.min_size", ">= 1 (every device needs data)", d.min_size)
    need(f.devices >= 1, "fleet.devices", ">= 1", f.devices)
    need(0 < f.participation <= 1, "fleet.participation", "in (0, 1]", f.participation)
    need(0 <= f.spread < 1, "fleet.spread", "in [0, 1)", f.spread)
    cs = f.compute_spread
    need(cs is None or (math.isfinite(cs) and cs >= 1), "fleet.compute_spread", "None or a number >= 1", cs)
    need(
        math.isfinite(f.link_scale) and f.link_scale > 0,
        "fleet.link_scale",
        "a finite number > 0",
        f.link_scale,
    )
    need(t.rounds >= 1, "train.rounds", ">= 1", t.rounds)
    tb = t.time_budget_s
    need(tb is None or (finite(tb) and tb > 0), "train.time_budget_s", "None or a finite number > 0", tb)
    need(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    need(finite(t.server_lr) and t.server_lr > 0, "train.server_lr", "a finite number > 0", t.server_lr)
    need(t.runner in RUNNERS, "train.runner", f"one of {list(RUNNERS)}", t.runner)
    need(t.batch_devices >= 1, "train.batch_devices", ">= 1", t.batch_devices)
    need(0 <= t.server_momentum < 1, "train.server_momentum", "in [0, 1)", t.server_momentum)
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
    names = sorted(STRATEGY_NAMES)
    need(cfg.strategy.name in names, "strategy.name", f"one of {names}", cfg.strategy.name)
    rules = sorted(AGGREGATION_RULES)
    agg = cfg.strategy.aggregation
    need(agg is None or agg in rules, "strategy.aggregation", f"None or one of {rules}", agg)
    need(cfg.eval.every >= 1, "eval.every", ">= 1", cfg.eval.every)
    acc = cfg.eval.target_accuracy
    need(acc is None or (finite(acc) and 0 <= acc <= 1), "eval.target_accuracy", "None or in [0, 1]", acc)
    lg = cfg.log
    need(lg.wandb in WANDB_MODES, "log.wandb", f"one of {list(WANDB_MODES)}", lg.wandb)
    need(bool(lg.dir.strip()), "log.dir", "a folder path", lg.dir)
    blocker = _file_in_the_way(Path(lg.dir))
    need(
        blocker is None,
        "log.dir",
        f"a folder or a path that can become one ({str(blocker)!r} is a file)",
        lg.dir,
    )
    name_ok = lg.name is None or (lg.name.strip() not in ("", ".", "..") and Path(lg.name).name == lg.name)
    need(name_ok, "log.name", "None or one folder name (no '/')", lg.name)
    saves = cfg.log.save_adapter_rounds
    need(
        all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= t.rounds for r in saves),
        "log.save_adapter_rounds",
        f"round numbers in [1, train.rounds = {t.rounds}]",
        saves,
    )
    need(
        isinstance(cfg.log.save_adapter_final, bool),
        "log.save_adapter_final",
        "true or false",
        cfg.log.save_adapter_final,
    )
    need(cfg.checkpoint_every >= 1, "checkpoint_every", ">= 1", cfg.checkpoint_every)
    _validate_faults(cfg.faults, cfg.server)
    return cfg


def _validate_faults(fc: FaultConfig, sc: ServerConfig) -> None:
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in ("dropout", "crash", "straggle", "corrupt"):
        v = getattr(fc, name)
        require(finite(v) and 0 <= v <= 1, f"faults.{name}", "a probability in [0, 1]", v)
    total = fc.dropout + fc.crash + fc.straggle + fc.corrupt
    require(
        total <= 1, "faults", "probabilities summing to at most 1 (one fault per device and round)", total
    )
    kinds = fc.corrupt_kinds
    require(
        len(kinds) > 0 and all(k in CORRUPT_KINDS for k in kinds),
        "faults.corrupt_kinds",
        f"a non-empty list of {list(CORRUPT_KINDS)}",
        kinds,
    )
    nf = fc.norm_factor
    require(finite(nf) and nf > 1, "faults.norm_factor", "a number > 1", nf)
    k = sc.norm_k
    require(k is None or (finite(k) and k > 1), "server.norm_k", "None or a number > 1", k)
    require(sc.norm_history >= 0, "server.norm_history", ">= 0", sc.norm_history)
    require(sc.min_success >= 1, "server.min_success", ">= 1", sc.min_success)
    d = sc.deadline_s
    require(d is None or (finite(d) and d > 0), "server.deadline_s", "None or a number of seconds > 0", d)
    f = sc.deadline_factor
    require(finite(f) and f >= 1, "server.deadline_factor", "a number >= 1", f)


class ConfigError(ValueError):
    """A user's input cannot run: the message names the field (or file, flag, argument), the bad
    value and what is allowed. The CLI prints it as one line (exit code 2), never a traceback.
    A ``ValueError``, so callers that catch those keep working."""


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a folder, if any."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def require(ok: bool, name: str, allowed: str, value: Any) -> None:
    """Raise ``ConfigError("<name> must be <allowed>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def finite(x: Any) -> bool:
    """``x`` is a real number and neither inf nor NaN (YAML reads ``.inf`` and ``.nan``)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML/TOML file, then ``section.field=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_config_file(Path(path))
    parsed = {}
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        try:
            parsed[key.strip()] = yaml.load(value, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)})"
            ) from None
    return config_from_mapping(raw, parsed)


def read_config_file(p: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML or TOML file; a missing file, a syntax error or a key given
    twice is a ``ConfigError`` naming the file (and the line)."""
    where = f"config file {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{where} {'is a folder' if p.is_dir() else 'does not exist'}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else yaml.load(text, Loader=_StrictLoader)  # noqa: S506
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping at the top level, got {type(raw).__name__}")
    return raw


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently; YAML 1.2 says keys are unique)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (line, column), without the excerpt."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def config_from_mapping(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A validated config from a nested mapping plus ``{"section.field": value}`` overrides."""
    raw = copy.deepcopy(dict(raw))
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}={value!r}: {part!r} is not a section")
        node[parts[-1]] = copy.deepcopy(value)
    return validate(from_mapping(RunConfig, raw, ""))


def fill_missing(stored: Any, defaults: Any) -> Any:
    """``stored`` (nested plain data, as a run recorded it) with every key of ``defaults`` it lacks
    added, at any depth: how a record from before a field existed is read today."""
    if not (isinstance(stored, dict) and isinstance(defaults, dict)):
        return stored
    out = {k: fill_missing(v, defaults.get(k)) for k, v in stored.items()}
    for k, v in defaults.items():
        out.setdefault(k, v)
    return out


def field_defaults(cls: type = RunConfig, where: str = "") -> dict[str, Any]:
    """Every field's full name (``"train.lr"``) and default, sections flattened, in declaration
    order: what ``fedspine run --help`` lists and the README's configuration tables hold."""
    out: dict[str, Any] = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out.update(field_defaults(type(value), f"{where}{f.name}."))
        else:
            out[f"{where}{f.name}"] = value
    return out


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists (``ranks: [4, 8, 16]``)."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def to_yaml(cfg: RunConfig) -> str:
    """The whole config as YAML, every default written out; ``load_config`` reads it back to ``cfg``."""
    return yaml.dump(_plain(cfg.to_dict()), Dumper=_Dumper, sort_keys=False, width=100)


def yaml_value(value: Any) -> str:
    """One value as it is written in a YAML file or an ``a.b=value`` override (``null``, ``[4, 8]``)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (YAML's safe dumper knows no tuples)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def from_mapping(cls: type, raw: Any, where: str) -> Any:
    """The dataclass ``cls`` from a nested mapping: unknown fields, wrong types and bad values are
    refused with the field's full name (``where`` + field, e.g. ``"strategy.params."``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {[f'{where}{u}' for u in unknown]}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, f"{name}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, name) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {_coerce(args[0], k, name): _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be float, got {value!r}") from None
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value
