"""Split example indices into train/test and across federated devices (numpy only, no torch).

Everything works on plain index arrays so the same partition serves a ``datasets.Dataset``, a
dict of tensors or a Flower ``partition-id``. Randomness comes only from the ``seed`` argument
(an int or a ``numpy.random.Generator``); the same seed gives the same split on every machine.

>>> import numpy as np
>>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
>>> parts = partition(labels, 2, scheme="iid", seed=0)
>>> sorted(np.concatenate(parts).tolist()) == list(range(8))
True
>>> partition_stats(labels, parts)["sizes"]
[4, 4]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

SCHEMES = ("iid", "dirichlet")

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
    seed: Seed = 0,
    min_size: int = 1,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Example indices per device: ``n_devices`` sorted int64 arrays that use every index exactly once.

    ``labels[i]`` is the class id of example ``i`` (positions, so to partition a train split pass
    its labels and map back with ``train_idx[part]``).

    * ``"iid"``: one seeded permutation cut into ``n_devices`` near-equal pieces (sizes differ by
      at most 1). ``alpha`` is ignored.
    * ``"dirichlet"``: label skew. For each class ``c`` draw ``p_c ~ Dir(alpha * 1_K)`` over the
      ``K`` devices and cut that class's shuffled indices at ``cumsum(p_c)``. Small ``alpha``
      gives each device few classes; ``alpha -> inf`` tends to IID label mixes (sizes still vary).
      Dirichlet label skew for FL is from Hsu et al. 2019 (arXiv 1909.06335); this per-class,
      across-devices form is the one of Yurochkin et al. 2019 and NIID-Bench (Li et al. 2022,
      ``noniid-labeldir``), which we follow without NIID-Bench's cap on already-large devices.
      A draw where some device gets fewer than ``min_size`` examples is redrawn (NIID-Bench uses
      ``min_size=10``), up to ``max_attempts`` times, then a ``ValueError`` says what to relax.
    """
    y = _labels(labels)
    n = y.size
    n_devices = _positive_int(n_devices, "n_devices")
    min_size = _positive_int(min_size, "min_size", minimum=0)
    max_attempts = _positive_int(max_attempts, "max_attempts")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if n_devices * min_size > n:
        raise ValueError(
            f"min_size={min_size} for n_devices={n_devices} needs {n_devices * min_size} examples, "
            f"but labels has {n}"
        )
    rng = _rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_devices)]

    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.integer, np.floating))
        or not np.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(f"alpha must be a finite number > 0 for scheme='dirichlet', got {alpha!r}")
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    smallest = 0
    for _ in range(max_attempts):
        pieces: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for idx in by_class:
            p = rng.dirichlet(np.full(n_devices, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for device, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                pieces[device].append(chunk)
        parts = [np.sort(np.concatenate(p)) for p in pieces]
        smallest = min(p.size for p in parts)
        if smallest >= min_size:
            return parts
    raise ValueError(
        f"dirichlet partition: no draw in max_attempts={max_attempts} gave every one of "
        f"n_devices={n_devices} devices at least min_size={min_size} examples (alpha={alpha}, "
        f"{n} examples; last smallest device {smallest}); "
        "raise alpha or max_attempts, or lower min_size or n_devices"
    )


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
    ``coverage_ok`` (every index used exactly once) and ``summary`` with min/median/max size,
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
        + ("" if stats["coverage_ok"] else "; WARNING: indices not used exactly once")
    )
    return "\n".join(lines)
