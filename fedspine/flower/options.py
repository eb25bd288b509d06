"""The Flower run config of a fedspine app, read once at the edge and validated.

Flower hands every app the same flat, kebab-case key/value map (``[tool.flwr.app.config]`` in
``pyproject.toml``, overridden by ``flwr run --run-config``). Two keys say *what* to run, as
``fedspine run`` would: ``config`` (a YAML/TOML run config; empty: the built-in defaults) and
``overrides`` (``section.field=value`` items). The rest are the few settings only a Flower run
needs (``FlowerOptions``). Errors name the key. No flwr or torch import.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspine.config import CORRUPT_KINDS, RunConfig, load_config

APP_ROOT = Path(__file__).resolve().parents[2]  # the Flower app (FAB) or repository root
TIME_SOURCES = ("auto", "modelled", "measured")
DEFAULT_STATE_DIR = "~/.cache/fedspine/flower"


@dataclass(frozen=True)
class FlowerOptions:
    """Settings of a Flower run that the in-process simulator does not have."""

    round_timeout_s: float = 600.0  # a device that has not answered by then failed the round
    time: str = "auto"  # auto: modelled on the simulation runtime, measured on real SuperNodes
    run_dir: str = ""  # metrics.jsonl + checkpoint/; "": <log.dir>/<strategy>-seed<seed>, as `fedspine run`
    resume: bool = False  # continue run_dir's checkpoint (the run config must be the same)
    min_devices: int = 0  # devices to wait for before round 1; 0: the whole fleet
    wait_s: float = 120.0  # how long to wait for them; the run starts with whoever is there
    poll_s: float = 0.2  # reply polling interval: the resolution of measured round times
    state_dir: str = DEFAULT_STATE_DIR  # where devices keep their state; a node's `state-dir` wins
    device_cache: int = 8  # device states one ClientApp process keeps in memory (simulation)


# Flower key -> (FlowerOptions field, type)
_OPTION_KEYS: dict[str, tuple[str, type]] = {
    "round-timeout": ("round_timeout_s", float),
    "time": ("time", str),
    "run-dir": ("run_dir", str),
    "resume": ("resume", bool),
    "min-devices": ("min_devices", int),
    "wait": ("wait_s", float),
    "poll": ("poll_s", float),
    "state-dir": ("state_dir", str),
    "device-cache": ("device_cache", int),
}
_RUN_KEYS = ("config", "overrides")
ALLOWED_KEYS = sorted([*_RUN_KEYS, *_OPTION_KEYS])


def read_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerOptions]:
    """(fedspine ``RunConfig``, ``FlowerOptions``) from a Flower run config; raises ``ValueError``
    naming the bad key. Cached: every ClientApp message calls this."""
    return _read(tuple(sorted((str(k), v) for k, v in run_config.items())))


@functools.lru_cache(maxsize=8)
def _read(items: tuple[tuple[str, Any], ...]) -> tuple[RunConfig, FlowerOptions]:
    raw = dict(items)
    unknown = sorted(set(raw) - set(ALLOWED_KEYS))
    if unknown:
        raise ValueError(f"unknown Flower run config key(s) {unknown}; allowed: {ALLOWED_KEYS}")
    config, overrides = _typed(raw, "config", str, ""), _typed(raw, "overrides", str, "")
    try:
        cfg = load_config(config_path(config), shlex.split(overrides))
    except ValueError as exc:
        raise ValueError(f"run config 'config'/'overrides': {exc}") from None
    kwargs = {}
    for key, (name, kind) in _OPTION_KEYS.items():
        if key in raw:
            kwargs[name] = _typed(raw, key, kind, None)
    opts = FlowerOptions(**kwargs)
    _check(opts)
    return cfg, opts


def config_path(value: str) -> Path | None:
    """The fedspine config file named by the ``config`` key; relative paths resolve against the app
    root (the installed Flower app, or this repository), then the working directory."""
    if not value:
        return None
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    for base in (APP_ROOT, Path.cwd()):
        if (base / p).exists():
            return base / p
    raise ValueError(
        f"run config 'config': {value!r} not found (relative paths resolve against {APP_ROOT} "
        "and the working directory)"
    )


def options_dict(opts: FlowerOptions) -> dict[str, Any]:
    """``opts`` back as Flower run config keys (to build ``--run-config`` arguments)."""
    by_field = {name: key for key, (name, _) in _OPTION_KEYS.items()}
    return {by_field[f.name]: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def _typed(raw: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ValueError(f"run config {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _check(o: FlowerOptions) -> None:
    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ValueError(f"run config {key!r} must be {allowed}, got {value!r}")

    need(
        math.isfinite(o.round_timeout_s) and o.round_timeout_s > 0,
        "round-timeout",
        "> 0 s",
        o.round_timeout_s,
    )
    need(o.time in TIME_SOURCES, "time", f"one of {list(TIME_SOURCES)}", o.time)
    need(o.min_devices >= 0, "min-devices", ">= 0", o.min_devices)
    need(math.isfinite(o.wait_s) and o.wait_s >= 0, "wait", ">= 0 s", o.wait_s)
    need(math.isfinite(o.poll_s) and 0 < o.poll_s <= 10, "poll", "in (0, 10] s", o.poll_s)
    need(bool(o.state_dir), "state-dir", "a directory", o.state_dir)
    need(o.device_cache >= 1, "device-cache", ">= 1", o.device_cache)


def run_dir(cfg: RunConfig, opts: FlowerOptions) -> Path:
    """Where the ServerApp writes metrics and checkpoints: the same place ``fedspine run`` would."""
    if opts.run_dir:
        return Path(opts.run_dir).expanduser()
    from fedspine.fl.simulator import default_run_dir  # torch: only the ServerApp asks

    return default_run_dir(cfg)


# --- node config (per SuperNode, `flower-supernode --node-config`) --------------------------------
def partition_of(node_config: Mapping[str, Any], cfg: RunConfig) -> int:
    """The node's device index in the fleet. The simulation runtime sets ``partition-id`` and
    ``num-partitions``; a real SuperNode gets them from ``--node-config``."""
    pid = node_config.get("partition-id")
    if pid is None:
        raise ValueError(
            "node config needs 'partition-id' (flower-supernode --node-config 'partition-id=0 ...')"
        )
    n = cfg.fleet.devices
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < n:
        raise ValueError(
            f"node config 'partition-id' must be an integer in [0, {n}) (fleet.devices), got {pid!r}"
        )
    parts = node_config.get("num-partitions")
    if parts is not None and parts != n:
        raise ValueError(f"node config 'num-partitions' is {parts!r} but the run's fleet.devices is {n}")
    return pid


def node_state_dir(node_config: Mapping[str, Any], opts: FlowerOptions) -> Path:
    value = node_config.get("state-dir", opts.state_dir)
    if not isinstance(value, str) or not value:
        raise ValueError(f"node config 'state-dir' must be a directory, got {value!r}")
    return Path(value).expanduser()


def node_model(node_config: Mapping[str, Any], cfg: RunConfig) -> RunConfig:
    """``cfg`` with the node's own copy of the base model (``model-path``), if it names one."""
    path = node_config.get("model-path")
    if path is None:
        return cfg
    if not isinstance(path, str) or not Path(path).expanduser().is_dir():
        raise ValueError(f"node config 'model-path' must be a local model directory, got {path!r}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(Path(path).expanduser())))


def node_corruption(node_config: Mapping[str, Any]) -> str:
    """What this node does to every update it sends (``corrupt`` in ``--node-config``): "" for
    nothing, or one of ``config.CORRUPT_KINDS``. For studying a real deployment's defences: the
    server's screening (``fedspine.fl.screening``) must reject such a node's updates."""
    value = node_config.get("corrupt", "")
    if value != "" and value not in CORRUPT_KINDS:
        raise ValueError(f"node config 'corrupt' must be '' or one of {list(CORRUPT_KINDS)}, got {value!r}")
    return value
