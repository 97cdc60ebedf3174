"""Blockwise ``scaled_dot_product_attention``: one square causal call per segment.

For a document segment in anchor mode the anchor's Q/K/V row is prepended, a square ``is_causal=True``
SDPA runs on ``[anchor] + document`` and the first output row is dropped. Extra memory is O(L) (the
concatenated pieces); no L x L mask is ever built (a sliding window shorter than a segment builds that
segment's own ``(l+1) x (l+1)`` mask). Trains on CPU and GPU. No softcap (SDPA cannot express it).

Per-row pieces come from ``split`` (one backward ``cat``), never from slicing a large leaf per piece,
which would build a full-size zero gradient per piece.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_options, check_qkv, default_scaling


def _window_mask(n: int, window: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window)


def _sdpa(q, k, v, *, scale, window, dropout, gqa):
    n = q.shape[-2]
    if window is not None and n > window:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=_window_mask(n, window, q.device), dropout_p=dropout, scale=scale, enable_gqa=gqa
        )
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def sdpa_attention(query, key, value, layout, *, scaling=None, softcap=None, sliding_window=None, dropout=0.0):
    """``query (B,H,L,D)``, ``key/value (B,Hkv,L,D)`` -> ``(B,L,H,D)``."""
    B, H, Hkv, L, D = check_qkv(query, key, value, layout)
    check_options(softcap, sliding_window, dropout)
    if softcap is not None:
        raise ValueError("softcap is not supported by the 'sdpa' backend; use backend='flex' or 'reference'")
    scale = default_scaling(scaling, D)
    window = None if sliding_window is None else int(sliding_window)
    gqa = Hkv != H
    kw = dict(scale=scale, window=window, dropout=dropout, gqa=gqa)
    if layout.mask == "full" and window is None:
        return _sdpa(query, key, value, **kw).transpose(1, 2)

    # per-row segment lengths (host lists, computed once per batch in the layout)
    rows: list[list[int]] = [[] for _ in range(B)]
    anchors: list[list[bool]] = [[] for _ in range(B)]
    for n, r, a in zip(layout.seqlens_q, layout.seg_row, layout.seg_anchor):
        rows[r].append(n)
        anchors[r].append(a)
    outs = []
    for b in range(B):
        qs = query[b].split(rows[b], dim=1)
        ks = key[b].split(rows[b], dim=1)
        vs = value[b].split(rows[b], dim=1)
        # the anchor is always the row's first segment (index 0) in anchor mode
        qa, ka, va = qs[0], ks[0], vs[0]
        if qa.dtype in (torch.float16, torch.bfloat16):
            # the anchor's gradient sums one term per document: accumulate it in float32 (a half-precision
            # running sum over many documents loses several bits), rounding once at the end
            qa, ka, va = qa.float(), ka.float(), va.float()
        row_out = []
        for qi, ki, vi, a in zip(qs, ks, vs, anchors[b]):
            if a:
                o = _sdpa(
                    torch.cat([qa.to(qi.dtype), qi], dim=1)[None], torch.cat([ka.to(ki.dtype), ki], dim=1)[None],
                    torch.cat([va.to(vi.dtype), vi], dim=1)[None], **kw,
                )[0, :, 1:]
            else:
                o = _sdpa(qi[None], ki[None], vi[None], **kw)[0]
            row_out.append(o)
        outs.append(torch.cat(row_out, dim=1) if len(row_out) > 1 else row_out[0])
    return torch.stack(outs).transpose(1, 2)
