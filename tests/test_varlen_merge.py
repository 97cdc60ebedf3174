"""The gather-free varlen path (LSE merge of the anchor key) against the float64 dense reference, on CPU.

The kernel is ``tests/varlen_kernel_standin.py``: the flash varlen kernel's raw (out, lse) forward and a backward
that trusts the output and LSE it is given (as the real kernel does), so a merge that handed the kernel its
own, unmerged LSE would fail the gradient checks. Tolerances as in ``tests/test_backends.py``:
``err(path, ref64) <= m * err(same-dtype torch reference, ref64) + eps`` (m = 2 for the output, 3 for gradients).
"""

from __future__ import annotations

import flash_standin
import pytest
import torch
import varlen_kernel_standin
from backend_oracle import CASES, L, check_against_oracle, doc_ids, make_qkv
from torch_varlen_fakes import (
    fake_cuda_torch_varlen,  # noqa: F401  (a fixture)
    torch_2_12_varlen,
)

from anchorcontext import AnchorLayout, anchor_attention
from anchorcontext.attention import reference_attention, varlen, varlen_attention, varlen_merge
from anchorcontext.attention.varlen_merge import merge_plan, varlen_merge_attention


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(varlen_merge, "KERNEL", varlen_kernel_standin.StandinKernel())
    varlen_kernel_standin.CALLS.clear()
    return varlen_kernel_standin


OPTIONS = {
    "plain": ((4, 4), {}),
    "gqa": ((8, 2), {}),
    "window": ((4, 4), dict(sliding_window=5)),
    "gqa_window1": ((6, 3), dict(sliding_window=1)),  # window 1: no query sees the anchor by merge
    "gqa_window_scale": ((8, 2), dict(sliding_window=13, scaling=0.3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mode", ["anchor", "intra_doc"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_reference(case, mode, option, dtype, kernel):
    torch.manual_seed(0)
    (H, Hkv), kw = OPTIONS[option]
    ids = doc_ids(case)
    layout = AnchorLayout.from_doc_ids(ids, mode)
    q, k, v = make_qkv(ids.shape[0], H, Hkv, L, 16, dtype)
    check_against_oracle(varlen_merge_attention, q, k, v, layout, **kw)
    fwd = [c for c in kernel.CALLS if c["op"] == "forward"]
    # one kernel call over the whole batch; in anchor mode each non-empty row's anchor and document 1 share a segment
    expected = layout.num_segments - (sum(1 for r in ids if int(r[1]) == 1) if mode == "anchor" else 0)
    assert len(fwd) == 1 and fwd[0]["segments"] == expected, (fwd, expected)


def test_merge_plan_joins_the_anchor_to_document_1():
    ids = torch.tensor([[0, 1, 1, 2, 2, 2, 3, -1], [0, 1, 2, 2, 2, 2, 2, 2], [0, -1, -1, -1, -1, -1, -1, -1]])
    layout = AnchorLayout.from_doc_ids(ids)
    cu, max_len, merge = merge_plan(layout, None)
    # row 0: [A 1 1] [2 2 2] [3] [pad]; row 1: [A 1] [2 x6]; row 2: [A] [pad x7]
    assert cu.tolist() == [0, 3, 6, 7, 8, 10, 16, 17, 24] and max_len == 7
    assert merge.tolist() == (ids.reshape(-1) > 1).tolist()
    _, _, merge3 = merge_plan(layout, 3)  # anchor visible iff offset in document + 1 < 3
    assert merge3.view(3, 8)[1].tolist() == [False, False, True, True, False, False, False, False]
    assert merge_plan(layout, 3)[2] is merge3  # cached per window on the layout


def test_merge_gradients_need_the_merged_lse(kernel, monkeypatch):
    """Negative control: with the kernel's own (unmerged) LSE in the backward, dk is wrong, so the gradient checks
    above see the difference the merge makes."""
    torch.manual_seed(1)
    ids = doc_ids("odd_lengths")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 4, 2, L, 16, torch.float64))
    dout = torch.randn(1, L, 4, 16, dtype=torch.float64)
    good = torch.autograd.grad(varlen_merge_attention(q, k, v, layout), (q, k, v), dout)
    exact = torch.autograd.grad(reference_attention(q, k, v, layout), (q, k, v), dout)
    for a, b in zip(good, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    own = kernel.StandinKernel()
    real_backward = own.backward

    def backward_with_own_lse(dout_, q_, k_, v_, out, lse, cu, max_len, scale, window):
        out_d, lse_d = own.forward(q_, k_, v_, cu, max_len, scale, window)
        return real_backward(dout_, q_, k_, v_, out_d, lse_d, cu, max_len, scale, window)

    own.backward = backward_with_own_lse
    monkeypatch.setattr(varlen_merge, "KERNEL", own)
    bad = torch.autograd.grad(varlen_merge_attention(q, k, v, layout), (q, k, v), dout)
    assert (bad[1] - exact[1]).abs().max() > 1e-3


def test_backend_varlen_uses_merge_when_selected(kernel, monkeypatch):
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", flash_standin.flash_attn_varlen_func)
    flash_standin.CALLS.clear()
    torch.manual_seed(2)
    ids = doc_ids("batch_mixed")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(ids.shape[0], 8, 2, L, 16, torch.float64)
    expected = reference_attention(q, k, v, layout, sliding_window=7)
    monkeypatch.setenv(varlen_merge.ENV, "merge")
    out = varlen_attention(q, k, v, layout, sliding_window=7)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert len(kernel.CALLS) == 1 and not flash_standin.CALLS  # merged: no gathered-K/V kernel call
    with varlen_merge.use_impl("gather"):  # per call, over the environment
        torch.testing.assert_close(varlen_attention(q, k, v, layout, sliding_window=7), expected, rtol=1e-10, atol=1e-10)
    assert len(kernel.CALLS) == 1 and len(flash_standin.CALLS) == 1
    # softcap: the merge path has none, so the gather path (which softcaps) runs it
    capped = varlen_attention(q, k, v, layout, softcap=2.0)
    torch.testing.assert_close(capped, reference_attention(q, k, v, layout, softcap=2.0), rtol=1e-10, atol=1e-10)
    assert len(kernel.CALLS) == 1 and len(flash_standin.CALLS) == 2
    # intra_doc has no gather: the gather path runs it as before
    intra = AnchorLayout.from_doc_ids(ids, "intra_doc")
    varlen_attention(q, k, v, intra)
    assert len(kernel.CALLS) == 1 and len(flash_standin.CALLS) == 3


def test_auto_honours_the_impl_env_var_after_resolving(kernel, monkeypatch):
    """resolve_backend caches auto's answer ("varlen" here); the gather/merge choice is made per call below it, so a
    change of ANCHORCONTEXT_VARLEN_IMPL between calls takes effect."""
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", flash_standin.flash_attn_varlen_func)
    flash_standin.CALLS.clear()
    ids = doc_ids("odd_lengths")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(1, 4, 2, L, 16, torch.float64)
    expected = reference_attention(q, k, v, layout)
    for impl, merged, gathered in [("gather", 0, 1), ("merge", 1, 1), ("gather", 1, 2), ("merge", 2, 2)]:
        monkeypatch.setenv(varlen_merge.ENV, impl)
        torch.testing.assert_close(anchor_attention(q, k, v, layout), expected, rtol=1e-10, atol=1e-10)
        assert (len(kernel.CALLS), len(flash_standin.CALLS)) == (merged, gathered), impl


def test_impl_selection_errors(monkeypatch):
    monkeypatch.setenv(varlen_merge.ENV, "fast")
    with pytest.raises(ValueError, match=r"ANCHORCONTEXT_VARLEN_IMPL='fast' is invalid"):
        varlen_merge.impl()
    with pytest.raises(ValueError, match=r"impl='fast' is invalid"), varlen_merge.use_impl("fast"):
        pass
    monkeypatch.delenv(varlen_merge.ENV)
    assert varlen_merge.impl() == "gather"
    with varlen_merge.use_impl("merge"):
        assert varlen_merge.impl() == "merge"
    assert varlen_merge.impl() == "gather"


def test_merge_refuses_what_it_cannot_run(kernel, monkeypatch):
    ids = doc_ids("odd_lengths")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(1, 4, 4, L, 16, torch.float32)
    with pytest.raises(ValueError, match=r"softcap=2.0"):
        varlen_merge_attention(q, k, v, layout, softcap=2.0)
    monkeypatch.setattr(varlen_merge, "KERNEL", varlen_merge.TorchFlashKernel())  # the real kernel's limits
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(device is cpu\)"):
        varlen_merge_attention(q, k, v, layout)
    assert "float16/bfloat16" in varlen_merge.unavailable_reason(torch.device("cuda"), torch.float32)
    assert varlen_merge.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None


def test_torch_varlen_runs_under_the_flash_pin(fake_cuda_torch_varlen):  # noqa: F811
    """The gather path calls torch's varlen_attn with only the flash SDPA backend enabled (torch's 2026-08 selector
    honours it and would otherwise prefer cuDNN); the caller's settings are restored afterwards."""
    seen = []

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1), enable_gqa=False):  # torch 2.12+'s signature
        b = torch.backends.cuda
        seen.append((b.flash_sdp_enabled(), b.cudnn_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()))
        return torch_2_12_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                 window_size=window_size, enable_gqa=enable_gqa)

    fake_cuda_torch_varlen(fake)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    ids = doc_ids("odd_lengths")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(1, 4, 2, L, 16, torch.bfloat16)
    with varlen_merge.use_impl("gather"):
        varlen_attention(q, k, v, layout)
    assert seen == [(True, False, False, False)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
