"""Backend selection: ``backend="auto"`` picks the fastest available path for the device.

Order: flash-attn varlen -> torch varlen (CUDA) -> flex (CUDA, or CPU without grad) -> sdpa -> reference.
When a faster path is off, the reason is logged once. ``softcap`` rules out ``sdpa`` (and torch varlen).
"""

from __future__ import annotations

import logging

import torch

from . import varlen as _varlen
from ._common import as_layout
from .flex import flex_attention_backend
from .reference import reference_attention
from .sdpa import sdpa_attention
from .varlen import varlen_attention

logger = logging.getLogger("anchorcontext")

BACKENDS = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention_backend,
    "varlen": varlen_attention,
}
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


def _flex_reason(device: torch.device, needs_grad: bool, dropout: float, head_dim: int | None = None) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception as e:
        return f"FlexAttention unavailable ({e})"
    if dropout:
        return "flex has no dropout"
    if device.type == "cpu":
        return "flex is off on CPU (compiled CPU FlexAttention is slower than sdpa and has no backward)"
    if device.type != "cuda":
        return f"flex is untested on {device.type}"
    if head_dim is not None and head_dim < 16:
        return f"flex needs head_dim >= 16 (Inductor's kernel), got {head_dim}"
    return None


def resolve_backend(
    backend: str, device: torch.device, *, softcap=None, dropout=0.0, needs_grad=True, sliding_window=None, dtype=None,
    head_dim=None,
) -> str:
    """The concrete backend name ``backend`` means on ``device`` for these options."""
    if backend in BACKENDS:
        return backend
    if backend != "auto":
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    why = _varlen.unavailable_reason(device, softcap, dropout, sliding_window, dtype)
    if why is None:
        return "varlen"
    _log_once(f"anchorcontext: varlen backend off: {why}")
    why = _flex_reason(device, needs_grad, dropout, head_dim)
    if why is None:
        return "flex"
    _log_once(f"anchorcontext: {why}")
    if softcap is None:
        return "sdpa"
    _log_once("anchorcontext: sdpa cannot apply softcap; using the dense reference backend (O(L^2) memory)")
    return "reference"


def dispatch(backend: str = "auto", device=None, **options):
    """The backend function for ``backend`` (``"auto"`` resolved for ``device`` and options)."""
    name = resolve_backend(backend, torch.device(device or "cpu"), **options)
    return BACKENDS[name]


def anchor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout,
    *,
    mask: str | None = None,
    backend: str = "auto",
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """AnchorAttention over a packed batch.

    Args:
        query: ``(B, H, L, D)``; key, value: ``(B, Hkv, L, D)`` with ``H % Hkv == 0`` (GQA).
        layout: an :class:`~anchorcontext.layout.AnchorLayout` or the ``(B, L)`` document-id tensor
            (anchor 0 at index 0, documents 1..n, right padding -1).
        mask: ``"anchor"`` (default), ``"intra_doc"`` or ``"full"``; must agree with a given layout.
        backend: ``"auto"``, ``"varlen"``, ``"flex"``, ``"sdpa"`` or ``"reference"``.
        scaling: softmax scale, default ``1/sqrt(D)``. softcap: Gemma2-style ``c*tanh(s/c)``.
        sliding_window: window size ``W`` (``q - k < W``) in the frame of ``[anchor] + document``.

    Returns:
        ``(B, L, H, D)`` in the query's dtype.
    """
    layout = as_layout(layout, mask)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    name = resolve_backend(
        backend, query.device, softcap=softcap, dropout=dropout, needs_grad=needs_grad,
        sliding_window=sliding_window, dtype=query.dtype, head_dim=query.shape[-1],
    )
    return BACKENDS[name](
        query, key, value, layout, scaling=scaling, softcap=softcap, sliding_window=sliding_window, dropout=dropout
    )
