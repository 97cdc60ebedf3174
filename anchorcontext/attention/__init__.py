"""Attention backends, one signature: ``fn(query, key, value, layout, *, scaling, softcap, sliding_window,
dropout) -> (B, L, H, D)``; the registry (:mod:`.registry`) lists them in ``backend="auto"`` order."""

from .dispatch import anchor_attention, backend_fn, resolve_backend
from .flex import block_mask_for, flex_attention
from .reference import reference_attention
from .registry import BACKENDS, check_backend
from .sdpa import sdpa_attention
from .varlen import varlen_attention

__all__ = [
    "BACKENDS",
    "anchor_attention",
    "backend_fn",
    "block_mask_for",
    "check_backend",
    "flex_attention",
    "reference_attention",
    "resolve_backend",
    "sdpa_attention",
    "varlen_attention",
]
