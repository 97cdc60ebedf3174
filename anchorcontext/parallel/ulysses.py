"""AnchorAttention inside DeepSpeed's Ulysses sequence parallelism (``UlyssesSPAttentionHF``).

Ulysses (arXiv 2309.14509) shards a row's tokens over the ``P`` ranks of a sequence-parallel (SP) group;
around each attention call an all-to-all trades the sequence shard for a head shard, so the attention
function sees the WHOLE row for ``H/P`` heads::

    rank r before:  q (B, H,   L/P, D)   tokens [r*L/P, (r+1)*L/P)
    all-to-all  ->  q (B, H/P, L,   D)   every token, heads [r*H/P, (r+1)*H/P)
    attention with the GLOBAL layout (doc ids of all L tokens), then the inverse all-to-all.

AnchorAttention is per-head, so it runs unchanged after the all-to-all, given the global layout. Where that
layout comes from (checked in ``tests/test_distributed.py``):

* ``anchor_layout`` (an :class:`~anchorcontext.layout.AnchorLayout`, what :class:`~anchorcontext.AnchorCollator`
  emits) is not a tensor, so DeepSpeed's ``UlyssesSPDataLoaderAdapter`` hands it to every SP rank unsharded
  (``all_gather_object``, then "leave non-tensors alone"): each rank already holds the global layout; no
  collective is needed.
* ``anchor_doc_ids`` (a ``(B, L)`` tensor) IS sharded on dim 1 by the adapter. The pre-hook then all-gathers
  the doc ids over the SP group once per forward (not per layer) and builds the global layout.

The model runs under its own registered attention name, :data:`SP_ATTN_NAME` (``"anchor_sp"``): DeepSpeed
replaces the registry entry of the name it wraps, process-wide, so wrapping ``"anchor"`` itself would also
turn every non-SP anchor model in the process into an SP one. The name is neutral (never ``flex_attention``,
for which DeepSpeed rebuilds a causal-only BlockMask, and never ``sdpa``/``flash``).
"""

from __future__ import annotations

import functools
import logging

import torch

from ..layout import AnchorLayout

logger = logging.getLogger("anchorcontext")

SP_ATTN_NAME = "anchor_sp"
_SP_STATE_ATTR = "_anchorcontext_sp"
_MIN_DEEPSPEED = "0.18.2"  # first release with UlyssesSPAttentionHF.register_with_transformers (accelerate's floor)


def require_deepspeed() -> str:
    """Import DeepSpeed or raise ImportError with the install line; return its version."""
    try:
        import deepspeed
    except Exception as e:  # ImportError, or a broken build raising something else at import
        raise ImportError(
            f"sequence parallelism needs DeepSpeed >= {_MIN_DEEPSPEED} (Ulysses for HF models); importing it failed: "
            f"{e}. Install with: DS_BUILD_OPS=0 pip install 'anchorcontext[deepspeed]'"
        ) from e
    from packaging.version import Version

    have = deepspeed.__version__
    if Version(have) < Version(_MIN_DEEPSPEED):
        raise ImportError(
            f"sequence parallelism needs DeepSpeed >= {_MIN_DEEPSPEED}; found deepspeed {have}. "
            "Upgrade with: DS_BUILD_OPS=0 pip install -U deepspeed"
        )
    return have


def check_sp_heads(config, sp_size: int) -> None:
    """Raise ``ValueError`` unless the model's heads split over ``sp_size`` ranks.

    Ulysses gives each rank ``num_attention_heads / P`` query heads, so ``P`` must divide
    ``num_attention_heads``. Key/value heads (GQA) either split (``num_key_value_heads % P == 0``) or, when
    there are fewer of them than ranks, are replicated (``P % num_key_value_heads == 0``).
    """
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"sp_size must be an integer >= 1, got {sp_size!r}")
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(cfg, "num_attention_heads", None)
    if h is None:
        raise ValueError(f"{type(cfg).__name__} has no num_attention_heads; cannot check it against sp_size={sp_size}")
    kv = getattr(cfg, "num_key_value_heads", None) or h
    if h % sp_size:
        raise ValueError(
            f"num_attention_heads={h} is not divisible by sp_size={sp_size}: Ulysses gives each of the sp_size ranks "
            f"num_attention_heads/sp_size heads; choose sp_size among {[p for p in range(1, h + 1) if h % p == 0]}"
        )
    if kv % sp_size and sp_size % kv:
        raise ValueError(
            f"num_key_value_heads={kv} and sp_size={sp_size}: one must divide the other (key/value heads are either "
            "split over the SP ranks or replicated to them)"
        )


def check_seq_len(seq_len: int, sp_size: int) -> None:
    """Raise ``ValueError`` unless a row of ``seq_len`` tokens splits evenly over ``sp_size`` ranks."""
    if seq_len % sp_size:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by sp_size={sp_size}; pad rows with "
            f"AnchorCollator(pad_to_multiple_of={sp_size}) (padding is never a target, nothing is truncated)"
        )


def _sp_mask_fn(*args, **kwargs):
    """Mask function for ``"anchor_sp"``: no mask.

    The Ulysses wrapper discards 4-D masks (they would be built for the local shard's length and cost
    O(L^2)); the anchor forward takes its boundaries from the layout, and a plain forward gets a causal mask in
    ``anchor_sp`` itself where its entry needs one (see :func:`_causal_mask`).
    """
    return


def _causal_mask(query, key, sliding_window=None):
    """An additive causal ``(1, 1, Lq, Lk)`` mask (bottom-right aligned) for a plain forward under SP, limited to
    the layer's ``sliding_window`` (a query sees keys ``q - window < k <= q``, transformers' rule) when it has one.

    The Ulysses wrapper drops 4-D masks; SDPA is causal without one, but the eager entry would attend both ways.
    O(Lq*Lk), built only for plain (non-anchor) forwards of eager models (evaluation)."""
    import torch

    q, k = query.shape[-2], key.shape[-2]
    if q == 1 and not sliding_window:
        return None
    keep = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    if sliding_window:
        keep &= ~torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q - sliding_window)
    return torch.zeros(q, k, dtype=query.dtype, device=query.device).masked_fill(
        ~keep, torch.finfo(query.dtype).min)[None, None]


def register_sp_attention() -> str:
    """Register ``"anchor_sp"`` (the anchor attention fn reading ``anchor_sp_layout``); idempotent.

    Never re-registers once present: DeepSpeed may already have replaced the entry by its Ulysses wrapper.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    from ..patches import ATTN_NAME, register

    register()
    if AttentionInterface._global_mapping.get(SP_ATTN_NAME) is None:

        def anchor_sp_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
            # the model's own patched entry ("anchor" or "anchor_eager"), sent by the SP pre-hook, so a plain
            # forward runs the fallback the model had (eager for Gemma2's softcap, ...)
            name = kwargs.pop("anchor_sp_inner", ATTN_NAME)
            inner = AttentionInterface._global_mapping[name]
            layout = kwargs.pop("anchor_sp_layout", None)
            if layout is None and kwargs.get("anchor_layout") is None and attention_mask is None and name != ATTN_NAME:
                attention_mask = _causal_mask(query, key, kwargs.get("sliding_window"))
            if layout is not None:
                kwargs["anchor_layout"] = layout
            return inner(module, query, key, value, attention_mask, *args, **kwargs)

        AttentionInterface.register(SP_ATTN_NAME, anchor_sp_attention_forward)
        AttentionMaskInterface.register(SP_ATTN_NAME, _sp_mask_fn)
    return SP_ATTN_NAME


def default_sp_group():
    """DeepSpeed's SP process group (set by ``register_with_transformers``), or ``None`` before that."""
    try:
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    except ImportError:
        return None
    return mpu._SEQUENCE_PARALLEL_GROUP


def gather_doc_ids(doc_ids: torch.Tensor, group) -> torch.Tensor:
    """``(B, L/P)`` local doc ids -> ``(B, L)`` global doc ids, all-gathered over the SP ``group`` in rank order
    (the order DeepSpeed's adapter shards in: rank r holds tokens ``[r*L/P, (r+1)*L/P)``)."""
    import torch.distributed as dist

    doc_ids = doc_ids.contiguous()
    parts = [torch.empty_like(doc_ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, doc_ids, group=group)
    return torch.cat(parts, dim=1)


def global_layout(kwargs: dict, local_len: int, sp_size: int, group, *, gather: bool = True) -> AnchorLayout | None:
    """The global :class:`AnchorLayout` of an SP forward from its ``anchor_*`` kwargs (which it pops).

    ``anchor_layout`` must already be global (``seq_len == local_len * sp_size``); ``anchor_doc_ids`` may be
    global or the local ``(B, local_len)`` shard (then all-gathered over ``group``; ``gather=False`` exists only
    for the negative control in the tests). Returns ``None`` when the forward carries no anchor keys.
    """
    from ..patches import anchor_kwargs_to_layout

    doc_ids = kwargs.get("anchor_doc_ids")
    sharded = isinstance(doc_ids, torch.Tensor) and doc_ids.dim() == 2 and doc_ids.shape[1] == local_len
    if sharded and sp_size > 1 and gather:
        kwargs["anchor_doc_ids"] = gather_doc_ids(doc_ids, group)
    given = kwargs.get("anchor_layout")
    given = given if given is not None else kwargs.get("anchor_doc_ids")
    length = given.seq_len if isinstance(given, AnchorLayout) else (
        given.shape[-1] if isinstance(given, torch.Tensor) else None)
    if length is not None and length != local_len * sp_size:
        raise ValueError(
            f"sequence parallelism (sp_size={sp_size}): the anchor layout has length {length}, but this rank's "
            f"input shard has {local_len} tokens, so the global row has {local_len * sp_size}. Pass the global "
            "anchor_layout (AnchorCollator's, which DeepSpeed's dataloader adapter hands to every rank unsharded) or "
            "anchor_doc_ids sharded like input_ids"
        )
    layout = anchor_kwargs_to_layout(kwargs)
    kwargs.pop("anchor_layout", None)
    return layout


def _sp_pre_hook(state, module, args, kwargs):
    kwargs["anchor_sp_inner"] = state["inner"]
    if not any(k in kwargs for k in ("anchor_layout", "anchor_doc_ids", "anchor_mask")):
        return args, kwargs
    ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
    ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if not isinstance(ref, torch.Tensor):
        raise ValueError("an anchor forward under sequence parallelism needs input_ids or inputs_embeds")
    # Matches accelerate's ``disable_in_eval=True``: SP runs in training only; eval batches are not sharded.
    active = module.training or not state["disable_in_eval"]
    sp_size = state["sp_size"] if active else 1
    group = state["group"]() if active else None
    if active and group is None:
        raise ValueError(
            "the model was prepared for sequence parallelism but DeepSpeed's SP group does not exist yet: call "
            "anchorcontext.parallel.register_ulysses (or let accelerate/Trainer prepare the model) first"
        )
    if kwargs.get("position_ids") is None:
        raise ValueError("an anchor forward needs position_ids (global positions, sharded like input_ids)")
    layout = global_layout(kwargs, ref.shape[1], sp_size, group, gather=state["gather"])
    kwargs.pop("anchor_mask", None)
    if layout is None:
        return args, kwargs
    kwargs["anchor_sp_layout"] = layout.to(ref.device)
    kwargs.setdefault("anchor_backend", state["backend"]())
    patched = getattr(module, "_anchorcontext_patch", None)  # the outer forward checks that the keys got here
    if patched is not None:
        patched["anchor_forwards"] = patched.get("anchor_forwards", 0) + 1
    return args, kwargs


def _contiguous_pre_hook(module, args, kwargs):
    # DeepSpeed's adapter shards with ``t[:, a:b].cpu()``: on a CPU host ``.cpu()`` is a no-op and the shard of a
    # (B > 1, L) tensor stays non-contiguous; transformers' ForCausalLMLoss then fails on ``shift_labels.view(-1)``.
    # (deepspeed 0.19.8, transformers 5.24; on GPU hosts the copy makes them contiguous.)
    changed = False
    for k in ("input_ids", "position_ids", "labels", "shift_labels"):
        t = kwargs.get(k)
        if isinstance(t, torch.Tensor) and not t.is_contiguous():
            kwargs[k] = t.contiguous()
            changed = True
    return (args, kwargs) if changed else None


_LAYOUT_FIELDS = ("doc_ids", "mask", "cu_seqlens_q", "cu_seqlens_k", "kv_index", "max_seqlen_q", "max_seqlen_k",
                  "seqlens_q", "seqlens_k", "seg_row", "seg_anchor")


def _rebuild_layout(*values) -> AnchorLayout:
    return AnchorLayout(**dict(zip(_LAYOUT_FIELDS, values)))


def _reduce_layout(layout: AnchorLayout):
    cpu = layout.to("cpu")
    return _rebuild_layout, tuple(getattr(cpu, f) for f in _LAYOUT_FIELDS)


def register_layout_pickling() -> None:
    """Pickle :class:`AnchorLayout` with CPU tensors and without its device cache (idempotent).

    DeepSpeed's dataloader adapter sends the layout to the other SP ranks with ``all_gather_object`` after
    accelerate moved the batch to the GPU. Pickled CUDA tensors come back on the SENDER's device index, so every
    rank would touch (and create a CUDA context on) every other rank's GPU. The pre-hook moves the layout to
    the local device once per forward. Registered through ``copyreg`` (the standard pickling registry).
    """
    import copyreg

    copyreg.pickle(AnchorLayout, _reduce_layout)


def prepare_model_for_sp(model, *, sp_size: int, backend: str = "auto", disable_in_eval: bool = True,
                         group_fn=None):
    """Patch ``model`` for AnchorAttention under Ulysses SP; returns the same model. Idempotent.

    Checks the head counts (:func:`check_sp_heads`), applies :func:`anchorcontext.patch_model` if needed, switches
    the attention implementation to ``"anchor_sp"`` and installs a decoder pre-hook (ahead of patch_model's)
    that turns the batch's ``anchor_*`` keys into the global layout (see the module docstring). Call it
    BEFORE DeepSpeed wraps the attention (``register_ulysses``, or accelerate/Trainer ``prepare``).
    ``group_fn`` returns the SP process group (default: DeepSpeed's).

    The model must be on ``sdpa`` or ``eager`` (a ``ValueError`` otherwise): patch_model keeps a FlashAttention,
    flex or kernels-hub name, but the rename to ``"anchor_sp"`` would break its plain forwards (transformers'
    flash path reads the kernel from the implementation name). The anchor forwards' kernel is ``backend``.
    """
    from ..patches import ATTN_NAME, _pretrained_root, is_patched, patch_model, patch_state
    from ..patches.hooks import decoder_of
    from ..patches.registration import is_anchor_name

    root = _pretrained_root(model)
    check_sp_heads(root.config, sp_size)
    name = (patch_state(model) or {}).get("name", root.config._attn_implementation)
    if getattr(root, _SP_STATE_ATTR, None) is None and not (is_anchor_name(name) or name in (None, "sdpa", "eager")):
        raise ValueError(
            f"sequence parallelism needs a model on sdpa or eager attention, got attn_implementation {name!r}: under "
            f"SP the model's implementation becomes {SP_ATTN_NAME!r}, and transformers' flash path picks its kernel "
            "from that name, so plain forwards (evaluation, generation) would fail. Load the model with "
            "attn_implementation='sdpa' (or 'eager'), or call model.set_attn_implementation('sdpa') before "
            "patch_model; the anchor forwards run the anchor backend (backend='varlen' or 'flex') either way"
        )
    if not is_patched(model) or backend != "auto":
        patch_model(model, backend=backend)
    register_sp_attention()
    register_layout_pickling()
    existing = getattr(root, _SP_STATE_ATTR, None)
    if existing is not None:
        existing.update(sp_size=sp_size, disable_in_eval=disable_in_eval, group=group_fn or default_sp_group)
        return model
    root.set_attn_implementation(SP_ATTN_NAME)
    state = {
        "sp_size": sp_size,
        "disable_in_eval": disable_in_eval,
        "group": group_fn or default_sp_group,
        "backend": lambda: (patch_state(model) or {}).get("backend", "auto"),
        "gather": True,
        "inner": (patch_state(model) or {}).get("name", ATTN_NAME),
    }
    state["hook"] = decoder_of(root).register_forward_pre_hook(
        functools.partial(_sp_pre_hook, state), with_kwargs=True, prepend=True
    )
    state["hook_outer"] = root.register_forward_pre_hook(_contiguous_pre_hook, with_kwargs=True)
    setattr(root, _SP_STATE_ATTR, state)
    return model


def sp_state(model) -> dict | None:
    from ..patches import _pretrained_root

    return getattr(_pretrained_root(model), _SP_STATE_ATTR, None)


def unprepare_model_for_sp(model):
    """Remove the SP hook and return to the model's patched entry (``"anchor"``, ``"anchor_eager"``, ...); the
    patch_model state stays."""
    from ..patches import _pretrained_root

    root = _pretrained_root(model)
    state = getattr(root, _SP_STATE_ATTR, None)
    if state is None:
        return model
    state["hook"].remove()
    state["hook_outer"].remove()
    delattr(root, _SP_STATE_ATTR)
    root.set_attn_implementation(state["inner"])
    return model


def register_ulysses(model, *, sp_size: int, micro_batch_size: int, disable_in_eval: bool = True):
    """Prepare ``model`` and wrap ``"anchor_sp"`` in DeepSpeed's ``UlyssesSPAttentionHF``; returns DeepSpeed's mpu.

    For loops that drive DeepSpeed directly (accelerate/Trainer do this themselves given
    :func:`~anchorcontext.parallel.make_parallelism_config`). Needs ``torch.distributed`` / ``deepspeed.comm``
    initialised; may be called once per process (DeepSpeed's SP groups are global).
    """
    require_deepspeed()
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    prepare_model_for_sp(model, sp_size=sp_size, disable_in_eval=disable_in_eval)
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=SP_ATTN_NAME,
        sequence_parallel_size=sp_size,
        micro_batch_size=micro_batch_size,
        seq_length_is_variable=True,
        disable_in_eval=disable_in_eval,
    )
