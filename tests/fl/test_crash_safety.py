"""SIGKILL a running ``fedspine run`` at 10 random moments, inside round 1 and between the steps
of a checkpoint save; every run resumes to the records of the uninterrupted one (issue #14).

Each run is ``fedspine.cli.main(["run", ...])`` in its own process, SIGKILLed from here. The
processes are forked from a forkserver that imported fedspine once, so a run costs its second
of work rather than the import of torch, transformers and peft again (~5 s each)."""

import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedspine.fl.checkpoint import KILL_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--config",
    str(ROOT / "experiments" / "configs" / "smoke.yaml"),
    "log.progress=false",
    "fleet.devices=4",
    "train.rounds=3",
    "train.local_steps=2",
    "data.max_examples=120",
]
DEADLINE_S = 120  # one process; the whole test is ~40 s on a quiet 2-core machine


def _cli(argv, kill_at):
    """A process's body: ``fedspine run``, SIGKILLed by the save at ``kill_at`` if given."""
    import torch

    from fedspine.cli import main

    if kill_at:
        os.environ[KILL_ENV] = kill_at
    torch.set_num_threads(1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process ends with this call
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def ctx():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "fedspine.cli", "fedspine.fl.simulator", "fedspine.fl.batched"])
    warm = ctx.Process(target=int)  # starts the server (and its one import) before anything is timed
    warm.start()
    warm.join(DEADLINE_S)
    return ctx


def start(ctx, run_dir: Path, *, resume=False, kill_at=None):
    argv = ["run", "--resume", str(run_dir)] if resume else ["run", *ARGS, f"log.dir={run_dir.parent}"]
    argv += [] if resume else [f"log.name={run_dir.name}"]
    p = ctx.Process(target=_cli, args=(argv, kill_at))
    p.start()
    return p


def wait(p) -> int:
    p.join(DEADLINE_S)
    if p.is_alive():
        p.kill()
        pytest.fail(f"a run took more than {DEADLINE_S} s")
    return p.exitcode


def stage(run_dir: Path) -> str:
    """What a kill left: how far the run's checkpoints got."""
    gens = sorted(p.name for p in (run_dir / "checkpoint").glob("ckpt-*"))
    return "done" if (run_dir / "summary.json").exists() else (",".join(gens) or "no checkpoint")


def finish(ctx, run_dir: Path) -> None:
    """Resume (or, if the kill came before the run dir had its config, start again) to the end."""
    assert wait(start(ctx, run_dir, resume=(run_dir / "config.json").exists())) == 0, stage(run_dir)


def outcome(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    drop = lambda d: {k: v for k, v in d.items() if k != "wall_s"}  # noqa: E731
    return [drop(r) for r in records], drop(summary)


def test_sigkill_at_any_moment_resumes_to_the_uninterrupted_records(ctx, tmp_path):
    t0 = time.perf_counter()
    ref = tmp_path / "ref"
    assert wait(start(ctx, ref)) == 0
    duration = time.perf_counter() - t0
    expected = outcome(ref)
    assert [r["round"] for r in expected[0]] == [1, 2, 3]

    stages = {}
    moments = np.random.default_rng(14).uniform(0.0, duration, size=10)
    for i, at in enumerate(moments):
        run_dir = tmp_path / f"random{i}"
        p = start(ctx, run_dir)
        time.sleep(at)
        p.kill()
        wait(p)
        stages[f"{at:.2f}s"] = stage(run_dir)
        finish(ctx, run_dir)
        assert outcome(run_dir) == expected, f"killed at {at:.2f} s of {duration:.2f} s"

    # Inside round 1: the moment round 0's checkpoint appears (before this, a kill here said
    # "no checkpoint" and the run had to start over).
    run_dir = tmp_path / "round1"
    p = start(ctx, run_dir)
    while p.is_alive() and not (run_dir / "checkpoint" / "ckpt-000000").exists():
        time.sleep(0.002)
    p.kill()
    assert wait(p) == -signal.SIGKILL
    assert stage(run_dir) == "ckpt-000000"
    finish(ctx, run_dir)
    assert outcome(run_dir) == expected

    # Between the steps of a save (fedspine.fl.checkpoint._test_kill): what is on disk then.
    left = {
        "files-written@0": "no checkpoint",  # before round 0's manifest
        "manifest-written@1": "ckpt-000000",  # round 1 complete under its temporary name
        "renamed@1": "ckpt-000000,ckpt-000001",  # round 1 in place, nothing pruned yet
        "trashed@0": "ckpt-000001,ckpt-000002",  # round 0 renamed away, not yet deleted
        "pruned@3": "ckpt-000002,ckpt-000003",  # the last save done, summary not written
    }
    for kill_at, on_disk in left.items():
        run_dir = tmp_path / kill_at.replace("@", "-")
        assert wait(start(ctx, run_dir, kill_at=kill_at)) == -signal.SIGKILL, kill_at
        assert stage(run_dir) == on_disk, kill_at
        finish(ctx, run_dir)
        assert outcome(run_dir) == expected, kill_at

    # Between the two renames of a save that replaces a damaged copy of its round: the resume
    # skipped a corrupted round 3 for round 2, and is killed while saving round 3 again.
    run_dir = tmp_path / "replaced"
    shutil.copytree(ref, run_dir)
    (run_dir / "summary.json").unlink()
    damaged = run_dir / "checkpoint" / "ckpt-000003" / "arrays.npz"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    assert wait(start(ctx, run_dir, resume=True, kill_at="replaced@3")) == -signal.SIGKILL
    assert stage(run_dir) == "ckpt-000002"
    finish(ctx, run_dir)
    assert outcome(run_dir) == expected
    print(f"\nuninterrupted run {duration:.2f} s; random kills left: {stages}")
    print(f"whole test {time.perf_counter() - t0:.1f} s")
