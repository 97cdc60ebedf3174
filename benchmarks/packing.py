"""Data-path benchmark: tokens/s of ``DocumentPacker`` + ``AnchorCollator`` (AnchorLayout included).

Synthetic corpus: documents with seeded lognormal lengths (mean ``--mean-doc`` tokens, ``--sigma``; long
tailed, so some documents exceed a row and are split), each a Python list of random token ids starting
with the BOS, as ``datasets`` hands them to a batched ``map``. Building the corpus is not timed.

Per batch size ``B`` and repeat, three timed passes over the whole corpus:

* ``pack``: ``DocumentPacker.iter_rows`` -> rows (lists, Arrow friendly), alone;
* ``collate``: ``AnchorCollator`` on the packed rows in batches of ``B`` -> ``input_ids, labels,
  position_ids, anchor_layout`` (CPU tensors; the layout's ``cu_seqlens``/``kv_index`` are built here);
* ``end_to_end``: both interleaved, as a data loader would run them.

Also, once per repeat (informational, not part of the goal): ``Dataset.map(packer, batched=True)`` over the
same corpus held as an Arrow ``datasets.Dataset`` (``--map-batch-size`` documents per map batch), i.e. the
offline path that writes packed rows back to Arrow.

``tokens/s`` counts row tokens (``rows * seq_len``, what the model consumes, padding included);
``doc tokens/s`` counts the documents' own tokens. Figures are medians over ``--repeats``. The machine may
be shared: the load average before the run is recorded next to the figures.

Usage::

    python benchmarks/packing.py --seq-len 32768 --batch-sizes 1,8 --out benchmarks/results/packing_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorcontext import AnchorCollator, AnchorLayout, DocumentPacker

BOS, PAD = 1, 0


def make_corpus(tokens: int, mean: float, sigma: float, vocab: int, seed: int) -> list[list[int]]:
    """Documents (Python lists, leading BOS) until ``tokens`` tokens; lognormal lengths with mean ``mean``."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2  # E[len] = exp(mu + sigma^2 / 2) = mean
    docs, total = [], 0
    while total < tokens:
        n = max(1, round(rng.lognormal(mu, sigma)))
        docs.append([BOS] + rng.integers(2, vocab, size=n).tolist())
        total += n + 1
    return docs


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Timer:
    """Wall and process-CPU seconds of a block (the CPU figure is robust to other processes on the machine)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def run_once(docs, args, B: int) -> dict:
    """One repeat for batch size ``B``: seconds (wall and CPU) of each pass, and what was produced."""

    def packer():
        return DocumentPacker(seq_len=args.seq_len, anchor_id=BOS, pad_id=PAD, vocab_size=args.vocab)

    collator = AnchorCollator(anchor_id=BOS, pad_id=PAD, mask=args.mask, positions=args.positions)

    with Timer() as t_pack:
        p = packer()
        rows = list(p.iter_rows(docs))
    n_all = len(rows)
    n_rows = n_all - n_all % B  # whole batches only, in every pass
    rows = rows[:n_rows]

    with Timer() as t_coll:
        for i in range(0, n_rows, B):
            collator(rows[i : i + B])
    # the layout's share: AnchorLayout.from_doc_ids alone on the same doc ids (also inside "collate")
    doc_ids = [collator(rows[i : i + B])["anchor_layout"].doc_ids for i in range(0, n_rows, B)]
    with Timer() as t_lay:
        for d in doc_ids:
            AnchorLayout.from_doc_ids(d, args.mask, validate=False)

    with Timer() as t_e2e:
        buf, done = [], 0
        for row in packer().iter_rows(docs):
            buf.append(row)
            if len(buf) == B:
                collator(buf)
                buf, done = [], done + B
                if done == n_rows:
                    break

    L, nb = args.seq_len, n_rows // B
    doc_frac = p.stats.tokens_packed / (n_all * L)  # share of row tokens that are document tokens
    out = {"rows": n_rows, "doc_token_fraction": doc_frac}
    for clock in ("wall", "cpu"):
        sec = {k: getattr(t, clock) for k, t in (("pack", t_pack), ("collate", t_coll), ("layout", t_lay), ("e2e", t_e2e))}
        out[clock] = {
            "pack_s": sec["pack"],
            "collate_s": sec["collate"],
            "end_to_end_s": sec["e2e"],
            "pack_tokens_per_s": n_all * L / sec["pack"],
            "collate_tokens_per_s": n_rows * L / sec["collate"],
            "end_to_end_tokens_per_s": n_rows * L / sec["e2e"],
            "end_to_end_doc_tokens_per_s": n_rows * L * doc_frac / sec["e2e"],
            "collate_ms_per_batch": 1e3 * sec["collate"] / nb,
            "layout_ms_per_batch": 1e3 * sec["layout"] / nb,
        }
    return out


def run_datasets_map(docs, args) -> dict:
    """Seconds (wall, CPU) of ``Dataset.map(DocumentPacker, batched=True)`` over ``docs`` and the rows made."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"input_ids": docs})
    packer = DocumentPacker(seq_len=args.seq_len, anchor_id=BOS, pad_id=PAD, vocab_size=args.vocab)
    with Timer() as t:
        out = ds.map(packer, batched=True, batch_size=args.map_batch_size, remove_columns=["input_ids"],
                     keep_in_memory=True)
    tokens = len(out) * args.seq_len
    return {"rows": len(out), "wall_s": t.wall, "cpu_s": t.cpu,
            "wall_tokens_per_s": tokens / t.wall, "cpu_tokens_per_s": tokens / t.cpu}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tokens", type=int, default=8 * 32768 * 32, help="corpus size in tokens")
    ap.add_argument("--mean-doc", type=float, default=2000.0)
    ap.add_argument("--sigma", type=float, default=1.5)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask", default="anchor", choices=["anchor", "intra_doc", "full"])
    ap.add_argument("--positions", default="continuous", choices=["continuous", "reset"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--map-batch-size", type=int, default=1000, help="documents per Dataset.map batch")
    ap.add_argument("--no-datasets-map", action="store_true", help="skip the Dataset.map measurement")
    ap.add_argument("--goal", type=float, default=2e6, help="tokens/s goal, printed beside the figures")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    docs = make_corpus(args.tokens, args.mean_doc, args.sigma, args.vocab, args.seed)
    lens = np.array([len(d) for d in docs])
    corpus = {
        "documents": len(docs),
        "tokens": int(lens.sum()),
        "median_len": float(np.median(lens)),
        "mean_len": float(lens.mean()),
        "max_len": int(lens.max()),
        "longer_than_row": int((lens - 1 > args.seq_len - 1).sum()),
    }
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"corpus: {corpus}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, load avg {load}")

    results = []
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    run_once(docs[:200], args, 1)  # warm-up (allocator, torch op dispatch)
    for B in batch_sizes:
        reps = [run_once(docs, args, B) for _ in range(args.repeats)]
        res = {"batch_size": B, "rows": reps[0]["rows"], "doc_token_fraction": reps[0]["doc_token_fraction"]}
        for clock in ("wall", "cpu"):
            res[clock] = {k: statistics.median(r[clock][k] for r in reps) for k in reps[0][clock]}
            res[clock]["end_to_end_s_all"] = [r[clock]["end_to_end_s"] for r in reps]
        results.append(res)

    print(f"\nseq_len {args.seq_len}, mask {args.mask}, positions {args.positions}, median of {args.repeats}; "
          "Mtok/s = million row tokens per second (padding included)")
    print(f"{'B':>3} {'clock':>5} {'rows':>5} {'pack':>7} {'collate':>8} {'e2e':>7} {'e2e doc':>8} "
          f"{'collate ms/batch':>17} {'layout ms/batch':>16} {'goal':>6}")
    for r in results:
        for clock in ("cpu", "wall"):
            m = r[clock]
            ok = "ok" if m["end_to_end_tokens_per_s"] >= args.goal else "BELOW"
            print(
                f"{r['batch_size']:>3} {clock:>5} {r['rows']:>5} {m['pack_tokens_per_s'] / 1e6:>7.2f} "
                f"{m['collate_tokens_per_s'] / 1e6:>8.2f} {m['end_to_end_tokens_per_s'] / 1e6:>7.2f} "
                f"{m['end_to_end_doc_tokens_per_s'] / 1e6:>8.2f} {m['collate_ms_per_batch']:>17.1f} "
                f"{m['layout_ms_per_batch']:>16.1f} {ok:>6}"
            )

    ds_map = None
    if not args.no_datasets_map:
        reps = [run_datasets_map(docs, args) for _ in range(args.repeats)]
        ds_map = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
        print(
            f"\nDataset.map(packer, batched=True, batch_size={args.map_batch_size}) -> Arrow, {ds_map['rows']} rows: "
            f"{ds_map['cpu_tokens_per_s'] / 1e6:.2f} Mtok/s (cpu), {ds_map['wall_tokens_per_s'] / 1e6:.2f} Mtok/s (wall)"
        )

    out = {
        "benchmark": "packing",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": args.threads,
            "load_avg_before": load,
            "load_avg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "args": vars(args),
        "corpus": corpus,
        "goal_tokens_per_s": args.goal,
        "results": results,
        "datasets_map": ds_map,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
