"""Tiny random Hugging Face causal LMs of every family the patch supports (float32, built from configs, no
downloads), shared by tests/test_patch.py and tests/test_hf_packing.py."""

from __future__ import annotations

import torch
import transformers

VOCAB = 101
ANCHOR, PAD = 1, 0


def config_kwargs(**kw):
    """The shared config fields of every tiny model (2 layers, 4 query / 2 key-value heads of 8), updated by ``kw``."""
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=ANCHOR, pad_token_id=PAD, eos_token_id=2,
        head_dim=8,
    )
    base.update(kw)
    return base


def make_model(family: str, attn: str = "sdpa"):
    """A tiny ``family`` model (one of ``FAMILIES``) in eval mode without a KV cache, with weights from seed 0."""
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**config_kwargs())
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**config_kwargs())
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**config_kwargs())
        cls = transformers.Qwen3ForCausalLM
    elif family == "mistral":
        # a window shorter than the documents, so the sliding window really bites
        cfg = transformers.MistralConfig(**config_kwargs(sliding_window=4))
        cls = transformers.MistralForCausalLM
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(
            **config_kwargs(sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=5.0,
                            final_logit_softcapping=30.0)
        )
        cls = transformers.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **config_kwargs(sliding_window=4, query_pre_attn_scalar=12, num_hidden_layers=3,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise AssertionError(family)
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    model.config.use_cache = False
    return model


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"]
