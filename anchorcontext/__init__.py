"""anchorcontext: AnchorAttention for long-context fine-tuning (arXiv 2411.13476).

One line: ``anchorcontext.patch_model(model)``; batches from :class:`AnchorCollator` (or
:func:`anchor_inputs`) then train with AnchorAttention, and forwards without ``anchor_*`` keys behave
exactly like stock transformers attention.
"""

from .attention import anchor_attention
from .collator import AnchorCollator, anchor_inputs, labels_for, position_ids_for
from .layout import MASKS, AnchorLayout, dense_mask
from .memory import MemoryPlan, ModelDims, format_plan, plan_memory
from .packing import DocumentPacker, PackStats, anchor_token_id, pack_documents
from .patches import is_patched, patch_model, register, unpatch_model

__version__ = "0.1.0"

__all__ = [
    "MASKS",
    "AnchorCollator",
    "AnchorLayout",
    "DocumentPacker",
    "MemoryPlan",
    "ModelDims",
    "PackStats",
    "__version__",
    "anchor_attention",
    "anchor_inputs",
    "anchor_token_id",
    "dense_mask",
    "format_plan",
    "is_patched",
    "labels_for",
    "pack_documents",
    "patch_model",
    "plan_memory",
    "position_ids_for",
    "register",
    "unpatch_model",
]
