"""Blockwise ``scaled_dot_product_attention``: one square causal call per segment.

For a document segment in anchor mode the anchor's Q/K/V row is prepended, a square ``is_causal=True``
SDPA runs on ``[anchor] + document`` and the first output row is dropped. Extra memory is O(L) (the
gathered pieces, or on CPU one private copy of Q/K/V); no L x L mask is ever built (a sliding window shorter than a segment builds that
segment's own ``(l+1) x (l+1)`` mask). Trains on CPU and GPU. No softcap (SDPA cannot express it).

Two implementations of the same computation:

* CPU fast path (``dropout == 0``, no effective sliding window, ``mask != "full"``): a custom autograd
  Function in ``_cpu_flash.py`` that calls the CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward) on views of one contiguous private copy of Q/K/V (the anchor's K/V row written into the
  row before each document for its calls), cuts 320-700-token documents into query chunks merged by
  log-sum-exp, writes outputs and gradients straight into preallocated buffers and sums the anchor's dk/dv
  over documents in float32 (float64 for float64 inputs). GQA is handled by the kernel without repeating K/V.
* General path (CUDA, dropout, sliding window, ``"full"``): the same per-segment square causal SDPA via
  ``F.scaled_dot_product_attention`` and autograd. Per-row pieces come from ``split`` (one backward
  ``cat``), never from slicing a large leaf per piece, which would build a full-size zero gradient per
  piece.

CPU speed is bounded by the kernel (docs/performance.md, "CPU attention kernel alone"): it skips causal
work only in 512-key blocks, so per useful (query, key) pair a square causal call costs ~2x the full 8K
causal call at 256-512 tokens, ~1.4x at 1K, ~1.2x at 2K, while an unmasked rectangle costs ~0.85x. The
fast path's choices were each measured interleaved against the previous version on the same rows (8K, five
layouts, 2-core Xeon, fp32, 1 thread): one contiguous copy instead of per-document ``cat`` copies, +1.6
points of the FLOP-ratio limit on average; chunking 320-700-token documents, +1.9 more; wider chunk
windows or 128/512-row chunks, no better; an unfused matmul+softmax for short documents, 1.3-2.6x slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_options, check_qkv, default_scaling
from ._cpu_flash import AnchorFlashCPU, plan


def _band_mask(nq: int, nk: int, q0: int, window: int, device) -> torch.Tensor:
    """``(nq, nk)`` bool: query ``q0 + i`` may see key ``j`` iff ``0 <= q0 + i - j < window``."""
    dist = (torch.arange(nq, device=device) + q0)[:, None] - torch.arange(nk, device=device)[None, :]
    return (dist >= 0) & (dist < window)


def _sdpa(q, k, v, *, scale, window, dropout, gqa):
    """Causal SDPA over one segment ``(..., n, D)``, optionally with a sliding window (``q - k < window``).

    A window shorter than the segment runs query chunks of ``window`` rows against their own key band
    (at most ``2 * window - 1`` keys), so the mask is never ``n x n``: O(n * window) memory.
    """
    n = q.shape[-2]
    kw = dict(dropout_p=dropout, scale=scale, enable_gqa=gqa)
    if window is None or n <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    if n <= 2 * window:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_band_mask(n, n, 0, window, q.device), **kw)
    outs = []
    for s, qc in zip(range(0, n, window), q.split(window, dim=-2)):
        ks = max(0, s - window + 1)
        e = s + qc.shape[-2]
        mask = _band_mask(qc.shape[-2], e - ks, s - ks, window, q.device)
        outs.append(F.scaled_dot_product_attention(qc, k[..., ks:e, :], v[..., ks:e, :], attn_mask=mask, **kw))
    return torch.cat(outs, dim=-2)


def sdpa_attention(query, key, value, layout, *, scaling=None, softcap=None, sliding_window=None, dropout=0.0):
    """``query (B,H,L,D)``, ``key/value (B,Hkv,L,D)`` -> ``(B,L,H,D)``."""
    *_, D = check_qkv(query, key, value, layout)
    check_options(softcap, sliding_window, dropout)
    if softcap is not None:
        raise ValueError("softcap is not supported by the 'sdpa' backend; use backend='flex' or 'reference'")
    scale = default_scaling(scaling, D)
    window = None if sliding_window is None else int(sliding_window)
    if window is not None and window > layout.max_seqlen_q:
        window = None  # longer than every segment run ([anchor] + document has <= max_seqlen_q + 1 tokens)
    if query.device.type == "cpu" and not dropout and window is None and layout.mask != "full":
        return AnchorFlashCPU.apply(query, key, value, plan(layout), scale)
    return _blockwise_sdpa(query, key, value, layout, scale=scale, window=window, dropout=dropout)


def _blockwise_sdpa(query, key, value, layout, *, scale, window, dropout):
    """The general path: per-segment ``F.scaled_dot_product_attention`` through autograd."""
    B, H = query.shape[:2]
    Hkv = key.shape[1]
    gqa = Hkv != H
    kw = {"scale": scale, "window": window, "dropout": dropout, "gqa": gqa}
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
                if layout.mask == "anchor":
                    # the anchor's own token and padding: SDPA would save these views for backward and keep the
                    # whole layer's Q/K/V alive (the documents use concatenated copies); copies are tiny
                    qi, ki, vi = qi.clone(), ki.clone(), vi.clone()
                o = _sdpa(qi[None], ki[None], vi[None], **kw)[0]
            row_out.append(o)
        outs.append(torch.cat(row_out, dim=1) if len(row_out) > 1 else row_out[0])
    return torch.stack(outs).transpose(1, 2)
