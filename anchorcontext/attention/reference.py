"""Dense masked attention in float64 (or float32): the oracle every backend is tested against.

O(L^2) memory: for tests and tiny inputs only.
"""

from __future__ import annotations

import torch

from ._common import check_options, check_qkv, default_scaling


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
    out = torch.matmul(p, v)
    return out.transpose(1, 2).to(query.dtype)
