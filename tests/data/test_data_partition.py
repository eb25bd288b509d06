"""Train/test splits and device partitions: coverage, reproducibility, skew, validation."""

import subprocess
import sys

import numpy as np
import pytest

from fedspine.data import format_stats, partition_stats, train_test_split
from fedspine.data.partition import partition

# 58% / 42%, like Rotten Tomatoes, plus a third small class to exercise multi-class paths.
LABELS = np.repeat([1, 0, 2], [1160, 840, 200])
CASES = [("iid", 1.0), ("dirichlet", 0.1), ("dirichlet", 0.5), ("dirichlet", 100.0)]


def _covered_once(parts, n):
    joined = np.concatenate(parts)
    return joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize(("scheme", "alpha"), CASES)
def test_every_index_is_used_exactly_once(scheme, alpha):
    parts = partition(LABELS, 10, scheme=scheme, alpha=alpha, seed=3, min_size=0)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts if p.size > 1)
    assert _covered_once(parts, LABELS.size)
    assert partition_stats(LABELS, parts)["coverage_ok"]


@pytest.mark.parametrize(("scheme", "alpha"), CASES)
def test_same_seed_same_partition_other_seed_differs(scheme, alpha):
    a = partition(LABELS, 8, scheme=scheme, alpha=alpha, seed=7, min_size=0)
    b = partition(LABELS, 8, scheme=scheme, alpha=alpha, seed=7, min_size=0)
    c = partition(LABELS, 8, scheme=scheme, alpha=alpha, seed=8, min_size=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_a_generator_seed_is_used_and_advanced():
    rng = np.random.default_rng(0)
    first = partition(LABELS, 4, seed=rng)
    second = partition(LABELS, 4, seed=rng)
    assert not np.array_equal(first[0], second[0])
    again = partition(LABELS, 4, seed=np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))


def test_iid_sizes_differ_by_at_most_one():
    sizes = partition_stats(LABELS, partition(LABELS, 7, seed=0))["sizes"]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == LABELS.size


def test_small_alpha_is_more_skewed_than_large_alpha_and_iid():
    """Mean per-device label entropy, averaged over 5 seeds: Dir(0.1) < Dir(1) < Dir(100) ~ IID."""

    def mean_entropy(scheme, alpha):
        return np.mean(
            [
                partition_stats(
                    LABELS, partition(LABELS, 20, scheme=scheme, alpha=alpha, seed=s, min_size=0)
                )["summary"]["mean_label_entropy_bits"]
                for s in range(5)
            ]
        )

    low, mid, high, iid = (
        mean_entropy("dirichlet", 0.1),
        mean_entropy("dirichlet", 1.0),
        mean_entropy("dirichlet", 100.0),
        mean_entropy("iid", 1.0),
    )
    assert low < mid < high <= iid + 0.02
    assert low < 0.6 * iid


def test_min_size_is_respected_by_resampling():
    parts = partition(LABELS, 20, scheme="dirichlet", alpha=0.3, seed=0, min_size=25)
    assert min(p.size for p in parts) >= 25
    assert _covered_once(parts, LABELS.size)


def test_impossible_min_size_fails_with_a_clear_error():
    with pytest.raises(ValueError, match=r"max_attempts=5 .* min_size=100 .*raise alpha"):
        partition(LABELS, 20, scheme="dirichlet", alpha=0.05, seed=0, min_size=100, max_attempts=5)
    with pytest.raises(
        ValueError, match=r"min_size=200 for n_devices=20 needs 4000 examples, but labels has 2200"
    ):
        partition(LABELS, 20, min_size=200)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "shards"}, r"scheme must be one of \['iid', 'dirichlet'\], got 'shards'"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"alpha must be a finite number > 0"),
        ({"scheme": "dirichlet", "alpha": float("inf")}, r"alpha must be a finite number > 0"),
        ({"seed": None}, r"seed must be a non-negative int or a numpy Generator"),
        ({"min_size": -1}, r"min_size must be an int >= 0"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition(LABELS, 4, **kwargs)


def test_bad_labels_and_device_counts_are_rejected():
    with pytest.raises(ValueError, match=r"n_devices must be an int >= 1, got 0"):
        partition(LABELS, 0)
    with pytest.raises(ValueError, match=r"labels must be integer class ids"):
        partition(np.array([0.5, 1.0]), 1)
    with pytest.raises(ValueError, match=r"labels must be 1-D"):
        partition(np.zeros((2, 2), dtype=int), 1)


def test_train_test_split_is_exact_disjoint_and_stratified():
    train, test = train_test_split(LABELS.size, 0.1, seed=0, labels=LABELS)
    assert test.size == 220 and train.size == 1980
    assert _covered_once([train, test], LABELS.size)
    assert np.bincount(LABELS[test]).tolist() == [84, 116, 20]  # exactly 10% of each class
    again, _ = train_test_split(LABELS.size, 0.1, seed=0, labels=LABELS)
    other, _ = train_test_split(LABELS.size, 0.1, seed=1, labels=LABELS)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    plain_train, plain_test = train_test_split(101, 0.25, seed=0)
    assert plain_test.size == 25 and _covered_once([plain_train, plain_test], 101)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, True, "0.1"])
def test_train_test_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match=r"test_fraction must be a number in \(0, 1\)"):
        train_test_split(10, fraction)


def test_stats_by_hand_and_table():
    labels = np.array([0, 0, 1, 1, 1, 0])
    stats = partition_stats(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])])
    assert stats["sizes"] == [2, 4]
    assert stats["label_counts"] == [[2, 0], [1, 3]]
    h = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))  # 0.811278 bits
    assert stats["label_entropy_bits"] == pytest.approx([0.0, h], abs=1e-6)
    assert stats["summary"] == {
        "min_size": 2,
        "median_size": 3.0,
        "max_size": 4,
        "mean_label_entropy_bits": pytest.approx(h / 2, abs=1e-6),
        "global_label_entropy_bits": pytest.approx(1.0),
    }
    table = format_stats(stats, label_names=["rotten", "fresh"])
    assert "rotten" in table and "fresh" in table and "size min/median/max 2/3/4" in table
    assert len(table.splitlines()) == 2 + 2 + 1
    short = format_stats(partition_stats(LABELS, partition(LABELS, 30, seed=0)), max_devices=5)
    assert "... 25 more devices" in short
    broken = partition_stats(labels, [np.array([0, 1]), np.array([1, 2])])
    assert not broken["coverage_ok"] and "WARNING" in format_stats(broken)


def test_partition_module_imports_without_torch_or_datasets():
    check = (
        "import sys; import fedspine.data.partition as p, fedspine.data as d; "
        "assert p.partition and d.partition_stats; "
        "heavy = [m for m in ('torch', 'datasets', 'pandas', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
