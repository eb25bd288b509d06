"""A Flower federation on this machine, as real processes: start it, run fedspine on it, tear it down.

``LocalFederation`` starts ``flower-superlink`` (with ``--simulation`` for the simulation
runtime) and, for deployment, one ``flower-supernode`` per device, all on 127.0.0.1, insecure,
on free ports, each in its own session; ``run`` submits the app with ``flwr run`` and waits for
it to finish. ``close`` stops every process it started and everything they started in turn:
each process gets a tag in its environment, which every descendant inherits (SuperExec,
ServerApp/ClientApp processes, Ray), so ``leftovers`` finds them all, even ones that detached.

Used by ``python -m fedspine.flower`` (docs/flower.md) and by the tests. Linux (``/proc``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SERVER_APP, CLIENT_APP = "fedspine.flower.server_app:app", "fedspine.flower.client_app:app"
TAG = "FEDSPINE_FLOWER_TAG"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live next to python


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunOutcome:
    """How ``flwr run`` ended: the run id, its final status (``finished:completed`` on success) and
    the streamed log."""

    run_id: int | None
    status: str
    log: str

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class LocalFederation:
    """SuperLink (+ SuperNodes) on 127.0.0.1. ``nodes`` maps each SuperNode to its ``--node-config``
    (e.g. ``{"partition-id": 0, "state-dir": "/data/fedspine"}``); none for the simulation runtime.
    ``threads`` caps each process's torch/OpenMP threads unless the environment sets them: all
    processes share this machine, and on 2 busy cores two-thread pools made a tiny round 30x slower.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        simulation: bool,
        nodes: Sequence[Mapping[str, Any]] = (),
        start_timeout_s: float = 60.0,
        threads: int | None = 1,
    ):
        if simulation and nodes:
            raise ValueError("nodes: the simulation runtime makes its own virtual SuperNodes")
        self.dir = Path(workdir).resolve()
        self.simulation, self.node_configs = simulation, [dict(n) for n in nodes]
        self.start_timeout_s = start_timeout_s
        self.tag = uuid.uuid4().hex
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            TAG: self.tag,
            "FLWR_HOME": str(self.dir / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the app runs in this environment
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_DISABLE_USAGE_STATS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        if threads is not None:  # many processes share this machine: spinning OpenMP pools slow all
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                self.env.setdefault(var, str(threads))

    # --- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        home = self.dir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedspine"\n\n[superlink.fedspine]\naddress = "{HOST}:{self.port}"\n'
            "insecure = true\n"
        )
        link = ["flower-superlink", "--insecure", "--host", HOST, "--port", str(self.port)]
        link += ["--disable-runtime-dependency-installation", "--database", str(self.dir / "superlink.db")]
        self._spawn("superlink", [*link, "--simulation"] if self.simulation else link)
        self._wait_ready()
        for i, node_config in enumerate(self.node_configs):
            self.start_node(i, node_config)

    def start_node(self, i: int, node_config: Mapping[str, Any]) -> None:
        """Start SuperNode ``i`` (again, after ``kill_node``)."""
        cmd = ["flower-supernode", "--insecure", "--superlink", f"{HOST}:{self.port}"]
        cmd += ["--port", str(free_port()), "--node-config", format_config(node_config)]
        self._spawn(f"supernode{i}", cmd)

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and its ClientApp processes, as a device that dies would."""
        proc = self.procs[f"supernode{i}"]
        tree = _descendants(proc.pid)
        for pid in [proc.pid, *tree]:
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self, grace_s: float = 15.0) -> None:
        """Stop everything: SIGTERM first (the SuperLink stops its SuperExec), then SIGKILL what is
        left of the tagged processes."""
        for name in sorted(self.procs, reverse=True):  # supernodes before the superlink
            if self.procs[name].poll() is None:
                _signal(self.procs[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while self.leftovers() and time.monotonic() < deadline:  # SuperExecs notice their parent left
            time.sleep(0.3)
        for _ in range(3):
            left = self.leftovers()
            if not left:
                break
            for pid in left:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

    def leftovers(self) -> list[int]:
        """Live processes that carry this federation's tag (any it started, at any depth)."""
        return [pid for pid in _pids() if pid != os.getpid() and _has_tag(pid, self.tag)]

    # --- runs --------------------------------------------------------------------------------------
    def run(
        self,
        app: str | Path,
        run_config: Mapping[str, Any],
        *,
        federation_config: Mapping[str, Any] | None = None,
        timeout_s: float = 600.0,
    ) -> RunOutcome:
        """``flwr run app --run-config ... --stream``; waits until the run has finished."""
        cfg_file = self.dir / f"run-config-{uuid.uuid4().hex[:8]}.toml"
        cfg_file.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items()))
        cmd = [str(BIN / "flwr"), "run", str(app), "fedspine", "--run-config", str(cfg_file), "--stream"]
        if federation_config:
            cmd += ["--federation-config", format_config(federation_config)]
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs[f"flwr-run-{proc.pid}"] = proc
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            raise TimeoutError(f"flwr run did not finish within {timeout_s:g} s:\n{log[-4000:]}") from None
        found = re.search(r"Successfully started run (\d+)", log)
        run_id = int(found.group(1)) if found else None
        return RunOutcome(run_id, self.status(run_id) if run_id is not None else "not started", log)

    def status(self, run_id: int, wait_s: float = 30.0) -> str:
        """The run's status from ``flwr ls``, once it is final (or after ``wait_s``)."""
        deadline, status = time.monotonic() + wait_s, "unknown"
        while time.monotonic() < deadline:
            out = subprocess.run(
                [str(BIN / "flwr"), "ls", "fedspine", "--run-id", str(run_id), "--format", "json"],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            try:
                status = json.loads(out.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError):
                status = f"unknown ({out.stdout.strip() or out.stderr.strip()})"
            if status.startswith("finished"):
                break
            time.sleep(1.0)
        return status

    # --- helpers -----------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")  # the child writes to it; our copy closes below
        cmd = [str(BIN / cmd[0]), *cmd[1:]]
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.dir / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower-superlink not ready within {self.start_timeout_s:g} s")


def write_app(directory: str | Path) -> Path:
    """A minimal Flower app for the installed fedspine: a ``pyproject.toml`` naming its ServerApp and
    ClientApp and every run config key (``flwr run --run-config`` may only override listed keys),
    with the defaults of ``fedspine.flower.options``. The app carries no code: fedspine comes from
    this environment. The repository's own ``pyproject.toml`` has the same section."""
    from fedspine import __version__
    from fedspine.flower.options import FlowerOptions, options_dict

    app = Path(directory)
    app.mkdir(parents=True, exist_ok=True)
    config = {"config": "", "overrides": "", **options_dict(FlowerOptions())}
    (app / "pyproject.toml").write_text(
        "[project]\n"
        'name = "fedspine"\n'
        f'version = "{__version__}"\n'
        'description = "fedspine on Flower"\n'
        'license = "Apache-2.0"\n'
        "dependencies = []\n\n"
        "[tool.flwr.app]\n"
        'publisher = "fedspine"\n\n'
        "[tool.flwr.app.components]\n"
        f'serverapp = "{SERVER_APP}"\n'
        f'clientapp = "{CLIENT_APP}"\n\n'
        "[tool.flwr.app.config]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in config.items())
    )
    return app


def format_config(config: Mapping[str, Any]) -> str:
    """Flower's ``key=value key=value`` form of a flat config (strings quoted, TOML values)."""
    return " ".join(f"{k}={_toml(v)}" for k, v in config.items())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise ValueError(f"config values must be str, int, float or bool, got {value!r}")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _has_tag(pid: int, tag: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and f"{TAG}={tag}".encode() in environ.split(b"\0")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in _pids():
        try:
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
