"""The model side of the patch: ``patch_model`` / ``unpatch_model`` and the decoder's forward hooks.

The pre-hook on the decoder (e.g. ``LlamaModel``) runs once per forward, not per layer. On a forward carrying
``anchor_*`` keys it builds one validated :class:`~anchorcontext.layout.AnchorLayout` on the model's device,
injects the backend choice, turns the KV cache off (an anchor forward neither reads nor returns one) and flags
the call so the mask function returns ``None`` instead of an unused ``(B, 1, L, L)`` mask. On a plain forward
carrying Hugging Face's packing conventions (``cu_seq_lens_*`` kwargs, or position ids that restart) it runs
the batch as intra-document attention, or refuses it (``hf_packing="refuse"``). The flag lives in a
``ContextVar``, so concurrent forwards in other threads never see it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any

import torch

from ..layout import AnchorLayout
from ..loss import DEFAULT_CHUNK_SIZE
from .loss_hook import configure_chunked_loss, remove_chunked_loss, resolve_loss_options
from .registration import (
    _ANCHOR_FORWARD,
    _STATE_ATTR,
    ATTN_NAME,
    ATTN_NAME_EAGER,
    PATCHED_KEY,
    is_anchor_name,
    register,
    skip_stock_mask_in_anchor_forwards,
)
from .support import unsupported_reason

HF_PACKING = ("intra_doc", "refuse")
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_CACHE_NAMES = ("cache", "past_key_values")  # transformers 5.24 passes "cache"; older releases "past_key_values"
# Per call (thread / asyncio task): (id(decoder), token) of each hooked forward in progress, innermost last
_CALLS: contextvars.ContextVar[tuple] = contextvars.ContextVar("anchorcontext_calls", default=())


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


def decoder_chain(root) -> list:
    """``root.base_model`` (``LlamaModel``), then the one transformers model inside it while that is all it holds
    (OPT's ``OPTModel`` wraps ``OPTDecoder``, which ``OPTForCausalLM`` calls directly; ``Gemma4Model`` without a
    vision tower wraps ``Gemma4TextModel``). Every forward of ``root`` goes through the last one; the first one it
    reaches may build the mask (Gemma4Model), so each is hooked."""
    from transformers import PreTrainedModel

    chain = [root.base_model]
    while True:
        inner = [c for c in chain[-1].children() if isinstance(c, PreTrainedModel)]
        others = [c for c in chain[-1].children() if not isinstance(c, PreTrainedModel)]
        if len(inner) != 1 or others:
            return chain
        chain.append(inner[0])


def decoder_of(root):
    """The decoder whose forward every forward of ``root`` goes through (the last of :func:`decoder_chain`)."""
    return decoder_chain(root)[-1]


def cache_arg_names(decoder) -> tuple[str, ...]:
    """The names under which ``decoder.forward`` takes its KV cache, read from its signature (plus the
    deprecated alias ``past_key_values``, which transformers' decorator renames inside the call)."""
    params = inspect.signature(decoder.forward).parameters
    names = tuple(n for n in _CACHE_NAMES if n in params)
    return names + tuple(n for n in ("past_key_values",) if n not in names)


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


def _cache_len(cache) -> int | None:
    """Tokens held by a KV cache object (``None`` when it cannot tell)."""
    try:
        return int(cache.get_seq_length())
    except Exception:  # a cache type without get_seq_length: treat as unknown
        return None


def _packing_layout(kwargs: dict, ref: torch.Tensor, cache_names) -> AnchorLayout | None:
    """An intra-document layout for a plain forward carrying HF packing conventions, else ``None``.

    ``cu_seq_lens_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``, TRL ``padding_free``) give
    the boundaries over the flattened ``(B*L,)`` tokens; otherwise a 2D position id that restarts (not above its
    predecessor, as ``DataCollatorWithFlattening`` and TRL's padding-free rows give) starts a new document, counted
    only between attended tokens so left/right padding is not read as packing. A forward jump is one sequence
    (an anchor run alone with its document's positions). 3D (mRoPE) position ids without ``cu_seq_lens`` pass
    through unchanged.
    """
    B, L = ref.shape[:2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    mask = kwargs.get("attention_mask")
    mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError(
                f"cu_seq_lens_q={cu_q} and cu_seq_lens_k={cu_k} must both be given and equal for a packed batch "
                "(anchorcontext runs it as intra-document attention)"
            )
        cu = cu_q.detach().to("cpu", torch.int64).reshape(-1)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != B * L or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(
                f"cu_seq_lens_q={cu.tolist()} must rise strictly from 0 to the batch's {B * L} tokens (B={B}, L={L})"
            )
        row_ends = set(range(0, B * L + 1, L))
        if not row_ends <= set(cu.tolist()):
            raise ValueError(f"cu_seq_lens_q={cu.tolist()} has a document crossing a row boundary (L={L})")
        starts = torch.zeros(B * L, dtype=torch.bool)
        starts[cu[:-1]] = True
        starts = starts.view(B, L)
    else:
        pos = kwargs.get("position_ids")
        if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or L < 2:
            return None
    # a 2-D mask covers cached + new tokens: its last L columns are this forward's (one host copy, used below)
    m = mask2d.detach()[:, -L:].to("cpu").bool() if mask2d is not None else None
    if cu_q is None:
        pos = pos.detach().to("cpu").expand(B, L)
        starts = torch.zeros(B, L, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] <= pos[:, :-1]
        if m is not None:
            starts[:, 1:] &= m[:, 1:] & m[:, :-1]
        if not bool(starts[:, 1:].any()):
            return None
        starts[:, 0] = True
    doc = starts.cumsum(1)
    if m is not None and not bool(m.all()):
        late = (m[:, 1:] & ~m[:, :-1]).any(1)  # a real token after a padded one
        if bool(late.any()):
            r = int(late.nonzero()[0, 0])
            raise ValueError(
                f"a packed batch (cu_seq_lens_* or restarting position_ids) needs right padding only; attention_mask "
                f"row {r} has a padded token before a real one"
            )
        doc[~m] = -1  # trailing padding: one segment of its own (the AnchorLayout convention)
    for n in cache_names:
        c = kwargs.get(n)
        if c is not None and _cache_len(c) != 0:
            raise ValueError(f"a packed batch cannot continue a KV cache ({n} holds {_cache_len(c)} tokens)")
    # doc ids 1..n per row (no anchor at index 0, so validate=False): intra_doc attends within equal ids only
    return AnchorLayout.from_doc_ids(doc.to(ref.device), "intra_doc", validate=False)


def _refuse_cache(kwargs: dict, cache_names, what: str) -> None:
    for n in cache_names:
        c = kwargs.get(n)
        if c is not None:
            raise ValueError(
                f"{what} cannot read or fill a KV cache, got {n}={type(c).__name__} holding {_cache_len(c)} tokens; "
                "call generate() and cached forwards without anchor_* keys (the patched model then behaves like "
                "stock attention)"
            )


def _enter(module, flag: bool) -> None:
    stack = _CALLS.get()
    _CALLS.set((*stack, (id(module), _ANCHOR_FORWARD.set(flag))))


def _pre_hook(state, module, args, kwargs):
    stack = _CALLS.get()
    if stack and stack[-1][0] in state["chain_ids"]:  # an outer model of the chain already prepared this forward
        _enter(module, _ANCHOR_FORWARD.get())
        return None
    _enter(module, False)  # first, so the always-called post-hook stays balanced even if this hook raises
    ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
    ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    names = state["cache_names"]
    if not any(k in kwargs for k in ("anchor_layout", "anchor_doc_ids")):
        if "anchor_mask" in kwargs:
            anchor_kwargs_to_layout(kwargs)  # raises the clear error
        if not isinstance(ref, torch.Tensor):
            return None
        packed = _packing_layout(kwargs, ref, names)
        if packed is None:
            return None
        if state["hf_packing"] == "refuse":
            raise ValueError(
                "this batch carries Hugging Face packing (cu_seq_lens_* or restarting position_ids) and the model was "
                "patched with hf_packing='refuse'; pass anchor_* keys (AnchorCollator) or patch with "
                "hf_packing='intra_doc'"
            )
        for k in _PACKING_KWARGS:
            kwargs.pop(k, None)
        layout, what = packed, "a packed forward"
    else:
        given = [k for k in _PACKING_KWARGS if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"a forward cannot carry both anchor_* keys and Hugging Face packing kwargs {given}")
        what = "an anchor forward"
        device = ref.device if isinstance(ref, torch.Tensor) else None
        layout = anchor_kwargs_to_layout(kwargs, device)
        if isinstance(ref, torch.Tensor) and tuple(ref.shape[:2]) != (layout.batch_size, layout.seq_len):
            raise ValueError(
                f"anchor layout shape {(layout.batch_size, layout.seq_len)} does not match the input's (B, L) = {tuple(ref.shape[:2])}"
            )
        if kwargs.get("position_ids") is None:
            raise ValueError("an anchor forward needs position_ids (use anchorcontext.anchor_inputs(doc_ids) to build them)")
    _refuse_cache(kwargs, names if what == "an anchor forward" else (), what)
    for n in names:
        if kwargs.get(n) is not None and _cache_len(kwargs[n]) == 0:
            kwargs[n] = None  # an empty cache of a packed forward: never filled under our mask
    kwargs["use_cache"] = False  # never hand back a cache built under the anchor / intra-document mask
    kwargs["anchor_layout"] = layout
    kwargs[PATCHED_KEY] = True
    kwargs.setdefault("anchor_backend", state["backend"])
    state["anchor_forwards"] = state.get("anchor_forwards", 0) + 1  # the outer forward checks the keys got here
    _ANCHOR_FORWARD.set(True)
    return args, kwargs


def _post_hook(state, module, args, kwargs, output):
    stack = _CALLS.get()
    if stack and stack[-1][0] == id(module):
        _ANCHOR_FORWARD.reset(stack[-1][1])
        _CALLS.set(stack[:-1])


def patch_model(model, *, backend: str = "auto", hf_packing: str = "intra_doc", chunked_loss=False,
                loss_chunk_tokens: int = DEFAULT_CHUNK_SIZE):
    """Switch ``model`` to AnchorAttention in one line; returns the same model.

    The mask mode and position policy are properties of each batch (see :func:`anchorcontext.anchor_inputs`,
    :class:`anchorcontext.AnchorCollator`); forwards without ``anchor_*`` keys run the implementation the model
    had (SDPA, eager, FlashAttention, flex, a kernels-hub kernel). A plain batch in Hugging Face's packing
    format runs as intra-document attention (``hf_packing="intra_doc"``) or is refused (``"refuse"``).
    ``chunked_loss`` (``True`` | ``"auto"`` | ``"liger"`` | ``False``): a forward with labels computes the loss
    from the final hidden states in chunks of ``loss_chunk_tokens`` tokens and returns ``logits=None``
    (:mod:`.loss_hook`); ``False`` keeps the stock loss. Idempotent (a second call only updates ``backend``,
    ``hf_packing`` and the chunked-loss options); undo with :func:`unpatch_model`.
    """
    from ..attention.registry import check_backend

    check_backend(backend)
    if hf_packing not in HF_PACKING:
        raise ValueError(f"hf_packing must be one of {HF_PACKING}, got {hf_packing!r}")
    register()
    if _peft_prompt_learning(model):
        raise ValueError(
            "PEFT prompt learning (prefix / prompt / p-tuning) prepends virtual tokens, which breaks the anchor at "
            "index 0 of every row; use LoRA or full fine-tuning with AnchorAttention"
        )
    root = _pretrained_root(model)
    loss_impl = resolve_loss_options(root, chunked_loss, loss_chunk_tokens)  # refused before anything changes
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        configure_chunked_loss(root, state, chunked_loss, loss_chunk_tokens, loss_impl)
        state["backend"] = backend
        state["hf_packing"] = hf_packing
        return model
    reason = unsupported_reason(root)
    if reason is not None:
        raise ValueError(reason)
    prev = root.config._attn_implementation
    if is_anchor_name(prev):  # loaded with attn_implementation="anchor"
        name, prev = prev, ("eager" if prev == ATTN_NAME_EAGER else "sdpa")
    elif prev in (None, "sdpa", "eager"):
        name = ATTN_NAME_EAGER if prev == "eager" else ATTN_NAME
    else:
        # FlashAttention, flex, a kernels-hub name: the model keeps it; its guarded entry runs the anchor forwards
        from transformers import AttentionInterface

        if prev not in AttentionInterface._global_mapping:
            raise ValueError(f"attention implementation {prev!r} is not registered in transformers' AttentionInterface")
        name = prev
        skip_stock_mask_in_anchor_forwards(name)
    if name != root.config._attn_implementation:
        root.set_attn_implementation(name)
    # Hooks go on the decoder (e.g. LlamaModel): it builds the mask, and wrappers that call the outer
    # ``forward`` directly (PEFT's LoraModel does) still reach it through ``__call__``.
    # Every model of the decoder chain is hooked (the first one a forward reaches prepares it, the inner ones pass):
    # OPTForCausalLM calls its inner OPTDecoder directly, Gemma4Model builds the mask before its Gemma4TextModel.
    chain = decoder_chain(root)
    names = tuple(dict.fromkeys(n for m in chain for n in cache_arg_names(m)))
    state = {"prev": prev, "name": name, "backend": backend, "hf_packing": hf_packing, "cache_names": names,
             "chain_ids": frozenset(id(m) for m in chain)}
    state["hooks"] = [
        h for m in chain for h in (
            m.register_forward_pre_hook(functools.partial(_pre_hook, state), with_kwargs=True),
            m.register_forward_hook(functools.partial(_post_hook, state), with_kwargs=True, always_call=True),
        )
    ]
    configure_chunked_loss(root, state, chunked_loss, loss_chunk_tokens, loss_impl)
    # on every transformers model a forward of ``model`` passes through before the hooked decoder, so their forwards
    # accept the anchor keys (registration._guard_forward)
    for m in {id(m): m for m in (model, root, *decoder_chain(root))}.values():
        setattr(m, _STATE_ATTR, state)
    return model


def unpatch_model(model):
    """Restore exactly the attention implementation ``model`` had before :func:`patch_model`."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for h in state["hooks"]:
        h.remove()
    root = _pretrained_root(model)
    remove_chunked_loss(root, state)
    if state["prev"] != root.config._attn_implementation:
        root.set_attn_implementation(state["prev"])
    for m in (model, root, *decoder_chain(root)):
        if getattr(m, _STATE_ATTR, None) is state:
            delattr(m, _STATE_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def patch_state(model) -> dict[str, Any] | None:
    """``{"prev", "name", "backend", "hf_packing", "chunked_loss", "loss_chunk_tokens"}`` of a patched model, else ``None``."""
    state = getattr(model, _STATE_ATTR, None)
    keys = ("prev", "name", "backend", "hf_packing", "chunked_loss", "loss_chunk_tokens")
    return None if state is None else {k: state[k] for k in keys}

