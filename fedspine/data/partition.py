"""Split example indices into train/test and across federated devices.

Everything works on plain index arrays so the same partition serves a ``datasets.Dataset``, a
dict of tensors or a Flower ``partition-id``. Device partitions are cut by Flower Datasets'
partitioners (``flwr-datasets``: IID, Dirichlet, pathological, shard), so they are the ones
FlowerTune and other Flower users get; this module keeps the checks, the error messages and the
statistics table. Importing it imports neither torch nor ``datasets`` (``partition`` loads
``datasets`` and ``flwr_datasets`` when called). Randomness comes only from the ``seed``
arguments; the same seed gives the same split on every machine.

>>> import numpy as np
>>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
>>> parts = partition(labels, 2, scheme="iid", seed=0)
>>> sorted(np.concatenate(parts).tolist()) == list(range(8))
True
>>> partition_stats(labels, parts)["sizes"]
[4, 4]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

SCHEMES = ("iid", "dirichlet", "pathological", "shard")  # flwr-datasets partitioners of the same names
# PathologicalPartitioner's class_assignment_mode values
CLASS_ASSIGNMENTS = ("random", "deterministic", "first-deterministic")

Seed = int | np.random.Generator


def _rng(seed: Seed, name: str = "seed") -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _labels(labels: ArrayLike) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels must be non-negative class ids, got min {arr.min()}")
    return arr.astype(np.int64, copy=False)


def train_test_split(
    n: int, test_fraction: float, *, seed: Seed = 0, labels: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted index arrays over ``range(n)``; ``round(test_fraction * n)`` go to test.

    With ``labels`` the split is stratified: each class gives its share of the test set, rounded
    by largest remainder so the total is exact, and the test set keeps the overall label balance
    (on Rotten Tomatoes a plain split of 1,000 drifts by about ±1.5 points of "fresh").
    """
    n = _positive_int(n, "n", minimum=2)
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (float, int, np.floating))
        or not 0 < test_fraction < 1
    ):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    n_test = int(round(test_fraction * n))
    if not 1 <= n_test <= n - 1:
        raise ValueError(f"test_fraction={test_fraction} of n={n} leaves an empty train or test set")
    rng = _rng(seed)
    if labels is None:
        test = rng.permutation(n)[:n_test]
    else:
        y = _labels(labels)
        if y.size != n:
            raise ValueError(f"labels must have length n={n}, got {y.size}")
        classes, counts = np.unique(y, return_counts=True)
        quota = counts * (n_test / n)
        take = np.floor(quota).astype(np.int64)
        short = n_test - int(take.sum())
        if short:  # largest remainders first; ties broken by class id, deterministically
            take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
        test = np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
        )
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def partition(
    labels: ArrayLike,
    n_devices: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    self_balancing: bool = False,
    classes_per_device: int = 2,
    class_assignment: str = "random",
    shards_per_device: int = 2,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Example indices per device: ``n_devices`` sorted int64 arrays, no index on two devices.

    ``labels[i]`` is the class id of example ``i`` (positions, so to partition a train split pass
    its labels and map back with ``train_idx[part]``). The split is Flower Datasets'
    (flwr-datasets 0.6.1), the one FlowerTune and other Flower users get, so results compare: the
    labels become a ``datasets.Dataset``, shuffled with ``seed`` as ``FederatedDataset(shuffle=True,
    seed=seed)`` does, and the scheme's partitioner, seeded with ``seed`` too, cuts it. Errors name
    the config fields the arguments come from (``data.*``, ``fleet.devices``).

    * ``"iid"``: ``IidPartitioner``, near-equal contiguous pieces of the shuffled data (sizes
      differ by at most 1).
    * ``"dirichlet"``: ``DirichletPartitioner(alpha, min_partition_size=min_size, self_balancing)``:
      per class ``p_c ~ Dir(alpha * 1_K)`` over the ``K`` devices (Hsu et al. 2019, arXiv
      1909.06335; the per-class form of Yurochkin et al. 2019 and NIID-Bench). Small ``alpha``
      gives each device few classes. A draw with a device under ``min_size`` is redrawn: flwr-datasets
      stops after 11 draws, we ask it again up to ``max_attempts`` times (by default 100 calls,
      1,100 draws; see ``_load_all``), then an error says what to relax.
    * ``"pathological"``: ``PathologicalPartitioner``: each device holds ``classes_per_device``
      classes chosen by ``class_assignment`` (``random``; ``deterministic``: device ``i`` gets
      classes ``i, i+1, ...``; ``first-deterministic``: class ``i mod C``, then random ones), and a
      class is split evenly among its devices (McMahan et al. 2017's label split). A class that no
      device drew would leave its examples on no device: that is an error here.
    * ``"shard"``: ``ShardPartitioner(num_shards_per_partition=shards_per_device)``: the data
      sorted by label, cut into ``n_devices * shards_per_device`` equal shards, dealt at random
      (McMahan et al. 2017). The ``n mod (n_devices * shards_per_device)`` examples past the last
      full shard are on no device, as in flwr-datasets.

    Every scheme then checks that each device holds at least ``min_size`` examples.
    """
    y = _labels(labels)
    n = y.size
    n_devices = _positive_int(n_devices, "n_devices")
    min_size = _positive_int(min_size, "min_size", minimum=0)
    max_attempts = _positive_int(max_attempts, "max_attempts")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if n_devices * max(min_size, 1) > n:
        raise ValueError(
            f"data.min_size={min_size} for fleet.devices={n_devices} needs "
            f"{n_devices * max(min_size, 1)} examples, but there are {n}; lower data.min_size or "
            "fleet.devices"
        )
    options = _options(
        scheme, y, n_devices, alpha, self_balancing, classes_per_device, class_assignment, shards_per_device
    )
    where = f"{scheme} partition ({_fields(options, n_devices, min_size)}, {n} examples)"

    import datasets
    from flwr_datasets import partitioner as flwr

    cls = {
        "iid": flwr.IidPartitioner,
        "dirichlet": flwr.DirichletPartitioner,
        "pathological": flwr.PathologicalPartitioner,
        "shard": flwr.ShardPartitioner,
    }[scheme]
    if scheme == "iid":
        cutter = cls(num_partitions=n_devices)
    else:
        extra = {"min_partition_size": min_size} if scheme == "dirichlet" else {}
        cutter = cls(
            num_partitions=n_devices,
            partition_by="label",
            seed=int(seed),
            **{_FLWR_NAMES[k]: v for k, v in options.items()},
            **extra,
        )
    table = datasets.Dataset.from_dict({"label": y, "index": np.arange(n, dtype=np.int64)})
    cutter.dataset = table.shuffle(seed=int(seed))  # as FederatedDataset(shuffle=True, seed=seed)
    try:
        parts = _load_all(cutter, n_devices, max_attempts)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if parts is None:
        raise ValueError(
            f"{where}: no draw in max_attempts={max_attempts} calls of {_DRAWS_PER_CALL} draws gave every "
            f"device at least data.min_size={min_size} examples; raise data.alpha, or lower data.min_size "
            "or fleet.devices"
        )
    if scheme == "pathological":
        missing = sorted(set(np.unique(y).tolist()) - set(np.unique(y[np.concatenate(parts)]).tolist()))
        if missing:
            raise ValueError(
                f"{where}: no device drew classes {missing}, so their examples would be on no device; "
                "use data.class_assignment 'first-deterministic' or 'deterministic', or raise "
                "data.classes_per_device"
            )
    smallest = min(p.size for p in parts)
    if smallest < min_size:
        raise ValueError(
            f"{where}: a device holds {smallest} examples, below data.min_size={min_size}; lower "
            "data.min_size or fleet.devices" + (", or raise data.alpha" if scheme == "dirichlet" else "")
        )
    return parts


_DRAWS_PER_CALL = 11  # DirichletPartitioner draws at most 11 times per call, then raises (0.6.1)


def _load_all(cutter: Any, n_devices: int, max_attempts: int) -> list[np.ndarray] | None:
    """Every device's sorted indices from a flwr-datasets partitioner with an ``index`` column.

    DirichletPartitioner gives up after 11 draws under ``min_partition_size``. Calling it again
    continues its own generator, so attempt ``k`` makes draws ``11k .. 11k+10`` of the one
    sequence that a partitioner allowed more draws would make: where flwr-datasets succeeds the
    result is its result, and where it would give up we go on (ours). None when all attempts fail.
    """
    with warnings.catch_warnings():
        # Dirichlet warns before each redraw and Pathological of unused classes (our errors say
        # what to change); datasets' sort warns of a pyarrow deprecation.
        warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
        warnings.filterwarnings("ignore", message="Classes: .* will NOT be used", category=UserWarning)
        warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
        for _ in range(max_attempts):
            try:
                return [
                    np.sort(np.asarray(cutter.load_partition(i)["index"], dtype=np.int64))
                    for i in range(n_devices)
                ]
            except ValueError as e:
                if "max number of attempts" not in str(e):
                    raise
    return None


# Our argument -> the flwr-datasets partitioner's (the config field is data.<our name>).
_FLWR_NAMES = {
    "alpha": "alpha",
    "self_balancing": "self_balancing",
    "classes_per_device": "num_classes_per_partition",
    "class_assignment": "class_assignment_mode",
    "shards_per_device": "num_shards_per_partition",
}


def _options(
    scheme: str,
    y: np.ndarray,
    n_devices: int,
    alpha: Any,
    self_balancing: Any,
    classes_per_device: Any,
    class_assignment: Any,
    shards_per_device: Any,
) -> dict[str, Any]:
    """The options ``scheme`` uses, checked (errors name the ``data.*`` field), by our names."""
    if scheme not in SCHEMES:
        raise ValueError(f"data.partition must be one of {list(SCHEMES)}, got {scheme!r}")
    if scheme == "iid":
        return {}
    if scheme == "dirichlet":
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.integer, np.floating))
            or not np.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"data.alpha must be a finite number > 0 for scheme 'dirichlet', got {alpha!r}")
        if not isinstance(self_balancing, (bool, np.bool_)):
            raise ValueError(f"data.self_balancing must be true or false, got {self_balancing!r}")
        return {"alpha": float(alpha), "self_balancing": bool(self_balancing)}
    if scheme == "pathological":
        n_classes = np.unique(y).size
        k = _positive_int(classes_per_device, "data.classes_per_device")
        if k > n_classes:
            raise ValueError(
                f"data.classes_per_device must be at most the {n_classes} classes in the data, got {k}"
            )
        if class_assignment not in CLASS_ASSIGNMENTS:
            raise ValueError(
                f"data.class_assignment must be one of {list(CLASS_ASSIGNMENTS)}, got {class_assignment!r}"
            )
        return {"classes_per_device": k, "class_assignment": class_assignment}
    s = _positive_int(shards_per_device, "data.shards_per_device")
    if n_devices * s > y.size:
        raise ValueError(
            f"data.shards_per_device={s} for fleet.devices={n_devices} needs {n_devices * s} shards of "
            f"at least one example, but there are {y.size}; lower data.shards_per_device or fleet.devices"
        )
    return {"shards_per_device": s}


def _fields(options: dict[str, Any], n_devices: int, min_size: int) -> str:
    items = [f"fleet.devices={n_devices}", f"data.min_size={min_size}"]
    return ", ".join(items + [f"data.{k}={v!r}" for k, v in options.items()])


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of a count matrix (0 for an empty row)."""
    totals = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return 0.0 - (p * logs).sum(axis=-1)  # 0.0 - x, not -x: no "-0.000" in tables


def partition_stats(
    labels: ArrayLike, parts: Sequence[ArrayLike], *, n_classes: int | None = None
) -> dict[str, Any]:
    """Per-device sizes and label histograms plus a summary, as JSON-ready plain data.

    Keys: ``sizes`` and ``label_counts`` (devices x classes), ``label_entropy_bits`` per device,
    ``coverage_ok`` (every index used exactly once), ``n_unassigned`` (examples on no device: the
    ``shard`` scheme drops a remainder), ``n_repeated`` (examples on several devices) and
    ``summary`` with min/median/max size,
    ``mean_label_entropy_bits`` (the skew measure: ``log2(C)`` for balanced devices, 0 when each
    device holds one class) and ``global_label_entropy_bits`` for reference.
    """
    y = _labels(labels)
    arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
    if not arrays:
        raise ValueError("parts must hold at least one device")
    for i, p in enumerate(arrays):
        if p.size and (p.min() < 0 or p.max() >= y.size):
            raise ValueError(f"parts[{i}] has indices outside 0..{y.size - 1}")
    c = int(y.max()) + 1 if y.size else 0
    if n_classes is not None:
        if _positive_int(n_classes, "n_classes") < c:
            raise ValueError(f"n_classes={n_classes} is below the largest label + 1 = {c}")
        c = int(n_classes)
    counts = np.stack([np.bincount(y[p], minlength=c) for p in arrays]).astype(np.int64)
    sizes = counts.sum(axis=1)
    used = np.bincount(np.concatenate(arrays), minlength=y.size) if y.size else np.zeros(0, np.int64)
    entropy = _entropy_bits(counts)
    return {
        "n_devices": len(arrays),
        "n_examples": int(y.size),
        "n_classes": c,
        "sizes": sizes.tolist(),
        "label_counts": counts.tolist(),
        "label_entropy_bits": [round(float(e), 6) for e in entropy],
        "coverage_ok": bool(used.size == y.size and np.all(used == 1)),
        "n_unassigned": int((used == 0).sum()),
        "n_repeated": int((used > 1).sum()),
        "summary": {
            "min_size": int(sizes.min()),
            "median_size": float(np.median(sizes)),
            "max_size": int(sizes.max()),
            "mean_label_entropy_bits": round(float(entropy.mean()), 6),
            "global_label_entropy_bits": round(float(_entropy_bits(np.bincount(y, minlength=c))), 6),
        },
    }


def format_stats(
    stats: dict[str, Any], *, label_names: Sequence[str] | None = None, max_devices: int | None = 20
) -> str:
    """A fixed-width table of :func:`partition_stats` for the CLI: one row per device, then the summary.

    With more than ``max_devices`` devices only the first ``max_devices`` rows are shown (the
    summary always covers all of them).
    """
    c = stats["n_classes"]
    names = [str(n) for n in label_names] if label_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"label_names must have n_classes={c} names, got {len(names)}")
    width = max([6, *(len(n) for n in names), len(str(max(stats["sizes"])))])
    header = f"{'device':>6}  {'size':>{width}}  " + "  ".join(f"{n:>{width}}" for n in names) + "  entropy"
    lines = [header, "-" * len(header)]
    rows = range(stats["n_devices"]) if max_devices is None else range(min(max_devices, stats["n_devices"]))
    for d in rows:
        cells = "  ".join(f"{k:>{width}}" for k in stats["label_counts"][d])
        lines.append(f"{d:>6}  {stats['sizes'][d]:>{width}}  {cells}  {stats['label_entropy_bits'][d]:7.3f}")
    hidden = stats["n_devices"] - len(rows)
    if hidden > 0:
        lines.append(f"... {hidden} more devices")
    s = stats["summary"]
    lines.append(
        f"{stats['n_devices']} devices, {stats['n_examples']} examples, {c} classes; "
        f"size min/median/max {s['min_size']}/{s['median_size']:g}/{s['max_size']}; "
        f"mean label entropy {s['mean_label_entropy_bits']:.3f} bits "
        f"(global {s['global_label_entropy_bits']:.3f})"
        + (f"; {stats['n_unassigned']} examples on no device" if stats["n_unassigned"] else "")
        + (f"; WARNING: {stats['n_repeated']} examples on several devices" if stats["n_repeated"] else "")
    )
    return "\n".join(lines)
