"""Model building for a training run: the model and tokenizer, an architecture block, the RoPE overrides."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .args import ModelArguments

SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size")


class RopeRangeWarning(UserWarning):
    """``seq_len`` exceeds the model's RoPE range and no scaling is configured."""


def rope_summary(config) -> dict:
    rp = dict(getattr(config, "rope_parameters", None) or {})
    return {"max_position_embeddings": getattr(config, "max_position_embeddings", None), **rp}


def apply_rope_overrides(config, margs: ModelArguments) -> bool:
    """Write ``rope_theta`` / ``rope_scaling`` / ``max_position_embeddings`` into ``config`` (in place).

    Returns True when anything changed. ``rope_scaling`` follows HF (``{"rope_type": "yarn", "factor": 4.0, ...}``);
    ``original_max_position_embeddings`` defaults to the config's range before the override.
    """
    if margs.rope_theta is None and margs.rope_scaling is None and margs.max_position_embeddings is None:
        return False
    original = getattr(config, "max_position_embeddings", None)
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if rp and any(isinstance(v, dict) for v in rp.values()):
        raise ValueError(
            f"{config.model_type} has per-layer-type RoPE parameters ({sorted(rp)}); set them in model_config instead "
            "of rope_theta / rope_scaling"
        )
    if margs.rope_theta is not None:
        rp["rope_theta"] = float(margs.rope_theta)
    if margs.rope_scaling is not None:
        sc = dict(margs.rope_scaling)
        sc["rope_type"] = sc.pop("rope_type", sc.pop("type", "default"))
        for k in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                  "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "short_factor", "long_factor",
                  "truncate"):
            rp.pop(k, None)
        rp.update(sc)
        if sc["rope_type"] in ("yarn", "longrope", "llama3") and original is not None:
            rp.setdefault("original_max_position_embeddings", original)
    if margs.max_position_embeddings is not None:
        config.max_position_embeddings = int(margs.max_position_embeddings)
    config.rope_parameters = rp
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    return True


def _rebuild_rotary(model) -> int:
    """Re-create every rotary-embedding module from its (updated) config; returns how many were rebuilt."""
    n = 0
    for name, module in list(model.named_modules()):
        if not (type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        try:
            new = type(module)(config=module.config)
        except TypeError as e:
            raise ValueError(
                f"cannot rebuild {type(module).__name__} with the new RoPE settings ({e}); build the model with "
                "model_config + from_scratch, or set them in the checkpoint's config.json"
            ) from None
        new.to(device=module.inv_freq.device)
        setattr(parent, name.rsplit(".", 1)[-1], new)
        n += 1
    return n


def config_from_block(block: dict):
    """A ``transformers`` config from an architecture block ``{"model_type": ..., **fields}`` (no download)."""
    from transformers import AutoConfig

    block = dict(block)
    model_type = block.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **block)
    except ValueError as e:
        raise ValueError(f"model_config: unknown model_type {model_type!r}: {e}") from None


def build_model_on_meta(margs: ModelArguments):
    """The model described by ``margs`` (architecture block + RoPE overrides) on the meta device.

    With ``model_config`` nothing is loaded. The offline models (``tiny``, the embedded ``smollm2``) have no config
    to read on their own, so they are built once the way training builds them and their config is used.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = margs.model_name_or_path
    if margs.model_config is not None:
        config = config_from_block(margs.model_config)
        apply_rope_overrides(config, margs)
    elif name in ("tiny", "smollm2") or name.startswith("HuggingFaceTB/SmolLM2-135M"):
        config = build_model(margs)[0].config  # the RoPE overrides are applied there
    else:
        config = AutoConfig.from_pretrained(name)
        apply_rope_overrides(config, margs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def build_model(margs: ModelArguments, *, seed: int = 0) -> tuple[Any, Any, str]:
    """``(model, tokenizer, source)`` with the RoPE overrides applied; ``use_cache`` off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, margs.dtype)
    name = margs.model_name_or_path
    if name == "tiny":
        from ..assets import tiny_llama, train_bpe_tokenizer

        tok = train_bpe_tokenizer(vocab_size=margs.tiny_vocab_size)
        kw = {}
        if margs.model_config:
            kw = {k: v for k, v in margs.model_config.items() if k != "model_type"}
        model = tiny_llama(tok, seed=seed, hidden_size=margs.tiny_hidden_size, num_layers=margs.tiny_num_layers, **kw)
        model = model.to(dtype)
        source = f"tiny (random Llama, hidden {margs.tiny_hidden_size}, {margs.tiny_num_layers} layers, stdlib BPE {len(tok)})"
    elif margs.from_scratch:
        config = config_from_block(margs.model_config)
        apply_rope_overrides(config, margs)
        tok_name = margs.tokenizer_name_or_path or name
        tok = AutoTokenizer.from_pretrained(tok_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        source = f"from_scratch ({config.model_type} from model_config, random init)"
    else:
        from ..assets import resolve_model

        model, tok, source = resolve_model(name, dtype=dtype)
        if margs.model_config:
            bad = {k: (margs.model_config[k], getattr(model.config, k, None)) for k in SHAPE_KEYS
                   if k in margs.model_config and getattr(model.config, k, None) != margs.model_config[k]}
            if bad:
                warnings.warn(f"model_config disagrees with the loaded {name!r} (key: (config, loaded)): {bad}",
                              stacklevel=2)
    if margs.tokenizer_name_or_path and not margs.from_scratch:
        tok = AutoTokenizer.from_pretrained(margs.tokenizer_name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if (name == "tiny" or not margs.from_scratch) and apply_rope_overrides(model.config, margs):
        _rebuild_rotary(model)  # from_scratch configs got the overrides before the model was built
    model.config.use_cache = False
    return model, tok, source


def check_rope_range(config, seq_len: int) -> str | None:
    """Warn (``RopeRangeWarning``) when ``seq_len`` exceeds ``max_position_embeddings`` and no scaling is set."""
    mpe = getattr(config, "max_position_embeddings", None)
    rp = getattr(config, "rope_parameters", None) or {}
    rtype = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    if mpe is None or seq_len <= mpe or rtype not in (None, "default"):
        return None
    msg = (
        f"seq_len={seq_len} exceeds the model's RoPE range max_position_embeddings={mpe} "
        f"(rope_theta={rp.get('rope_theta')}, no rope_scaling): positions {mpe}..{seq_len - 1} were never trained. "
        "Raise rope_theta (the paper: 5e6 at 64K, 1e7 at 128K) together with --max_position_embeddings, or set "
        "--rope_scaling"
    )
    warnings.warn(msg, RopeRangeWarning, stacklevel=2)
    return msg
