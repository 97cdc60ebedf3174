"""``anchorcontext train [--quick] [--config FILE] [--option value ...]``.

* no arguments: the embedded demo (:data:`~anchorcontext.training.presets.DEMO`);
* ``--quick``: the tiny preset (:data:`~anchorcontext.training.presets.QUICK`);
* ``--config FILE``: a YAML file of options (no preset underneath);
* any ``--option value`` overrides the preset/file (``--max_steps 20``, ``--mask intra_doc``, ...).

Returns 0 on success, 1 on a clear configuration/data error (printed without a traceback), 130 after Ctrl-C and
143 after SIGTERM (both once the resumable checkpoint is saved).
"""

from __future__ import annotations

import logging
import sys

from .presets import split_preset  # noqa: F401  (re-exported: its home is presets.py)

USAGE = """usage: anchorcontext train [--quick] [--config FILE] [--OPTION VALUE ...]

  (no arguments)     the embedded demo: SmolLM2-135M, AnchorAttention, stdlib corpus, runs/demo/
  --quick            tiny random Llama + BPE tokenizer, < 2 minutes, runs/quick/
  --config FILE      YAML mapping of option names to values (configs/*.yaml); no preset underneath
  --dry_run          build the model on the meta device, print the recipe and its per-device memory plan
                     (--dry_run_world_size N, --device_memory_gib G, --sp_size, --deepspeed/--fsdp), stop
  --help-all         list every option (model / data / anchor / run / transformers.TrainingArguments)

examples:
  anchorcontext train --max_steps 20 --mask intra_doc
  anchorcontext train --config configs/llama3-8b-128k.yaml --dry_run true --sp_size 8 --dry_run_world_size 8 \
      --deepspeed configs/accelerate/ds_zero3.json --device_memory_gib 80
  anchorcontext train --quick --output_dir runs/q --resume_from_checkpoint last

see docs/training.md"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if "--help-all" in argv or "--help_all" in argv:
        from .args import help_text

        print(help_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .args import parse_args
    from .train import run

    try:
        summary = run(*parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"anchorcontext train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("anchorcontext train: aborted", file=sys.stderr)
        return 130
    if isinstance(summary, dict) and summary.get("interrupted"):
        return 143 if summary.get("signal") == "SIGTERM" else 130  # 128 + the signal, as a shell reports it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
