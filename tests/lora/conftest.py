"""Fixtures for the LoRA tests (the tiny models are ``make_model``, in ``tests/conftest.py``)."""

import pytest
import torch


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
