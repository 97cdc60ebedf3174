"""Varlen backend: flash-attn's ``flash_attn_varlen_func`` or torch's ``varlen_attn`` on gathered K/V.

Queries are flattened to ``(B*L, H, D)``. In anchor mode K/V are gathered with ``layout.kv_index``
(``(total_k,)``), so each document's key segment is ``[anchor] + document`` and
``cu_seqlens_k != cu_seqlens_q``; both kernels align causal masks bottom-right, so query ``i`` sees the
anchor plus the document's tokens ``0..i``. ``index_select``'s backward sums the anchor's gradient
over documents. Sliding window ``W`` maps to flash-attn's ``window_size=(W - 1, 0)`` in the local
frame of ``[anchor] + document`` (the convention :func:`anchorcontext.layout.dense_mask` specifies).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math

import torch

from . import varlen_merge
from ._common import Backend, check_options, check_qkv, default_scaling

logger = logging.getLogger(__name__)

# Tests may set this to a stand-in with flash-attn's documented semantics (see tests/flash_standin.py).
_KERNEL_OVERRIDE = None


@functools.cache
def _params(fn) -> frozenset[str]:
    """Parameter names of a kernel (cached: the signature is inspected once, not per layer)."""
    return frozenset(inspect.signature(fn).parameters)


@functools.cache
def _import_flash_attn():
    # cached: a failed import is retried by Python on every call (~40 us), and this runs per layer
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as e:  # ImportError, or a broken CUDA build
        return None, f"flash-attn not importable ({type(e).__name__}: {e})"
    return flash_attn_varlen_func, "flash_attn"


def flash_varlen_kernel():
    """``(kernel, source)``: flash-attn's ``flash_attn_varlen_func`` (or the test override), else ``(None, reason)``."""
    if _KERNEL_OVERRIDE is not None:
        return _KERNEL_OVERRIDE, "override"
    return _import_flash_attn()


@functools.cache
def torch_varlen_func():
    """torch's ``varlen_attn`` or ``None`` with the reason."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:
        return None, f"torch.nn.attention.varlen.varlen_attn unavailable in torch {torch.__version__} ({e})"
    return varlen_attn, "torch"


def pin_flash():
    """A context pinning torch's ``varlen_attn`` to its flash kernel. torch >= the 2026-08 varlen selector (pytorch
    #193631) honours ``sdpa_kernel`` and may otherwise prefer cuDNN, reported silently wrong on unaligned inputs
    (#194818); torch 2.13 (and pytorch at 000459dc) always run flash (``_should_use_cudnn`` returns False) and
    ignore the context.

    Entered per call, around ``varlen_attn`` only: held across layers it would also restrict every other SDPA call of
    the model to flash (a call flash cannot serve would raise). The autograd backward runs after the context has
    exited, so a selector that chooses again there is not pinned (``tests/gpu`` checks both directions run flash)."""
    sdpa_kernel, flash_only = _flash_pin_args()
    return sdpa_kernel(flash_only)


@functools.cache
def _flash_pin_args():
    # imported and built once (this runs per layer); sdpa_kernel copies the list, never mutates it
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel, [SDPBackend.FLASH_ATTENTION]


def torch_varlen_cudnn_possible(device: torch.device) -> bool:
    """Whether torch's own varlen selector could pick cuDNN on ``device`` without :func:`pin_flash` (for tests)."""
    import torch.nn.attention.varlen as tv

    if hasattr(tv, "_select_backend"):
        return True
    should = getattr(tv, "_should_use_cudnn", None)
    return bool(should is not None and device.type == "cuda" and should(device.index or 0))


HALF_DTYPES = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device, softcap=None, dropout=0.0, sliding_window=None, dtype=None) -> str | None:
    """Why the varlen backend cannot run here (``None`` when it can). ``dtype`` is the inputs' dtype:
    both kernels take float16/bfloat16 only (the test override takes any)."""
    if _KERNEL_OVERRIDE is not None:
        return None
    fn, why = flash_varlen_kernel()
    if device.type != "cuda":
        return f"varlen needs CUDA tensors ({why}; device is {device.type})"
    if dtype is not None and dtype not in HALF_DTYPES:
        return f"varlen kernels take float16/bfloat16 inputs, got {dtype}"
    if fn is not None:
        return None
    tfn, twhy = torch_varlen_func()
    if tfn is None:
        return f"{why}; {twhy}"
    if softcap is not None:
        return "torch varlen_attn has no softcap (install flash-attn for it)"
    if dropout:
        return "torch varlen_attn has no dropout (install flash-attn for it)"
    if sliding_window is not None and "window_size" not in _params(tfn):
        return f"torch {torch.__version__} varlen_attn has no window_size (a newer torch or flash-attn has it)"
    return None


def _torch_varlen_call(fn, q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, H, Hkv):
    params = _params(fn)
    kw = {}
    if "scale" in params:
        kw["scale"] = scale
    else:  # torch 2.10: no scale argument; the kernel uses 1/sqrt(D), so fold the ratio into q
        q = q * (scale * math.sqrt(q.shape[-1]))
    win = (-1, 0) if window is None else (window - 1, 0)
    if "window_size" in params:
        kw["window_size"] = win
        if "is_causal" in params:
            kw["is_causal"] = True
    else:
        if window is not None:
            raise ValueError(
                f"torch {torch.__version__} varlen_attn has no window_size: sliding_window={window} unsupported"
            )
        kw["is_causal"] = True
    if Hkv != H:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
    with pin_flash():  # torch may pick cuDNN (wrong on unaligned inputs, pytorch #194818)
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward sums repeated rows in float32.

    The anchor's K/V row is gathered once per document; with hundreds of documents a bf16 ``index_add``
    (``index_select``'s own backward) loses the anchor's dk/dv to rounding (seen on an H100: 9x the bf16
    reference's error with 269 documents).
    """

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        acc = torch.float32 if ctx.dtype in (torch.float16, torch.bfloat16) else ctx.dtype
        out = torch.zeros(ctx.shape, dtype=acc, device=grad.device)
        out.index_add_(0, index, grad.to(acc))
        return out.to(ctx.dtype), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` (``(total_k, Hkv, D)``); repeated rows' gradients are summed in float32."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, index)
    return x.index_select(0, index)


def varlen_attention(query, key, value, layout, *, scaling=None, softcap=None, sliding_window=None, dropout=0.0):
    """``query (B,H,L,D)``, ``key/value (B,Hkv,L,D)`` -> ``(B,L,H,D)``."""
    B, H, Hkv, L, D = check_qkv(query, key, value, layout)
    check_options(softcap, sliding_window, dropout)
    if varlen_merge.selected(layout, softcap, dropout):  # the gather-free path (ANCHORCONTEXT_VARLEN_IMPL=merge)
        return varlen_merge.varlen_merge_attention(query, key, value, layout, scaling=scaling, sliding_window=sliding_window)
    window = None if sliding_window is None else int(sliding_window)
    reason = unavailable_reason(query.device, softcap, dropout, window, query.dtype)
    if reason is not None:  # before any gather
        raise ValueError(f"backend='varlen' cannot run: {reason}")
    layout = layout.to(query.device)
    scale = default_scaling(scaling, D)
    q = query.transpose(1, 2).reshape(B * L, H, D)
    k = key.transpose(1, 2).reshape(B * L, Hkv, D)
    v = value.transpose(1, 2).reshape(B * L, Hkv, D)
    if layout.kv_index is not None:
        k = gather_rows(k, layout.kv_index)
        v = gather_rows(v, layout.kv_index)
    fa, _ = flash_varlen_kernel()
    if fa is not None:
        out = fa(
            q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k,
            dropout_p=dropout, softmax_scale=scale, causal=True,
            window_size=(-1, -1) if window is None else (window - 1, 0),
            softcap=0.0 if softcap is None else float(softcap),
        )
    else:
        tfn, _ = torch_varlen_func()
        out = _torch_varlen_call(
            tfn, q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k,
            scale=scale, window=window, H=H, Hkv=Hkv,
        )
    return out.reshape(B, L, H, D)


BACKEND = Backend(
    name="varlen",
    fn=varlen_attention,
    unavailable_reason=lambda device, dtype, options: unavailable_reason(
        device, options.get("softcap"), options.get("dropout", 0.0), options.get("sliding_window"), dtype
    ),
    train_reason=lambda device: "needs CUDA" if device.type != "cuda" else unavailable_reason(device),
    help="flash-attn or torch varlen_attn on gathered [anchor] + document K/V: CUDA, float16/bfloat16",
)
