"""Blockwise ``scaled_dot_product_attention``: one square causal call per segment.

For a document segment in anchor mode the anchor's Q/K/V row is prepended, a square ``is_causal=True``
SDPA runs on ``[anchor] + document`` and the first output row is dropped. Extra memory is O(L) (the
gathered pieces); no L x L mask is ever built (a sliding window shorter than a segment builds that
segment's own ``(l+1) x (l+1)`` mask). Trains on CPU and GPU. No softcap (SDPA cannot express it).

Three implementations of the same computation:

* Compiled CPU kernel (``cpu_kernel``; float32/float64, and bfloat16/float16 with float32 products and
  sums; ``dropout == 0``, no effective sliding window, ``mask != "full"``): ``csrc/anchor_flash_cpu.cpp``
  runs the whole batch in one forward and one backward call per layer, reading Q/K/V without full-size
  copies; the anchor is one extra key of each document's query blocks, and key blocks end exactly at each
  query block's diagonal. JIT-built on first use; where it cannot be built (no compiler), the next path runs.
* Stock CPU path (same conditions): a custom autograd Function that calls the CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) per segment on
  ``[anchor] + document`` pieces (views of Q/K/V for segments without an anchor), writes outputs and
  gradients straight into preallocated ``(B, L, H, D)`` buffers and sums the anchor's dk/dv over documents
  in float32 (float64 for float64 inputs). No autograd graph of per-document ``cat``/slice nodes, hence no
  zero-filled full-size gradient per slice; GQA is handled by the kernel without repeating K/V.
* General path (CUDA, dropout, sliding window, ``"full"``): the same per-segment square causal SDPA via
  ``F.scaled_dot_product_attention`` and autograd. Per-row pieces come from ``split`` (one backward
  ``cat``), never from slicing a large leaf per piece, which would build a full-size zero gradient per
  piece.

Why the compiled kernel exists, and the stock-path variants measured and rejected: docs/architecture.md
("Measured and rejected") and docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernel
from ._common import Backend, check_options, check_qkv, default_scaling


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


_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _AnchorKernelCPU(torch.autograd.Function):
    """The compiled exact-tile kernel (``cpu_kernel``): one forward and one backward call per layer for the
    whole batch, Q/K/V read (no full-size copies) from their ``(B, L, H, D)`` views. Saves q, k, v, out and
    the ``(B, H, L)`` log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, segments, scale, kernel):
        qt, kt, vt = (_last_dim_contiguous(t.transpose(1, 2)) for t in (q, k, v))
        out, lse = kernel.forward(qt, kt, vt, segments, scale, cpu_kernel.Q_BLOCK, cpu_kernel.KV_BLOCK)
        ctx.save_for_backward(qt, kt, vt, out, lse, segments)
        ctx.scale, ctx.kernel = scale, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        qt, kt, vt, out, lse, segments = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(
            _last_dim_contiguous(dout), qt, kt, vt, out, lse, segments, ctx.scale,
            cpu_kernel.Q_BLOCK, cpu_kernel.KV_BLOCK,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _AnchorFlashCPU(torch.autograd.Function):
    """Square causal CPU flash attention per segment on gathered ``[anchor] + document`` rows.

    forward(q (B,H,L,D), k/v (B,Hkv,L,D), rows, scale) -> out (B,L,H,D).
    Saved: q, k, v, the output and each segment's logsumexp ``(1, H, n + a)``; a document's
    ``[anchor] + document`` pieces are rebuilt in backward one document at a time (peak extra memory is
    one document's pieces, not the row's). The dropped anchor row of every document's kernel output
    equals the anchor's own output ``out[b, 0]`` (a query that sees one key returns that key's value),
    so prepending ``out[b, 0]`` restores it exactly.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows, scale):
        B, H, L, D = q.shape
        out = q.new_empty(B, L, H, D)
        lses = []
        for b in range(B):
            for s, n, a in rows[b]:
                qs, ks, vs = _segment(b, s, n, a, q, k, v)
                o, lse = _flash_fwd(qs, ks, vs, 0.0, True, scale=scale)
                out[b, s:s + n] = o[0, :, a:].transpose(0, 1)  # drop the anchor's own row
                lses.append(lse)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.rows, ctx.scale = rows, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        rows, scale = ctx.rows, ctx.scale
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        dtype = q.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        dq = q.new_empty(B, L, H, D)
        dk = q.new_empty(B, L, Hkv, D)
        dv = q.new_empty(B, L, Hkv, D)
        out_t = out.transpose(1, 2)  # (B, H, L, D)
        i = 0
        for b in range(B):
            # the anchor's dk/dv sum one term per document: accumulate in float32 (float64), round once
            dk0 = torch.zeros(Hkv, D, dtype=acc, device=q.device)
            dv0 = torch.zeros(Hkv, D, dtype=acc, device=q.device)
            for s, n, a in rows[b]:
                lse = lses[i]
                i += 1
                if a:  # the anchor's own output row was dropped: its incoming gradient is zero
                    g = q.new_empty(1, n + 1, H, D)
                    g[0, 0] = 0
                    g[0, 1:] = dout[b, s:s + n]
                    g = g.transpose(1, 2)
                else:
                    g = dout[b:b + 1, s:s + n].to(dtype).transpose(1, 2)
                qs, ks, vs, os_ = _segment(b, s, n, a, q, k, v, out_t)
                gq, gk, gv = _flash_bwd(g, qs, ks, vs, os_, lse, 0.0, True, scale=scale)
                dq[b, s:s + n] = gq[0, :, a:].transpose(0, 1)
                dk[b, s:s + n] = gk[0, :, a:].transpose(0, 1)
                dv[b, s:s + n] = gv[0, :, a:].transpose(0, 1)
                if a:
                    dk0 += gk[0, :, 0]
                    dv0 += gv[0, :, 0]
            if any(seg[2] for seg in rows[b]):
                dk[b, 0] = (dk[b, 0].to(acc) + dk0).to(dtype)
                dv[b, 0] = (dv[b, 0].to(acc) + dv0).to(dtype)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


def _segment(b, s, n, a, *tensors):
    """``(1, h, n + a, D)`` pieces of ``(B, h, L, D)`` tensors: row ``b``, tokens ``s:s+n``, with the row's
    anchor (index 0) prepended when ``a`` (a copy of ``n + 1`` rows; otherwise a view)."""
    if a:
        return tuple(torch.cat([t[b:b + 1, :, :1], t[b:b + 1, :, s:s + n]], dim=2) for t in tensors)
    return tuple(t[b:b + 1, :, s:s + n] for t in tensors)


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
        kernel = cpu_kernel.get() if query.dtype in cpu_kernel.DTYPES else None
        if kernel is not None:
            return _AnchorKernelCPU.apply(query, key, value, layout.segment_table(), scale, kernel)
        return _AnchorFlashCPU.apply(query, key, value, layout.segment_plan(), scale)
    return _blockwise_sdpa(query, key, value, layout, scale=scale, window=window, dropout=dropout)


def _blockwise_sdpa(query, key, value, layout, *, scale, window, dropout):
    """The general path: per-segment ``F.scaled_dot_product_attention`` through autograd."""
    B, H = query.shape[:2]
    Hkv = key.shape[1]
    gqa = Hkv != H
    kw = {"scale": scale, "window": window, "dropout": dropout, "gqa": gqa}
    if layout.mask == "full" and window is None:
        return _sdpa(query, key, value, **kw).transpose(1, 2)

    # per-row segment lengths and anchor flags, from the plan cached on the layout (once per batch)
    plan = layout.segment_plan()
    rows = [[n for _, n, _ in segs] for segs in plan]
    anchors = [[bool(a) for _, _, a in segs] for segs in plan]
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


BACKEND = Backend(
    name="sdpa",
    fn=sdpa_attention,
    unavailable_reason=lambda device, dtype, options: (
        None if options.get("softcap") is None
        else "sdpa cannot apply softcap; using the dense reference backend (O(L^2) memory)"
    ),
    train_reason=lambda device: None,
    help="per-document causal SDPA (compiled CPU kernel on CPU): trains on CPU and GPU, O(L) memory, no softcap",
)
