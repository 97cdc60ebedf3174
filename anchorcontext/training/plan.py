"""The memory plan of a training run: reads the run's options and hands plain numbers to
:func:`anchorcontext.memory.plan_memory` (``anchorcontext train --dry_run`` prints it).

Where each input comes from:

* model dims: the model's config (``model_config`` block of a recipe, a local checkpoint, the hub), else
  :data:`anchorcontext.memory.KNOWN_MODELS` for the paper recipes' hub ids;
* engine: ``--deepspeed`` or the DeepSpeed config ``accelerate launch`` passes (stage 3 -> ``zero3``; with
  ``offload_optimizer``/``offload_param`` on the CPU -> ``zero3_offload``; other stages are refused), ``--fsdp`` or
  ``ACCELERATE_USE_FSDP`` -> ``fsdp2``, ``sp_size > 1`` with neither -> ``zero3`` (SP runs only on ZeRO-3), else
  ``ddp``;
* world size: ``--dry_run_world_size``, else the launcher's; device memory: ``--device_memory_gib``, else the CUDA
  device's when there is one;
* precision: ``--dtype`` (the weights as loaded) and ``--bf16`` / ``--fp16`` (mixed precision); checkpointing:
  ``--gradient_checkpointing`` / ``--activation_checkpointing``; attention: ``--attn_backend`` (``auto`` is planned
  as ``varlen``, what it resolves to on a GPU with flash-attn or torch varlen);
* loss: ``chunked_loss`` and ``loss_chunk_tokens`` when the run's options have them (default: chunked, ``anchorcontext.loss.DEFAULT_CHUNK_SIZE``).
"""

from __future__ import annotations

import logging
import os

from ..loss import DEFAULT_CHUNK_SIZE
from ..memory import KNOWN_MODELS, MemoryPlan, ModelDims, plan_memory

logger = logging.getLogger("anchorcontext")

DEFAULT_LOSS_CHUNK_TOKENS = DEFAULT_CHUNK_SIZE  # anchorcontext.loss: the chunk patch_model uses


def _option(args: tuple, name: str, default):
    """The first of the run's argument objects that has option ``name`` (works before and after it exists)."""
    for a in args:
        if hasattr(a, name):
            return getattr(a, name)
    return default


def _auto_int(value, default: int) -> int:
    return default if value is None or isinstance(value, str) else int(value)


def engine_for_run(training_args, sp_size: int) -> tuple[str, dict, str]:
    """``(engine, deepspeed config dict or {}, why)`` for the run described by ``training_args``."""
    from ..parallel.config import _resolved_ds_config
    from ..parallel.loss import load_deepspeed_config

    ds = _resolved_ds_config(training_args)
    if ds is not None:
        cfg = load_deepspeed_config(ds)
        zero = cfg.get("zero_optimization", {}) or {}
        stage = zero.get("stage", 0)
        if stage != 3:
            raise ValueError(f"the memory plan covers DeepSpeed ZeRO stage 3 (engines zero3, zero3_offload); the "
                             f"DeepSpeed config has zero_optimization.stage={stage!r}")
        off = [k for k in ("offload_optimizer", "offload_param")
               if str((zero.get(k) or {}).get("device", "none")).lower() in ("cpu", "nvme")]
        if off:
            return "zero3_offload", cfg, f"DeepSpeed ZeRO-3 config with {' and '.join(off)}"
        return "zero3", cfg, "DeepSpeed ZeRO-3 config"
    if getattr(training_args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2", {}, "FSDP (--fsdp / accelerate FSDP config)"
    if sp_size > 1:
        return "zero3", {}, f"sp_size={sp_size} runs on DeepSpeed ZeRO-3 (no DeepSpeed config given: its defaults)"
    return "ddp", {}, "no DeepSpeed or FSDP config: DDP"


def device_memory_default() -> tuple[float | None, str]:
    """``(GiB, name)`` of the current CUDA device, or ``(None, "")`` without one."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(torch.cuda.current_device())
            return p.total_memory / 2**30, p.name
    except Exception as e:  # a broken CUDA setup must not stop a dry run; say why the size is unknown
        logger.warning("anchorcontext: the CUDA device's memory is unknown (%s: %s); give --device_memory_gib",
                       type(e).__name__, e)
    return None, ""


def model_dims_for_run(margs, config=None) -> ModelDims:
    """Dims from ``config`` (a transformers config) or, for a hub id that cannot be read here, the known table."""
    if config is not None:
        known = KNOWN_MODELS.get(margs.model_name_or_path)
        return ModelDims.from_config(config, name=known.name if known else margs.model_name_or_path)
    if margs.model_name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[margs.model_name_or_path]
    raise ValueError(f"no model config for {margs.model_name_or_path!r} and it is not among the known models "
                     f"{sorted(KNOWN_MODELS)}: give model_config (the architecture block)")


def plan_for_run(margs, dargs, aargs, rargs, training_args, *, config=None) -> MemoryPlan:
    """The :class:`~anchorcontext.memory.MemoryPlan` of the run these options describe (per device)."""
    all_args = (aargs, margs, dargs, rargs, training_args)
    sp = rargs.sp_size
    engine, ds, why = engine_for_run(training_args, sp)
    world = rargs.dry_run_world_size or max(int(getattr(training_args, "world_size", 1) or 1), sp)
    if rargs.device_memory_gib is not None:
        gib, name = rargs.device_memory_gib, "device given by --device_memory_gib"
    else:
        gib, name = device_memory_default()
    ckpt = bool(getattr(training_args, "activation_checkpointing", False)
                or getattr(training_args, "gradient_checkpointing", False))
    mixed = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    backend = "varlen" if aargs.attn_backend == "auto" else aargs.attn_backend
    chunked = _option(all_args, "chunked_loss", True)
    chunk_tokens = _option(all_args, "loss_chunk_tokens", DEFAULT_LOSS_CHUNK_TOKENS)
    zero = ds.get("zero_optimization", {}) or {}
    plan = plan_memory(
        model=model_dims_for_run(margs, config), seq_len=dargs.seq_len,
        micro_batch=training_args.per_device_train_batch_size, world_size=world, sp_size=sp, engine=engine,
        param_dtype=margs.dtype, mixed_precision=mixed, gradient_checkpointing=ckpt, attention=backend,
        chunked_loss=chunked is not False, loss_chunk_tokens=int(chunk_tokens), device_memory_gib=gib,
        device_name=name or "device of unknown memory",
        zero3_max_live_parameters=_auto_int(zero.get("stage3_max_live_parameters"), 10**9),
        zero3_sub_group_size=_auto_int(zero.get("sub_group_size"), 10**9),
    )
    plan.notes.insert(0, f"engine {engine}: {why}")
    if aargs.attn_backend == "auto":
        plan.notes.insert(1, "attention auto planned as varlen (what auto picks on a GPU with flash-attn/torch varlen)")
    if chunked == "auto":
        plan.notes.insert(1, "chunked_loss=auto planned as chunked")
    return plan
