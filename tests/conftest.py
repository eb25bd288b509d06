"""Shared test setup: nothing may reach a hub, wandb never logs anywhere, one torch thread."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """On a shared 2-core CI machine OpenMP's two-thread pools spin against other processes and
    made a tiny round ~30x slower. Results are compared within one process (or against processes
    that also use one thread), so this changes no expectation."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_model():
    """Factory: make_model("llama" | "bert", seed) -> a fresh tiny model (same seed, same weights);
    the LLaMA has grouped-query attention (4 query / 2 KV heads). See ``tests/tiny_models.py``."""
    from tiny_models import tiny_bert, tiny_llama

    return lambda family, seed=0: {"llama": lambda: tiny_llama(2, seed), "bert": lambda: tiny_bert(seed)}[
        family
    ]()
