"""Hugging Face integration: ``patch_model`` / ``unpatch_model`` / ``register``.

Two halves: :mod:`.registration` plugs our attention and mask functions into transformers' registries
(``AttentionInterface`` + ``AttentionMaskInterface``) under neutral names and guards the stock entries against
``anchor_*`` kwargs; :mod:`.hooks` switches a model to those names and installs the decoder hooks that turn a
batch's ``anchor_*`` keys (or Hugging Face packing kwargs) into one layout per forward. A forward without them
runs the model's previous implementation exactly as stock transformers would (``generate()``, KV cache, left
padding).
"""

from __future__ import annotations

import sys

from .hooks import (
    _STATE_ATTR,
    HF_PACKING,
    _peft_prompt_learning,
    _pretrained_root,
    anchor_kwargs_to_layout,
    is_patched,
    patch_model,
    patch_state,
    unpatch_model,
)
from .registration import (
    _ANCHOR_FORWARD,
    ANCHOR_KEYS,
    ATTN_NAME,
    ATTN_NAME_EAGER,
    ATTN_PREFIX,
    MIN_TRANSFORMERS,
    check_transformers_version,
    guard_stock_attention,
    register,
)

if "transformers.modeling_utils" in sys.modules:  # guard now; otherwise register()/patch_model()/the collator do
    guard_stock_attention()

__all__ = [
    "ANCHOR_KEYS",
    "ATTN_NAME",
    "ATTN_NAME_EAGER",
    "ATTN_PREFIX",
    "HF_PACKING",
    "MIN_TRANSFORMERS",
    "_ANCHOR_FORWARD",
    "_STATE_ATTR",
    "_peft_prompt_learning",
    "_pretrained_root",
    "anchor_kwargs_to_layout",
    "check_transformers_version",
    "guard_stock_attention",
    "is_patched",
    "patch_model",
    "patch_state",
    "register",
    "unpatch_model",
]
