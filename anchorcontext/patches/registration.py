"""Registration with transformers: the ``"anchor*"`` attention entries, their mask functions, and the guard.

Entries (``AttentionInterface`` + ``AttentionMaskInterface``, never rebinding private functions):

* ``"anchor"``: anchor-aware attention whose stock fallback is SDPA (``sdpa_attention_forward`` + ``sdpa_mask``).
* ``"anchor_eager"``: the same with the model's own ``eager_attention_forward`` + ``eager_mask`` as fallback
  (chosen when the model was on ``eager``, e.g. Gemma2 for its softcap).

A call that carries ``anchor_layout`` runs AnchorAttention; any other call runs the fallback unchanged.

The guard (:func:`guard_stock_attention`) wraps every other entry of ``AttentionInterface`` (FlashAttention,
flex, kernels-hub names, and the ``"sdpa"`` that a reloaded model gets) and the ``*eager_attention_forward``
functions of every loaded ``transformers.models.*.modeling_*`` module (what a model on ``eager`` calls; its call
site passes it to ``get_interface`` as the default, read from the module at call time): a call carrying ``anchor_*`` kwargs runs
AnchorAttention when a patched model's pre-hook prepared it, and is refused with an error naming ``patch_model``
otherwise (never patched, unpatched, reloaded), instead of silently attending across documents. So a model
loaded with FlashAttention or flex keeps its name and its kernel for plain forwards after ``patch_model``
(transformers' flash path reads the kernel from the name). See docs/architecture.md, "What is refused, and why".
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys

import torch

from ..attention import anchor_attention
from .support import check_call, missing_layout_error

logger = logging.getLogger("anchorcontext")

MIN_TRANSFORMERS = "5.0.0"
ATTN_NAME = "anchor"
ATTN_NAME_EAGER = "anchor_eager"
ANCHOR_KEYS = ("anchor_layout", "anchor_doc_ids", "anchor_mask", "anchor_backend", "anchor_patched")
# Set by a patched model's pre-hook beside the layout it built. A kwarg, not the ContextVar flag, because
# gradient checkpointing re-runs the attention in backward, after the forward's hooks have reset the flag.
PATCHED_KEY = "anchor_patched"
_GUARD_KEYS = (*ANCHOR_KEYS, "anchor_sp_layout")

# True while the current call (thread / asyncio task: a ContextVar) runs an anchor forward of a patched model;
# set by the decoder's pre-hook, reset by its post-hook, read by the mask functions.
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
    fn = getattr(fn, "__wrapped_stock__", fn)
    return fn(module, query, key, value, attention_mask, **kwargs)


def _sdpa_fallback(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _make_attention_fn(fallback):
    def attention_fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                     softcap=None, **kwargs):
        layout = kwargs.get("anchor_layout")
        if layout is None:
            if not torch.compiler.is_compiling() and _ANCHOR_FORWARD.get():
                raise missing_layout_error(module)  # the family dropped the forward's kwargs on the way here
            for k in ANCHOR_KEYS:
                kwargs.pop(k, None)
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            sliding_window=sliding_window, softcap=softcap, **kwargs)
        if attention_mask is not None and not torch.compiler.is_compiling() and _ANCHOR_FORWARD.get():
            # a patched model's mask entry returned None: this mask is the family's own (a learned bias: Doge)
            raise ValueError(
                f"{type(module).__name__} builds its own attention mask or bias inside the anchor forward, which the "
                "anchor backends cannot apply; this family is not supported by anchorcontext"
            )
        if attention_mask is not None and "mask" not in _warned:
            _warned.add("mask")
            logger.warning(
                "anchorcontext: transformers built an attention mask that the anchor forward ignores; call "
                "anchorcontext.patch_model(model) so it is skipped (it costs O(B*L^2) memory)."
            )
        check_call(module, kwargs)
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
        return out.contiguous(), None  # as stock SDPA returns it: some families .view() it

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


def is_anchor_name(name: str | None) -> bool:
    """Whether ``name`` is one of our attention entries."""
    return name in (ATTN_NAME, ATTN_NAME_EAGER)


def _make_guard(what: str, fn):
    """``fn`` (a stock entry) that runs AnchorAttention for a patched model's anchor forward (the decoder's
    pre-hook marked it) and refuses ``anchor_*`` kwargs otherwise."""
    anchor_fn = _make_attention_fn(fn)

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if not any(k in kwargs for k in _GUARD_KEYS):  # every plain call, every layer: cheap, and torch.compile traces it
            return fn(*args, **kwargs)
        given = [k for k in _GUARD_KEYS if k in kwargs]
        if kwargs.get("anchor_layout") is not None and kwargs.get(PATCHED_KEY):
            return anchor_fn(*args, **kwargs)
        raise ValueError(
            f"this forward carries {given} but the model's attention is the stock {what}, which would ignore "
            "them and attend across documents; call "
            "anchorcontext.patch_model(model) first (also after unpatch_model, and on a model reloaded "
            "with from_pretrained: its saved config rightly names the stock implementation)"
        )

    guarded.__wrapped_stock__ = fn
    return guarded


def skip_stock_mask_in_anchor_forwards(name: str) -> None:
    """Make the stock mask entry ``name`` (a name a patched model kept: FlashAttention, flex, a kernels-hub kernel)
    return ``None`` during anchor forwards, as ours do: the anchor attention ignores it, and flex's BlockMask is
    O(L^2) work. Idempotent; other calls, and calls under torch.compile, run the stock entry unchanged."""
    from transformers import AttentionMaskInterface

    fn = AttentionMaskInterface._global_mapping.get(name)
    if fn is None or hasattr(fn, "__wrapped_stock__"):
        return

    @functools.wraps(fn)
    def mask_fn(*args, **kwargs):
        if not torch.compiler.is_compiling() and _ANCHOR_FORWARD.get():
            return None
        return fn(*args, **kwargs)

    mask_fn.__wrapped_stock__ = fn
    AttentionMaskInterface.register(name, mask_fn)


def is_modeling_module(name: str) -> bool:
    """Whether ``name`` is a transformers model family's modeling module (``transformers.models.x.modeling_x``)."""
    return name.startswith("transformers.models.") and name.rpartition(".")[2].startswith("modeling_")


_STATE_ATTR = "_anchorcontext_patch"  # set by patch_model on the model (and its PreTrainedModel root)


def _guard_forward(cls) -> None:
    """Make ``cls.forward`` (a transformers ``PreTrainedModel`` class) refuse ``anchor_*`` keys unless the model is
    patched: the families that never reach a registry entry or an eager function (Bloom, Falcon, MPT: attention
    inline) or that drop the forward's kwargs before their layers (Nemotron) would otherwise run them as full
    attention. A patched model passes: its state is on the outer model, and inner models (OPT's decoder) run
    inside the anchor forward its decoder's pre-hook opened."""
    fn = cls.__dict__.get("forward")
    if fn is None or hasattr(fn, "__wrapped_stock__"):
        return

    @functools.wraps(fn)
    def forward(self, *args, **kwargs):
        if not any(k in kwargs for k in ANCHOR_KEYS) or kwargs.get(PATCHED_KEY) or _ANCHOR_FORWARD.get():
            return fn(self, *args, **kwargs)  # plain, or inside an anchor forward the decoder's pre-hook opened
        given = [k for k in ANCHOR_KEYS if k in kwargs]
        state = getattr(self, _STATE_ATTR, None)
        if state is None:
            raise ValueError(
                f"this forward carries {given} but {cls.__name__} is not patched by anchorcontext, so it would ignore "
                "them and attend across documents; call anchorcontext.patch_model(model) first (it names what is "
                "missing if the family cannot be supported; see docs/models.md)"
            )
        if id(self) in state.get("chain_ids", ()):  # a hooked decoder: its pre-hooks took the keys already
            return fn(self, *args, **kwargs)
        seen = state.get("anchor_forwards", 0)
        out = fn(self, *args, **kwargs)
        if state.get("anchor_forwards", 0) == seen:  # the keys never reached the hooked decoder
            raise ValueError(
                f"{cls.__name__}.forward does not pass {given} on to its decoder (it drops the keyword arguments it "
                "does not name), so its layers attended across documents; this family is not supported by "
                "anchorcontext"
            )
        return out

    forward.__wrapped_stock__ = fn
    cls.forward = forward


def guard_eager_functions(module) -> None:
    """Wrap the ``*eager_attention_forward`` functions of one modeling module in place, and the ``forward`` of
    each of its model classes (:func:`_guard_forward`; idempotent).

    A model on ``eager`` calls them, not a registry entry: ``get_interface(name, eager_attention_forward)`` (or
    ``eager_attention_forward`` itself on transformers < 5.x) reads the module global at call time, so replacing
    the global guards every such call, including families whose call site passes another eager function
    (``vision_``/``simple_``/``text_eager_attention_forward``): each keeps its own function.
    """
    from transformers import PreTrainedModel

    for attr, fn in list(vars(module).items()):
        if attr.endswith("eager_attention_forward") and callable(fn) and not hasattr(fn, "__wrapped_stock__"):
            setattr(module, attr, _make_guard(f"'eager' implementation ({module.__name__}.{attr})", fn))
        elif isinstance(fn, type) and issubclass(fn, PreTrainedModel) and fn.__module__ == module.__name__:
            _guard_forward(fn)


def guard_stock_attention() -> None:
    """Wrap every registered stock attention entry and every loaded model family's eager attention function so
    they refuse ``anchor_*`` kwargs (idempotent).

    Entries registered later (a kernels-hub kernel loaded by ``from_pretrained``) are guarded at the next call;
    modeling modules imported later are guarded as they load (the import hook in :mod:`anchorcontext.patches`).
    """
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 5: register() names the version needed
        return
    for name, fn in list(AttentionInterface._global_mapping.items()):
        if fn is None or name.startswith("anchor") or hasattr(fn, "__wrapped_stock__"):
            continue
        AttentionInterface.register(name, _make_guard(f"{name!r} implementation", fn))
    for name, module in list(sys.modules.items()):
        if module is not None and is_modeling_module(name):
            guard_eager_functions(module)


def register() -> None:
    """Register ``"anchor"`` and ``"anchor_eager"`` with transformers and guard the stock entries (idempotent).

    Then ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="anchor")`` works; call
    :func:`~anchorcontext.patch_model` on the loaded model too so anchor forwards skip building the stock mask.
    """
    check_transformers_version()
    from transformers import AttentionInterface, AttentionMaskInterface

    if AttentionInterface._global_mapping.get(ATTN_NAME) is None:
        AttentionInterface.register(ATTN_NAME, _make_attention_fn(_sdpa_fallback))
        AttentionMaskInterface.register(ATTN_NAME, _make_mask_fn("sdpa"))
        AttentionInterface.register(ATTN_NAME_EAGER, _make_attention_fn(_eager_fallback))
        AttentionMaskInterface.register(ATTN_NAME_EAGER, _make_mask_fn("eager"))
    guard_stock_attention()
