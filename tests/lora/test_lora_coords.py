"""fedspine.lora.coords: lift / project / rank helpers, pure numpy, checked against hand-made numbers."""

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from fedspine.lora.coords import lift, pad_rank, project, rank_of, take_block, truncate_rank


@dataclass(frozen=True)
class Slice:
    out_idx: np.ndarray | None
    in_idx: np.ndarray | None


SHAPES = {"l.q": (6, 5), "l.o": (5, 6), "l.v": (4, 5)}
SLICES = {
    "l.q": Slice(np.array([1, 2, 4]), None),  # rows pruned (q_proj-like)
    "l.o": Slice(None, np.array([0, 3, 5])),  # columns pruned (o_proj-like)
    "l.v": Slice(np.array([0, 3]), np.array([1, 2, 4])),  # both
}


def _device(rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for path, (d_out, d_in) in SHAPES.items():
        s = SLICES[path]
        rows = d_out if s.out_idx is None else len(s.out_idx)
        cols = d_in if s.in_idx is None else len(s.in_idx)
        out[f"{path}.lora_A"] = rng.normal(size=(rank, cols)).astype(np.float32)
        out[f"{path}.lora_B"] = rng.normal(size=(rows, rank)).astype(np.float32)
    out["classifier.weight"] = rng.normal(size=(2, 5)).astype(np.float32)
    return out


def _global(rank: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for path, (d_out, d_in) in SHAPES.items():
        out[f"{path}.lora_A"] = rng.normal(size=(rank, d_in)).astype(np.float32)
        out[f"{path}.lora_B"] = rng.normal(size=(d_out, rank)).astype(np.float32)
    out["classifier.weight"] = rng.normal(size=(2, 5)).astype(np.float32)
    return out


def test_lift_by_hand():
    a = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)  # r=1, kept input cols 1, 2, 4 of 5
    b = np.array([[5.0], [6.0]], dtype=np.float32)  # kept output rows 0, 3 of 4
    lifted = lift({"l.v.lora_A": a, "l.v.lora_B": b}, SLICES, rank=1, global_shapes=SHAPES)
    np.testing.assert_array_equal(lifted.tensors["l.v.lora_A"], [[0, 1, 2, 0, 3]])
    np.testing.assert_array_equal(lifted.tensors["l.v.lora_B"], [[5], [0], [0], [6]])
    np.testing.assert_array_equal(lifted.masks["l.v.lora_A"], [[False, True, True, False, True]])
    np.testing.assert_array_equal(lifted.masks["l.v.lora_B"], [[True], [False], [False], [True]])
    assert all(t.dtype == np.float32 for t in lifted.tensors.values())
    assert all(m.dtype == bool for m in lifted.masks.values())


def test_take_block_by_hand():
    full = np.arange(20, dtype=np.float64).reshape(4, 5)  # l.v: rows 0, 3 and cols 1, 2, 4 kept
    block = take_block(full, SLICES, "l.v")
    np.testing.assert_array_equal(block, [[1, 2, 4], [16, 17, 19]])
    assert block.dtype == np.float32
    np.testing.assert_array_equal(take_block(full, SLICES, "l.unsliced"), full)
    with pytest.raises(ValueError, match="out_idx"):
        take_block(full[:2], SLICES, "l.v")  # row 3 is out of range


@pytest.mark.parametrize("rank", [1, 3])
def test_project_lift_is_identity(rank):
    dev = _device(rank)
    before = {k: v.copy() for k, v in dev.items()}
    lifted = lift(dev, SLICES, rank=rank, global_shapes=SHAPES)
    back = project(lifted.tensors, SLICES, rank=rank)
    assert back.keys() == dev.keys()
    for k in dev:
        np.testing.assert_array_equal(back[k], dev[k])
        np.testing.assert_array_equal(dev[k], before[k])  # inputs untouched
    for path, (d_out, d_in) in SHAPES.items():
        assert lifted.tensors[f"{path}.lora_A"].shape == (rank, d_in)
        assert lifted.tensors[f"{path}.lora_B"].shape == (d_out, rank)
    assert lifted.masks["classifier.weight"].all()


def test_lift_project_keeps_kept_coordinates_and_zeros_the_rest():
    glob = _global(rank=4)
    dev = project(glob, SLICES, rank=3)  # also truncates the rank 4 -> 3
    lifted = lift(dev, SLICES, rank=3, global_shapes=SHAPES)
    for key, g in glob.items():
        if key == "classifier.weight":
            np.testing.assert_array_equal(lifted.tensors[key], g)
            continue
        g3 = g[:3] if key.endswith("lora_A") else g[:, :3]
        m = lifted.masks[key]
        np.testing.assert_array_equal(lifted.tensors[key][m], g3[m])
        assert not lifted.tensors[key][~m].any()
    # masks: exactly the kept rows of B and kept columns of A
    assert lifted.masks["l.q.lora_B"].all(axis=1).tolist() == [False, True, True, False, True, False]
    assert lifted.masks["l.q.lora_A"].all()
    assert lifted.masks["l.o.lora_A"].all(axis=0).tolist() == [True, False, False, True, False, True]
    assert lifted.masks["l.o.lora_B"].all()


def test_identity_slices_are_noops():
    glob = _global(rank=2)
    for slices in ({}, {p: Slice(None, None) for p in SHAPES}):
        dev = project(glob, slices, rank=2)
        for k in glob:
            np.testing.assert_array_equal(dev[k], glob[k])
        lifted = lift(dev, slices, rank=2, global_shapes=SHAPES)
        for k in glob:
            np.testing.assert_array_equal(lifted.tensors[k], glob[k])
            assert lifted.masks[k].all()


def test_pad_and_truncate_rank():
    dev = _device(rank=2)
    padded = pad_rank(dev, 5)
    assert rank_of(padded) == 5 and rank_of(dev) == 2
    for path in SHAPES:
        a, b = dev[f"{path}.lora_A"], dev[f"{path}.lora_B"]
        pa, pb = padded[f"{path}.lora_A"], padded[f"{path}.lora_B"]
        assert not pa[2:].any() and not pb[:, 2:].any()
        np.testing.assert_array_equal(pb @ pa, b @ a)  # the update B·A is unchanged
    back = truncate_rank(padded, 2)
    for k in dev:
        np.testing.assert_array_equal(back[k], dev[k])
    masks = lift(dev, SLICES, rank=2, global_shapes=SHAPES).masks
    pm = pad_rank(masks, 3)
    assert pm["l.v.lora_A"].dtype == bool and not pm["l.v.lora_A"][2].any()
    np.testing.assert_array_equal(truncate_rank(dev, 1)["l.q.lora_A"], dev["l.q.lora_A"][:1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d: pad_rank(d, 1), "r_max"),
        (lambda d: truncate_rank(d, 3), "r "),
        (lambda d: truncate_rank(d, 0), "r must be a positive integer"),
        (lambda d: lift(d, SLICES, rank=3, global_shapes=SHAPES), "do not match rank 3"),
        (lambda d: lift(d, SLICES, rank=2, global_shapes={"l.q": (6, 5)}), "global_shapes"),
        (lambda d: project(d, SLICES, rank=3), "exceeds the global rank"),
        (
            lambda d: lift(
                {k: v for k, v in d.items() if k != "l.q.lora_B"}, SLICES, rank=2, global_shapes=SHAPES
            ),
            "needs both lora_A and lora_B",
        ),
        (
            lambda d: lift(
                d, {**SLICES, "l.q": Slice(np.array([1, 1, 2]), None)}, rank=2, global_shapes=SHAPES
            ),
            "distinct",
        ),
        (
            lambda d: lift(
                d, {**SLICES, "l.q": Slice(np.array([1, 2, 6]), None)}, rank=2, global_shapes=SHAPES
            ),
            r"in \[0, 6\)",
        ),
        (
            lambda d: lift(d, {**SLICES, "l.q": Slice(np.array([1, 2]), None)}, rank=2, global_shapes=SHAPES),
            "do not match",
        ),
        (
            lambda d: lift(
                d, {**SLICES, "l.q": Slice(np.array([1.0, 2.0, 4.0]), None)}, rank=2, global_shapes=SHAPES
            ),
            "integer",
        ),
    ],
)
def test_bad_input_raises_valueerror_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call(_device(rank=2))


def test_coords_imports_without_torch():
    code = (
        "import sys, fedspine.lora, fedspine.lora.coords\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
