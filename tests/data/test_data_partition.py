"""Train/test splits and device partitions (flwr-datasets' partitioners): coverage, reproducibility,
skew, agreement with Flower Datasets, validation."""

import subprocess
import sys

import numpy as np
import pytest

from fedspine.data import format_stats, partition_stats, train_test_split
from fedspine.data.partition import partition

# 58% / 42%, like Rotten Tomatoes, plus a third small class to exercise multi-class paths.
LABELS = np.repeat([1, 0, 2], [1160, 840, 200])
CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.1}),
    ("dirichlet", {"alpha": 0.5}),
    ("dirichlet", {"alpha": 100.0, "self_balancing": True}),
    ("pathological", {"classes_per_device": 2, "class_assignment": "first-deterministic"}),
    ("pathological", {"classes_per_device": 1, "class_assignment": "deterministic"}),
]


def _covered_once(parts, n):
    joined = np.concatenate(parts)
    return joined.size == n and np.array_equal(np.sort(joined), np.arange(n))


def _entropy(parts):
    return partition_stats(LABELS, parts)["summary"]["mean_label_entropy_bits"]


@pytest.mark.parametrize(("scheme", "options"), CASES)
def test_every_index_is_used_exactly_once(scheme, options):
    parts = partition(LABELS, 10, scheme=scheme, seed=3, min_size=0, **options)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts if p.size > 1)
    assert _covered_once(parts, LABELS.size)
    stats = partition_stats(LABELS, parts)
    assert stats["coverage_ok"] and stats["n_unassigned"] == stats["n_repeated"] == 0


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_shards_are_equal_and_only_the_remainder_is_left_out(shards):
    parts = partition(LABELS, 7, scheme="shard", shards_per_device=shards, seed=0, min_size=0)
    shard_size = LABELS.size // (7 * shards)
    assert [p.size for p in parts] == [shards * shard_size] * 7
    stats = partition_stats(LABELS, parts)
    assert stats["n_repeated"] == 0 and stats["n_unassigned"] == LABELS.size % (7 * shards)
    assert f"{LABELS.size % (7 * shards)} examples on no device" in format_stats(stats)
    # A shard is a run of the label-sorted data: with one shard per device, at most 2 classes each.
    if shards == 1:
        assert all(np.unique(LABELS[p]).size <= 2 for p in parts)


@pytest.mark.parametrize(("scheme", "options"), CASES + [("shard", {"shards_per_device": 2})])
def test_same_seed_same_partition_other_seed_differs(scheme, options):
    a = partition(LABELS, 8, scheme=scheme, seed=7, min_size=0, **options)
    b = partition(LABELS, 8, scheme=scheme, seed=7, min_size=0, **options)
    c = partition(LABELS, 8, scheme=scheme, seed=8, min_size=0, **options)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_the_split_is_flower_datasets_own():
    """What a Flower user gets (the data shuffled with the seed, as FederatedDataset does, then the
    partitioner with the seed) is our partition, index for index: results compare with theirs."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    ds = datasets.Dataset.from_dict({"label": LABELS, "row": np.arange(LABELS.size)}).shuffle(seed=5)
    theirs = [
        DirichletPartitioner(
            num_partitions=6, partition_by="label", alpha=0.3, min_partition_size=20, seed=5
        ),
        PathologicalPartitioner(
            num_partitions=6,
            partition_by="label",
            num_classes_per_partition=2,
            seed=5,
            class_assignment_mode="first-deterministic",
        ),
    ]
    ours = [
        partition(LABELS, 6, scheme="dirichlet", alpha=0.3, min_size=20, seed=5),
        partition(
            LABELS,
            6,
            scheme="pathological",
            classes_per_device=2,
            class_assignment="first-deterministic",
            seed=5,
        ),
    ]
    for partitioner, parts in zip(theirs, ours, strict=True):
        partitioner.dataset = ds
        for i, part in enumerate(parts):
            assert np.array_equal(np.sort(partitioner.load_partition(i)["row"]), part)


def test_partitioning_needs_no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the partition tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for scheme, options in CASES:
        assert _covered_once(partition(LABELS, 5, scheme=scheme, seed=1, min_size=0, **options), LABELS.size)


def test_iid_sizes_differ_by_at_most_one():
    sizes = partition_stats(LABELS, partition(LABELS, 7, seed=0))["sizes"]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == LABELS.size


def test_small_alpha_is_more_skewed_than_large_alpha_and_iid():
    """Mean per-device label entropy, averaged over 5 seeds: Dir(0.1) < Dir(1) < Dir(100) ~ IID."""

    def mean_entropy(scheme, alpha):
        return np.mean(
            [
                _entropy(partition(LABELS, 20, scheme=scheme, alpha=alpha, seed=s, min_size=0))
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


def test_pathological_devices_hold_exactly_their_classes():
    parts = partition(
        LABELS, 9, scheme="pathological", classes_per_device=2, class_assignment="deterministic"
    )
    assert [sorted(np.unique(LABELS[p]).tolist()) for p in parts] == [[0, 1], [1, 2], [0, 2]] * 3
    one = partition(
        LABELS, 9, scheme="pathological", classes_per_device=1, class_assignment="first-deterministic"
    )
    assert all(np.unique(LABELS[p]).size == 1 for p in one) and _covered_once(one, LABELS.size)
    assert _entropy(one) == 0.0 < _entropy(parts) < _entropy(partition(LABELS, 9, seed=0))


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_min_size_is_met_by_asking_flower_datasets_again():
    """Dir(0.3) over 20 devices with 25 each: flwr-datasets' 11 draws do not find one for seed 0;
    asking again continues its generator, as a Flower user catching the error and retrying would."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    with pytest.raises(ValueError, match=r"no draw in max_attempts=1 calls of 11 draws"):
        partition(LABELS, 20, scheme="dirichlet", alpha=0.3, seed=0, min_size=25, max_attempts=1)
    parts = partition(LABELS, 20, scheme="dirichlet", alpha=0.3, seed=0, min_size=25)
    assert min(p.size for p in parts) >= 25
    assert _covered_once(parts, LABELS.size)

    theirs = DirichletPartitioner(
        num_partitions=20, partition_by="label", alpha=0.3, min_partition_size=25, seed=0
    )
    theirs.dataset = datasets.Dataset.from_dict({"label": LABELS, "row": np.arange(LABELS.size)}).shuffle(
        seed=0
    )
    for _ in range(100):
        try:
            theirs.load_partition(0)
            break
        except ValueError:
            continue
    assert all(np.array_equal(np.sort(theirs.load_partition(i)["row"]), p) for i, p in enumerate(parts))


def test_a_min_size_that_cannot_be_met_names_the_fields():
    fields = r"fleet.devices=20, data.min_size=100, data.alpha=0.05"
    with pytest.raises(ValueError, match=rf"dirichlet partition \({fields}.*\): no draw .*raise data.alpha"):
        partition(LABELS, 20, scheme="dirichlet", alpha=0.05, seed=0, min_size=100, max_attempts=3)
    with pytest.raises(
        ValueError, match=r"data.min_size=200 for fleet.devices=20 needs 4000 examples, but there are 2200"
    ):
        partition(LABELS, 20, min_size=200)
    # pathological, one class each: class 2's 200 examples split over devices 2, 5 and 8 -> 66 or 67
    with pytest.raises(
        ValueError,
        match=r"pathological partition .*data.classes_per_device=1.*: a device holds 66 examples, below",
    ):
        partition(
            LABELS,
            9,
            scheme="pathological",
            classes_per_device=1,
            class_assignment="deterministic",
            min_size=100,
        )


def test_a_class_no_device_drew_is_an_error_not_a_silent_drop():
    with pytest.raises(ValueError, match=r"no device drew classes \[2\].*'first-deterministic'"):
        partition(LABELS, 2, scheme="pathological", classes_per_device=1, class_assignment="deterministic")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"scheme": "shards"},
            r"data.partition must be one of \['iid', 'dirichlet', 'pathological', 'shard'\]",
        ),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"data.alpha must be a finite number > 0"),
        ({"scheme": "dirichlet", "alpha": float("inf")}, r"data.alpha must be a finite number > 0"),
        ({"scheme": "dirichlet", "self_balancing": "yes"}, r"data.self_balancing must be true or false"),
        (
            {"scheme": "pathological", "classes_per_device": 4},
            r"data.classes_per_device must be at most the 3",
        ),
        ({"scheme": "pathological", "classes_per_device": 0}, r"data.classes_per_device must be an int >= 1"),
        ({"scheme": "pathological", "class_assignment": "fixed"}, r"data.class_assignment must be one of"),
        ({"scheme": "shard", "shards_per_device": 0}, r"data.shards_per_device must be an int >= 1"),
        (
            {"scheme": "shard", "shards_per_device": 600},
            r"data.shards_per_device=600 for fleet.devices=4 needs",
        ),
        ({"seed": None}, r"seed must be an int in \[0, 2\*\*32\)"),
        ({"seed": np.random.default_rng(0)}, r"seed must be an int"),
        ({"min_size": -1}, r"min_size must be an int >= 0"),
        ({"max_attempts": 0}, r"max_attempts must be an int >= 1"),
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
