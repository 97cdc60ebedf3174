"""Which models AnchorAttention can be exact on: the rules ``patch_model`` refuses by, each naming what is missing.

AnchorAttention is exact when the *only* place tokens see each other is attention calls that go through
transformers' ``AttentionInterface`` and receive the forward's kwargs (the layout). A model is refused when it
mixes tokens anywhere else, or when its attention computes something the layout cannot express:

* no ``AttentionInterface`` (the attention is inline in the modeling code: Bloom's ALiBi, Falcon, MPT, GPT-Neo, ...);
* layers that are not attention (``layer_types`` / ``layers_block_type`` / ``block_types`` kinds such as
  ``linear_attention``, ``mamba``, ``conv``, ``recurrent``, ``hybrid``);
* token-mixing modules outside attention: a ``Conv1d`` over the sequence (short convolutions, Mamba mixers), or a
  module whose class names a recurrent / state-space / linear-attention mixer;
* attention the layout cannot express: chunked attention (``attention_chunk_size``, Llama 4), learned attention
  sinks (a ``sinks`` parameter, GPT-OSS), non-causal attention modules (``is_causal=False``: an encoder loaded
  without ``is_decoder=True``).

What can only be seen at call time is checked there (:func:`check_call`): an attention call of an anchor forward
that did not receive the layout (a family that does not pass the forward's kwargs to its layers), or that carries
a keyword the anchor backends do not implement (e.g. ``s_aux``). The whole zoo of transformers' causal LMs is run
against these rules by :mod:`anchorcontext.zoo` (docs/models.md).
"""

from __future__ import annotations

import re

import torch

# layer kinds that either are causal (possibly windowed) attention through the interface, or mix no tokens
ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "attention", "global", "local", "mlp", "moe",
                             "dense"})
_LAYER_KIND_ATTRS = ("layer_types", "layers_block_type", "block_types")
# a Conv1d here encodes another modality's input (audio towers): it never sees the text tokens
_OTHER_MODALITY = re.compile(r"(^|\.)(audio|speech|vision|visual|image|video)", re.IGNORECASE)
# class-name parts (CamelCase) of token mixers that are not attention
_MIXER_NAMES = re.compile(r"Mamba|Rwkv|RWKV|Lstm|LSTM|Rglru|RgLru|Recurrent|Lightning|DeltaNet|LinearAttention|"
                          r"ShortConv|SSM|Ssm(?![a-z])|Retention")
# keywords an attention call may carry that the anchor backends implement or that do not change the result
KNOWN_CALL_KWARGS = frozenset({
    "dropout", "scaling", "sliding_window", "softcap", "position_ids", "cache_position", "use_cache",
    "output_attentions", "output_hidden_states", "output_router_logits", "return_dict", "is_causal",
    "anchor_layout", "anchor_backend", "anchor_patched", "anchor_doc_ids", "anchor_mask",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "num_items_in_batch", "layer_idx",
    "labels", "shift_labels", "seq_idx",  # seq_idx: the packing index of TRL padding-free (mamba kernels)
})


def _configs(config):
    """The config and its text sub-configs (``text_config``, ``language_config``, ...), once each."""
    seen, todo = [], [config]
    while todo:
        c = todo.pop()
        if c is None or any(c is s for s in seen):
            continue
        seen.append(c)
        todo.extend(v for k, v in vars(c).items() if k.endswith("_config") and hasattr(v, "to_dict"))
    return seen


def unsupported_reason(root) -> str | None:
    """Why AnchorAttention cannot be exact on ``root`` (a transformers ``PreTrainedModel``), or ``None``."""
    name = type(root).__name__
    if not root._can_set_attn_implementation() or not getattr(root, "_supports_attention_backend", False):
        return (f"{name} does not route its attention through transformers' AttentionInterface (its attention, "
                "and any ALiBi or relative bias, is computed inline), so anchorcontext cannot patch it")
    for cfg in _configs(root.config):
        for attr in _LAYER_KIND_ATTRS:
            kinds = getattr(cfg, attr, None)
            if isinstance(kinds, (list, tuple)):
                other = sorted({str(k) for k in kinds} - ATTENTION_KINDS)
                if other:
                    return (f"{name} has layers of kind {other} (config.{attr}): they mix tokens outside attention "
                            "(recurrent / state-space / linear attention / convolution) or attend in a pattern the "
                            "anchor layout cannot express, so documents would see each other there")
        chunk = getattr(cfg, "attention_chunk_size", None)
        if chunk:
            return (f"{name} uses chunked attention (config.attention_chunk_size={chunk}), a pattern the anchor "
                    "layout cannot express")
    for mname, mod in root.named_modules():
        if isinstance(mod, torch.nn.Conv1d) and not _OTHER_MODALITY.search(mname):
            return (f"{name} has a Conv1d over the sequence ({mname}): it mixes neighbouring tokens outside "
                    "attention, across document boundaries")
        if _MIXER_NAMES.search(type(mod).__name__):
            return (f"{name} has a {type(mod).__name__} ({mname}), a recurrent / state-space / linear-attention "
                    "mixer outside attention")
        if (type(mod).__name__.endswith("Attention") and getattr(mod, "is_causal", True) is False
                and not _OTHER_MODALITY.search(mname)):
            return (f"{name} has non-causal attention ({mname}.is_causal=False; an encoder needs "
                    "is_decoder=True to be a causal LM)")
    for pname, _ in root.named_parameters():
        if pname.rpartition(".")[2] == "sinks":
            return (f"{name} has learned attention sinks ({pname}), which the anchor backends do not implement")
    return None


def check_call(module, kwargs: dict) -> None:
    """Refuse an anchor-forward attention call whose keywords the anchor backends would ignore."""
    unknown = sorted(k for k, v in kwargs.items() if k not in KNOWN_CALL_KWARGS and v is not None)
    if unknown:
        raise ValueError(
            f"{type(module).__name__} passes {unknown} to its attention function; the anchor backends do not "
            "implement them (s_aux: attention sinks; block_indices: sparse attention; encoder_hidden_states: "
            "cross-attention), so anchorcontext cannot run this model exactly"
        )
    if getattr(module, "is_causal", True) is False:
        raise ValueError(f"{type(module).__name__} is non-causal (is_causal=False); AnchorAttention is causal")


def missing_layout_error(module) -> ValueError:
    return ValueError(
        f"{type(module).__name__} was called during an anchor forward without the anchor layout: this family does "
        "not pass the forward's keyword arguments to its attention layers, so they would attend across documents; "
        "it is not supported by anchorcontext"
    )
