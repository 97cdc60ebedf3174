"""The report of a training run: the evaluation brief, the final table and the PNG plots."""

from __future__ import annotations

import logging
import math
import pathlib

logger = logging.getLogger("anchorcontext")


def _eval_brief(res: dict | None) -> dict | None:
    if res is None:
        return None
    if "error" in res and "scores" not in res:
        return {"error": res["error"]}
    out = {"average": res.get("average"), "scores": res.get("scores")}
    ppl = res.get("perplexity")
    if isinstance(ppl, dict):
        out["perplexity"] = {k: v for k, v in ppl.items() if k != "records"} if "by_length" not in ppl else {
            str(L): (v.get("ppl") if isinstance(v, dict) else v) for L, v in ppl["by_length"].items()}
    return out


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if math.isfinite(x) else str(x)
    return str(x)


def _score(e: dict | None) -> str:
    """``"50.0% @1024"`` from an evaluation brief (``average``: {length: percent})."""
    if not e:
        return "-"
    if "error" in e:
        return f"(skipped: {e['error'][:60]})"
    avg = e.get("average")
    if isinstance(avg, dict):
        return ", ".join(f"{_fmt(float(v), 1)}% @{k}" for k, v in avg.items())
    return _fmt(avg, 1)


def format_summary(s: dict) -> str:
    """A short final table."""
    hb, ha = s.get("heldout_before") or {}, s.get("heldout_after") or {}
    lb, la = hb.get("heldout_loss"), ha.get("heldout_loss")
    t = s["timings_s"]
    rows = [
        ("model", s["model_source"]),
        ("attention", f"mask={s['mask']}  positions={s['positions']}  backend={s['attn_backend']}"),
        ("data", (f"{s['data']['train_rows'] if s['data']['train_rows'] is not None else 'stream of'} rows x "
                  f"{s['data']['seq_len']} tokens  ({s['data']['source']})")),
        ("steps", (f"{s['steps']}  ({s['tokens_per_step']} tokens/step"
                   f"{', interrupted' if s['interrupted'] else ''})")),
        ("train loss", f"{_fmt(s['first_loss'])} (first step) -> {_fmt(s['last_loss'])} (last step)"),
        ("held-out loss", f"{_fmt(lb)} -> {_fmt(la)}" + (
            f"  (ppl {_fmt(math.exp(lb), 2)} -> {_fmt(math.exp(la), 2)})" if lb is not None and la is not None else "")),
    ]
    eb, ea = s.get("eval_before"), s.get("eval_after")
    if eb or ea:
        rows.append(("RULER-style score", f"{_score(eb)} -> {_score(ea)}"))
    rows += [
        ("throughput", f"{_fmt(s['tokens_per_second_median'], 1)} tokens/s (median step)"),
        ("time", (f"total {t['total']:.0f} s = model {t['model']:.0f} + data {t['data']:.0f} + eval "
                  f"{t['eval_before'] + t['eval_after']:.0f} + train {t['train']:.0f} + save {t['save']:.0f}")),
        ("outputs", f"{s['output_dir']}/ (model/, summary.json{', loss.png, throughput.png' if s.get('plots') else ''})"),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * 78
    return "\n".join([line, "anchorcontext train: summary", line, *(f"{k:<{w}}  {v}" for k, v in rows), line])


def write_plots(s: dict, out: pathlib.Path) -> list[str]:
    """``loss.png`` (training loss per step, held-out loss before/after) and ``throughput.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("anchorcontext: matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    paths = []
    if s["losses"]:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r["step"] for r in s["losses"]], [r["loss"] for r in s["losses"]], marker="o", ms=3, label="train loss")
        for key, style in (("heldout_before", "--"), ("heldout_after", "-")):
            v = (s.get(key) or {}).get("heldout_loss")
            if v is not None:
                ax.axhline(v, ls=style, color="gray", lw=1, label=f"held-out loss {key.split('_')[1]} ({v:.3f})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        q4 = " (dequantised Q4_1 weights)" if "Q4_1" in str(s.get("model_source")) else ""
        ax.set_title(f"{s['model_name_or_path']}{q4}: mask={s['mask']}, seq_len={s['data']['seq_len']}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)
        paths.append(str(out / "loss.png"))
    if s["step_times"]:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r["step"] for r in s["step_times"]], [r["tokens_per_second"] for r in s["step_times"]], marker="o", ms=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"throughput ({s['machine']['device']}, {s['machine']['torch_threads']} threads)")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=120)
        plt.close(fig)
        paths.append(str(out / "throughput.png"))
    return paths
