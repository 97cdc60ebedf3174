"""PNG plots of evaluation results (matplotlib, Agg backend): one line or panel per model."""

from __future__ import annotations

import math
import pathlib

__all__ = ["plot_accuracy", "plot_niah_depth", "plot_perplexity"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lengths(results: list[dict], key: str = "average") -> list[int]:
    return sorted({int(L) for r in results for L in r.get(key, {})})


def plot_accuracy(results: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Accuracy (percent) vs prompt length: one panel per task plus the average, one line per model."""
    plt = _plt()
    tasks = sorted({t for r in results for t in r["scores"]}, key=lambda t: list(_task_order()).index(t))
    panels = ["average", *tasks]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False, sharey=True)
    lengths = _lengths(results)
    for ax, panel in zip(axes.flat, panels):
        for r in results:
            src = r["average"] if panel == "average" else r["scores"].get(panel, {})
            xs = [L for L in lengths if str(L) in src]
            ax.plot(xs, [src[str(L)] for L in xs], marker="o", label=r["name"])
        ax.set_title(panel, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_label(L) for L in lengths], fontsize=7)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("score (%)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("RULER-style accuracy vs prompt length (tokens)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_niah_depth(results: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Heat map of needle depth × prompt length (mean score of NIAH + passkey samples), one panel per model."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(1.2 + 3.6 * len(results), 3.4), squeeze=False)
    im = None
    for ax, r in zip(axes.flat, results):
        grid = r.get("niah_depth", {})
        lengths = sorted(grid, key=int)
        depths = sorted({d for by_d in grid.values() for d in by_d}, key=float)
        data = [[grid[L].get(d, float("nan")) for L in lengths] for d in depths]
        im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_label(int(L)) for L in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(r["name"], fontsize=9)
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label="score (%)")
    return _save(fig, path)


def plot_perplexity(results: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Left: perplexity vs window length. Right: NLL by token position (log2 bins) at the longest length."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in results:
        by_len = (r.get("perplexity") or {}).get("by_length", {})
        pts = sorted((int(L), v["ppl"]) for L, v in by_len.items() if v.get("ppl") is not None)
        if not pts:
            continue
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r["name"])
        longest = by_len[str(pts[-1][0])]["by_position"]
        b.plot([(x["start"] * x["end"]) ** 0.5 for x in longest], [x["nll"] for x in longest], marker=".",
               label=f"{r['name']} (L={_label(pts[-1][0])})")  # fmt: skip
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a.set_xlabel("window length (tokens)")
    a.set_ylabel("perplexity")
    a.set_title("held-out perplexity vs context length", fontsize=9)
    b.set_xlabel("token position")
    b.set_ylabel("mean NLL (nats)")
    b.set_title("NLL by position", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _task_order():
    from .ruler import TASKS

    return TASKS


def _label(L: int) -> str:
    return f"{L // 1024}k" if L % 1024 == 0 else str(L)


def _save(fig, path: str | pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
