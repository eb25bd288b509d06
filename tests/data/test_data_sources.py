"""Loading labelled text: packaged Rotten Tomatoes, local file round trips, and the errors."""

import json

import datasets
import numpy as np
import pandas as pd
import pytest
from data_helpers import asset_or_skip

from fedspine.data import label_names, load_text_classification, packaged_sources, split_dataset

ROWS = [
    {"review": "a good film", "stars": "pos", "extra": 1},
    {"review": "NA", "stars": "neg", "extra": 2},  # the word "NA" is text, not a missing value
    {"review": "not very fun", "stars": "neg", "extra": 3},
    {"review": "great", "stars": "pos", "extra": 4},
    {"review": "dull", "stars": "neutral", "extra": 5},
]
TEXTS = [r["review"] for r in ROWS]
IDS = [2, 0, 0, 2, 1]  # sorted names: neg=0, neutral=1, pos=2


def _write(tmp_path, fmt):
    frame = pd.DataFrame(ROWS)
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "csv.gz":
        frame.to_csv(path, index=False, compression="gzip")
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "saved":
        datasets.Dataset.from_pandas(frame).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "csv.gz", "json", "jsonl", "parquet", "saved"])
def test_local_files_round_trip(tmp_path, fmt):
    ds = load_text_classification(_write(tmp_path, fmt), text_column="review", label_column="stars")
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == TEXTS and list(ds["label"]) == IDS
    assert label_names(ds) == ["neg", "neutral", "pos"]


def test_explicit_label_names_fix_the_ids(tmp_path):
    ds = load_text_classification(
        _write(tmp_path, "csv"),
        text_column="review",
        label_column="stars",
        label_names=["pos", "neg", "neutral"],
    )
    assert list(ds["label"]) == [0, 1, 1, 0, 2] and label_names(ds) == ["pos", "neg", "neutral"]
    with pytest.raises(ValueError, match=r"label_column 'stars' has values \['neutral'\] not in label_names"):
        load_text_classification(
            _write(tmp_path, "csv"), text_column="review", label_column="stars", label_names=["pos", "neg"]
        )


def test_integer_labels_sort_numerically(tmp_path):
    path = tmp_path / "ints.csv"
    pd.DataFrame({"text": list("abcd"), "label": [10, 2, 2, 0]}).to_csv(path, index=False)
    ds = load_text_classification(path)
    assert label_names(ds) == ["0", "2", "10"] and list(ds["label"]) == [2, 1, 1, 0]


def test_saved_classlabel_keeps_its_ids_and_dict_needs_a_split(tmp_path):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["b", "a"])}
    )
    part = datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [1, 0, 1]}, features=features)
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "dd"))
    ds = load_text_classification(tmp_path / "dd", split="test")
    assert list(ds["label"]) == [1, 0, 1] and label_names(ds) == ["b", "a"]
    with pytest.raises(ValueError, match=r"split must name one of \['test', 'train'\]"):
        load_text_classification(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'dev'"):
        load_text_classification(tmp_path / "dd", split="dev")


def test_max_examples_is_a_seeded_subset_in_original_order(tmp_path):
    path = tmp_path / "many.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [i % 2 for i in range(100)]}).to_csv(
        path, index=False
    )
    a = load_text_classification(path, max_examples=10, seed=1)
    b = load_text_classification(path, max_examples=10, seed=1)
    c = load_text_classification(path, max_examples=10, seed=2)
    order = [int(t[1:]) for t in a["text"]]
    assert len(a) == 10 and a["text"] == b["text"] and a["text"] != c["text"] and order == sorted(order)
    assert len(load_text_classification(path, max_examples=1000)) == 100
    with pytest.raises(ValueError, match=r"max_examples must be a positive int or None, got 0"):
        load_text_classification(path, max_examples=0)


def test_missing_columns_are_named_with_the_available_ones(tmp_path):
    path = _write(tmp_path, "csv")
    with pytest.raises(
        ValueError,
        match=r"column not found: text_column='text', label_column='label'; "
        r"available columns: \['review', 'stars', 'extra'\]",
    ):
        load_text_classification(path)
    with pytest.raises(ValueError, match=r"label_column='rating'; available columns"):
        load_text_classification(path, text_column="review", label_column="rating")


def test_missing_paths_unknown_names_and_formats(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no such file or directory .*packaged names: \['rotten-tomatoes'\]"
    ):
        load_text_classification(tmp_path / "nope.csv")
    with pytest.raises(
        ValueError, match=r"'imdb' is not a packaged dataset \(packaged: \['rotten-tomatoes'\]\)"
    ):
        load_text_classification("imdb")
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '.xlsx'; expected one of \['.csv'"):
        load_text_classification(bad)


def test_one_class_missing_values_and_packaged_overrides_are_errors(tmp_path):
    one = tmp_path / "one.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["pos", "pos"]}).to_csv(one, index=False)
    with pytest.raises(ValueError, match=r"label_column 'label' needs at least 2 classes, found \['pos'\]"):
        load_text_classification(one)
    holes = tmp_path / "holes.csv"
    holes.write_text("text,label\na,1\n,0\nc,\n")
    with pytest.raises(ValueError, match=r"text_column 'text' has 1 missing values \(rows \[1\]"):
        load_text_classification(holes)
    holes.write_text("text,label\na,1\nb,0\nc,\n")
    with pytest.raises(ValueError, match=r"label_column 'label' has 1 missing values \(rows \[2\]"):
        load_text_classification(holes)
    floats = tmp_path / "floats.parquet"
    pd.DataFrame({"text": ["a", "b"], "label": [0.5, 1.0]}).to_parquet(floats)
    with pytest.raises(ValueError, match=r"non-integer number 0.5"):
        load_text_classification(floats)
    with pytest.raises(
        ValueError, match=r"text_column, label_column and label_names apply only to local files"
    ):
        load_text_classification("rotten-tomatoes", text_column="review")


def test_packaged_names_are_listed():
    assert packaged_sources() == ["rotten-tomatoes"]


@pytest.mark.real_model
def test_rotten_tomatoes_is_real_and_balanced():
    """12,808 snippets (plot synopses dropped), rotten=0 / fresh=1, 57.8% fresh (env.md §3.2)."""
    asset_or_skip("rotten-tomatoes")
    ds = load_text_classification("rotten-tomatoes")
    labels = np.asarray(ds["label"])
    assert len(ds) == 12_808 and label_names(ds) == ["rotten", "fresh"]
    assert np.bincount(labels).tolist() == [5_405, 7_403]
    assert labels.mean() == pytest.approx(0.578, abs=0.001)
    assert all(isinstance(t, str) and t.strip() for t in ds["text"][:500])
    train, test = split_dataset(ds, 1000 / 12_808, seed=0)
    assert (len(train), len(test)) == (11_808, 1_000)
    assert np.mean(test["label"]) == pytest.approx(0.578, abs=0.001)  # stratified
    small = load_text_classification("rotten-tomatoes", max_examples=200, seed=0)
    assert len(small) == 200 and set(small["label"]) == {0, 1}
