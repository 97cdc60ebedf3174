"""Attention backends, one signature: ``fn(query, key, value, layout, *, scaling, softcap, sliding_window,
dropout) -> (B, L, H, D)``."""

from .dispatch import BACKENDS, anchor_attention, dispatch, resolve_backend
from .flex import block_mask_for, flex_attention_backend
from .reference import reference_attention
from .sdpa import sdpa_attention
from .varlen import varlen_attention

__all__ = [
    "BACKENDS",
    "anchor_attention",
    "block_mask_for",
    "dispatch",
    "flex_attention_backend",
    "reference_attention",
    "resolve_backend",
    "sdpa_attention",
    "varlen_attention",
]
