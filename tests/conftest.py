"""Shared test setup: deterministic seeds, one intra-op thread (the CI machine has 2 shared cores)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
    yield
