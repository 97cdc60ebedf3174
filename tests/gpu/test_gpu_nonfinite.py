"""GPU tier: where a NaN in one document's values goes in compiled FlexAttention on CUDA (bfloat16, forward).

FlexAttention skips only the fully masked (query block, key block) pairs of its BlockMask; inside a partially
masked block a masked key's value enters ``P @ V`` with weight 0, and ``0 * NaN = NaN``. So a NaN reaches every
query that may see it, and may reach other queries of the blocks that hold it, but never a query block whose key
block holding the NaN is fully masked (docs/architecture.md, "Attention backends"), by causality or by the document
mask alone. Skipped without CUDA; nothing here touches CUDA at import.
"""

from __future__ import annotations

import pytest
import torch

from anchorcontext import AnchorLayout
from anchorcontext.attention import block_mask_for, flex_attention

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
    ids = [0] + [1] * 260 + [2] * 123 + [3] * 117 + [-1] * (L - 501)  # document 1 fills key block 1 (128..255)
    layout = AnchorLayout.from_doc_ids(torch.tensor([ids, ids]), mode)
    q, k, v = (torch.randn(2, 4, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = 200  # a token of document 1, in key block 1
    # query block 0 cannot see key block 1 by causality; query block 3 (document 3 and padding) could causally, and
    # only the document mask empties the block pair: a kernel that leaked across documents would load it
    blocks = block_mask_for(layout, None, "cuda")
    assert blocks.BLOCK_SIZE == (BLOCK, BLOCK)
    assert blocks.to_dense()[0, 0, :, 1].tolist() == [0, 1, 1, 0]  # (query block, key block 1) pairs visited
    assert set(ids[3 * BLOCK:]) == {3, -1} and set(ids[BLOCK: 2 * BLOCK]) == {1}
    v_bad = v.clone()
    v_bad[0, 1, pos, 5] = float("nan")
    with torch.no_grad():
        out = flex_attention(q, k, v, layout)
        out_bad = flex_attention(q, k, v_bad, layout)
    sees = layout.dense_mask().to("cuda")[0, :, pos]
    assert sees.sum() == 61  # document 1's queries 200..260
    assert not torch.isfinite(out_bad[0, sees, 1, 5]).any()  # every query that may see it gets it
    # query blocks that never load key block 1: bit for bit the clean output
    assert torch.equal(out_bad[0, :BLOCK], out[0, :BLOCK])  # causally masked
    assert torch.equal(out_bad[0, 3 * BLOCK:], out[0, 3 * BLOCK:])  # masked by the document mask only
    assert torch.equal(out_bad[1], out[1])  # the other row of the batch
    assert torch.equal(out_bad[0, :, [0, 2, 3]], out[0, :, [0, 2, 3]])  # the other heads
