"""Shared fixtures: offline env, thread count, a tiny random bridge."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# sparsify picks its Triton decoder whenever triton imports, which fails on a CPU-only machine.
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# Model fixtures live on the CPU even on a GPU machine (the tests build CPU inputs and references);
# the CUDA paths have their own tests in test_cuda.py. INTERP_TEST_DEVICE=cuda moves the fixtures.
TEST_DEVICE = os.environ.get("INTERP_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_model():
    """A small random-weight TransformerBridge (offline, seconds to build)."""
    import interp

    return interp.load_model("tiny-random", device=TEST_DEVICE)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (converted once into the cache, then < 5 s to load)."""
    import interp

    return interp.load_model("smollm2-135m", device=TEST_DEVICE)
