"""The varlen backend's K/V gather sums the anchor's gradient (one row gathered per document) in float32."""

import torch

from anchorcontext.attention.varlen import gather_rows


def test_gather_rows_sums_repeated_rows_in_float32():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 16).to(torch.bfloat16).requires_grad_(True)
    index = torch.cat([torch.zeros(600, dtype=torch.long), torch.arange(1, 8)])  # row 0 = the anchor, 600 documents
    y = gather_rows(x, index)
    assert torch.equal(y, x.detach().index_select(0, index))
    g = (torch.randn(y.shape) * 3).to(torch.bfloat16)
    y.backward(g)
    exact = torch.zeros(8, 2, 16, dtype=torch.float64).index_add_(0, index, g.double())
    err = (x.grad.double() - exact).abs()
    # one final bf16 rounding of the exact sum, not 600 accumulated ones
    assert (err <= exact.abs() * 2**-8 + 1e-6).all(), err.max()
    assert x.grad.dtype == torch.bfloat16
