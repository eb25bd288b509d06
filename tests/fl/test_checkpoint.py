"""Checkpoint generations: atomic saves, verification, fallback to the previous good one, the
format-1 layout. The kill tests (a real process SIGKILLed) are in test_crash_safety.py."""

import json
import os
import warnings

import numpy as np
import pytest

from fedspine.cli import main
from fedspine.config import load_config
from fedspine.fl import checkpoint
from fedspine.fl.simulator import run, run_in_dir
from fedspine.logging import read_metrics


def state(rnd):
    return {"round": rnd, "records": [{"round": r} for r in range(1, rnd + 1)]}


def arrays(rnd):
    return {"global/a": np.full((3, 4), float(rnd), dtype=np.float32), "momentum/b": np.arange(rnd + 2)}


def saved(root, *rounds):
    for r in rounds:
        checkpoint.save(root, state(r), arrays(r))
    return root


def names(root):
    return sorted(p.name for p in root.iterdir())


def flip_byte(path, at=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_keeps_the_newest_two_generations_and_load_takes_the_newest(tmp_path):
    root = saved(tmp_path / "ckpt", 0, 1, 2, 3)
    assert names(root) == ["ckpt-000002", "ckpt-000003"]
    st, arr = checkpoint.load(root)
    assert st == state(3)
    np.testing.assert_array_equal(arr["global/a"], arrays(3)["global/a"])
    manifest = json.loads((root / "ckpt-000003" / "MANIFEST.json").read_text())
    assert manifest["round"] == 3 and set(manifest["files"]) == {"state.json", "arrays.npz"}
    assert manifest["files"]["arrays.npz"]["bytes"] == (root / "ckpt-000003" / "arrays.npz").stat().st_size


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda d: flip_byte(d / "arrays.npz"), r"arrays\.npz: sha256 .* does not match the manifest"),
        (lambda d: flip_byte(d / "state.json", at=3), r"state\.json: sha256 .* does not match"),
        (lambda d: os.truncate(d / "arrays.npz", 100), r"arrays\.npz: 100 bytes, the manifest says \d+"),
        (lambda d: (d / "state.json").write_text(""), r"state\.json: 0 bytes, the manifest says"),
        (lambda d: (d / "MANIFEST.json").write_text("{"), r"MANIFEST\.json: unreadable manifest"),
        (lambda d: (d / "arrays.npz").unlink(), r"arrays\.npz: missing"),
    ],
    ids=["bit-flip-arrays", "bit-flip-state", "truncated-arrays", "empty-state", "bad-manifest", "missing"],
)
def test_a_damaged_newest_generation_falls_back_to_the_previous_one(tmp_path, damage, why):
    root = saved(tmp_path / "ckpt", 1, 2)
    damage(root / "ckpt-000002")
    with pytest.warns(checkpoint.CheckpointWarning, match=why) as caught:
        st, arr = checkpoint.load(root)
    assert str(root / "ckpt-000002") in str(caught[0].message)
    assert f"resuming from {root / 'ckpt-000001'} instead" in str(caught[0].message)
    assert st == state(1)
    np.testing.assert_array_equal(arr["momentum/b"], arrays(1)["momentum/b"])


def test_with_every_generation_damaged_the_error_names_each_file(tmp_path):
    root = saved(tmp_path / "ckpt", 1, 2)
    flip_byte(root / "ckpt-000002" / "arrays.npz")
    os.truncate(root / "ckpt-000001" / "state.json", 5)
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint") as err:
        checkpoint.load(root)
    msg = str(err.value)
    assert str(root / "ckpt-000002" / "arrays.npz") in msg and str(root / "ckpt-000001" / "state.json") in msg
    assert "\n" not in msg
    assert not isinstance(err.value, checkpoint.NoCheckpoint)


def test_nothing_saved_is_no_checkpoint_and_leftovers_of_a_killed_save_are_ignored(tmp_path):
    with pytest.raises(checkpoint.NoCheckpoint, match="no checkpoint in"):
        checkpoint.load(tmp_path / "absent")
    root = tmp_path / "ckpt"
    (root / ".tmp-ckpt-000000").mkdir(parents=True)
    (root / ".tmp-ckpt-000000" / "arrays.npz").write_bytes(b"half")
    with pytest.raises(checkpoint.NoCheckpoint):
        checkpoint.load(root)
    saved(root, 0)
    assert names(root) == ["ckpt-000000"]  # the stale temp dir is gone


def test_saving_a_round_again_replaces_its_damaged_copy(tmp_path):
    """A resume that skipped a damaged round 2 later saves round 2 again."""
    root = saved(tmp_path / "ckpt", 1, 2)
    flip_byte(root / "ckpt-000002" / "arrays.npz")
    with pytest.warns(checkpoint.CheckpointWarning):
        assert checkpoint.load(root)[0]["round"] == 1
    saved(root, 2)
    assert names(root) == ["ckpt-000001", "ckpt-000002"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load(root)[0] == state(2)


def legacy(path, rnd):
    """The format-1 layout: state.json and arrays.npz straight in the directory."""
    path.mkdir(parents=True)
    np.savez(path / "arrays.npz", **arrays(rnd))
    (path / "state.json").write_text(json.dumps(state(rnd)))


def test_the_format_1_layout_still_resumes_and_is_removed_by_later_saves(tmp_path):
    root = tmp_path / "checkpoint"
    legacy(root, 2)
    assert checkpoint.load(root)[0] == state(2)
    saved(root, 3)
    assert checkpoint.load(root)[0] == state(3)
    assert "state.json" in names(root)  # the previous generation, kept to fall back to
    saved(root, 4)
    assert names(root) == ["ckpt-000003", "ckpt-000004"]


def test_format_1_killed_between_its_renames_resumes_from_the_old_copy(tmp_path):
    """What #14 found: checkpoint/ gone, checkpoint.old and checkpoint.tmp both complete."""
    root = tmp_path / "checkpoint"
    legacy(tmp_path / "checkpoint.old", 1)
    legacy(tmp_path / "checkpoint.tmp", 2)
    assert checkpoint.load(root)[0] == state(1)
    saved(root, 2)
    saved(root, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert names(root) == ["ckpt-000002", "ckpt-000003"]


def test_a_leftover_checkpoint_old_does_not_block_later_saves(tmp_path):
    """What #14 found: a non-empty checkpoint.old made every save fail (Directory not empty)."""
    root = tmp_path / "checkpoint"
    legacy(root, 2)
    legacy(tmp_path / "checkpoint.old", 1)
    (tmp_path / "checkpoint.old" / "extra").write_text("x")
    for r in (3, 4, 5):
        saved(root, r)
    assert checkpoint.load(root)[0] == state(5)
    assert not (tmp_path / "checkpoint.old").exists()


def test_a_damaged_format_1_checkpoint_names_its_file(tmp_path):
    root = tmp_path / "checkpoint"
    legacy(root, 2)
    os.truncate(root / "arrays.npz", 40)
    why = r"checkpoint/arrays\.npz: cannot be read \(BadZipFile"
    with pytest.raises(checkpoint.CheckpointError, match=why):
        checkpoint.load(root)


# --- through the simulator and the CLI --------------------------------------------------------------
TINY = [
    "log.progress=false",
    "fleet.devices=4",
    "train.rounds=3",
    "train.local_steps=2",
    "train.prune_interval=2",
    "data.max_examples=120",
]


def strip(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def test_round_0_is_saved_before_round_1_trains(tmp_path):
    cfg = load_config(None, TINY)
    run(cfg, checkpoint_dir=tmp_path / "c", stop_after=0)
    st, _ = checkpoint.load(tmp_path / "c")
    assert st["round"] == 0 and st["records"] == [] and st["clock_s"] == 0.0


def test_a_corrupted_and_a_truncated_checkpoint_resume_from_the_previous_one_to_the_same_records(tmp_path):
    cfg = load_config(None, TINY)
    uninterrupted = run(cfg).records
    for i, damage in enumerate([flip_byte, lambda p: os.truncate(p, p.stat().st_size // 2)]):
        run_dir = tmp_path / f"run{i}"
        run_in_dir(cfg, run_dir)
        damage(run_dir / "checkpoint" / "ckpt-000003" / "arrays.npz")
        (run_dir / "summary.json").unlink()
        with pytest.warns(checkpoint.CheckpointWarning, match="ckpt-000003/arrays.npz"):
            resumed = run_in_dir(cfg, run_dir, resume=True)
        assert strip(resumed.records) == strip(uninterrupted)
        assert strip(read_metrics(run_dir)) == strip(uninterrupted)
        assert checkpoint.load(run_dir / "checkpoint")[0]["round"] == 3  # round 3 saved again, intact


def test_resume_without_any_checkpoint_starts_from_round_0(tmp_path):
    cfg = load_config(None, [*TINY, "train.rounds=1"])
    run_dir = tmp_path / "run"
    with pytest.warns(checkpoint.CheckpointWarning, match="starting from round 0"):
        resumed = run_in_dir(cfg, run_dir, resume=True)
    assert strip(resumed.records) == strip(run(cfg).records)


def test_a_fresh_run_does_not_keep_another_runs_generations(tmp_path):
    root = saved(tmp_path / "c", 7, 8)
    run(load_config(None, [*TINY, "train.rounds=1"]), checkpoint_dir=root)
    assert names(root) == ["ckpt-000000", "ckpt-000001"]


def test_the_cli_says_in_one_line_which_run_and_file_cannot_be_resumed(tmp_path, capsys):
    assert main(["run", *TINY, "train.rounds=1", f"log.dir={tmp_path}"]) == 0
    run_dir = tmp_path / "fedspine-seed0"
    for gen in ("ckpt-000000", "ckpt-000001"):
        flip_byte(run_dir / "checkpoint" / gen / "arrays.npz")
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: cannot resume {run_dir}: ")
    assert str(run_dir / "checkpoint" / "ckpt-000001" / "arrays.npz") in err
