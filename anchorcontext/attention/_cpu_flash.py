"""CPU fast path of the ``sdpa`` backend: the CPU flash kernel per segment, on views, with query chunks.

Called by :func:`anchorcontext.attention.sdpa.sdpa_attention` on CPU when there is no dropout, no
effective sliding window and the mask is not ``"full"``. A custom autograd Function calls
``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward directly.

**One contiguous copy, no per-document copies.** Q/K/V arrive as ``(B, H, L, D)`` views of ``(B, L, H, D)``
memory (what a transformers attention module passes). They are copied once into contiguous ``(B, H, L, D)``
buffers owned by this function (the kernel runs ~5-10% faster on per-head contiguous rows), and every kernel
call runs on views of those. A document at ``[s, s + n)`` needs the keys ``[anchor] + document``: instead of
concatenating them, the anchor's K/V row is written into row ``s - 1`` of the private K/V copies (the previous
segment's last token) for the duration of the document's calls and the old row is put back afterwards. The
query at row ``s - 1`` is computed too (it sees only the anchor) and dropped; in backward its incoming gradient
row is zeroed in a private copy of the gradient, so it contributes nothing. The caller's tensors are never
written.

**Query chunks.** The kernel skips causal work only in 512-key blocks, so a square causal call on
``n <= 512`` tokens costs the full ``n x n`` square. A document of ``SPLIT_MIN <= n <= SPLIT_MAX``
tokens is therefore cut into query chunks of ``CHUNK`` rows: chunk 0 is one square causal call on
``[anchor] + chunk``; chunk ``c >= 1`` is a causal square over its own rows plus an unmasked
rectangle over ``[anchor] + document[:c*CHUNK]``, merged by log-sum-exp. Backward calls the kernel's
backward per piece with the merged output and merged log-sum-exp (so each piece's softmax
probabilities are the global ones) and sums the pieces' gradients in float32 (float64 for float64
inputs). The window where this pays is narrow (see ``chunk_size``): the kernel-only saving is
1.2-1.5x for 200-1000-token documents, but the merges, the extra calls, the per-piece gradient
accumulation and their fresh buffers (memory traffic is expensive on the 2-core VM) take much of it back.
"""

from __future__ import annotations

import torch

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

#: documents with ``SPLIT_MIN <= n <= SPLIT_MAX`` tokens run in query chunks of ``CHUNK`` rows (see
#: ``chunk_size``). Module constants, read when a layout's plan is first built; the plan records each
#: segment's chunk length, so backward always follows the forward's pieces.
SPLIT_MIN = 320
SPLIT_MAX = 700
CHUNK = 256


def chunk_size(n: int) -> int:
    """Query-chunk length for a segment of ``n`` tokens (``n`` itself: one square causal call).

    Measured (2-core Xeon, fp32, 8 heads, D=64, 1 thread): per document, 256-row chunks are 1.0-1.24x
    faster (median ~1.12x) at 384-640 tokens; per packed 8K row (five lognormal layouts, interleaved with the
    unchunked path) +1.9 points of the FLOP-ratio limit on average, +4.7 on the three layouts richest in short
    documents; windows 200-1100 or 320-1400 and 128-row chunks were no better, 512-row chunks worse.
    """
    if n < SPLIT_MIN or n > SPLIT_MAX:
        return n
    return CHUNK


def plan(layout):
    """Per row, the segments ``(s, n, a, T)``: query start, length, 1 if the row's anchor is prepended,
    query-chunk length. Cached on the layout (per chunking constants), so all layers share it."""
    key = ("sdpa_cpu_plan", SPLIT_MIN, SPLIT_MAX, CHUNK)
    hit = layout._cache.get(key)
    if hit is None:
        rows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(layout.batch_size)]
        pos = [0] * layout.batch_size
        for n, r, a in zip(layout.seqlens_q, layout.seg_row, layout.seg_anchor):
            rows[r].append((pos[r], n, int(a), chunk_size(n)))
            pos[r] += n
        hit = tuple(tuple(r) for r in rows)
        layout._cache[key] = hit
    return hit


def _private(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that this function may write rows into (never the caller's memory)."""
    return t.contiguous() if not t.is_contiguous() else t.clone()


# ------------------------------------------------------------------------------------------- kernels
def _segment_forward(q, k, v, o, s, n, a, T, scale, lses):
    """One segment of row views ``(1, h, L, D)``; writes ``o[:, :, s:s+n]``, appends its LSEs."""
    lo, e = s - a, s + min(T, n)
    out0, lse0 = _fwd(q[:, :, lo:e], k[:, :, lo:e], v[:, :, lo:e], 0.0, True, scale=scale)
    o[:, :, s:e] = out0[:, :, a:]
    lses.append(lse0)
    for r0 in range(e, s + n, T):
        r1 = min(r0 + T, s + n)
        qc = q[:, :, r0:r1]
        o1, l1 = _fwd(qc, k[:, :, r0:r1], v[:, :, r0:r1], 0.0, True, scale=scale)
        o2, l2 = _fwd(qc, k[:, :, lo:r0], v[:, :, lo:r0], 0.0, False, scale=scale)
        lse = torch.logaddexp(l1, l2)
        w1 = (l1 - lse).exp_().unsqueeze(-1)
        w2 = (l2 - lse).exp_().unsqueeze(-1)
        o[:, :, r0:r1] = o1 * w1 + o2 * w2
        lses.append(lse)


def _segment_backward(g, q, k, v, o, dq, dk, dv, s, n, a, T, scale, lses, acc):
    """Backward of :func:`_segment_forward`; writes dq/dk/dv rows ``s:s+n``.
    Returns the anchor's ``(dk, dv)`` contribution ``(Hkv, D)`` when ``a``, else ``None``."""
    lo, e = s - a, s + min(T, n)
    gq, gk, gv = _bwd(g[:, :, lo:e], q[:, :, lo:e], k[:, :, lo:e], v[:, :, lo:e], o[:, :, lo:e], next(lses),
                      0.0, True, scale=scale)
    dq[:, :, s:e] = gq[:, :, a:]
    if e == s + n:  # one piece
        dk[:, :, s:e] = gk[:, :, a:]
        dv[:, :, s:e] = gv[:, :, a:]
        return (gk[0, :, 0], gv[0, :, 0]) if a else None
    Hkv, D = k.shape[1], k.shape[3]
    kacc = torch.zeros(1, Hkv, n + a, D, dtype=acc)
    vacc = torch.zeros(1, Hkv, n + a, D, dtype=acc)
    kacc[:, :, : e - lo] += gk
    vacc[:, :, : e - lo] += gv
    for r0 in range(e, s + n, T):
        r1 = min(r0 + T, s + n)
        lse = next(lses)
        gc, qc, oc = g[:, :, r0:r1], q[:, :, r0:r1], o[:, :, r0:r1]
        gq1, gk1, gv1 = _bwd(gc, qc, k[:, :, r0:r1], v[:, :, r0:r1], oc, lse, 0.0, True, scale=scale)
        gq2, gk2, gv2 = _bwd(gc, qc, k[:, :, lo:r0], v[:, :, lo:r0], oc, lse, 0.0, False, scale=scale)
        dq[:, :, r0:r1] = gq1.to(acc) + gq2
        kacc[:, :, r0 - lo : r1 - lo] += gk1
        vacc[:, :, r0 - lo : r1 - lo] += gv1
        kacc[:, :, : r0 - lo] += gk2
        vacc[:, :, : r0 - lo] += gv2
    dk[:, :, s : s + n] = kacc[:, :, a:]
    dv[:, :, s : s + n] = vacc[:, :, a:]
    return (kacc[0, :, 0], vacc[0, :, 0]) if a else None


class AnchorFlashCPU(torch.autograd.Function):
    """forward(q (B,H,L,D), k/v (B,Hkv,L,D), rows from :func:`plan`, scale) -> out (B,L,H,D).

    Saved: q, k, v, the output and each kernel call's (merged) log-sum-exp.
    """

    @staticmethod
    def forward(ctx, q, k, v, rows, scale):
        B, H, L, D = q.shape
        q, kw, vw = q.contiguous(), _private(k), _private(v)  # q is only read
        # (B, H, L, D) like the kernel's own outputs (no transposing copies); returned as a (B, L, H, D)
        # view, exactly as F.scaled_dot_product_attention(...).transpose(1, 2) would be
        out = q.new_empty(B, H, L, D)
        lses: list[torch.Tensor] = []
        for b in range(B):
            qb, kb, vb, ob = q[b : b + 1], kw[b : b + 1], vw[b : b + 1], out[b : b + 1]
            for s, n, a, T in rows[b]:
                if a and s > 1:  # the anchor into row s - 1 (for s == 1 it is there already)
                    targets = [(kb, (0, slice(None), s - 1), kb[0, :, 0]), (vb, (0, slice(None), s - 1), vb[0, :, 0])]
                    _with_rows(targets, _segment_forward, qb, kb, vb, ob, s, n, a, T, scale, lses)
                else:
                    _segment_forward(qb, kb, vb, ob, s, n, a, T, scale, lses)
        ctx.save_for_backward(q, kw, vw, out, *lses)  # the private copies, restored row by row above
        ctx.rows, ctx.scale = rows, scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        rows, scale = ctx.rows, ctx.scale
        B, H, L, D = q.shape
        Hkv, dtype = k.shape[1], q.dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if dout.dtype != dtype:
            dout = dout.to(dtype)
        kw, vw = k, v  # forward's private copies
        gw = _private(dout.transpose(1, 2))  # (B, H, L, D): rows of it are zeroed below
        dq = q.new_empty(B, L, H, D)
        dk = q.new_empty(B, L, Hkv, D)
        dv = q.new_empty(B, L, Hkv, D)
        # the kernel's gradients come in (B, L, H, D) memory order: same-order copies into dq/dk/dv
        dqh, dkh, dvh = (t.transpose(1, 2) for t in (dq, dk, dv))
        it = iter(lses)
        zero = torch.zeros(H, D, dtype=dtype)
        for b in range(B):
            qb, kb, vb, ob, gb = q[b : b + 1], kw[b : b + 1], vw[b : b + 1], out[b : b + 1], gw[b : b + 1]
            views = (gb, qb, kb, vb, ob, dqh[b : b + 1], dkh[b : b + 1], dvh[b : b + 1])
            k0 = torch.zeros(Hkv, D, dtype=acc)
            v0 = torch.zeros(Hkv, D, dtype=acc)
            for s, n, a, T in rows[b]:
                if a:  # zero the dropped query row's gradient; the anchor into row s - 1 of K/V
                    targets = [(gb, (0, slice(None), s - 1), zero)]
                    if s > 1:
                        targets += [(kb, (0, slice(None), s - 1), kb[0, :, 0]), (vb, (0, slice(None), s - 1), vb[0, :, 0])]
                    got = _with_rows(targets, _segment_backward, *views, s, n, a, T, scale, it, acc)
                    k0 += got[0]
                    v0 += got[1]
                else:
                    _segment_backward(*views, s, n, a, T, scale, it, acc)
            if any(seg[2] for seg in rows[b]):
                dk[b, 0] = (dk[b, 0].to(acc) + k0).to(dtype)
                dv[b, 0] = (dv[b, 0].to(acc) + v0).to(dtype)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None


def _with_rows(targets, fn, *args):
    """Run ``fn(*args)`` with each ``(tensor, index, value)`` row written, restored afterwards."""
    saved = [t[i].clone() for t, i, _ in targets]
    try:
        for t, i, val in targets:
            t[i] = val
        return fn(*args)
    finally:
        for (t, i, _), old in zip(reversed(targets), reversed(saved)):
            t[i] = old
