"""GPU tier: where a NaN in one document's values goes in compiled FlexAttention on CUDA (bfloat16, forward).

FlexAttention skips only the fully masked (query block, key block) pairs of its BlockMask; inside a partially
masked block a masked key's value enters ``P @ V`` with weight 0, and ``0 * NaN = NaN``. So a NaN reaches every
query that may see it, and may reach other queries of the blocks that hold it, but never a query block whose key
block holding the NaN is fully masked (docs/architecture.md, "Attention backends"). Skipped without CUDA; nothing
here touches CUDA at import.
"""

from __future__ import annotations

import pytest
import torch

from anchorcontext import AnchorLayout
from anchorcontext.attention import flex_attention

pytestmark = pytest.mark.gpu

BLOCK = 128  # create_block_mask's default block size


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)


@pytest.mark.parametrize("mode", ["anchor", "intra_doc"])
def test_flex_nan_stays_out_of_fully_masked_blocks(mode):
    L = 4 * BLOCK
    ids = [0] + [1] * 150 + [2] * 120 + [3] * 200 + [-1] * (L - 471)  # document 3 starts in key block 2
    layout = AnchorLayout.from_doc_ids(torch.tensor([ids, ids]), mode)
    q, k, v = (torch.randn(2, 4, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = 300  # a token of document 3, in key block 2
    v_bad = v.clone()
    v_bad[0, 1, pos, 5] = float("nan")
    with torch.no_grad():
        out = flex_attention(q, k, v, layout)
        out_bad = flex_attention(q, k, v_bad, layout)
    sees = layout.dense_mask().to("cuda")[0, :, pos]
    assert not torch.isfinite(out_bad[0, sees, 1, 5]).any()  # every query that may see it gets it
    # query blocks 0 and 1 (the anchor, documents 1 and 2) never load key block 2: bit for bit the clean output
    assert torch.equal(out_bad[0, : 2 * BLOCK], out[0, : 2 * BLOCK])
    assert torch.equal(out_bad[1], out[1])  # the other row of the batch
    assert torch.equal(out_bad[0, :, [0, 2, 3]], out[0, :, [0, 2, 3]])  # the other heads
