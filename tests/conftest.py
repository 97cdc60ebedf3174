"""Shared test setup: deterministic seeds, one intra-op thread (the CI machine has 2 shared cores)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def block_mask_builds(monkeypatch):
    """The names of the mask functions FlexAttention's ``create_block_mask`` is called with, in order."""
    import torch.nn.attention.flex_attention as fa

    built = []
    real = fa.create_block_mask

    def counting(*args, **kwargs):
        built.append(args[0].__name__)
        return real(*args, **kwargs)

    monkeypatch.setattr(fa, "create_block_mask", counting)
    return built
