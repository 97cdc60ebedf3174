"""The float64 oracle check shared by the CPU backend tests (tests/test_backends.py, tests/test_varlen_merge.py):
the layout cases, q/k/v of a given shape, and ``check_against_oracle``, the flash-attn style bound

    err(fast, ref64) <= m * err(ref_same_dtype, ref64) + eps    (m = 2 for the output, 3 for dq, dk, dv)

where ``ref64`` is the dense reference in float64 and ``ref_same_dtype`` the same reference in the fast path's dtype.
"""

from __future__ import annotations

import torch

from anchorcontext.attention import reference_attention

L = 61  # odd, not a multiple of any block size
EPS = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def row(lengths: list[int], length: int) -> list[int]:
    ids = [0]
    for d, n in enumerate(lengths, start=1):
        ids += [d] * n
    assert len(ids) <= length, (lengths, length)
    return ids + [-1] * (length - len(ids))


# Each case: a function of the row length giving one list of document lengths per row.
CASES = {
    "odd_lengths": lambda n: [[7, 13, 5, 21, 9]],
    "one_token_docs": lambda n: [[1, 1, 3, 1, 1, 2, 1, 17, 1, 1, 5]],
    "single_doc": lambda n: [[n - 1]],
    "many_docs": lambda n: [[1] * 50 + [2, 3, 1, 2, n - 59]],  # 55 documents, no padding
    "trailing_padding": lambda n: [[10, 20]],
    "batch_mixed": lambda n: [[7, 13, 5, 21, 9], [n - 1], [], [1] * 30 + [n - 31]],  # row 2: no document
}


def doc_ids(case: str, length: int = L) -> torch.Tensor:
    return torch.tensor([row(lens, length) for lens in CASES[case](length)])


def make_qkv(B, H, Hkv, n, D, dtype):
    q = torch.randn(B, H, n, D).to(dtype)
    k = torch.randn(B, Hkv, n, D).to(dtype)
    v = torch.randn(B, Hkv, n, D).to(dtype)
    return q, k, v


def run(fn, q, k, v, layout, dout=None, **kw):
    """Output and, when ``dout`` is given, (dq, dk, dv) for ``fn``."""
    q, k, v = (t.detach().requires_grad_(dout is not None) for t in (q, k, v))
    out = fn(q, k, v, layout, **kw)
    if dout is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), grads


def ref64(q, k, v, layout, **kw):
    return reference_attention(q, k, v, layout, compute_dtype=torch.float64, **kw)


def ref_same_dtype(q, k, v, layout, **kw):
    return reference_attention(q, k, v, layout, compute_dtype=q.dtype, **kw)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_oracle(fn, q, k, v, layout, *, grad=True, **kw):
    """Assert the flash-attn style bound on the output and (optionally) dq, dk, dv."""
    dtype = q.dtype
    dout = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3]) if grad else None
    out64, g64 = run(ref64, q.double(), k.double(), v.double(), layout, dout, **kw)
    out_pt, g_pt = run(ref_same_dtype, q, k, v, layout, dout, **kw)
    if grad:
        out, g = run(fn, q, k, v, layout, dout, **kw)
    else:
        with torch.no_grad():
            out, g = run(fn, q, k, v, layout, None, **kw)
    assert out.shape == out64.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    names = ["out"] + (["dq", "dk", "dv"] if grad else [])
    fast = [out] + (list(g) if grad else [])
    pt = [out_pt] + (list(g_pt) if grad else [])
    exact = [out64] + (list(g64) if grad else [])
    for name, f, p, x in zip(names, fast, pt, exact):
        assert f.shape == x.shape, name
        e_fast, e_pt = err(f, x), err(p, x)
        m = 2 if name == "out" else 3
        assert e_fast <= m * e_pt + EPS[dtype], f"{name}: err {e_fast:.3g} > {m} * {e_pt:.3g} + {EPS[dtype]}"
