"""Diagnostics: BF16 RoPE drift measurements (arXiv 2411.13476 Eq. 4/5) with mitigations and plots.

``from anchorcontext.diagnostics import compare_settings, sample_sequences`` — measurements in :mod:`.rope`, the
probing attention and precision settings in :mod:`.probe`;
plots in :mod:`.plots` (matplotlib, imported lazily); CLI ``anchorcontext diagnose rope`` in :mod:`.cli`.
"""

from .probe import (
    DEFAULT_SETTINGS,
    PAPER_LENGTHS,
    PAPER_OFFSETS,
    PAPER_REFERENCE_OFFSET,
    PROBE_NAME,
    SETTINGS,
    PrecisionSetting,
    deviation_terms,
    get_setting,
    model_for_setting,
    probe_model,
    register_probe,
    row_weights,
    shifted_position_ids,
)
from .rope import (
    RopeDriftReport,
    ShiftDeviation,
    attention_difference,
    compare_settings,
    first_token_logit_difference,
    per_key_contribution,
    probe_shift_deviation,
    sample_sequences,
)

__all__ = [
    "DEFAULT_SETTINGS",
    "PAPER_LENGTHS",
    "PAPER_OFFSETS",
    "PAPER_REFERENCE_OFFSET",
    "PROBE_NAME",
    "SETTINGS",
    "PrecisionSetting",
    "RopeDriftReport",
    "ShiftDeviation",
    "attention_difference",
    "compare_settings",
    "deviation_terms",
    "first_token_logit_difference",
    "get_setting",
    "model_for_setting",
    "per_key_contribution",
    "probe_model",
    "probe_shift_deviation",
    "register_probe",
    "row_weights",
    "sample_sequences",
    "shifted_position_ids",
]
