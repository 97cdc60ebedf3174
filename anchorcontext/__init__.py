"""anchorcontext: AnchorAttention for long-context fine-tuning (arXiv 2411.13476)."""

from .attention import anchor_attention, dispatch
from .layout import MASKS, AnchorLayout, dense_mask

__version__ = "0.1.0"

__all__ = ["MASKS", "AnchorLayout", "anchor_attention", "dense_mask", "dispatch", "__version__"]
