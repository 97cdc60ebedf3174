"""Hugging Face integration: ``patch_model`` / ``unpatch_model`` / ``register``.

We plug into transformers' registries (``AttentionInterface`` + ``AttentionMaskInterface``) under neutral
names, never rebinding private functions:

* ``"anchor"``: anchor-aware attention whose stock fallback is SDPA (``sdpa_attention_forward`` + ``sdpa_mask``).
* ``"anchor_eager"``: the same with the model's own ``eager_attention_forward`` + ``eager_mask`` as fallback
  (chosen when the model was on ``eager``, e.g. Gemma2 for its softcap).

A forward that carries ``anchor_layout`` (or ``anchor_doc_ids``) runs AnchorAttention; any other forward runs
the fallback exactly as stock transformers would (``generate()``, KV cache, left padding).

``patch_model`` also installs a forward pre-hook on the model. It turns the ``anchor_*`` keys into one
validated :class:`~anchorcontext.layout.AnchorLayout` on the model's device (once per forward, not per layer),
injects the backend choice, and flags the forward so the mask function returns ``None`` instead of building
an unused ``(B, 1, L, L)`` mask (1 GiB per row at 32K).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
from typing import Any

import torch

from ..attention import anchor_attention
from ..layout import AnchorLayout

logger = logging.getLogger("anchorcontext")

MIN_TRANSFORMERS = "5.0.0"
ATTN_NAME = "anchor"
ATTN_NAME_EAGER = "anchor_eager"
ANCHOR_KEYS = ("anchor_layout", "anchor_doc_ids", "anchor_mask", "anchor_backend")
_STATE_ATTR = "_anchorcontext_patch"

# True while a patched model runs an anchor forward (set by the pre-hook, reset by the post-hook).
_ANCHOR_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("anchorcontext_anchor_forward", default=False)
_warned: set[str] = set()


def check_transformers_version(have: str | None = None) -> str:
    """Raise a clear error naming both versions when transformers (``have``: its version) is too old."""
    from packaging.version import Version

    if have is None:
        import transformers

        have = transformers.__version__
    if Version(have) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"anchorcontext needs transformers >= {MIN_TRANSFORMERS} (AttentionInterface with per-call kwargs); "
            f"found transformers {have}. Upgrade with: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )
    return have


def _eager_fallback(module, query, key, value, attention_mask, **kwargs):
    """The model family's own ``eager_attention_forward`` (it knows softcap etc.)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn(module, query, key, value, attention_mask, **kwargs)


def _sdpa_fallback(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _make_attention_fn(fallback):
    def attention_fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, **kwargs):
        layout = kwargs.get("anchor_layout")
        if layout is None:
            for k in ANCHOR_KEYS:
                kwargs.pop(k, None)
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            sliding_window=sliding_window, softcap=softcap, **kwargs)
        if attention_mask is not None and "mask" not in _warned:
            _warned.add("mask")
            logger.warning(
                "anchorcontext: transformers built an attention mask that the anchor forward ignores; call "
                "anchorcontext.patch_model(model) so it is skipped (it costs O(B*L^2) memory)."
            )
        if query.shape[2] != layout.seq_len:
            raise ValueError(
                f"anchor_layout has length {layout.seq_len} but the attention got {query.shape[2]} query tokens "
                "(anchor forwards cannot use a KV cache or generate())"
            )
        # Under autocast, RoPE may hand back fp32 q/k beside a bf16 v; SDPA would autocast, our kernels do not
        dev = query.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else value.dtype
        query, key, value = (t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))
        out = anchor_attention(
            query, key, value, layout.to(query.device), backend=kwargs.get("anchor_backend", "auto"),
            scaling=scaling, softcap=softcap, sliding_window=sliding_window, dropout=dropout,
        )
        return out, None

    attention_fn.__name__ = f"anchor_attention_forward[{fallback.__name__}]"
    return attention_fn


def _make_mask_fn(stock_name: str):
    def mask_fn(*args, **kwargs):
        if _ANCHOR_FORWARD.get():
            return None  # the anchor attention takes its boundaries from anchor_layout
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[stock_name](*args, **kwargs)

    mask_fn.__name__ = f"anchor_mask[{stock_name}]"
    return mask_fn


def register() -> None:
    """Register ``"anchor"`` and ``"anchor_eager"`` with transformers (idempotent).

    Then ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="anchor")`` works; call
    :func:`patch_model` on the loaded model too so anchor forwards skip building the stock mask.
    """
    check_transformers_version()
    from transformers import AttentionInterface, AttentionMaskInterface

    if AttentionInterface._global_mapping.get(ATTN_NAME) is None:
        AttentionInterface.register(ATTN_NAME, _make_attention_fn(_sdpa_fallback))
        AttentionMaskInterface.register(ATTN_NAME, _make_mask_fn("sdpa"))
        AttentionInterface.register(ATTN_NAME_EAGER, _make_attention_fn(_eager_fallback))
        AttentionMaskInterface.register(ATTN_NAME_EAGER, _make_mask_fn("eager"))


def _peft_prompt_learning(model) -> bool:
    cfgs = getattr(model, "peft_config", None)
    if not isinstance(cfgs, dict):
        return False
    return any(getattr(c, "is_prompt_learning", False) for c in cfgs.values())


def _pretrained_root(model):
    """The transformers ``PreTrainedModel`` inside ``model`` (itself, or under a PEFT wrapper)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    raise ValueError(f"patch_model needs a transformers PreTrainedModel (or a wrapper of one), got {type(model).__name__}")


def anchor_kwargs_to_layout(kwargs: dict, device: torch.device | None = None) -> AnchorLayout | None:
    """Turn ``anchor_layout`` / ``anchor_doc_ids`` (+ ``anchor_mask``) into one AnchorLayout (or None)."""
    layout = kwargs.get("anchor_layout")
    doc_ids = kwargs.pop("anchor_doc_ids", None)
    mask = kwargs.pop("anchor_mask", None)
    if layout is None and doc_ids is None:
        if mask is not None:
            raise ValueError(f"anchor_mask={mask!r} was given without anchor_layout or anchor_doc_ids")
        return None
    if layout is None:
        layout = AnchorLayout.from_doc_ids(doc_ids, mask or "anchor")
    elif not isinstance(layout, AnchorLayout):
        raise ValueError(f"anchor_layout must be an AnchorLayout, got {type(layout).__name__}")
    elif mask is not None and mask != layout.mask:
        raise ValueError(f"anchor_mask={mask!r} disagrees with anchor_layout.mask={layout.mask!r}")
    return layout.to(device) if device is not None else layout


def _pre_hook(state, module, args, kwargs):
    if not any(k in kwargs for k in ("anchor_layout", "anchor_doc_ids")):
        if any(k in kwargs for k in ("anchor_mask",)):
            anchor_kwargs_to_layout(kwargs)  # raises the clear error
        return None
    if kwargs.get("past_key_values") is not None:
        raise ValueError(
            "anchor_* keys cannot be combined with past_key_values / generate(): AnchorAttention is a training and "
            "scoring layout; call generate() without anchor_* keys (the patched model then behaves like stock attention)"
        )
    ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
    ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    device = ref.device if isinstance(ref, torch.Tensor) else None
    layout = anchor_kwargs_to_layout(kwargs, device)
    if isinstance(ref, torch.Tensor) and tuple(ref.shape[:2]) != (layout.batch_size, layout.seq_len):
        raise ValueError(
            f"anchor layout shape {(layout.batch_size, layout.seq_len)} does not match the input's (B, L) = {tuple(ref.shape[:2])}"
        )
    if kwargs.get("position_ids") is None:
        raise ValueError("an anchor forward needs position_ids (use anchorcontext.anchor_inputs(doc_ids) to build them)")
    kwargs["anchor_layout"] = layout
    kwargs.setdefault("anchor_backend", state["backend"])
    state["tokens"].append(_ANCHOR_FORWARD.set(True))
    return args, kwargs


def _post_hook(state, module, args, kwargs, output):
    if state["tokens"]:
        _ANCHOR_FORWARD.reset(state["tokens"].pop())


def patch_model(model, *, backend: str = "auto"):
    """Switch ``model`` to AnchorAttention in one line; returns the same model.

    The mask mode and position policy are properties of each batch (see :func:`anchorcontext.anchor_inputs`,
    :class:`anchorcontext.AnchorCollator`); forwards without ``anchor_*`` keys behave exactly like the
    previous implementation. Idempotent (a second call only updates ``backend``); undo with :func:`unpatch_model`.
    """
    from ..attention.registry import check_backend

    check_backend(backend)
    register()
    if _peft_prompt_learning(model):
        raise ValueError(
            "PEFT prompt learning (prefix / prompt / p-tuning) prepends virtual tokens, which breaks the anchor at "
            "index 0 of every row; use LoRA or full fine-tuning with AnchorAttention"
        )
    root = _pretrained_root(model)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        state["backend"] = backend
        return model
    if not root._can_set_attn_implementation() or not getattr(root, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(root).__name__} does not route its attention through transformers' AttentionInterface, so "
            "anchorcontext cannot patch it"
        )
    prev = root.config._attn_implementation
    name = ATTN_NAME_EAGER if prev == "eager" else ATTN_NAME
    if prev in (ATTN_NAME, ATTN_NAME_EAGER):  # loaded with attn_implementation="anchor"
        name, prev = prev, ("eager" if prev == ATTN_NAME_EAGER else "sdpa")
    root.set_attn_implementation(name)
    # Hooks go on the decoder (e.g. LlamaModel): it builds the mask, and wrappers that call the outer
    # ``forward`` directly (PEFT's LoraModel does) still reach it through ``__call__``.
    decoder = root.base_model
    state = {"prev": prev, "name": name, "backend": backend, "tokens": []}
    state["hooks"] = [
        decoder.register_forward_pre_hook(functools.partial(_pre_hook, state), with_kwargs=True),
        decoder.register_forward_hook(functools.partial(_post_hook, state), with_kwargs=True, always_call=True),
    ]
    setattr(model, _STATE_ATTR, state)
    if root is not model:
        setattr(root, _STATE_ATTR, state)
    return model


def unpatch_model(model):
    """Restore exactly the attention implementation ``model`` had before :func:`patch_model`."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for h in state["hooks"]:
        h.remove()
    root = _pretrained_root(model)
    root.set_attn_implementation(state["prev"])
    for m in (model, root):
        if getattr(m, _STATE_ATTR, None) is state:
            delattr(m, _STATE_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def patch_state(model) -> dict[str, Any] | None:
    """``{"prev", "name", "backend"}`` of a patched model, else ``None``."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else {k: state[k] for k in ("prev", "name", "backend")}
