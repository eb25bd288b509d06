"""Fixtures for the pruning tests."""

import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_llama

MODELS = {"bert": tiny_bert, "llama-mha": lambda: tiny_llama(4), "llama-gqa": lambda: tiny_llama(2)}


@pytest.fixture(params=sorted(MODELS))
def tiny_model(request):
    """(name, model) for each tiny family variant."""
    return request.param, MODELS[request.param]()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12), generator=g)
