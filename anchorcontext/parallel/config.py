"""Wiring for accelerate and HF Trainer: ``configure_sequence_parallel`` and ``make_parallelism_config``.

accelerate (``ParallelismConfig(sp_backend="deepspeed")``) and HF Trainer (``TrainingArguments(
parallelism_config=..., deepspeed=...)``) drive DeepSpeed's Ulysses: at ``prepare`` they wrap the model's
attention implementation in ``UlyssesSPAttentionHF``, shard each batch on the sequence dimension with
``UlyssesSPDataLoaderAdapter`` and (Trainer) gather the loss over the SP group. We only choose the attention
(``"anchor_sp"``) and refuse settings that would train wrongly.
"""

from __future__ import annotations

import os

from .loss import check_deepspeed_config_for_sp
from .ulysses import SP_ATTN_NAME, check_sp_heads, prepare_model_for_sp, require_deepspeed


def make_parallelism_config(sp_size: int):
    """``accelerate.ParallelismConfig`` for DeepSpeed Ulysses over ``sp_size`` ranks running ``"anchor_sp"``.

    accelerate 1.15 accepts only flash/sdpa names for ``sp_attn_implementation`` at construction; the handler
    is built with ``"sdpa"`` and the field set to ``"anchor_sp"`` afterwards (the value is only forwarded to
    DeepSpeed's ``register_with_transformers``, which accepts any registered name).
    """
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 2:
        raise ValueError(f"sp_size must be an integer >= 2 for a sequence-parallel config, got {sp_size!r}")
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa")
    handler.sp_attn_implementation = SP_ATTN_NAME
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sp_size, sp_handler=handler)


def _resolved_ds_config(training_args) -> dict | str | None:
    """The DeepSpeed config in force: ``training_args.deepspeed``, else the one ``accelerate launch`` passes in the
    environment (``ACCELERATE_USE_DEEPSPEED`` + ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` or ``..._ZERO_STAGE``)."""
    hf_cfg = getattr(training_args, "hf_deepspeed_config", None)
    if hf_cfg is not None and isinstance(getattr(hf_cfg, "config", None), dict):
        return hf_cfg.config
    if training_args.deepspeed is not None:
        return training_args.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if path and path.lower() != "none":
            return path
        # accelerate's DeepSpeedPlugin default stage is 2
        return {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}}
    return None


def configure_sequence_parallel(*, model, training_args, sp_size: int):
    """Set up Ulysses sequence parallelism over ``sp_size`` ranks for an HF Trainer run; returns ``training_args``.

    Requires DeepSpeed ZeRO-3 (``training_args.deepspeed``, e.g. ``configs/accelerate/ds_zero3.json``, or an
    ``accelerate launch --config_file configs/accelerate/deepspeed_zero3_sp8.yaml`` environment): other
    stages give gradients ``sp_size`` times too large (see :mod:`anchorcontext.parallel.loss`). Checks the head
    counts and the world size, prepares ``model`` (:func:`~anchorcontext.parallel.prepare_model_for_sp`) and
    sets ``training_args.parallelism_config``. The data collator must pad rows to a multiple of ``sp_size``
    (``AnchorCollator(pad_to_multiple_of=sp_size)``). ``sp_size == 1`` returns ``training_args`` unchanged.

    Trainer's SP loss (``deepspeed_sp_compute_loss``) is the token-weighted mean of each micro-batch over its SP
    group; micro-batches of one step (gradient accumulation, DP) are then averaged with equal weight.
    """
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"sp_size must be an integer >= 1, got {sp_size!r}")
    if sp_size == 1:
        return training_args
    require_deepspeed()
    check_sp_heads(model.config, sp_size)
    ds = _resolved_ds_config(training_args)
    if ds is None:
        raise ValueError(
            f"sp_size={sp_size} needs DeepSpeed ZeRO-3: launch with accelerate launch --config_file "
            f"configs/accelerate/deepspeed_zero3_sp{sp_size}.yaml, or pass --deepspeed configs/accelerate/ds_zero3.json; "
            "Ulysses sequence parallelism runs inside DeepSpeed"
        )
    check_deepspeed_config_for_sp(ds, sp_size)
    world = int(getattr(training_args, "world_size", 1) or 1)
    if world < sp_size:
        raise ValueError(
            f"sp_size={sp_size} needs at least {sp_size} processes, but the trainer sees world size {world}: launch with "
            f"accelerate launch --config_file configs/accelerate/deepspeed_zero3_sp{sp_size}.yaml (or torchrun "
            "--nproc_per_node N). On a CPU-only host accelerate reports world size 1 on every rank unless its state is "
            "pre-configured for gloo (see docs/distributed.md)"
        )
    if world % sp_size:
        raise ValueError(f"world size {world} is not divisible by sp_size={sp_size} (ranks = data-parallel x sp_size)")
    prepare_model_for_sp(model, sp_size=sp_size)
    training_args.parallelism_config = make_parallelism_config(sp_size)
    return training_args
