"""Helpers for the data tests (a unique module name: ``conftest`` is ambiguous across test folders)."""

import functools
import os

import pytest


def asset_or_skip(name):
    """Path of a packaged asset; skipped where scripts/setup.sh has not run, a failure in CI."""
    from fedspine.assets import asset_path

    try:
        return asset_path(name)
    except FileNotFoundError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"asset {name!r} is not installed (scripts/setup.sh)")


@functools.cache
def make_tiny_tokenizer(pad=True):
    """A WordLevel fast tokenizer built in code (no files, no hub): [PAD]=0, [UNK]=1, then words.

    Cached: treat it as read-only.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a good bad movie film great awful not very fun dull the was is".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if pad:
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
