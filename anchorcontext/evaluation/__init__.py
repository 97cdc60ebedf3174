"""Long-context evaluation, offline: RULER-style synthetic tasks at exact token lengths, perplexity by length.

    from anchorcontext.evaluation import evaluate
    results = evaluate(model, tokenizer, tasks="niah", lengths="1k,2k,4k", samples=4, out_dir="runs/eval")

Command line: ``anchorcontext eval --model smollm2 --lengths 512,1k,2k --samples 4 --out runs/eval``.
See docs/evaluation.md.
"""

from .perplexity import heldout_windows, perplexity_by_length, token_nll
from .ruler import (
    DEFAULT_TASKS,
    NIAH_TASKS,
    TASKS,
    RulerGenerator,
    Sample,
    TaskSpec,
    parse_lengths,
    parse_tasks,
    score_prediction,
    string_match_all,
    string_match_part,
)
from .runner import evaluate, format_table, hf_generate_fn, load_results, summarise, write_outputs

__all__ = [
    "DEFAULT_TASKS",
    "NIAH_TASKS",
    "TASKS",
    "RulerGenerator",
    "Sample",
    "TaskSpec",
    "evaluate",
    "format_table",
    "heldout_windows",
    "hf_generate_fn",
    "load_results",
    "parse_lengths",
    "parse_tasks",
    "perplexity_by_length",
    "score_prediction",
    "string_match_all",
    "string_match_part",
    "summarise",
    "token_nll",
    "write_outputs",
]
