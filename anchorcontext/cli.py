"""``anchorcontext train | diagnose | eval | bench | demo`` — thin dispatch to each subsystem's ``main(argv)``.

Every subcommand accepts ``--flag_name`` and ``--flag-name`` and writes under ``runs/<command>/`` by default.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("anchorcontext.training.cli", "Fine-tune with HF Trainer (no arguments: the embedded demo)"),
    "diagnose": ("anchorcontext.diagnostics.cli", "BF16 RoPE drift diagnostics (`diagnose rope ...`)"),
    "eval": ("anchorcontext.evaluation.cli", "RULER-style long-context evaluation and perplexity by length"),
    "compare": ("anchorcontext.compare", "The paper's ablation: train full/intra_doc/anchor alike, evaluate all"),
    "bench": ("anchorcontext.bench", "Training-step benchmark: full vs intra_doc vs anchor"),
    "demo": ("anchorcontext.demo", "Smoke demo: pack a few documents and run a patched tiny model"),
}


def _usage() -> str:
    lines = ["usage: anchorcontext [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"anchorcontext {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"anchorcontext: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
