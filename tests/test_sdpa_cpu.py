"""The CPU fast path of the sdpa backend (anchorcontext/attention/_cpu_flash.py).

It copies Q/K/V once into contiguous private buffers, runs the CPU flash kernel on views of them with the
anchor's K/V row written into row ``s - 1`` (and a zero into the gradient row ``s - 1`` of a private copy
of the incoming gradient) for a document's kernel calls, putting the old rows back afterwards; 320-700-token
documents run in query chunks merged by log-sum-exp. These tests pin: the chunk plan at the default sizes,
agreement with the float64 reference at real chunk sizes, that no input or incoming gradient is changed
(bit-exact) or has its autograd version bumped, and correct results for aliased or expanded tensors.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_backends import check_against_oracle, err, make_qkv, row, run

from anchorcontext import AnchorLayout
from anchorcontext.attention import reference_attention, sdpa_attention

cpu_flash = importlib.import_module("anchorcontext.attention._cpu_flash")


def layout_of(*rows_lens, length, mode="anchor"):
    return AnchorLayout.from_doc_ids(torch.tensor([row(list(r), length) for r in rows_lens]), mode)


def test_plan_chunks_documents_by_length():
    lay = layout_of([100, 319, 320, 500, 700, 701], length=2700)
    (segs,) = cpu_flash.plan(lay)
    # (start, length, anchor prepended, chunk length): the anchor's own segment first
    assert segs[0] == (0, 1, 0, 1)
    assert [(n, T) for _, n, _, T in segs[1:7]] == [(100, 100), (319, 319), (320, 256), (500, 256), (700, 256), (701, 701)]
    assert all(a == 1 for _, _, a, _ in segs[1:7])
    assert segs[-1][2] == 0  # trailing padding: no anchor
    assert [s for s, *_ in segs] == [0, 1, 101, 420, 740, 1240, 1940, 2641]


@pytest.mark.parametrize("mode", ["anchor", "intra_doc"])
def test_real_chunk_sizes_match_reference(mode):
    """Default chunking (256-row chunks) on documents of 330..700 tokens beside unchunked ones, GQA, batch 2."""
    lay = layout_of([330, 5, 700, 161], [1000, 1, 513], length=1520, mode=mode)
    (segs0, segs1) = cpu_flash.plan(lay)
    # chunked pieces really run (row 0's 323 padding tokens are a segment too)
    assert sorted(n for _, n, _, T in segs0 + segs1 if T < n) == [323, 330, 513, 700]
    q, k, v = make_qkv(2, 4, 2, 1520, 16, torch.float32)
    check_against_oracle(sdpa_attention, q, k, v, lay)


def _fwd_bwd(q, k, v, lay, dout):
    out = sdpa_attention(q, k, v, lay)
    out.backward(dout)
    return out


def test_inputs_and_gradient_left_unchanged():
    """The caller's tensors are never written (bit-exact, no autograd version bump); the private copies are
    restored row by row, so backward (which reuses them) is right too."""
    lay = layout_of([7, 200, 3, 400], [50, 350, 50], length=700)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 700, 8, torch.float32))
    dout = torch.randn(2, 700, 4, 8)
    before = [t.detach().clone() for t in (q, k, v, dout)]
    versions = [t._version for t in (q, k, v, dout)]
    _fwd_bwd(q, k, v, lay, dout)
    for t, b in zip((q, k, v, dout), before):
        assert torch.equal(t.detach(), b)
    assert [t._version for t in (q, k, v, dout)] == versions


def test_key_saved_by_another_op_still_differentiates():
    """K used (and saved) by another autograd node before attention: no in-place error in backward."""
    lay = layout_of([20, 30, 12], length=64)
    q, k, v = (t.double().requires_grad_() for t in make_qkv(1, 2, 2, 64, 8, torch.float32))
    dout = torch.randn(1, 64, 2, 8, dtype=torch.float64)

    def loss(fn):
        q.grad = k.grad = v.grad = None
        k2 = k * 1.5  # mul saves k for its backward...
        kk = k2.sin()  # ...and sin saves k2, which the attention reads (and row-writes) next
        out = fn(q, k2, v, lay)
        ((out * dout).sum() + kk.sum()).backward()
        return out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()

    got, want = loss(sdpa_attention), loss(reference_attention)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alias", ["qkv_same", "kv_same", "k_expanded", "q_overlaps_k", "dout_expanded"])
def test_aliased_inputs(alias):
    """Inputs that share memory: the same tensor for q/k/v, expanded (stride-0) keys, a query overlapping the
    keys at an offset, an expanded incoming gradient: results match the reference, nothing is changed."""
    lay = layout_of([9, 400, 4, 31], length=460)
    torch.manual_seed(0)
    H, D, n = 2, 8, 460
    x = torch.randn(1, H, n + 1, D, dtype=torch.float64)
    if alias == "qkv_same":
        q = k = v = x[:, :, :n]
    elif alias == "kv_same":
        q, k = torch.randn(1, H, n, D, dtype=torch.float64), x[:, :, :n]
        v = k
    elif alias == "k_expanded":
        q, v = torch.randn(1, H, n, D, dtype=torch.float64), torch.randn(1, H, n, D, dtype=torch.float64)
        k = torch.randn(1, 1, n, D, dtype=torch.float64).expand(1, H, n, D)
    elif alias == "q_overlaps_k":  # k row s - 1 is q row s: the document's first query
        q, k, v = x[:, :, :n], x[:, :, 1:], torch.randn(1, H, n, D, dtype=torch.float64)
    else:
        q, k, v = (torch.randn(1, H, n, D, dtype=torch.float64) for _ in range(3))
    snapshot = [t.clone() for t in (q, k, v)]
    dout = torch.randn(1, n, H, D, dtype=torch.float64)
    if alias == "dout_expanded":
        dout = torch.randn(1, 1, H, D, dtype=torch.float64).expand(1, n, H, D)
    want = run(reference_attention, q.clone(), k.clone(), v.clone(), lay, dout.clone())
    got = run(sdpa_attention, q, k, v, lay, dout)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for t, s in zip((q, k, v), snapshot):
        assert torch.equal(t, s)


def test_chunked_differs_from_unmerged_pieces():
    """Negative control: the chunks' log-sum-exp merge matters (each piece alone is far off)."""
    lay = layout_of([400], length=401)
    assert cpu_flash.plan(lay)[0][1][3] == 256
    q, k, v = make_qkv(1, 2, 2, 401, 8, torch.float64)
    full = sdpa_attention(q, k, v, lay)
    torch.testing.assert_close(full, reference_attention(q, k, v, lay), rtol=1e-10, atol=1e-10)
    # the same rows with only the diagonal pieces (what a missing merge would give)
    diag = torch.nn.functional.scaled_dot_product_attention(q[:, :, 257:], k[:, :, 257:], v[:, :, 257:],
                                                            is_causal=True).transpose(1, 2)
    assert err(diag, full[:, 257:]) > 1e-2
