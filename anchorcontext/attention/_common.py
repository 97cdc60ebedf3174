"""Shared argument handling for the attention backends (one signature for all)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layout import AnchorLayout, check_mask


@dataclass(frozen=True)
class Backend:
    """One attention backend, declared in its own module and listed in :mod:`.registry`.

    ``fn(query, key, value, layout, *, scaling, softcap, sliding_window, dropout) -> (B, L, H, D)``.
    ``unavailable_reason(device, dtype, options)`` says why ``backend="auto"`` must not pick it here (``None``:
    it can run); ``options`` holds ``softcap``, ``dropout``, ``sliding_window``, ``needs_grad`` and ``head_dim``.
    ``train_reason(device)`` says why it is not a training path on ``device`` (``None``: it trains there).
    """

    name: str
    fn: Callable
    unavailable_reason: Callable[[torch.device, torch.dtype | None, dict], str | None]
    train_reason: Callable[[torch.device], str | None]
    help: str


def as_layout(layout, mask: str | None = None) -> AnchorLayout:
    """Accept an ``AnchorLayout`` or a ``(B, L)`` doc-id tensor; check the mask agrees."""
    if isinstance(layout, AnchorLayout):
        if mask is not None and check_mask(mask) != layout.mask:
            raise ValueError(f"mask={mask!r} disagrees with the layout's mask {layout.mask!r}")
        return layout
    if isinstance(layout, torch.Tensor):
        return AnchorLayout.from_doc_ids(layout, mask or "anchor")
    raise ValueError(f"layout must be an AnchorLayout or a (B, L) doc-id tensor, got {type(layout).__name__}")


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: AnchorLayout):
    """Validate ``query (B,H,L,D)``, ``key/value (B,Hkv,L,D)`` against the layout; return shapes."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"query/key/value must be 4-D (B, H, L, D); got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    B, H, L, D = query.shape
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} device {t.device} != query device {query.device}")
    if key.shape != value.shape:
        raise ValueError(f"key shape {tuple(key.shape)} != value shape {tuple(value.shape)}")
    if key.shape[0] != B or key.shape[2] != L or key.shape[3] != D:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    Hkv = key.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if (layout.batch_size, layout.seq_len) != (B, L):
        raise ValueError(f"layout has shape {(layout.batch_size, layout.seq_len)} but query has (B, L) = {(B, L)}")
    return B, H, Hkv, L, D


def check_options(softcap, sliding_window, dropout):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if sliding_window is not None and int(sliding_window) < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def default_scaling(scaling, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scaling is None else float(scaling)
