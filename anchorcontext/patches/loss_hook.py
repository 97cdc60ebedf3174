"""Hugging Face glue for the chunked loss (``patch_model(model, chunked_loss=True)``); the math is in
:mod:`anchorcontext.loss`.

A causal-LM forward *with labels* (``labels`` or pre-shifted ``shift_labels``) runs the model with
``logits_to_keep`` = an empty index tensor (so the head projects no token), captures the decoder's
``last_hidden_state`` with a forward hook on ``root.base_model``, and computes the loss from it in chunks through
the model's own output embeddings (``get_output_embeddings()``) and its family's logit transform. It returns the
model's output with ``loss`` set and ``logits=None``. Without labels the forward is the stock one (``generate()``,
eval, KV cache). Normalisation is ``ForCausalLMLoss``'s: the mean over targets, or the sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation).

The forward is set on the instance (``root.forward``, a bound method), not hooked: PEFT's ``LoraModel`` calls
the causal LM's ``forward`` directly, which bypasses module hooks but finds an instance attribute; ``copy.deepcopy``
rebinds a bound method to the copy. :func:`remove_chunked_loss` deletes the attribute and the decoder hook.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import types

import torch

from ..loss import (
    DEFAULT_CHUNK_SIZE,
    check_chunk_size,
    chunked_linear_cross_entropy,
    chunked_module_cross_entropy,
    shift_causal_labels,
)

logger = logging.getLogger("anchorcontext")

CHUNKED_LOSS = (True, False, "auto", "liger", "chunked")
# per call: a list the decoder hook appends its last_hidden_state to (innermost forward last)
_CAPTURE: contextvars.ContextVar[tuple] = contextvars.ContextVar("anchorcontext_loss_capture", default=())
_PREV = "_anchorcontext_prev_forward"  # instance attribute: the instance forward the chunked one replaced
_SUM: contextvars.ContextVar[bool] = contextvars.ContextVar("anchorcontext_loss_sum", default=False)


@contextlib.contextmanager
def summed_loss():
    """Inside this block a chunked forward returns the *summed* token loss (no division): what sequence
    parallelism needs to add the ranks' shards (:mod:`anchorcontext.parallel.loss`)."""
    tok = _SUM.set(True)
    try:
        yield
    finally:
        _SUM.reset(tok)


def liger_available() -> str | None:
    """``None`` when Liger-Kernel's fused linear cross-entropy can be imported, else why not."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception as e:  # ImportError, or a Triton / CUDA error raised at import
        return f"liger-kernel is not importable ({type(e).__name__}: {e})"
    return None


def resolve_chunked_loss(chunked_loss, device: torch.device) -> str | None:
    """``True``/``"chunked"`` -> ``"chunked"``; ``"auto"`` -> ``"liger"`` on CUDA when Liger imports, else
    ``"chunked"`` (logged once why); ``"liger"`` -> ``"liger"`` or a ValueError; ``False`` -> ``None`` (stock)."""
    if not (isinstance(chunked_loss, bool) or chunked_loss in CHUNKED_LOSS[2:]):
        raise ValueError(f"chunked_loss must be one of {CHUNKED_LOSS}, got {chunked_loss!r}")
    if chunked_loss is False:
        return None
    if chunked_loss in (True, "chunked"):
        return "chunked"
    why = liger_available()
    if chunked_loss == "liger":
        if why is not None:
            raise ValueError(f"chunked_loss='liger' but {why}; pip install liger-kernel (CUDA), or use "
                             "chunked_loss=True (anchorcontext's own chunked loss)")
        return "liger"
    if device.type != "cuda":
        why = f"the model is on {device.type}, not CUDA"
    if why is not None:
        logger.info("anchorcontext: chunked_loss='auto' uses anchorcontext's chunked loss: %s", why)
        return "chunked"
    return "liger"


def _auto_impl(state: dict, device: torch.device, root) -> str:
    """``chunked_loss="auto"`` on ``device``: resolved once per device type (the reason logged once); Liger only
    for what it computes (a plain linear head without logit scaling), else anchorcontext's."""
    cache = state.setdefault("auto_impl", {})
    if device.type not in cache:
        impl = resolve_chunked_loss("auto", device)
        if impl == "liger" and (_logit_transform(root)[0] is not None or _head_path(root.get_output_embeddings())
                                != "linear"):
            logger.info("anchorcontext: chunked_loss='auto' uses anchorcontext's chunked loss: Liger's takes a plain "
                        "linear head without logit scaling")
            impl = "chunked"
        cache[device.type] = impl
    return cache[device.type]


def _logit_transform(root) -> tuple[float | None, float | None]:
    """``(scale, softcap)`` of the family's logit post-processing (see :mod:`anchorcontext.loss`)."""
    cfg = root.config
    scale = None
    if getattr(root, "logit_scale", None) is not None and not isinstance(root.logit_scale, torch.nn.Module):
        scale = float(root.logit_scale)  # Cohere: logits * self.logit_scale
    if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
        scale = 1.0 / float(cfg.logits_scaling)  # Granite: logits / config.logits_scaling
    softcap = getattr(cfg, "final_logit_softcapping", None)
    text = getattr(cfg, "get_text_config", None)
    if softcap is None and callable(text):
        softcap = getattr(text(), "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def _head_path(head) -> str:
    """``"linear"`` (fused Function on weight/bias) or ``"module"`` (the head called per checkpointed chunk)."""
    if type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id") and not head._forward_hooks \
            and not head._forward_pre_hooks:
        return "linear"
    base = getattr(head, "base_layer", None) or getattr(head, "get_base_layer", lambda: None)()
    if isinstance(head, torch.nn.Linear) or isinstance(base, torch.nn.Linear):
        return "module"  # a Linear subclass, a hooked / ZeRO-3 partitioned Linear, a PEFT LoRA Linear
    raise ValueError(
        f"chunked_loss needs a linear output head (get_output_embeddings() -> nn.Linear, or a PEFT layer over one), "
        f"got {type(head).__name__}; patch with chunked_loss=False"
    )


def check_chunked_loss_model(root) -> None:
    """Refuse a model the chunked loss cannot serve (ValueError naming what is missing)."""
    params = inspect.signature(type(root).forward).parameters
    if "logits_to_keep" not in params:
        raise ValueError(f"chunked_loss: {type(root).__name__}.forward has no logits_to_keep argument, so its "
                         "logits cannot be skipped; patch with chunked_loss=False")
    if "labels" not in params:
        raise ValueError(f"chunked_loss: {type(root).__name__}.forward takes no labels (not a causal LM head?); "
                         "patch with chunked_loss=False")
    head = root.get_output_embeddings()
    if head is None:
        raise ValueError(f"chunked_loss: {type(root).__name__}.get_output_embeddings() is None; patch with "
                         "chunked_loss=False")
    _head_path(head)
    _decoders(root)


def _head_mismatch(root, hidden, logits) -> str | None:
    """Why ``transform(head(hidden))`` does not reproduce the model's own ``logits`` of the same positions
    (``(B, 1, H)`` and ``(B, 1, V)``), or ``None``: the first-call check of the chunked loss."""
    if logits is None or tuple(logits.shape[:2]) != tuple(hidden.shape[:2]):
        return (f"{type(root).__name__}.forward did not return the logits asked for with logits_to_keep (got "
                f"{None if logits is None else tuple(logits.shape)})")
    scale, softcap = _logit_transform(root)
    head = root.get_output_embeddings()
    width = getattr(head, "in_features", None)
    if width is not None and width != hidden.shape[-1]:
        return (f"the decoder's last hidden state has {hidden.shape[-1]} features but the output head of "
                f"{type(root).__name__} takes {width}: the family has layers between its decoder and its head")
    with torch.no_grad():
        try:
            ours = head(hidden).float()
        except Exception as e:  # a head that needs more than the decoder's output
            return f"the output head of {type(root).__name__} cannot be applied to the decoder's output ({e})"
        from ..loss import _transform

        ours, _ = _transform(ours, scale, softcap)
        theirs = logits.detach().float()
        err = float((ours - theirs).abs().max())
        # float32: rounding of one matmul on another batch shape; bf16/fp16: the head's storage rounding
        bar = (1e-4 if hidden.dtype == torch.float32 else 3e-2) * max(1.0, float(theirs.abs().max()))
    if err > bar:
        return (f"the output head of {type(root).__name__} with the logit transform anchorcontext reads (scale "
                f"{scale}, softcap {softcap}) does not reproduce the model's own logits (max diff {err:.3g}): the "
                "family transforms the decoder's output or the logits in a way the chunked loss does not know "
                "(layers between the decoder and the head, as BERT's prediction transform; a logit post-processing)")
    return None


def _capture_hook(module, args, output):
    stack = _CAPTURE.get()
    if stack:
        h = getattr(output, "last_hidden_state", None)
        stack[-1].append(h if h is not None else output[0])


def chunked_lm_loss(root, hidden, labels=None, *, shift_labels=None, num_items_in_batch=None,
                    chunk_size=DEFAULT_CHUNK_SIZE, summed=False, impl="chunked"):
    """The causal-LM loss of ``root`` from its final hidden states, chunked (float32 scalar).

    Args:
        hidden: ``(B, L, H)`` ``last_hidden_state``. labels: ``(B, L)`` unshifted (HF convention) or
            shift_labels: ``(B, L)`` already shifted; -100 = no target.
        num_items_in_batch: divide the sum by it (Trainer, gradient accumulation); else the mean over targets.
        summed: return the sum itself (sequence parallelism adds the ranks' sums).
    """
    if shift_labels is None:
        shift_labels = shift_causal_labels(labels)
    if tuple(shift_labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels (B, L) = {tuple(shift_labels.shape)} do not match the hidden states' "
                         f"{tuple(hidden.shape[:2])}")
    head = root.get_output_embeddings()
    scale, softcap = _logit_transform(root)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels.reshape(-1).to(h.device)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        if scale is not None or _head_path(head) != "linear":
            raise ValueError("chunked_loss='liger' supports a plain linear head without logit scaling; use "
                             "chunked_loss=True")
        total = liger_fused_linear_cross_entropy(h, head.weight, y, head.bias, ignore_index=-100,
                                                 reduction="sum", softcap=softcap)
        total = (total[0] if isinstance(total, tuple) else total).float()  # some releases return (loss, z_loss)
    elif _head_path(head) == "linear":
        total = chunked_linear_cross_entropy(h, head.weight, head.bias, y, chunk_size=chunk_size, scale=scale,
                                             softcap=softcap)
    else:
        total = chunked_module_cross_entropy(h, head, y, chunk_size=chunk_size, scale=scale, softcap=softcap)
    if summed:
        return total
    if num_items_in_batch is not None:
        n = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        return total / n
    return total / (y != -100).sum()  # all -100: 0/0 = nan, as stock ForCausalLMLoss gives


def _chunked_forward(self, *args, **kwargs):
    """``root.forward`` of a model with a chunked loss (bound with ``types.MethodType``, so ``copy.deepcopy``
    rebinds it to the copy and the copy's own state is read)."""
    from .hooks import _STATE_ATTR

    # the forward we replaced: another wrapper's instance forward (TRL's fused LM head), else the class's
    orig = self.__dict__.get(_PREV) or type(self).forward.__get__(self)
    state = getattr(self, _STATE_ATTR, None) or {}
    impl = state.get("chunked_loss_impl")
    if impl is None or kwargs.get("fused_lm_head"):  # TRL's own fused head computes its loss without logits
        return orig(*args, **kwargs)
    sig = inspect.signature(type(self).forward.__get__(self))
    kw = dict(sig.bind_partial(*args, **kwargs).arguments)  # labels may come positionally
    var_kw = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    kw.update(kw.pop(var_kw, None) or {})
    labels, shift = kw.get("labels"), kw.get("shift_labels")
    keep = kw.get("logits_to_keep", 0)
    if (labels is None and shift is None) or not (isinstance(keep, int) and keep == 0):
        return orig(*args, **kwargs)  # no labels, or logits asked for explicitly: the stock forward
    for k in ("labels", "shift_labels"):
        kw.pop(k, None)
    n_items = kw.pop("num_items_in_batch", None)
    return_dict = kw.pop("return_dict", None)
    ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if impl == "auto":
        impl = _auto_impl(state, ref.device if torch.is_tensor(ref) else self.get_output_embeddings().weight.device,
                          self)
    # the first call of a model keeps the stock logits of one position per row, to check that the head and the
    # family's logit transform reproduce them (an unknown post-processing would make every loss silently wrong)
    probe = None if state.get("head_checked") else max(int(ref.shape[1]) - 1, 0) if torch.is_tensor(ref) else None
    device = getattr(ref, "device", None)
    kw["logits_to_keep"] = torch.tensor([] if probe is None else [probe], dtype=torch.long, device=device)
    captured: list = []
    tok = _CAPTURE.set((*_CAPTURE.get(), captured))
    try:
        out = orig(**kw, return_dict=True)
    finally:
        _CAPTURE.reset(tok)
    why = None
    if not captured:
        names = ", ".join(type(m).__name__ for m in _decoders(self))
        why = f"{names} (the decoder anchorcontext hooks) returned no hidden state to {type(self).__name__}.forward"
    elif probe is not None:
        why = _head_mismatch(self, captured[-1][:, probe:probe + 1], out.logits)
    if why is not None:  # refused on the first call: an error for chunked_loss=True, the stock loss for "auto"
        if state.get("chunked_loss") != "auto":
            raise ValueError(f"chunked_loss: {why}; patch with chunked_loss=False (the stock loss)")
        logger.warning("anchorcontext: chunked_loss='auto' keeps the stock loss for %s: %s", type(self).__name__, why)
        state["chunked_loss_impl"] = None
        return orig(*args, **kwargs)
    state["head_checked"] = True
    hidden = captured[-1]
    loss = chunked_lm_loss(self, hidden, labels, shift_labels=shift, num_items_in_batch=n_items,
                           chunk_size=state["loss_chunk_tokens"], summed=_SUM.get(), impl=impl)
    aux = getattr(out, "aux_loss", None)  # MoE: stock adds <coef> * aux_loss to a loss with labels
    coef = next((getattr(self, n) for n in ("router_aux_loss_coef", "aux_loss_coef")
                 if getattr(self, n, None) is not None), None)
    if aux is not None and coef is not None and not _SUM.get():
        loss = loss + coef * aux.to(loss.device)
    # a new output, not `out.logits = None`: ModelOutput keeps a None-assigned field's old item, which
    # accelerate's convert_to_fp32, DeepSpeed and to_tuple() read (the probe's (B, 1) logits came back that way)
    out = type(out)(**{**{k: v for k, v in out.items() if k != "logits"}, "loss": loss})
    if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
        return out.to_tuple()
    return out


_chunked_forward._anchorcontext_chunked = True


def _is_chunked_forward(f) -> bool:
    return getattr(getattr(f, "__func__", None), "_anchorcontext_chunked", False)


def _decoders(root) -> list:
    """The modules whose output is the decoder's last hidden state: ``root.base_model`` (``root.get_decoder()``
    when a family's ``base_model_prefix`` names no attribute, e.g. Mllama's text model) and its ``decoder`` child
    when the causal LM calls that one directly (OPT: ``self.model.decoder``). Whichever runs last wins; the
    first call checks that the head reproduces the model's logits from it."""
    base = root.base_model
    if base is root:
        get = getattr(root, "get_decoder", None)
        try:
            base = get() if callable(get) else None
        except Exception:
            base = None
        if base is None or base is root:
            base = getattr(root, "model", None)
    if not isinstance(base, torch.nn.Module) or base is root:
        raise ValueError(f"chunked_loss: {type(root).__name__} has no decoder module to take the hidden states "
                         "from (base_model is the model itself); patch with chunked_loss=False")
    out = [base]
    child = getattr(base, "decoder", None)
    if isinstance(child, torch.nn.Module) and child is not root:
        out.append(child)
    return out


def install_chunked_loss(root, state: dict) -> None:
    """Set ``root.forward`` (an instance attribute: PEFT's ``LoraModel`` calls the causal LM's ``forward``
    directly, bypassing module hooks) and hook its decoder; the options are read from ``state`` per call."""
    check_chunked_loss_model(root)
    prev = root.__dict__.get("forward")
    if prev is not None:  # e.g. TRL's add_fused_lm_head: kept, and called for everything but the chunked loss
        setattr(root, _PREV, prev)
    root.forward = types.MethodType(_chunked_forward, root)
    state["loss_hooks"] = [m.register_forward_hook(_capture_hook) for m in _decoders(root)]


def remove_chunked_loss(root, state: dict) -> None:
    for h in state.pop("loss_hooks", ()):
        h.remove()
    if _is_chunked_forward(root.__dict__.get("forward")):
        del root.forward
        prev = root.__dict__.pop(_PREV, None)
        if prev is not None:
            root.forward = prev


def resolve_loss_options(root, chunked_loss, loss_chunk_tokens) -> str | None:
    """Validate the chunked-loss options for ``root`` without changing it: the implementation to use
    (``"chunked"`` | ``"liger"`` | ``None`` = stock), else a ValueError naming the option or what is missing."""
    check_chunk_size(loss_chunk_tokens, "loss_chunk_tokens")
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    # "auto" is resolved per forward, on the device the batch runs on (Trainer moves the model after patching)
    impl = "auto" if chunked_loss == "auto" else resolve_chunked_loss(chunked_loss, device)
    if impl is not None:
        try:
            check_chunked_loss_model(root)
        except ValueError as e:
            if chunked_loss != "auto":
                raise
            logger.warning("anchorcontext: chunked_loss='auto' keeps the stock loss for %s: %s", type(root).__name__, e)
            return None
    return impl


def configure_chunked_loss(root, state: dict, chunked_loss, loss_chunk_tokens, impl=None) -> None:
    """(Re)apply the chunked-loss options on a patched model (idempotent); ``impl`` from
    :func:`resolve_loss_options` when already resolved."""
    if impl is None:
        impl = resolve_loss_options(root, chunked_loss, loss_chunk_tokens)
    if impl is not None and "loss_hooks" not in state:
        install_chunked_loss(root, state)
    elif impl is None:
        remove_chunked_loss(root, state)
    state.update(chunked_loss=chunked_loss, loss_chunk_tokens=loss_chunk_tokens, chunked_loss_impl=impl)


def uses_chunked_loss(model) -> bool:
    """Whether forwards of ``model`` with labels return ``logits=None`` (a chunked loss is on)."""
    from .hooks import _STATE_ATTR

    state = getattr(model, _STATE_ATTR, None)
    return bool(state and state.get("chunked_loss_impl"))
