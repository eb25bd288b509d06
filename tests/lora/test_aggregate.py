"""fedspine.lora.aggregate: every rule checked against hand-computed numbers; pure numpy."""

import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from fedspine.lora.aggregate import (
    AGGREGATORS,
    DeviceUpdate,
    flora_stack,
    get_aggregator,
)


@dataclass(frozen=True)
class Slice:
    out_idx: np.ndarray | None
    in_idx: np.ndarray | None


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def update(path, a, b, n, *, rows=None, cols=None, head=None) -> DeviceUpdate:
    a, b = f32(a), f32(b)
    tensors = {f"{path}.lora_A": a, f"{path}.lora_B": b}
    if head is not None:
        tensors["classifier.weight"] = f32(head)
    slices = {} if rows is None and cols is None else {path: Slice(rows, cols)}
    return DeviceUpdate(tensors, slices, rank=a.shape[0], num_samples=n)


def random_update(shapes, rank, n, slices, seed) -> DeviceUpdate:
    rng = np.random.default_rng(seed)
    tensors = {}
    for path, (d_out, d_in) in shapes.items():
        s = slices.get(path, Slice(None, None))
        rows = d_out if s.out_idx is None else len(s.out_idx)
        cols = d_in if s.in_idx is None else len(s.in_idx)
        tensors[f"{path}.lora_A"] = f32(rng.normal(size=(rank, cols)))
        tensors[f"{path}.lora_B"] = f32(rng.normal(size=(rows, rank)))
    return DeviceUpdate(tensors, slices, rank=rank, num_samples=n)


def block(u: DeviceUpdate, path: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """Device k's B_k A_k scattered to original coords (float64) and its 0/1 block mask, by hand."""
    s = u.slices.get(path, Slice(None, None))
    rows = np.arange(shape[0]) if s.out_idx is None else np.asarray(s.out_idx)
    cols = np.arange(shape[1]) if s.in_idx is None else np.asarray(s.in_idx)
    full, mask = np.zeros(shape), np.zeros(shape)
    prod = u.tensors[f"{path}.lora_B"].astype(np.float64) @ u.tensors[f"{path}.lora_A"].astype(np.float64)
    full[np.ix_(rows, cols)] = prod
    mask[np.ix_(rows, cols)] = 1.0
    return full, mask


# --- rule 1: count-normalised scatter ------------------------------------------------------------
def test_count_normalised_scatter_by_hand():
    shapes = {"m": (4, 3)}
    prev = {
        "m.lora_A": f32([[7, 7, 7]]),
        "m.lora_B": f32([[100], [100], [100], [100]]),
        "classifier.weight": f32([[0, 0]]),
    }
    ups = [
        update("m", [[1, 1, 1]], [[2], [4]], 1, rows=np.array([0, 1]), head=[[1, 2]]),
        update("m", [[5, 9]], [[8], [12]], 3, rows=np.array([2, 1]), cols=np.array([0, 2]), head=[[3, 4]]),
        DeviceUpdate({"classifier.weight": f32([[5, 6]])}, {}, rank=1, num_samples=4),  # no LoRA module
    ]
    out = get_aggregator("zero-pad").aggregate(prev, ups, global_shapes=shapes, r_max=1)
    # rows: 0 only dev1; 1 both (1·4 + 3·12)/4 (dev2's row 1 is its 2nd row); 2 only dev2; 3 nobody.
    np.testing.assert_allclose(out["m.lora_B"], [[2], [(4 + 3 * 12) / 4], [8], [100]])
    # cols: 0 both (1·1 + 3·5)/4; 1 only dev1; 2 both (1·1 + 3·9)/4.
    np.testing.assert_allclose(out["m.lora_A"], [[4, 1, 7]])
    np.testing.assert_allclose(out["classifier.weight"], [[30 / 8, 38 / 8]])
    assert all(v.dtype == np.float32 for v in out.values())
    np.testing.assert_array_equal(prev["m.lora_B"], [[100]] * 4)  # input untouched


def test_untouched_modules_and_missing_previous():
    shapes = {"m": (2, 2), "other": (3, 3)}
    prev = {"other.lora_A": f32(np.ones((1, 3))), "other.lora_B": f32(np.ones((3, 1)))}
    ups = [update("m", [[1, 2]], [[3]], 2, rows=np.array([1]))]
    out = get_aggregator("fedspine").aggregate(prev, ups, global_shapes=shapes, r_max=1)
    np.testing.assert_array_equal(out["other.lora_A"], prev["other.lora_A"])
    np.testing.assert_array_equal(out["m.lora_B"], [[0], [3]])  # no previous value -> 0
    np.testing.assert_array_equal(out["m.lora_A"], [[1, 2]])


# --- rules 2, 3, 6: zero-pad, HetLoRA, ours --------------------------------------------------------
MIXED = [  # module (2, 2), r_max 2: dev1 rank 1 (‖BA‖ = 3, n = 1), dev2 rank 2 (‖BA‖ = 4, n = 2)
    update("m", [[1, 0]], [[3], [0]], 1),
    update("m", [[1, 0], [0, 1]], [[0, 0], [0, 4]], 2),
]


def test_zero_pad_by_hand():
    out = get_aggregator("zero-pad").aggregate({}, MIXED, global_shapes={"m": (2, 2)}, r_max=2)
    # padded A1 = [[1,0],[0,0]], B1 = [[3,0],[0,0]]; weights 1, 2.
    np.testing.assert_allclose(out["m.lora_A"], [[1, 0], [0, 2 / 3]], rtol=1e-6)
    np.testing.assert_allclose(out["m.lora_B"], [[1, 0], [0, 8 / 3]], rtol=1e-6)


def test_rank_aware_by_hand():
    prev = {"m.lora_A": f32([[9, 9], [9, 9], [5, 5]]), "m.lora_B": f32([[9, 9, 5], [9, 9, 5]])}
    out = get_aggregator("rank-aware").aggregate(prev, MIXED, global_shapes={"m": (2, 2)}, r_max=3)
    # component 0: both devices, weights 1 and 2; component 1: dev2 only; component 2: nobody
    np.testing.assert_allclose(out["m.lora_A"], [[1, 0], [0, 1], [5, 5]], rtol=1e-6)
    np.testing.assert_allclose(out["m.lora_B"], [[1, 0, 5], [0, 4, 5]], rtol=1e-6)


def test_zero_pad_kills_a_rank_nobody_played_and_rank_aware_keeps_it():
    """Round 1 of FedSpine: every device at rank 1 of r_max 2 (the lowest rank). Zero-padding
    writes A = B = 0 into component 1, where both gradients vanish, so a rank-2 device later
    trains only component 0; the rank-aware rule keeps the initialised A."""
    init = {"m.lora_A": f32([[0.5, -0.5], [0.3, 0.7]]), "m.lora_B": f32([[0, 0], [0, 0]])}
    round1 = [update("m", [[1, 0]], [[3], [1]], 1), update("m", [[0, 1]], [[2], [2]], 1)]
    dead = get_aggregator("zero-pad").aggregate(init, round1, global_shapes={"m": (2, 2)}, r_max=2)
    np.testing.assert_array_equal(dead["m.lora_A"][1], [0, 0])
    np.testing.assert_array_equal(dead["m.lora_B"][:, 1], [0, 0])
    alive = get_aggregator("rank-aware").aggregate(init, round1, global_shapes={"m": (2, 2)}, r_max=2)
    np.testing.assert_array_equal(alive["m.lora_A"][1], init["m.lora_A"][1])  # kept as it was


def test_hetlora_by_hand():
    out = get_aggregator("hetlora").aggregate({}, MIXED, global_shapes={"m": (2, 2)}, r_max=2)
    # weights n·‖BA‖_F: 1·3 = 3 and 2·4 = 8, total 11; padded zeros count.
    np.testing.assert_allclose(out["m.lora_A"], [[1, 0], [0, 8 / 11]], rtol=1e-6)
    np.testing.assert_allclose(out["m.lora_B"], [[9 / 11, 0], [0, 32 / 11]], rtol=1e-6)


def test_fedspine_by_hand_unpruned():
    out = get_aggregator("fedspine").aggregate({}, MIXED, global_shapes={"m": (2, 2)}, r_max=2)
    # ρ = 1; w = n·‖BA‖/√4: 1.5 and 4. Rank component 1 belongs to dev2 only (rank-aware).
    np.testing.assert_allclose(out["m.lora_A"], [[1, 0], [0, 1]], rtol=1e-6)
    np.testing.assert_allclose(out["m.lora_B"], [[1.5 * 3 / 5.5, 0], [0, 4]], rtol=1e-6)


def test_fedspine_by_hand_pruned():
    ups = [update("m", [[1, 0]], [[3]], 1, rows=np.array([0])), MIXED[1]]
    prev = {"m.lora_A": f32([[9, 9], [9, 9], [5, 5]]), "m.lora_B": f32([[9, 9, 5], [9, 9, 5]])}
    out = get_aggregator("fedspine").aggregate(prev, ups, global_shapes={"m": (2, 2)}, r_max=3)
    w1 = 1 * (2 / 4) * 3 / math.sqrt(2)  # n·ρ·‖BA‖/√kept: dev1 kept row 0 only
    w2 = 2 * 1 * 4 / 2
    np.testing.assert_allclose(
        out["m.lora_B"], [[w1 * 3 / (w1 + w2), 0, 5], [0, 4, 5]], rtol=1e-6
    )  # rank 2: nobody -> previous
    np.testing.assert_allclose(out["m.lora_A"], [[1, 0], [0, 1], [5, 5]], rtol=1e-6)
    keep0 = get_aggregator("fedspine", keep_power=0.0).aggregate(
        prev, ups, global_shapes={"m": (2, 2)}, r_max=3
    )
    v1 = 3 / math.sqrt(2)
    np.testing.assert_allclose(keep0["m.lora_B"][0, 0], v1 * 3 / (v1 + w2), rtol=1e-6)


def test_zero_norm_falls_back_to_sample_weights():
    ups = [update("m", [[1, 0]], [[0], [0]], 1), update("m", [[0, 1]], [[0], [0]], 3)]
    for name in ("hetlora", "fedspine"):
        out = get_aggregator(name).aggregate({}, ups, global_shapes={"m": (2, 2)}, r_max=1)
        np.testing.assert_allclose(out["m.lora_A"], [[0.25, 0.75]])


def test_factorised_distribute_truncates_and_slices():
    rng = np.random.default_rng(0)
    state = {
        "m.lora_A": f32(rng.normal(size=(3, 5))),
        "m.lora_B": f32(rng.normal(size=(6, 3))),
        "classifier.weight": f32([[1, 2]]),
    }
    slices = {"m": Slice(np.array([4, 0, 2]), np.array([1, 3]))}
    for name in ("zero-pad", "rank-aware", "hetlora", "fedspine"):
        d = get_aggregator(name).distribute(state, slices, 2)
        assert d.base_delta is None
        np.testing.assert_array_equal(d.adapter["m.lora_A"], state["m.lora_A"][:2][:, [1, 3]])
        np.testing.assert_array_equal(d.adapter["m.lora_B"], state["m.lora_B"][[4, 0, 2], :2])
        np.testing.assert_array_equal(d.adapter["classifier.weight"], [[1, 2]])


def test_init_state_is_a_lora_start():
    shapes = {"m": (6, 4)}
    for name, rule in AGGREGATORS.items():
        s = rule.init_state(shapes, 3, rng=1, heads={"classifier.weight": np.ones((2, 4))})
        assert s["m.lora_A"].shape == (3, 4) and s["m.lora_B"].shape == (6, 3), name
        assert np.all(s["m.lora_B"] == 0) and np.all(np.abs(s["m.lora_A"]) <= 0.5) and s["m.lora_A"].any()
        np.testing.assert_array_equal(s["m.lora_A"], rule.init_state(shapes, 3, rng=1)["m.lora_A"])
        assert s["classifier.weight"].dtype == np.float32
    assert AGGREGATORS["flexlora"].init_state(shapes, 3)["m.delta"].shape == (6, 4)
    assert AGGREGATORS["flora"].init_state(shapes, 3)["m.merged"].shape == (6, 4)


# --- rule 4: FlexLoRA ------------------------------------------------------------------------------
SHAPES = {"m": (6, 5)}
SLICES_1 = {"m": Slice(np.array([0, 1, 2, 4]), None)}
SLICES_2 = {"m": Slice(np.array([1, 3, 4, 5]), np.array([0, 2, 3]))}


def test_flexlora_delta_is_count_normalised_per_element():
    ups = [random_update(SHAPES, 1, 2, SLICES_1, 0), random_update(SHAPES, 2, 3, SLICES_2, 1)]
    prev = {"m.delta": f32(np.full((6, 5), 9.0))}
    out = get_aggregator("flexlora").aggregate(prev, ups, global_shapes=SHAPES, r_max=3)
    (p1, m1), (p2, m2) = (block(u, "m", (6, 5)) for u in ups)
    den = 2 * m1 + 3 * m2
    want = np.where(den > 0, (2 * p1 + 3 * p2) / np.maximum(den, 1), 9.0)
    np.testing.assert_allclose(out["m.delta"], want, rtol=1e-6, atol=1e-6)
    assert out["m.delta"][3, 1] == 9.0  # row 3 × col 1: nobody held it


def test_flexlora_svd_redistribution_is_exact_when_rank_suffices():
    ups = [random_update(SHAPES, 1, 2, {}, 0), random_update(SHAPES, 2, 3, {}, 1)]  # unpruned: rank ΔW = 3
    for split in ("b", "sqrt"):
        rule = get_aggregator("flexlora", split=split)
        state = rule.aggregate({}, ups, global_shapes=SHAPES, r_max=4)
        delta = state["m.delta"].astype(np.float64)
        np.testing.assert_allclose(
            delta, (2 * block(ups[0], "m", (6, 5))[0] + 3 * block(ups[1], "m", (6, 5))[0]) / 5, atol=1e-5
        )
        assert np.linalg.matrix_rank(delta, tol=1e-4) == 3
        for rank in (3, 4):
            d = rule.distribute(state, SLICES_2, rank)
            assert d.base_delta is None
            assert d.adapter["m.lora_A"].shape == (rank, 3) and d.adapter["m.lora_B"].shape == (4, rank)
            got = d.adapter["m.lora_B"].astype(np.float64) @ d.adapter["m.lora_A"]
            np.testing.assert_allclose(got, delta[np.ix_([1, 3, 4, 5], [0, 2, 3])], atol=1e-5)
        low = rule.distribute(state, {}, 2).adapter  # rank 2 < 3: the best rank-2 approximation
        sv = np.linalg.svd(delta, compute_uv=False)
        err = np.linalg.norm(low["m.lora_B"].astype(np.float64) @ low["m.lora_A"] - delta, 2)
        assert err == pytest.approx(sv[2], rel=1e-4)


def test_flexlora_large_modules_use_randomized_svd():
    big = {"big": (120, 100)}  # r_max + 10 probes < min(d) / 2: the randomized path
    ups = [random_update(big, 2, 2, {}, 0), random_update(big, 3, 1, {}, 1)]
    state = get_aggregator("flexlora").aggregate({}, ups, global_shapes=big, r_max=8)
    got = state["big.lora_B"].astype(np.float64) @ state["big.lora_A"]
    np.testing.assert_allclose(got, state["big.delta"], atol=1e-5)  # rank 5 <= r_max: exact
    pruned = {"big": Slice(np.arange(0, 120, 2), np.arange(30, 100))}
    ups = [random_update(big, 2, 2, pruned, 0), random_update(big, 3, 1, {}, 1)]
    state = get_aggregator("flexlora").aggregate({}, ups, global_shapes=big, r_max=4)
    delta = state["big.delta"].astype(np.float64)
    sv = np.linalg.svd(delta, compute_uv=False)
    assert sv[4] > 1e-3  # per-element normalisation made ΔW full rank
    err = np.linalg.norm(state["big.lora_B"].astype(np.float64) @ state["big.lora_A"] - delta, 2)
    assert err <= 1.1 * sv[4]  # near the optimal rank-4 error σ_5


def test_flexlora_sigma_on_b_keeps_a_alive_when_delta_is_rank_deficient():
    ups = [random_update(SHAPES, 1, 1, {}, 0)]  # ΔW has rank 1 < r_max
    state = get_aggregator("flexlora").aggregate({}, ups, global_shapes=SHAPES, r_max=3)
    a = state["m.lora_A"].astype(np.float64)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-5)  # orthonormal rows, none dead


# --- rule 5: FLoRA ---------------------------------------------------------------------------------
def test_flora_stack_is_exact_for_mixed_ranks_and_channels():
    ups = [
        random_update(SHAPES, 1, 2, SLICES_1, 0),
        random_update(SHAPES, 3, 5, SLICES_2, 1),
        random_update(SHAPES, 2, 1, {}, 2),
    ]
    b, a = flora_stack(ups, "m", global_shapes=SHAPES)
    assert b.shape == (6, 6) and a.shape == (6, 5) and b.dtype == np.float64
    want = sum(n * block(u, "m", (6, 5))[0] for u, n in zip(ups, (2, 5, 1), strict=True)) / 8
    np.testing.assert_allclose(b @ a, want, rtol=0, atol=1e-10)


def test_flora_aggregate_and_distribute():
    ups = [random_update(SHAPES, 1, 2, SLICES_1, 0), random_update(SHAPES, 3, 5, SLICES_2, 1)]
    rule = get_aggregator("flora")
    state0 = rule.init_state(SHAPES, 4, rng=3)
    state1 = rule.aggregate(state0, ups, global_shapes=SHAPES, r_max=4)
    (p1, m1), (p2, m2) = (block(u, "m", (6, 5)) for u in ups)
    den = (2 * m1 + 5 * m2) / 7
    delta = np.where(den > 0, (2 * p1 + 5 * p2) / 7 / np.maximum(den, 1e-12), 0.0)
    np.testing.assert_allclose(state1["m.merged"], 2.0 * delta, atol=1e-5)
    np.testing.assert_array_equal(state1["m.lora_A"], state0["m.lora_A"])  # rng=None: previous A
    assert not state1["m.lora_B"].any()
    state2 = rule.aggregate(state1, ups, global_shapes=SHAPES, r_max=4)
    np.testing.assert_allclose(state2["m.merged"], 4.0 * delta, atol=1e-5)  # cumulative
    d = rule.distribute(state2, SLICES_2, 3)
    np.testing.assert_array_equal(d.base_delta["m"], state2["m.merged"][np.ix_([1, 3, 4, 5], [0, 2, 3])])
    np.testing.assert_array_equal(d.adapter["m.lora_A"], state0["m.lora_A"][:3][:, [0, 2, 3]])
    assert d.adapter["m.lora_B"].shape == (4, 3) and not d.adapter["m.lora_B"].any()
    assert "m.merged" not in d.adapter


def test_flora_unpruned_matches_weighted_sum_and_rng_restart():
    ups = [random_update(SHAPES, 1, 2, {}, 0), random_update(SHAPES, 2, 3, {}, 1)]
    want = (2 * block(ups[0], "m", (6, 5))[0] + 3 * block(ups[1], "m", (6, 5))[0]) / 5
    runs = []
    for _ in range(2):
        rule = get_aggregator("flora", rng=np.random.default_rng(7), scaling=1.0)
        state = rule.aggregate(rule.init_state(SHAPES, 2), ups, global_shapes=SHAPES, r_max=2)
        np.testing.assert_allclose(state["m.merged"], want, atol=1e-5)
        runs.append(state["m.lora_A"])
    np.testing.assert_array_equal(runs[0], runs[1])  # seeded: reproducible
    assert not np.array_equal(runs[0], get_aggregator("flora").init_state(SHAPES, 2)["m.lora_A"])


def test_flora_default_scaling_matches_adapters():
    adapters = pytest.importorskip("fedspine.lora.adapters")
    assert AGGREGATORS["flora"].scaling == adapters.ALPHA_PER_RANK


# --- registry, errors, imports ------------------------------------------------------------------
def test_registry_and_unknown_names():
    assert set(AGGREGATORS) == {"zero-pad", "rank-aware", "hetlora", "flexlora", "flora", "fedspine"}
    assert get_aggregator("hetlora") is AGGREGATORS["hetlora"]
    with pytest.raises(ValueError, match="fedspine, flexlora, flora, hetlora, rank-aware, zero-pad"):
        get_aggregator("fedavg")
    with pytest.raises(ValueError, match="no option"):
        get_aggregator("zero-pad", keep_power=1.0)
    with pytest.raises(ValueError, match="split"):
        get_aggregator("flexlora", split="left")


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize(
    ("state", "ups", "match"),
    [
        ({"m.lora_A": f32(np.zeros((1, 2)))}, [update("m", [[1, 0]], [[1], [1]], 1)], "'m.lora_A'"),
        ({"m.lora_B": f32(np.zeros((3, 2)))}, [update("m", [[1, 0]], [[1], [1]], 1)], "'m.lora_B'"),
        ({}, [update("m", [[1, 0]], [[1], [1]], 1, rows=np.array([0]))], "'m'"),  # B has 2 rows, slice 1
        (
            {},
            [
                update("m", [[1, 0]], [[1], [1]], 1, head=[[1, 2]]),
                update("m", [[1, 0]], [[1], [1]], 1, head=[[1]]),
            ],
            "'classifier.weight'",
        ),
        (
            {"classifier.weight": f32([[1]])},
            [update("m", [[1, 0]], [[1], [1]], 1, head=[[1, 2]])],
            "classifier",
        ),
        ({}, [update("m", [[1, 0], [0, 1], [1, 1]], np.ones((2, 3)), 1)], "exceeds r_max"),
        ({}, [update("m", [[np.nan, 0]], [[1], [1]], 1)], "'m.lora_A'.*non-finite"),
        ({}, [update("x", [[1, 0]], [[1], [1]], 1)], "'x'"),
        ({}, [], "empty"),
        ({}, [DeviceUpdate({"m.lora_A": f32([[1, 0]])}, {}, rank=1, num_samples=1)], "'m' needs both"),
    ],
)
def test_bad_input_raises_valueerror_naming_it(name, state, ups, match):
    if name == "flora" and "m.lora_A" not in state:
        state = {**state, "m.lora_A": f32(np.ones((2, 2)))}  # FLoRA restarts from it
    with pytest.raises(ValueError, match=match):
        AGGREGATORS[name].aggregate(state, ups, global_shapes={"m": (2, 2)}, r_max=2)


def test_full_size_shape_mismatch_names_key():
    ups = [update("m", [[1, 0]], [[1], [1]], 1)]
    with pytest.raises(ValueError, match="'m.delta'"):
        AGGREGATORS["flexlora"].aggregate(
            {"m.delta": f32(np.zeros((2, 3)))}, ups, global_shapes={"m": (2, 2)}, r_max=1
        )
    with pytest.raises(ValueError, match="'m.merged'"):
        AGGREGATORS["flora"].aggregate(
            {"m.lora_A": f32(np.ones((1, 2))), "m.merged": f32(np.zeros((3, 2)))},
            ups,
            global_shapes={"m": (2, 2)},
            r_max=1,
        )
    with pytest.raises(ValueError, match="init_state"):
        AGGREGATORS["flora"].aggregate({}, ups, global_shapes={"m": (2, 2)}, r_max=1)


def test_distribute_rank_above_global_raises():
    state = AGGREGATORS["hetlora"].init_state({"m": (2, 2)}, 2)
    with pytest.raises(ValueError, match="exceeds the global rank"):
        AGGREGATORS["hetlora"].distribute(state, {}, 3)


@pytest.mark.parametrize("n", [0, -1, float("nan"), True, "3"])
def test_bad_num_samples(n):
    with pytest.raises(ValueError, match="num_samples"):
        DeviceUpdate({}, {}, rank=1, num_samples=n)


def test_aggregate_imports_without_torch():
    code = (
        "import sys, fedspine.lora.aggregate, fedspine.lora\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'torch imported'\n"
        "assert fedspine.lora.get_aggregator is fedspine.lora.aggregate.get_aggregator\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
