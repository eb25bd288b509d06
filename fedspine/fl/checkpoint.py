"""Crash-safe checkpoints of a simulation, and exact resume.

A checkpoint holds everything a later round depends on: the global adapter (npz), each
device's kept-index map and (FLoRA-style rules) the base delta it has applied, the strategy's
state (the allocator's, RNG included), the simulator's RNG streams, the simulated clock, the
round and the records so far. Device base models are not stored: they are the original model
pruned to the device's kept map, rebuilt on load. Client randomness is a function of (seed,
device, round), so it needs no snapshot.

Layout (docs/checkpoints.md): one directory of generations, ``ckpt-000003/`` per saved round,
each holding ``state.json``, ``arrays.npz`` and ``MANIFEST.json`` (size and sha256 of both). A
generation is written under a temporary name, fsynced, its manifest written last, then renamed
into place, so a ``ckpt-*`` directory is always complete; the previous generation is deleted
only after that. A kill at any instant leaves at least one complete generation once round 0 is
saved. ``load`` takes the newest generation whose manifest verifies and falls back, with a
warning naming the file, to the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
MANIFEST_FILE = "MANIFEST.json"
FORMAT = 2  # 1: the single ``checkpoint/`` directory (state.json + arrays.npz), no manifest
KEEP = 2  # generations kept: the newest, and one to fall back to
_GENERATION = re.compile(r"ckpt-(\d{6,})")
_TMP, _TRASH = ".tmp-", ".trash-"
KILL_ENV = "FEDSPINE_TEST_KILL_AT"  # test-only, see _test_kill


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class NoCheckpoint(CheckpointError):
    """Nothing was ever saved there (the run stopped before round 0 was saved)."""


class CheckpointWarning(UserWarning):
    """A damaged generation was skipped for an earlier one."""


@dataclass(frozen=True)
class Generation:
    """One saved round on disk; ``legacy`` is the format-1 layout (no manifest)."""

    path: Path
    round: int | None  # None: legacy (its round is in its state.json)
    legacy: bool = False


def save(root: str | Path, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write ``state`` (JSON) and ``arrays`` as generation ``state["round"]`` under ``root``;
    keep it and the newest older one, delete the rest. Returns the generation's directory."""
    root = Path(root)
    rnd = int(state["round"])
    if not root.is_dir():
        root.mkdir(parents=True)
        _fsync_dir(root.parent)
    _remove_stale(root)
    final = root / f"ckpt-{rnd:06d}"
    tmp = root / f"{_TMP}{final.name}"
    tmp.mkdir()
    with (tmp / ARRAYS_FILE).open("wb") as f:
        np.savez(f, **arrays)
        _flush(f)
    with (tmp / STATE_FILE).open("wb") as f:
        f.write(json.dumps(state, default=_json_default).encode())
        _flush(f)
    _test_kill("files-written", rnd)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in _FILES}
    with (tmp / MANIFEST_FILE).open("wb") as f:
        f.write(json.dumps({"format": FORMAT, "round": rnd, "files": files}, indent=1).encode())
        _flush(f)
    _fsync_dir(tmp)
    _test_kill("manifest-written", rnd)
    if final.exists():  # a damaged copy of this round, skipped by the resume that led here
        _to_trash(final, root)
        _test_kill("replaced", rnd)
    os.rename(tmp, final)
    _fsync_dir(root)
    _test_kill("renamed", rnd)
    older = [g for g in generations(root) if g.path != final]
    keep = [g for g in older if g.legacy or g.round < rnd][: KEEP - 1]
    for g in older:
        if g not in keep:
            _discard(g)
    _fsync_dir(root)
    _test_kill("pruned", rnd)
    _remove_stale(root)
    return final


def load(root: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The newest generation under ``root`` that verifies: (state, arrays).

    A damaged generation is skipped with a ``CheckpointWarning`` naming its file and the
    mismatch; with none left, ``CheckpointError`` names every file tried. ``NoCheckpoint`` when
    nothing was ever saved there."""
    root = Path(root)
    problems = []
    for g in generations(root):
        try:
            state, arrays = _read(g)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            warnings.warn(f"{problem}; resuming from {g.path} instead", CheckpointWarning, stacklevel=2)
        return state, arrays
    if problems:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(problems))
    raise NoCheckpoint(f"no checkpoint in {root} (expected {root}/ckpt-NNNNNN/{MANIFEST_FILE})")


def generations(root: str | Path) -> list[Generation]:
    """Every saved round under ``root``, newest first: ``ckpt-*`` by round, then the legacy
    ``root`` itself and ``root.old`` (written before this layout, so older than any ``ckpt-*``)."""
    root = Path(root)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _GENERATION.fullmatch(p.name)
            if m and p.is_dir():
                found.append(Generation(p, int(m.group(1))))
    found.sort(key=lambda g: g.round, reverse=True)
    for p in _legacy_dirs(root):
        if (p / STATE_FILE).exists():
            found.append(Generation(p, None, legacy=True))
    return found


def clear(root: str | Path) -> None:
    """Remove every generation (and leftovers) under ``root``: a fresh run starts with none, so
    that a kill before its round 0 is saved cannot resume someone else's later round."""
    root = Path(root)
    for g in generations(root):
        _discard(g)
    if root.is_dir():
        _remove_stale(root)


# --- reading ---------------------------------------------------------------------------------------
_FILES = (STATE_FILE, ARRAYS_FILE)


def _read(g: Generation) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Verify (manifest: sizes and sha256) and parse one generation, or raise CheckpointError."""
    if not g.legacy:
        manifest = g.path / MANIFEST_FILE
        try:
            listed = json.loads(manifest.read_bytes())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{manifest}: unreadable manifest ({_why(exc)})") from None
        for name in _FILES:
            path, want = g.path / name, listed.get(name, {})
            if not path.exists():
                raise CheckpointError(f"{path}: missing")
            size = path.stat().st_size
            if size != want.get("bytes"):
                raise CheckpointError(
                    f"{path}: {size} bytes, the manifest says {want.get('bytes')} (truncated?)"
                )
            digest = _sha256(path)
            if digest != want.get("sha256"):
                raise CheckpointError(
                    f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                    f"{str(want.get('sha256'))[:12]}... (corrupted)"
                )
    path = g.path / STATE_FILE
    try:
        state = json.loads(path.read_bytes())
        path = g.path / ARRAYS_FILE
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zip, CRC, zlib, JSON, pickle-refused: all mean "this file is damaged"
        raise CheckpointError(f"{path}: cannot be read ({_why(exc)})") from None
    if g.round is not None and state.get("round") != g.round:
        raise CheckpointError(f"{g.path / STATE_FILE}: round {state.get('round')}, directory says {g.round}")
    return state, arrays


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- writing ---------------------------------------------------------------------------------------
def _legacy_dirs(root: Path) -> Iterator[Path]:
    yield root  # format 1 wrote state.json straight into the checkpoint directory
    yield root.with_name(root.name + ".old")  # the previous one, when a save was killed mid-rename


def _discard(g: Generation) -> None:
    """Delete a generation so that it is never seen half-deleted: renamed away first."""
    if g.legacy and not g.path.name.endswith(".old"):
        for name in (STATE_FILE, ARRAYS_FILE):  # state.json first: it is what marks the generation
            (g.path / name).unlink(missing_ok=True)
        return
    root = g.path.parent if not g.legacy else g.path.with_name(g.path.name[: -len(".old")])
    if not root.is_dir():  # format 1 killed between its renames: only root.old is left
        shutil.rmtree(g.path, ignore_errors=True)
        return
    trash = _to_trash(g.path, root)
    _test_kill("trashed", g.round)
    shutil.rmtree(trash, ignore_errors=True)


def _to_trash(path: Path, root: Path) -> Path:
    trash = root / (_TRASH + path.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    return trash


def _remove_stale(root: Path) -> None:
    """Temporary and half-deleted directories a killed save left (never a complete generation)."""
    for p in root.iterdir():
        if p.name.startswith((_TMP, _TRASH)):
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(root.with_name(root.name + ".tmp"), ignore_errors=True)  # format 1's
    if not (root / STATE_FILE).exists():  # format 1's arrays, left by a discard killed half-way
        (root / ARRAYS_FILE).unlink(missing_ok=True)


def _flush(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_kill(point: str, rnd: int | None) -> None:
    """Test-only: ``FEDSPINE_TEST_KILL_AT=<point>@<round>`` SIGKILLs this process at that point
    of a save, so tests can kill between any two steps (tests/fl/test_crash_safety.py)."""
    if os.environ.get(KILL_ENV) == f"{point}@{rnd}":
        os.kill(os.getpid(), signal.SIGKILL)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "Generation",
    "NoCheckpoint",
    "clear",
    "generations",
    "load",
    "save",
]
