"""The sdpa backend's sliding window never builds a segment-sized (n x n) mask, and stays exact."""

import pytest
import torch

from anchorcontext import AnchorLayout
from anchorcontext.attention import reference_attention, sdpa, sdpa_attention


@pytest.mark.parametrize("mask", ["anchor", "intra_doc", "full"])
@pytest.mark.parametrize("window", [1, 7, 40])
def test_window_is_banded_and_exact(monkeypatch, mask, window):
    shapes = []
    real = sdpa.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            shapes.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    L = 300
    doc_ids = torch.tensor([[0] + [1] * 120 + [2] * 150 + [3] * 29, [0] + [1] * 299])
    layout = AnchorLayout.from_doc_ids(doc_ids, mask)
    torch.manual_seed(0)
    q = torch.randn(2, 4, L, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, L, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = sdpa_attention(q, k, v, layout, sliding_window=window)
    ref = reference_attention(q, k, v, layout, sliding_window=window)
    g = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert shapes, "the window must bite in this layout"
    # every mask is a band of at most 2 * window rows/keys, never the 300-token segment squared
    assert max(max(s) for s in shapes) <= 2 * window, shapes
