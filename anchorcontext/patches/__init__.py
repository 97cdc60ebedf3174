"""Hugging Face integration: ``patch_model`` / ``unpatch_model`` / ``register``.

Two halves: :mod:`.registration` plugs our attention and mask functions into transformers' registries
(``AttentionInterface`` + ``AttentionMaskInterface``) under neutral names and guards the stock entries against
``anchor_*`` kwargs; :mod:`.hooks` switches a model to those names and installs the decoder hooks that turn a
batch's ``anchor_*`` keys (or Hugging Face packing kwargs) into one layout per forward. A forward without them
runs the model's previous implementation exactly as stock transformers would (``generate()``, KV cache, left
padding).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
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
    MIN_TRANSFORMERS,
    check_transformers_version,
    guard_eager_functions,
    guard_stock_attention,
    is_modeling_module,
    register,
)


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Guards as transformers loads: the stock attention entries right after ``transformers.modeling_utils`` is
    first imported, and each model family's eager attention functions right after its ``modeling_*`` module is
    (transformers imports those lazily, at first use). So the guard holds whichever of ``anchorcontext`` and
    ``transformers`` a script imports first, and for families loaded later."""

    def __init__(self):
        self._busy: set[str] = set()  # names being looked up through the other finders (per name: thread-safe)

    def find_spec(self, fullname, path, target=None):
        if fullname in self._busy or not (fullname == "transformers.modeling_utils" or is_modeling_module(fullname)):
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if fullname == "transformers.modeling_utils":
                guard_stock_attention()
            else:
                guard_eager_functions(module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _GuardOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _GuardOnImport())
if "transformers.modeling_utils" in sys.modules:
    guard_stock_attention()

__all__ = [
    "ANCHOR_KEYS",
    "ATTN_NAME",
    "ATTN_NAME_EAGER",
    "HF_PACKING",
    "MIN_TRANSFORMERS",
    "_ANCHOR_FORWARD",
    "_STATE_ATTR",
    "_peft_prompt_learning",
    "_pretrained_root",
    "anchor_kwargs_to_layout",
    "check_transformers_version",
    "guard_eager_functions",
    "guard_stock_attention",
    "is_patched",
    "patch_model",
    "patch_state",
    "register",
    "unpatch_model",
]
