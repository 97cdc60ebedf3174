"""GPU tier: the varlen kernels (flash-attn, else torch's ``varlen_attn``), compiled FlexAttention and
blockwise SDPA on CUDA in bfloat16, forward and backward, against the float64 dense reference.

Skipped without CUDA; nothing here touches CUDA at import. Tolerances as in ``tests/test_backends.py``
(flash-attn's rule): ``err(backend, ref64) <= m * err(bf16 torch reference, ref64) + eps`` with m = 2 for
the output and 3 for dq, dk, dv. Flex compiles once per (mask, shape, options): every flex test uses
``(B, L) = (2, L)`` and one of ``VARIANTS``.
"""

from __future__ import annotations

import pytest
import torch

from anchorcontext import AnchorLayout, anchor_attention
from anchorcontext.attention import (
    block_mask_for,
    flex_attention,
    reference_attention,
    resolve_backend,
    sdpa_attention,
    varlen,
    varlen_attention,
)

pytestmark = pytest.mark.gpu

L = 509  # odd; documents straddle the kernels' 64/128-token blocks
D = 64
EPS = 1e-3
DEV = "cuda"


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)


def row(lengths: list[int], length: int = L) -> list[int]:
    ids = [0]
    for d, n in enumerate(lengths, start=1):
        ids += [d] * n
    assert len(ids) <= length, (lengths, length)
    return ids + [-1] * (length - len(ids))


MANY = [1] * 200 + [2] * 50 + [3] * 19  # 269 short documents
# Every case has two rows (flex compiles per batch size).
CASES = {
    "odd_lengths+single_doc": [row([37, 129, 3, 255, 1, 77]), row([L - 1])],
    "many_docs+trailing_padding": [row(MANY + [L - 1 - sum(MANY)]), row([100, 27])],
    "one_token_docs+no_document": [row([1, 1, 1, 1, 1, 128, 1, 1, 1, 127, 1, 3]), row([])],
}
# (mask, (H, Hkv), options)
VARIANTS = {
    "anchor": ("anchor", (4, 4), {}),
    "intra_doc": ("intra_doc", (4, 4), {}),
    "full": ("full", (4, 4), {}),
    "anchor_gqa_window_softcap": ("anchor", (8, 2), dict(sliding_window=37, softcap=2.0)),
}


def make_qkv(B, H, Hkv, n=L, d=D, dtype=torch.bfloat16):
    return (
        torch.randn(B, H, n, d, device=DEV).to(dtype),
        torch.randn(B, Hkv, n, d, device=DEV).to(dtype),
        torch.randn(B, Hkv, n, d, device=DEV).to(dtype),
    )


def run(fn, q, k, v, layout, dout, **kw):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, layout, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return [out.detach(), *grads]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_oracle(fn, q, k, v, layout, **kw):
    dout = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], device=DEV)
    exact = run(lambda *a, **k_: reference_attention(*a, compute_dtype=torch.float64, **k_),
                q.double(), k.double(), v.double(), layout, dout, **kw)
    pt = run(lambda *a, **k_: reference_attention(*a, compute_dtype=q.dtype, **k_), q, k, v, layout, dout, **kw)
    fast = run(fn, q, k, v, layout, dout, **kw)
    assert fast[0].dtype == q.dtype and torch.isfinite(fast[0]).all()
    for name, f, p, x in zip(["out", "dq", "dk", "dv"], fast, pt, exact):
        assert f.shape == x.shape, name
        m = 2 if name == "out" else 3
        e_fast, e_pt = err(f, x), err(p, x)
        assert e_fast <= m * e_pt + EPS, f"{name}: err {e_fast:.3g} > {m} * {e_pt:.3g} + {EPS}"


def varlen_kernel() -> str:
    why = varlen.unavailable_reason(torch.device(DEV), dtype=torch.bfloat16)
    if why is not None:
        pytest.skip(f"no varlen kernel: {why}")
    return varlen.flash_varlen_kernel()[1] if varlen.flash_varlen_kernel()[0] is not None else "torch"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_varlen_gpu_matches_reference(variant, case):
    kernel = varlen_kernel()
    mode, (H, Hkv), kw = VARIANTS[variant]
    layout = AnchorLayout.from_doc_ids(torch.tensor(CASES[case]), mode)  # built on CPU, moved by the backend
    q, k, v = make_qkv(2, H, Hkv)
    if kernel == "torch" and "softcap" in kw:
        with pytest.raises(ValueError, match="torch varlen_attn has no softcap"):
            varlen_attention(q, k, v, layout, **kw)
        kw = {key: val for key, val in kw.items() if key != "softcap"}
    check_against_oracle(varlen_attention, q, k, v, layout, **kw)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flex_gpu_matches_reference(variant, case):
    mode, (H, Hkv), kw = VARIANTS[variant]
    layout = AnchorLayout.from_doc_ids(torch.tensor(CASES[case], device=DEV), mode)
    q, k, v = make_qkv(2, H, Hkv)
    check_against_oracle(flex_attention, q, k, v, layout, **kw)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sdpa_gpu_matches_reference(variant, case):
    mode, (H, Hkv), kw = VARIANTS[variant]
    kw = {key: val for key, val in kw.items() if key != "softcap"}  # sdpa cannot softcap (tested on CPU)
    layout = AnchorLayout.from_doc_ids(torch.tensor(CASES[case]), mode)
    q, k, v = make_qkv(2, H, Hkv)
    check_against_oracle(sdpa_attention, q, k, v, layout, **kw)


def test_flex_block_mask_reused_across_layers(block_mask_builds):
    """Four 'layers' forward and backward build the layout's BlockMask once (cached on the layout)."""
    built = block_mask_builds
    layout = AnchorLayout.from_doc_ids(torch.tensor(CASES["odd_lengths+single_doc"], device=DEV))
    q, k, v = (t.requires_grad_(True) for t in make_qkv(2, 4, 4))  # VARIANTS["anchor"]: no recompile
    h = q
    for _ in range(4):
        h = flex_attention(h, k, v, layout).transpose(1, 2).contiguous()
    h.float().square().sum().backward()
    assert built == ["anchor_mask"]
    assert block_mask_for(layout, None, DEV) is block_mask_for(layout, None, DEV)
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (q, k, v))
    # a new layout at the same length builds its own mask (and does not recompile)
    other = AnchorLayout.from_doc_ids(torch.tensor(CASES["many_docs+trailing_padding"]))
    q2, k2, v2 = (t.requires_grad_(True) for t in make_qkv(2, 4, 4))
    flex_attention(q2, k2, v2, other).float().sum().backward()
    assert built == ["anchor_mask", "anchor_mask"]


def test_auto_on_cuda_picks_a_kernel_and_matches_reference():
    ids = torch.tensor(CASES["odd_lengths+single_doc"])
    q, k, v = make_qkv(2, 8, 2)
    name = resolve_backend("auto", q.device, dtype=q.dtype)
    assert name in ("varlen", "flex")
    if varlen.unavailable_reason(q.device, dtype=q.dtype) is None:
        assert name == "varlen"
    assert resolve_backend("auto", q.device, dtype=torch.float32) == "flex"  # varlen kernels are half-only
    layout = AnchorLayout.from_doc_ids(ids)
    check_against_oracle(lambda q_, k_, v_, _layout: anchor_attention(q_, k_, v_, ids), q, k, v, layout)


def test_varlen_gpu_golden_mask():
    """The varlen kernel's effective mask on the golden layout (zero queries, one-hot values)."""
    varlen_kernel()
    import golden_masks as golden_mod
    for mode in ("anchor", "intra_doc", "full"):
        for window, table in ((None, golden_mod.GOLDEN), (3, golden_mod.GOLDEN_WINDOW3)):
            layout = AnchorLayout.from_doc_ids(golden_mod.golden_ids(), mode)
            for fn in (varlen_attention, sdpa_attention):
                q = torch.zeros(1, 2, 12, 16, device=DEV, dtype=torch.bfloat16)
                kv = torch.eye(12, 16, device=DEV, dtype=torch.bfloat16).expand(1, 2, 12, 16).contiguous()
                with torch.no_grad():
                    out = fn(q, torch.randn_like(kv), kv, layout, sliding_window=window).float()
                seen = (out[0, :, 0, :12] > 0.5 / 12).cpu()
                assert torch.equal(seen, golden_mod.parse(table[mode])), (fn.__name__, mode, window, seen.int())
