"""Gather-free varlen anchor attention: documents as plain varlen segments, the anchor merged through the LSE.

The gather path (:mod:`.varlen`) copies ``[anchor] + document`` K/V rows every layer. Here the kernel runs
the packed row as-is (``cu_seqlens_q == cu_seqlens_k``, causal) and returns its log-sum-exp; the anchor is
one extra key per query, merged by ``lse = logaddexp(lse_doc, s_anchor)`` and
``out = exp(lse_doc - lse) * out_doc + exp(s_anchor - lse) * v_anchor``. The first document's segment starts
at the row's index 0 (``[anchor] + document 1``), so it sees the anchor inside the kernel and is not merged.

Backward (the ring-attention recipe): the kernel's backward gets the *merged* output and LSE, so its
probabilities and ``rowsum(dO * O)`` are those of the whole softmax; the anchor's dq/dk/dv terms are added by
hand (float32 accumulation). torch's autograd for ``varlen_attn`` drops the gradient of its LSE, hence one
``autograd.Function`` around the raw kernel calls.

Kernel: ``torch.ops.aten._flash_attention_forward/_backward`` (the flash kernel ``varlen_attn`` calls; calling
it directly pins flash, never cuDNN). Schemas checked in torch 2.13 (installed here) and in pytorch's
``torch/nn/attention/varlen.py`` at commit 000459dc (the k_cache-era API; the GPU image has 2.11, not checked
directly): same positional arguments and ``scale``/``window_size_left``/``window_size_right`` keywords, LSE
``(H, total_q)`` float32 (ROCm pads it: refused below). The kernel is the module's ``KERNEL`` object (its
``forward``, ``backward`` and ``unavailable_reason``); tests set it to a stand-in with the same (out, lse) semantics
(``tests/varlen_kernel_standin.py``).

Selection per call: :func:`selected` (``ANCHORCONTEXT_VARLEN_IMPL=gather|merge`` or :func:`use_impl`); the
default stays ``gather`` until a GPU run measures both.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ._common import check_options, check_qkv, default_scaling

ENV = "ANCHORCONTEXT_VARLEN_IMPL"
IMPLS = ("gather", "merge")
_IMPL_OVERRIDE: str | None = None  # set by use_impl (benchmarks time both side by side)


def impl() -> str:
    """The varlen implementation chosen now: :func:`use_impl`'s, else ``$ANCHORCONTEXT_VARLEN_IMPL``, else gather."""
    name = _IMPL_OVERRIDE if _IMPL_OVERRIDE is not None else os.environ.get(ENV, "gather")
    if name not in IMPLS:
        raise ValueError(f"{ENV}={name!r} is invalid: use one of {IMPLS}")
    return name


@contextlib.contextmanager
def use_impl(name: str):
    """Run the enclosed varlen calls with implementation ``name`` (``gather`` or ``merge``)."""
    global _IMPL_OVERRIDE
    if name not in IMPLS:
        raise ValueError(f"impl={name!r} is invalid: use one of {IMPLS}")
    old, _IMPL_OVERRIDE = _IMPL_OVERRIDE, name
    try:
        yield
    finally:
        _IMPL_OVERRIDE = old


def selected(layout, softcap=None, dropout=0.0) -> bool:
    """Whether ``backend='varlen'`` should take this path: merge chosen, anchor mask (the only mask with a
    gather), no softcap or dropout (the torch flash kernel has neither; the gather path handles or refuses them)."""
    return impl() == "merge" and layout.kv_index is not None and softcap is None and not dropout


# ---------------------------------------------------------------------------------------------- kernel
class TorchFlashKernel:
    """torch's flash varlen kernel through its aten ops. ``window`` is ``None`` or the HF window ``W``."""

    name = "torch_flash"

    @staticmethod
    def unavailable_reason(device: torch.device, dtype=None) -> str | None:
        """Why the kernel cannot run on ``device`` with ``dtype`` inputs (``None`` when it can)."""
        if device.type != "cuda":
            return f"the varlen merge path needs CUDA tensors (device is {device.type})"
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            return f"the flash kernel takes float16/bfloat16 inputs, got {dtype}"
        return None

    @staticmethod
    def _args(window):  # varlen_attn's own convention: causal = window (-1, 0); a window (W - 1, 0) is local
        if window is None:
            return True, -1, 0
        return False, window - 1, 0

    def forward(self, q, k, v, cu, max_len, scale, window):
        causal, left, right = self._args(window)
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, causal, False,
            scale=scale, window_size_left=left, window_size_right=right,
        )
        if lse.shape != (q.shape[1], q.shape[0]):
            raise RuntimeError(f"varlen merge: kernel LSE of shape {tuple(lse.shape)}, expected (H, total) = "
                               f"{(q.shape[1], q.shape[0])} (ROCm's padded layout is not supported)")
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu, max_len, scale, window):
        causal, left, right = self._args(window)
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: what varlen_attn passes too
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, causal, rng, torch.empty(0, device=q.device),
            scale=scale, window_size_left=left, window_size_right=right,
        )


# The kernel the merge path calls: ``forward``, ``backward`` and ``unavailable_reason`` as above (tests substitute a
# stand-in with the same semantics).
KERNEL = TorchFlashKernel()


def unavailable_reason(device: torch.device, dtype=None) -> str | None:
    """Why the merge path cannot run here (``None`` when it can): :data:`KERNEL`'s answer."""
    return KERNEL.unavailable_reason(device, dtype)


# ------------------------------------------------------------------------------------------------ plan
def merge_plan(layout, window: int | None):
    """``(cu_seqlens, max_seqlen, merge)``, cached on the layout per window: the kernel's segments (in anchor mode
    the row's anchor joined to document 1, every other segment as in the layout) and the ``(B*L,)`` bool mask of
    the queries that take the anchor by merge (documents 2.. whose anchor is inside the window; ``None`` for
    ``intra_doc``/``full``)."""
    return layout.cached(("varlen_merge_plan", window), lambda: _build_merge_plan(layout, window))


def _build_merge_plan(layout, window: int | None):
    if layout.kv_index is None:  # intra_doc / full: the layout's own segments, nothing to merge
        return layout.cu_seqlens_q, layout.max_seqlen_q, None
    doc = layout.doc_ids.reshape(-1)
    B, L = layout.doc_ids.shape
    lens: list[int] = []
    offset = 0
    for s, n in enumerate(layout.seqlens_q):
        # segment s - 1 is a row's anchor alone and s is document 1 of the same row: one segment [anchor, doc 1]
        if s > 0 and layout.seg_anchor[s] and (offset - 1) % L == 0 and layout.seg_row[s - 1] == layout.seg_row[s]:
            lens[-1] += n
        else:
            lens.append(n)
        offset += n
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    cu = cu.to(doc.device)
    merge = doc > 1
    if window is not None:
        seg_start = torch.repeat_interleave(layout.cu_seqlens_q[:-1].to(torch.int64),
                                            torch.tensor(layout.seqlens_q, device=doc.device), output_size=B * L)
        local = torch.arange(B * L, device=doc.device) - seg_start  # offset within the document
        merge = merge & (local + 1 < window)
    return cu, max(lens), merge


# ------------------------------------------------------------------------------------------- autograd
def _acc(dtype: torch.dtype) -> torch.dtype:
    """The merge's math dtype: float32 (float64 inputs stay float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _MergeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, merge, B, scale, window, kern):
        T, H, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        acc = _acc(q.dtype)
        out_d, lse_d = kern.forward(q, k, v, cu, max_len, scale, window)
        ctx.max_len, ctx.B, ctx.scale, ctx.window, ctx.kern = max_len, B, scale, window, kern
        if merge is None:  # no anchor key: the kernel's own output and LSE
            ctx.save_for_backward(q, k, v, out_d, lse_d, None, cu)
            return out_d
        # Memory traffic matters here (these passes are bandwidth-bound beside the kernel): products of
        # half-precision tensors run in their dtype with float32 accumulation (matmuls), elementwise merges promote
        # to float32 without a float32 copy of q or out.
        ka = k.view(B, -1, Hkv, D)[:, 0]  # (B, Hkv, D): each row's anchor key and value
        va = v.view(B, -1, Hkv, D)[:, 0]
        q5 = q.view(B, -1, Hkv, G, D)
        s = torch.einsum("blhgd,bhd->blhg", q5, ka).reshape(T, H).to(acc) * scale
        s = s.masked_fill(~merge[:, None], float("-inf"))
        lse_dt = lse_d.transpose(0, 1).to(acc)  # (T, H)
        lse = torch.logaddexp(lse_dt, s)
        w_d, p_a = torch.exp(lse_dt - lse), torch.exp(s - lse)
        out = out_d * w_d[..., None]  # promoted to acc
        out.view(B, -1, Hkv, G, D).addcmul_(p_a.view(B, -1, Hkv, G, 1), va.to(acc)[:, None, :, None, :])
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse.transpose(0, 1).contiguous(), p_a, cu)  # LSE as the kernel's (H, T)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, p_a, cu = ctx.saved_tensors
        B, scale = ctx.B, ctx.scale
        T, H, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        acc = _acc(q.dtype)
        dout = dout.contiguous()
        dq, dk, dv = ctx.kern.backward(dout, q, k, v, out, lse, cu, ctx.max_len, scale, ctx.window)
        if p_a is None:
            return dq, dk, dv, None, None, None, None, None, None, None
        # the anchor key's terms: dS = P (dP - rowsum(dO * O)); float32 accumulation, as in forward
        ka = k.view(B, -1, Hkv, D)[:, 0]
        va = v.view(B, -1, Hkv, D)[:, 0]
        do5 = dout.view(B, -1, Hkv, G, D)
        delta = torch.mul(dout, out).sum(-1, dtype=acc).view(B, -1, Hkv, G)
        pa = p_a.view(B, -1, Hkv, G)
        dp = torch.einsum("blhgd,bhd->blhg", do5, va).to(acc)
        ds = pa * (dp - delta)
        dq = torch.addcmul(dq.reshape(B, -1, Hkv, G, D), ds[..., None], scale * ka.to(acc)[:, None, :, None, :])
        dq = dq.reshape(T, H, D).to(q.dtype)
        q5 = q.view(B, -1, Hkv, G, D)
        dk_a = scale * torch.einsum("blhg,blhgd->bhd", ds.to(q.dtype), q5).to(acc)
        dv_a = torch.einsum("blhg,blhgd->bhd", pa.to(q.dtype), do5).to(acc)
        dk, dv = dk.contiguous(), dv.contiguous()  # the kernel's fresh gradients, updated in place
        dk5, dv5 = dk.view(B, -1, Hkv, D), dv.view(B, -1, Hkv, D)
        dk5[:, 0] = (dk5[:, 0].to(acc) + dk_a).to(dk.dtype)  # one rounding of the anchor's whole gradient
        dv5[:, 0] = (dv5[:, 0].to(acc) + dv_a).to(dv.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_merge_attention(query, key, value, layout, *, scaling=None, softcap=None, sliding_window=None,
                           dropout=0.0):
    """``query (B,H,L,D)``, ``key/value (B,Hkv,L,D)`` -> ``(B,L,H,D)``; any mask (only ``anchor`` merges)."""
    B, H, Hkv, L, D = check_qkv(query, key, value, layout)
    check_options(softcap, sliding_window, dropout)
    if softcap is not None or dropout:
        raise ValueError(f"the varlen merge path has no softcap or dropout (softcap={softcap}, dropout={dropout}): "
                         f"use {ENV}=gather")
    reason = unavailable_reason(query.device, query.dtype)
    if reason is not None:
        raise ValueError(f"backend='varlen' (merge) cannot run: {reason}")
    window = None if sliding_window is None else int(sliding_window)
    layout = layout.to(query.device)
    cu, max_len, merge = merge_plan(layout, window)
    q = query.transpose(1, 2).reshape(B * L, H, D)
    k = key.transpose(1, 2).reshape(B * L, Hkv, D)
    v = value.transpose(1, 2).reshape(B * L, Hkv, D)
    out = _MergeFn.apply(q, k, v, cu, max_len, merge, B, default_scaling(scaling, D), window, KERNEL)
    return out.reshape(B, L, H, D)
