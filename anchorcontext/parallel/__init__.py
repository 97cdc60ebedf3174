"""Sequence parallelism for AnchorAttention on DeepSpeed's Ulysses, driven by accelerate / HF Trainer.

No home-made distributed runtime: DeepSpeed shards the batch and does the all-to-all; this package picks our
attention (``"anchor_sp"``), gets it the global layout, checks head counts and sequence lengths, and refuses
DeepSpeed settings with wrong gradient scale. Launch configs live in ``configs/accelerate/``; see
``docs/distributed.md``. Nothing here imports DeepSpeed at module load.
"""

from .config import configure_sequence_parallel, make_parallelism_config
from .loss import (
    check_deepspeed_config_for_sp,
    count_targets,
    load_deepspeed_config,
    sp_causal_lm_loss,
    sp_loss_from_sum,
)
from .trainer import SequenceParallelLossMixin, sequence_parallel_trainer_class
from .ulysses import (
    SP_ATTN_NAME,
    check_seq_len,
    check_sp_heads,
    default_sp_group,
    gather_doc_ids,
    global_layout,
    prepare_model_for_sp,
    register_layout_pickling,
    register_sp_attention,
    register_ulysses,
    require_deepspeed,
    sp_state,
    unprepare_model_for_sp,
)

__all__ = [
    "SP_ATTN_NAME",
    "SequenceParallelLossMixin",
    "check_deepspeed_config_for_sp",
    "check_seq_len",
    "check_sp_heads",
    "configure_sequence_parallel",
    "count_targets",
    "default_sp_group",
    "gather_doc_ids",
    "global_layout",
    "load_deepspeed_config",
    "make_parallelism_config",
    "prepare_model_for_sp",
    "register_layout_pickling",
    "register_sp_attention",
    "register_ulysses",
    "require_deepspeed",
    "sequence_parallel_trainer_class",
    "sp_causal_lm_loss",
    "sp_loss_from_sum",
    "sp_state",
    "unprepare_model_for_sp",
]
