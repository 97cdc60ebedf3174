"""Merge benchmark JSON files (``benchmarks/attention.py --out``) into the first one: results and summaries
concatenated, each run's own header (config, machine, dates) kept under ``runs``. Missing files are skipped (a stage
that timed out wrote none); nothing is written when no file exists.

Usage: python scripts/merge_bench_json.py TARGET.json [MORE.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def merge(paths: list[Path]) -> dict | None:
    """The merged document of the existing ``paths`` (``None`` if none exists). A file merged before contributes
    its ``runs`` as they are, so merging twice does not nest."""
    docs = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not docs:
        return None
    merged = {k: v for k, v in docs[0].items() if k not in ("results", "summary", "runs")}
    merged["results"] = [r for d in docs for r in d.get("results", [])]
    merged["summary"] = [s for d in docs for s in d.get("summary", [])]
    merged["runs"] = [run for d in docs
                      for run in d.get("runs", [{k: v for k, v in d.items() if k not in ("results", "summary")}])]
    return merged


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    paths = [Path(a) for a in argv]
    merged = merge(paths)
    if merged is None:
        print(f"# merge_bench_json: none of {argv} exists; nothing written")
        return 0
    paths[0].write_text(json.dumps(merged, indent=2) + "\n")
    print(f"# merged {len(merged['runs'])} runs ({len(merged['results'])} results) into {paths[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
