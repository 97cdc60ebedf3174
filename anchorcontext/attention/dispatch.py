"""Backend selection: ``backend="auto"`` picks the first backend of :mod:`.registry` that can run here.

Order: varlen (flash-attn, else torch ``varlen_attn``; CUDA, half precision) -> flex (CUDA only: on CPU it is
off, being slower than sdpa and forward-only) -> sdpa -> reference (softcap on CPU: sdpa cannot apply it). When
a faster path is off, the reason is logged once.
"""

from __future__ import annotations

import logging

import torch

from ._common import as_layout
from .registry import BACKENDS, REGISTRY, check_backend

logger = logging.getLogger("anchorcontext")

_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


def resolve_backend(
    backend: str, device: torch.device, *, softcap=None, dropout=0.0, needs_grad=True, sliding_window=None, dtype=None,
    head_dim=None,
) -> str:
    """The concrete backend name ``backend`` means on ``device`` for these options."""
    if check_backend(backend) != "auto":
        return backend
    options = dict(softcap=softcap, dropout=dropout, needs_grad=needs_grad, sliding_window=sliding_window,
                   head_dim=head_dim)
    for b in REGISTRY:
        why = b.unavailable_reason(device, dtype, options)
        if why is None:
            return b.name
        _log_once(f"anchorcontext: {b.name} backend off: {why}")
    raise ValueError(f"no attention backend can run on {device} with {options}")  # unreachable: reference always runs


def backend_fn(backend: str = "auto", device=None, **options):
    """The backend function for ``backend`` (``"auto"`` resolved for ``device`` and options)."""
    return BACKENDS[resolve_backend(backend, torch.device(device or "cpu"), **options)].fn


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
        backend: ``"auto"`` or a name of :data:`~.registry.BACKENDS`.
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
    return BACKENDS[name].fn(
        query, key, value, layout, scaling=scaling, softcap=softcap, sliding_window=sliding_window, dropout=dropout
    )
