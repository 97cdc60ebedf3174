"""PNG plots of a :class:`~anchorcontext.diagnostics.rope.RopeDriftReport`, after the paper's Figure 1.

matplotlib is imported lazily with the non-interactive ``Agg`` backend (no display needed).

* ``attention_difference.png``: Eq. 4 ``D`` against ``Δ1`` (categorical axis in the given order, as in the
  paper), one line per setting, log scale; the control ``Δ1 = Δ2`` (exactly 0) is marked, not plotted.
* ``logit_difference.png``: Eq. 5 ``D_logit`` against the prefix length ``T`` (log-log).
* ``per_key_contribution.png``: ``c_j`` against key position ``j`` (log-log, mean over ``Δ1 != Δ2``);
  the legend gives each setting's first-token share.
* ``per_layer.png``: ``D`` per layer (mean over ``Δ1 != Δ2``).
"""

from __future__ import annotations

import math
import pathlib

import torch

from .rope import RopeDriftReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positive(values):
    return [v if v > 0 else float("nan") for v in values]


def plot_report(report: RopeDriftReport, out_dir: str | pathlib.Path, *, title: str = "") -> list[pathlib.Path]:
    """Write the four PNGs into ``out_dir`` (created) and return their paths."""
    plt = _pyplot()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(report.results)
    first = report.results[names[0]]
    T = first.length
    suffix = f"\n{title}" if title else ""
    paths = []

    # 1. D vs Δ1.
    fig, ax = plt.subplots(figsize=(8, 4.8))
    x = list(range(len(first.offsets)))
    for n in names:
        r = report.results[n]
        d = r.attention_difference().tolist()
        d[r.control_index] = float("nan")
        ax.plot(x, _positive(d), marker="o", ms=3, label=f"{n} ({r.setting.describe()})")
    ax.axvline(first.control_index, color="grey", ls=":", lw=1)
    ax.text(first.control_index, 1.0, f" Δ1=Δ2={first.reference_offset}\n (control: 0)", transform=ax.get_xaxis_transform(),
            va="top", fontsize=7, color="grey")  # fmt: skip
    ax.set_xticks(x, [str(o) for o in first.offsets], rotation=60, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("Δ1 (position offset)")
    ax.set_ylabel(f"D(X, Δ1, Δ2={first.reference_offset})  [Eq. 4, n_i: {first.row_weight}]")
    ax.set_title(f"Attention difference vs offset, L={T}{suffix}", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    paths.append(out / "attention_difference.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 2. D_logit vs T.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for n in names:
        r = report.results[n]
        k = r.offsets.index(report.logit_offset) if report.logit_offset in r.offsets else 0
        ys = [float(r.logit_difference(t)[k]) for t in report.lengths]
        ax.plot(report.lengths, _positive(ys), marker="o", ms=3, label=n)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(f"D_logit  [Eq. 5, Δ1={report.logit_offset}, Δ2={first.reference_offset}]")
    ax.set_title(f"First-token logit difference vs length{suffix}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    paths.append(out / "logit_difference.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 3. per-key contribution.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    j = torch.arange(1, T + 1).tolist()
    for n in names:
        r = report.results[n]
        keep = [k for k in range(len(r.offsets)) if k != r.control_index]
        c = r.per_key_contribution()[keep].mean(0).tolist()
        share = c[0] / sum(c) if sum(c) > 0 else float("nan")
        lab = f"{n} (first token {100 * share:.1f}%)" if not math.isnan(share) else n
        ax.plot(j, _positive(c), lw=1, label=lab)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("key position j + 1")
    ax.set_ylabel("contribution c_j to D (mean over Δ1 ≠ Δ2)")
    ax.set_title(f"Per-key-position contribution, L={T}{suffix}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    paths.append(out / "per_key_contribution.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # 4. per layer.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for n in names:
        r = report.results[n]
        keep = [k for k in range(len(r.offsets)) if k != r.control_index]
        per = r.attention_difference(per_layer=True)[:, keep].mean(1).tolist()
        ax.plot(range(len(per)), _positive(per), marker="o", ms=3, label=n)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("D of the layer (mean over Δ1 ≠ Δ2)")
    ax.set_title(f"Attention difference per layer, L={T}{suffix}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    paths.append(out / "per_layer.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


__all__ = ["plot_report"]
