"""Long-context fine-tuning with HF Trainer: typed options, data -> packed rows, the training job, the CLI.

    from anchorcontext.training import parse_args, run
    run(*parse_args(["--quick", "--max_steps", "5"]))   # or: anchorcontext train --quick --max_steps 5

See docs/training.md.
"""

from .args import AnchorArguments, DataArguments, ModelArguments, RunArguments, load_config, parse_args
from .cli import main
from .presets import DEMO, PRESETS, QUICK

__all__ = [
    "DEMO",
    "PRESETS",
    "QUICK",
    "AnchorArguments",
    "DataArguments",
    "ModelArguments",
    "RunArguments",
    "build_datasets",
    "build_model",
    "load_config",
    "main",
    "parse_args",
    "run",
]


def __getattr__(name):  # torch / transformers / datasets load only when the job needs them
    if name in ("run", "build_model", "build_model_on_meta", "apply_rope_overrides", "check_rope_range"):
        from . import train

        return getattr(train, name)
    if name in ("build_datasets", "TrainData"):
        from . import data

        return getattr(data, name)
    raise AttributeError(name)
