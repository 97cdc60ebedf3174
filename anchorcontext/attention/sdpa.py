"""Blockwise ``scaled_dot_product_attention``: one square causal call per segment.

For a document segment in anchor mode the anchor's Q/K/V row is prepended, a square ``is_causal=True``
SDPA runs on ``[anchor] + document`` and the first output row is dropped. Extra memory is O(L) (the
gathered pieces); no L x L mask is ever built (a sliding window shorter than a segment builds that
segment's own ``(l+1) x (l+1)`` mask). Trains on CPU and GPU. No softcap (SDPA cannot express it).

Two implementations of the same computation:

* CPU fast path (``dropout == 0``, no effective sliding window, ``mask != "full"``): a custom autograd
  Function that gathers ``[anchor] + document`` Q/K/V rows once per row (``index_select`` with the
  layout's segment order), calls the CPU flash kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) on views of the gathered
  tensors, writes outputs and gradients straight into preallocated ``(B, L, H, D)`` buffers and sums the
  anchor's dk/dv over documents in float32 (float64 for float64 inputs). No per-document ``cat``, no
  zero-filled full-size gradient per slice; GQA is handled by the kernel without repeating K/V.
* General path (CUDA, dropout, sliding window, ``"full"``): the same per-segment square causal SDPA via
  ``F.scaled_dot_product_attention`` and autograd. Per-row pieces come from ``split`` (one backward
  ``cat``), never from slicing a large leaf per piece, which would build a full-size zero gradient per
  piece.

Why not finer pieces on CPU: the CPU flash kernel skips causal work only in 512-key blocks, so a
document of ``n <= 512`` tokens costs a full ``n x n`` square. Splitting documents into query chunks
(a causal diagonal plus an unmasked prefix rectangle, merged by log-sum-exp) was measured on the 2-core
Xeon (torch 2.13, fp32, 1 thread): the kernel time saved on 600-2000-token documents is lost again in
merges and smaller, less efficient kernel calls, and for larger documents the chunked kernels are
slower than one square call. See ``benchmarks/attention.py`` for the measured fraction of the
FLOP-ratio limit.
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


_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _cpu_plan(layout):
    """Per row: segments ``(s, n, a, ks)`` (query start, length, 1 if the anchor is prepended, start in
    the gathered keys) and the gather index ``(L + num_anchored_docs,)`` (``None``: identity). Cached on
    the layout, so all layers of a forward share it."""
    key = ("sdpa_cpu_plan",)
    hit = layout._cache.get(key)
    if hit is None:
        B = layout.batch_size
        rows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(B)]
        gather: list[list[torch.Tensor]] = [[] for _ in range(B)]
        pos, kpos = [0] * B, [0] * B
        for n, r, a in zip(layout.seqlens_q, layout.seg_row, layout.seg_anchor):
            a = int(a)
            rows[r].append((pos[r], n, a, kpos[r]))
            if a:
                gather[r].append(torch.zeros(1, dtype=torch.int64))  # the row's anchor, index 0
            gather[r].append(torch.arange(pos[r], pos[r] + n))
            pos[r] += n
            kpos[r] += n + a
        index = tuple(
            torch.cat(g).to(layout.doc_ids.device) if any(seg[2] for seg in rows[b]) else None
            for b, g in enumerate(gather)
        )
        hit = (tuple(tuple(r) for r in rows), index)
        layout._cache[key] = hit
    return hit


class _AnchorFlashCPU(torch.autograd.Function):
    """Square causal CPU flash attention per segment on gathered ``[anchor] + document`` rows.

    forward(q (B,H,L,D), k/v (B,Hkv,L,D), rows, index, scale) -> out (B,L,H,D).
    Saved: q, k, v, the output and each segment's logsumexp ``(1, H, n + a)``; the gathered rows are
    rebuilt in backward (one ``index_select`` each) instead of being kept alive between passes. The
    dropped anchor row of every document's kernel output equals the anchor's own output ``out[b, 0]``
    (a query that sees one key returns that key's value), so gathering ``out`` restores it exactly.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows, index, scale):
        B, H, L, D = q.shape
        out = q.new_empty(B, L, H, D)
        lses = []
        for b in range(B):
            qg, kg, vg = _gather_row(b, index, q, k, v)
            for s, n, a, ks in rows[b]:
                sl = slice(ks, ks + n + a)
                o, lse = _flash_fwd(qg[None, :, sl], kg[None, :, sl], vg[None, :, sl], 0.0, True, scale=scale)
                out[b, s:s + n] = o[0, :, a:].transpose(0, 1)  # drop the anchor's own row
                lses.append(lse)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.rows, ctx.index, ctx.scale = rows, index, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        rows, index, scale = ctx.rows, ctx.index, ctx.scale
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
            qg, kg, vg, og = _gather_row(b, index, q, k, v, out_t)
            # the anchor's dk/dv sum one term per document: accumulate in float32 (float64), round once
            dk0 = torch.zeros(Hkv, D, dtype=acc, device=q.device)
            dv0 = torch.zeros(Hkv, D, dtype=acc, device=q.device)
            for s, n, a, ks in rows[b]:
                lse = lses[i]
                i += 1
                if a:  # the anchor's own output row was dropped: its incoming gradient is zero
                    g = q.new_empty(1, n + 1, H, D)
                    g[0, 0] = 0
                    g[0, 1:] = dout[b, s:s + n]
                    g = g.transpose(1, 2)
                else:
                    g = dout[b:b + 1, s:s + n].to(dtype).transpose(1, 2)
                sl = slice(ks, ks + n + a)
                gq, gk, gv = _flash_bwd(g, qg[None, :, sl], kg[None, :, sl], vg[None, :, sl], og[None, :, sl], lse,
                                        0.0, True, scale=scale)
                dq[b, s:s + n] = gq[0, :, a:].transpose(0, 1)
                dk[b, s:s + n] = gk[0, :, a:].transpose(0, 1)
                dv[b, s:s + n] = gv[0, :, a:].transpose(0, 1)
                if a:
                    dk0 += gk[0, :, 0]
                    dv0 += gv[0, :, 0]
            if index[b] is not None:
                dk[b, 0] = (dk[b, 0].to(acc) + dk0).to(dtype)
                dv[b, 0] = (dv[b, 0].to(acc) + dv0).to(dtype)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None


def _gather_row(b, index, *tensors):
    """Row ``b`` of each ``(B, h, L, D)`` tensor as ``(h, L + num_anchored_docs, D)`` in segment order."""
    if index[b] is None:
        return tuple(t[b] for t in tensors)
    return tuple(t[b].index_select(1, index[b]) for t in tensors)


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
        rows, index = _cpu_plan(layout)
        return _AnchorFlashCPU.apply(query, key, value, rows, index, scale)
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
                o = _sdpa(qi[None], ki[None], vi[None], **kw)[0]
            row_out.append(o)
        outs.append(torch.cat(row_out, dim=1) if len(row_out) > 1 else row_out[0])
    return torch.stack(outs).transpose(1, 2)
