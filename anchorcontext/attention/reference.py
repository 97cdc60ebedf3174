"""Dense masked attention in float64 (or float32): the oracle every backend is tested against.

O(L^2) memory: for tests and tiny inputs only. A masked key's value never enters ``P @ V`` (a dense product
would give ``0 * NaN = NaN``): a NaN or inf value reaches exactly the queries allowed to see it.
"""

from __future__ import annotations

import torch

from ._common import Backend, check_options, check_qkv, default_scaling


def reference_attention(
    query, key, value, layout, *, scaling=None, softcap=None, sliding_window=None, dropout=0.0,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``query (B,H,L,D)``, ``key/value (B,Hkv,L,D)`` -> ``(B,L,H,D)`` in ``query.dtype``.

    Scores are computed in ``compute_dtype`` (float64 by default), softcapped (``c * tanh(s / c)``),
    masked with :func:`anchorcontext.layout.dense_mask`, softmaxed and applied to V.
    """
    _, H, Hkv, _, D = check_qkv(query, key, value, layout)
    check_options(softcap, sliding_window, dropout)
    scale = default_scaling(scaling, D)
    q, k, v = (t.to(compute_dtype) for t in (query, key, value))
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = layout.dense_mask(sliding_window).to(query.device)[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout:
        p = torch.nn.functional.dropout(p, p=dropout)
    out = _masked_pv(p, v, allowed)
    return out.transpose(1, 2).to(query.dtype)


def _masked_pv(p: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``p @ v`` (``(B,H,L,L) @ (B,H,L,D)``) with the non-finite values of ``v`` reaching only the queries
    ``allowed`` (``(B,1,L,L)``) to see them, with what a product over the allowed keys alone gives: NaN for a
    NaN, for ``+inf`` and ``-inf`` together or for a zero weight times inf; else the inf. Counting with 0/1
    matrices keeps NaN out of every product; the gradient treats the non-finite values as 0."""
    bad = ~torch.isfinite(v)
    if not bad.any():
        return torch.matmul(p, v)
    out = torch.matmul(p, v.masked_fill(bad, 0.0))
    a = allowed.to(v.dtype)

    def seen(weights, values):  # (q, d): some key in ``weights`` has a value in ``values``
        return torch.matmul(weights, values.to(v.dtype)) > 0

    nan = seen(a, torch.isnan(v)) | seen(((p == 0) & allowed).to(v.dtype), torch.isinf(v))
    pos, neg = seen(a, v == float("inf")), seen(a, v == float("-inf"))
    poison = torch.zeros_like(out).masked_fill(pos, float("inf")).masked_fill(neg, float("-inf"))
    return out + poison.masked_fill(nan | (pos & neg), float("nan"))


BACKEND = Backend(
    name="reference",
    fn=reference_attention,
    unavailable_reason=lambda device, dtype, options: None,
    train_reason=lambda device: "dense O(L^2) oracle, not a training path",
    help="dense float64 oracle, O(L^2) memory (tests; auto's last resort: softcap on CPU)",
)
