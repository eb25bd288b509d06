"""Tokenizing to fixed-length tensors and drawing reproducible mini-batches."""

import numpy as np
import pytest
import torch
from data_helpers import asset_or_skip, make_tiny_tokenizer

from fedspine.data.tokenize import batches, tokenize

DATA = {
    "text": ["a good movie", "not very fun and very dull film", "great", "the film was awful", "bad", "fun"],
    "label": [1, 0, 1, 0, 0, 1],
}


def test_tiny_fast_tokenizer_pads_and_truncates():
    tiny_tokenizer = make_tiny_tokenizer()
    assert tiny_tokenizer.is_fast
    enc = tokenize(DATA, tiny_tokenizer, max_length=5, chunk_size=4)  # two chunks
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    assert enc["input_ids"].shape == (6, 5) and enc["input_ids"].dtype == torch.int64
    assert enc["labels"].tolist() == DATA["label"]
    vocab = tiny_tokenizer.get_vocab()
    assert enc["input_ids"][0].tolist() == [vocab["a"], vocab["good"], vocab["movie"], 0, 0]
    assert enc["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert enc["attention_mask"][1].tolist() == [1] * 5  # truncated at 5 tokens
    assert enc["input_ids"][1, 3].item() == vocab["[UNK]"]  # "and" is out of vocabulary


def test_batches_cover_indices_and_replay_from_the_generator():
    tiny_tokenizer = make_tiny_tokenizer()
    enc = tokenize(DATA, tiny_tokenizer, max_length=8)
    idx = np.array([5, 0, 3, 2])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [b["labels"].tolist() + b["input_ids"][:, 0].tolist() for b in batches(enc, idx, 3, g)]

    got = list(batches(enc, idx, 3, torch.Generator().manual_seed(0)))
    assert [len(b["labels"]) for b in got] == [3, 1]
    seen = torch.cat([b["input_ids"] for b in got])
    expected = enc["input_ids"][torch.as_tensor(np.sort(idx))]
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, expected.tolist()))
    assert run(0) == run(0)
    assert any(run(0) != run(s) for s in range(1, 6))
    assert [len(b["labels"]) for b in batches(enc, idx, 3, torch.Generator(), drop_last=True)] == [3]
    ordered = list(batches(enc, idx, 2, shuffle=False))
    assert torch.equal(ordered[0]["labels"], enc["labels"][[5, 0]])


def test_trim_padding_cuts_only_all_padding_columns():
    tiny_tokenizer = make_tiny_tokenizer()
    enc = tokenize(DATA, tiny_tokenizer, max_length=10)
    (batch,) = batches(enc, [2, 4], 2, shuffle=False, trim_padding=True)  # "great", "bad": 1 token each
    assert batch["input_ids"].shape == (2, 1) and batch["labels"].shape == (2,)
    (full,) = batches(enc, [0, 1], 2, shuffle=False, trim_padding=True)
    assert full["input_ids"].shape == (2, 7)


def test_errors_name_the_argument():
    tiny_tokenizer = make_tiny_tokenizer()
    enc = tokenize(DATA, tiny_tokenizer, max_length=4)
    with pytest.raises(ValueError, match=r"generator must be a torch.Generator when shuffle=True"):
        next(batches(enc, [0], 1))
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        next(batches(enc, [0], 0, torch.Generator()))
    with pytest.raises(ValueError, match=r"indices must lie in 0..5"):
        next(batches(enc, [6], 1, torch.Generator()))
    with pytest.raises(ValueError, match=r"max_length must be an int >= 2"):
        tokenize(DATA, tiny_tokenizer, max_length=1)
    with pytest.raises(
        ValueError, match=r"text_column 'sentence' not found; available columns: \['text', 'label'\]"
    ):
        tokenize(DATA, tiny_tokenizer, 8, text_column="sentence")


def test_a_tokenizer_without_pad_token_is_refused_not_patched():
    tok = make_tiny_tokenizer(pad=False)
    assert tok.pad_token is None
    with pytest.raises(ValueError, match=r"tokenizer has no pad token"):
        tokenize(DATA, tok, 8)
    assert tok.pad_token is None


@pytest.mark.real_model
def test_minilm_tokenizer_on_rotten_tomatoes():
    from transformers import AutoTokenizer

    from fedspine.data import load_text_classification

    asset_or_skip("rotten-tomatoes")
    tok = AutoTokenizer.from_pretrained(asset_or_skip("all-minilm-l6-v2"))
    assert tok.is_fast
    ds = load_text_classification("rotten-tomatoes", max_examples=512, seed=0)
    enc = tokenize(ds, tok, max_length=64)
    assert enc["input_ids"].shape == (512, 64)
    assert (enc["input_ids"][:, 0] == tok.cls_token_id).all()
    lengths = enc["attention_mask"].sum(1)
    assert 20 < lengths.float().mean() < 35  # 18 words -> 27 word pieces with [CLS]/[SEP] on all of RT
    assert (
        tok.decode(enc["input_ids"][0, 1 : lengths[0] - 1]).split()[:3] == ds[0]["text"].lower().split()[:3]
    )
    g = torch.Generator().manual_seed(0)
    first = next(batches(enc, np.arange(512), 16, g, trim_padding=True))
    assert first["input_ids"].shape[0] == 16 and first["input_ids"].shape[1] <= 64
