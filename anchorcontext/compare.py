"""``anchorcontext compare``: the paper's ablation (full vs intra_doc vs anchor attention) as one command.

    anchorcontext compare --config configs/compare_cpu.yaml --variants full,intra_doc,anchor --seeds 0,1

One training per variant x precision x seed, all from the same initial weights on the same packed rows in the
same order (only the mask / position policy differs), then one evaluation suite on every result and on the
base model: RULER-style accuracy at several lengths (beyond the training length too), perplexity by length and
by token position on held-out documents, and the BF16 RoPE drift (arXiv 2411.13476 Eq. 4, the ``bf16`` setting,
with its ``fp32`` control) of each model. Writes ``<out>/compare.json`` (every number, the exact configuration,
the device, dtype and wall time of each phase), ``table.txt`` (also printed) and one PNG per metric family.

Invariants are recorded, not assumed: each run stores a hash of its initial weights, a hash of every training
batch (``input_ids``, ``labels``) and the masks / position policies its attention layers
actually received (a forward pre-hook on every attention module reads the ``anchor_layout`` it is called with).

Statistics: a cell is the mean over seeds (``± sd`` with two or more). Against the reference variant (``full``
when present) a difference is called a direction only when it exceeds the seed-to-seed range of both variants;
otherwise the cell says ``~`` (within seed spread) or ``?`` (one seed: spread unknown). See docs/ablation.md.

A finished run (``<out>/runs/<run>/summary.json`` + ``model/``, same configuration) is not retrained, and a
finished evaluation is not repeated (its key holds the evaluation settings and a hash of the evaluated model's
files); a run whose stored configuration differs is an error (new ``--out`` or ``--force``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from transformers import TrainerCallback

from .assets import sha256_file
from .layout import MASKS
from .training.checkpoints import RESUME_MAY_DIFFER, _jsonable

PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}
DRIFT_OFFSETS = (0, 4, 15, 17, 50, 200)  # a subset of the paper's Δ1 (Δ2 = 16 is added as the control)
HIGHER_IS_BETTER = {"ruler": True, "ppl": False, "drift": False, "train_loss": False}


def parse_variant(name: str) -> tuple[str, str]:
    """``"anchor"`` -> ``("anchor", "continuous")``; ``"anchor_reset"`` -> ``("anchor", "reset")``."""
    if not isinstance(name, str):
        raise ValueError(f"variants: each entry must be a string, got {name!r}")
    mask, positions = (name[: -len("_reset")], "reset") if name.endswith("_reset") else (name, "continuous")
    if mask not in MASKS:
        allowed = [*MASKS, *(f"{m}_reset" for m in MASKS)]
        raise ValueError(f"variants: unknown variant {name!r}; choose from {allowed}")
    return mask, positions


def _split_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass(kw_only=True)
class CompareOptions:
    """What ``compare`` runs, beyond the training options (which come from the config file and flags).

    ``variants``: mask names, ``<mask>_reset`` for per-document position ids. ``precisions``: training dtypes
    (``bf16`` | ``fp32``; default: the config's ``dtype``). ``seeds``: default the config's ``seed``.
    The RULER tasks, lengths and samples are the training options ``eval_tasks`` / ``eval_lengths`` /
    ``eval_samples`` (lengths default to ``seq_len/2, seq_len, 2*seq_len``). ``eval_dtype``: the dtype every
    model is evaluated in. ``drift_*``: the RoPE drift measurement (``drift_settings`` of
    :data:`anchorcontext.diagnostics.SETTINGS`; ``drift_sequences`` windows of ``drift_length`` tokens of stdlib
    text). ``base``: evaluate the initial weights (with the config's RoPE overrides) as a row. ``reference``: the variant others are compared with (default ``full``
    when present, else the first).
    """

    variants: list[str] = field(default_factory=lambda: ["full", "intra_doc", "anchor"])
    precisions: list[str] | None = None
    seeds: list[int] | None = None
    out: str = "runs/compare"
    reference: str | None = None
    eval_dtype: str = "float32"
    ppl_samples: int | None = None
    max_new_tokens: int | None = None
    bos: str = "auto"
    drift: bool = True
    drift_settings: list[str] = field(default_factory=lambda: ["bf16", "fp32"])
    drift_length: int = 256
    drift_sequences: int = 1
    drift_offsets: list[int] = field(default_factory=lambda: list(DRIFT_OFFSETS))
    base: bool = True
    plots: bool = True
    progress: bool = True
    force: bool = False

    def __post_init__(self):
        self.variants = [str(v) for v in _split_list(self.variants)]
        if not self.variants:
            raise ValueError("variants must name at least one variant")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct, got {self.variants!r}")
        for v in self.variants:
            parse_variant(v)
        if self.precisions is not None:
            self.precisions = [str(p) for p in _split_list(self.precisions)]
            for p in self.precisions:
                if p not in PRECISIONS:
                    raise ValueError(f"precision must be among {sorted(PRECISIONS)}, got {p!r}")
            if not self.precisions or len(set(self.precisions)) != len(self.precisions):
                raise ValueError(f"precision must list distinct values, got {self.precisions!r}")
        if self.seeds is not None:
            seeds = []
            for s in _split_list(self.seeds):
                try:
                    seeds.append(int(s))
                except (TypeError, ValueError):
                    raise ValueError(f"seeds must be integers, got {s!r}") from None
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds must list distinct integers, got {self.seeds!r}")
            self.seeds = seeds
        if self.reference is not None and self.reference not in self.variants:
            raise ValueError(f"reference must be one of the variants {self.variants}, got {self.reference!r}")
        if self.eval_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"eval_dtype must be float32, bfloat16 or float16, got {self.eval_dtype!r}")
        for name in ("ppl_samples", "max_new_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if self.bos not in ("auto", "always", "never"):
            raise ValueError(f"bos must be 'auto', 'always' or 'never', got {self.bos!r}")
        self.drift_settings = [str(s) for s in _split_list(self.drift_settings)]
        from .diagnostics.rope import SETTINGS

        for s in self.drift_settings:
            if s not in SETTINGS:
                raise ValueError(f"drift_settings entries must be among {sorted(SETTINGS)}, got {s!r}")
        for name in ("drift_length", "drift_sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "drift_length" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.drift_offsets = [int(o) for o in _split_list(self.drift_offsets)]

    @property
    def reference_variant(self) -> str:
        return self.reference or ("full" if "full" in self.variants else self.variants[0])


COMPARE_KEY = "compare"  # the config file's block of CompareOptions; every other key is a training option


def load_compare_config(path: str | pathlib.Path | None) -> tuple[dict, dict]:
    """``(training options, compare options)`` from a YAML file: flat training keys + a ``compare:`` mapping."""
    if path is None:
        return {}, {}
    import yaml

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping, got {type(data).__name__}")
    block = data.pop(COMPARE_KEY, None) or {}
    if not isinstance(block, dict):
        raise ValueError(f"config file {str(p)!r}: '{COMPARE_KEY}' must be a mapping, got {type(block).__name__}")
    known = {f.name for f in fields(CompareOptions)}
    for k in block:
        if k not in known:
            raise ValueError(f"unknown key {k!r} in the '{COMPARE_KEY}' block of {str(p)!r}; known: {sorted(known)}")
    from .training.args import check_keys

    check_keys(data, source=str(p))
    return data, block


# ------------------------------------------------------------------------------------------- records


def _sha(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_sha(model) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(_sha(t).encode())
    return h.hexdigest()[:16]


def files_sha(path: str | pathlib.Path) -> str:
    """A hash of every file under ``path`` (relative names and contents): the identity of a saved model."""
    root = pathlib.Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()[:16]


def _attention_modules(model) -> list:
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


POSITION_POLICIES = ("either", "continuous", "reset", "other")  # RunRecorder's device counters, in this order


class RunRecorder(TrainerCallback):
    """A ``TrainerCallback`` that records what a training run actually did (see the module docstring).

    ``initial_weights``: :func:`weights_sha` at ``on_train_begin``. ``batches``: one hash per training forward of
    ``input_ids`` and ``labels`` (position ids differ by design between ``*_reset`` and the others). ``masks`` / ``positions``: counts of the ``anchor_layout.mask``
    and of the position policy the ``position_ids`` follow (``continuous``, ``reset``, or ``either`` for a batch
    of one-document rows, where both agree) seen by attention modules.

    The position policy is counted on the device (no host sync per attention call) and read once, by
    :attr:`positions`; the layers of one forward share ``position_ids`` and layout, so it is compared once.
    """

    def __init__(self):
        self.initial_weights: str | None = None
        self.batches: list[str] = []
        self.masks: Counter = Counter()
        self.attention_calls = 0
        self._unknown_positions = 0
        self._counts: dict[torch.device, torch.Tensor] = {}  # device -> (len(POSITION_POLICIES),) int64
        self._last: tuple | None = None  # (position_ids, layout, one-hot policy) of the current forward
        self._handles: list = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.initial_weights = weights_sha(model)
        self._handles.append(model.register_forward_pre_hook(self._batch_hook, with_kwargs=True))
        mods = _attention_modules(model)
        if not mods:
            raise ValueError(f"{type(model).__name__} has no '*self_attn' modules to record the mask from")
        for m in mods:
            self._handles.append(m.register_forward_pre_hook(self._attention_hook, with_kwargs=True))

    def _batch_hook(self, module, args, kwargs):
        if module.training:
            self._last = None
            if kwargs.get("input_ids") is not None:
                self.batches.append(_sha(*(kwargs[k] for k in ("input_ids", "labels") if k in kwargs)))

    def _attention_hook(self, module, args, kwargs):
        if not module.training:
            return
        self.attention_calls += 1
        layout = kwargs.get("anchor_layout")
        self.masks[getattr(layout, "mask", "none (no anchor_layout)")] += 1
        pos = kwargs.get("position_ids")
        if pos is None or layout is None:
            self._unknown_positions += 1
            return
        if self._last is not None and self._last[0] is pos and self._last[1] is layout:
            hot = self._last[2]
        else:
            from .collator import position_ids_for

            doc_ids = layout.doc_ids.to(pos.device)
            cont = (pos == position_ids_for(doc_ids, "continuous")).all()
            reset = (pos == position_ids_for(doc_ids, "reset")).all()
            # index into POSITION_POLICIES; one document per row: both policies give the same ids ("either")
            policy = (~cont).long() * 2 + (~reset).long()
            hot = (torch.arange(len(POSITION_POLICIES), device=pos.device) == policy).long()
            self._last = (pos, layout, hot)
        counts = self._counts.get(hot.device)
        if counts is None:
            counts = self._counts[hot.device] = torch.zeros_like(hot)
        counts.add_(hot)

    @property
    def positions(self) -> Counter:
        """Attention calls per position policy (``unknown``: no ``position_ids`` or no layout); one host copy."""
        out: Counter = Counter()
        for counts in self._counts.values():
            for policy, n in zip(POSITION_POLICIES, counts.tolist()):
                if n:
                    out[policy] += n
        if self._unknown_positions:
            out["unknown"] += self._unknown_positions
        return out

    def on_train_end(self, args, state, control, **kw):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def to_dict(self) -> dict:
        return {"initial_weights": self.initial_weights, "batches": list(self.batches),
                "data_order": hashlib.sha256("".join(self.batches).encode()).hexdigest()[:16],
                "attention_masks": dict(self.masks), "attention_positions": dict(self.positions),
                "attention_calls": self.attention_calls}  # fmt: skip


# ----------------------------------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict:
    """``{"n", "mean", "sd", "min", "max", "range"}`` of finite values (sample sd; None with fewer than two)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "range": None}
    n, mean = len(xs), sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "min": min(xs), "max": max(xs), "range": (max(xs) - min(xs)) if n > 1 else None}


def verdict(a: dict, ref: dict, higher_is_better: bool) -> str:
    """How the spread ``a`` compares with ``ref`` (both from :func:`spread`).

    ``"better"`` / ``"worse"``: the difference of the means exceeds the seed-to-seed range (max - min) of both
    sides. ``"within spread"``: it does not. ``"one seed"``: a
    side has fewer than two seeds, so no spread is known and no direction is claimed. ``"n/a"``: no value.
    """
    if a["n"] == 0 or ref["n"] == 0:
        return "n/a"
    if a["n"] < 2 or ref["n"] < 2:
        return "one seed"
    diff = a["mean"] - ref["mean"]
    if abs(diff) <= max(a["range"], ref["range"]):
        return "within spread"
    return "better" if (diff > 0) == higher_is_better else "worse"


MARKS = {"better": "+", "worse": "-", "within spread": "~", "one seed": "?", "n/a": ""}


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_suite(model, tokenizer, *, lengths: list[int], opts: CompareOptions, rargs, name: str,
                   out_dir: pathlib.Path | None = None) -> dict:  # fmt: skip
    """RULER-style tasks + perplexity by length/position + RoPE drift of one model; every number, JSON-ready."""
    from .evaluation import evaluate

    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    if rargs.eval_tasks:
        r = evaluate(model, tokenizer, tasks=list(rargs.eval_tasks), lengths=lengths, samples=rargs.eval_samples,
                     seed=0, out_dir=None if out_dir is None else str(out_dir), name=name, bos=opts.bos,
                     max_new_tokens=opts.max_new_tokens, ppl_samples=opts.ppl_samples or rargs.eval_samples,
                     progress=opts.progress)  # fmt: skip
        res["ruler"] = {k: r[k] for k in ("tasks", "lengths", "samples", "scores", "average", "niah_depth", "timing")}
        res["ruler"]["records"] = [{k: rec.get(k) for k in ("task", "length", "depth", "score", "prediction")}
                                   for rec in r["records"]]  # fmt: skip
        res["ruler"]["sample_sd"] = _sample_sd(r["records"])
        res["perplexity"] = r["perplexity"]
    else:
        from .evaluation import perplexity_by_length

        res["perplexity"] = perplexity_by_length(model, tokenizer, lengths, samples=opts.ppl_samples or rargs.eval_samples,
                                                 bos=opts.bos, progress=opts.progress)  # fmt: skip
    res["eval_s"] = time.perf_counter() - t0
    if opts.drift:
        from .diagnostics import compare_settings, sample_sequences

        t0 = time.perf_counter()
        ids = sample_sequences(tokenizer, opts.drift_length, opts.drift_sequences, seed=0)
        rep = compare_settings(model, ids, settings=opts.drift_settings, offsets=opts.drift_offsets,
                               progress=opts.progress)  # fmt: skip
        res["drift"] = {"length": opts.drift_length, "sequences": opts.drift_sequences, "offsets": opts.drift_offsets,
                        "summary": rep.rows(), "seconds": time.perf_counter() - t0}  # fmt: skip
    return res


def _sample_sd(records: list[dict]) -> dict:
    """Per length: sd of the per-sample scores (percent) over all tasks' samples, and the standard error."""
    by_len: dict[str, list[float]] = {}
    for r in records:
        by_len.setdefault(str(r["length"]), []).append(100.0 * r["score"])
    out = {}
    for L, xs in by_len.items():
        s = spread(xs)
        out[L] = {"n": s["n"], "sd": s["sd"], "se": (s["sd"] / math.sqrt(s["n"])) if s["sd"] is not None else None}
    return out


def metrics_of(ev: dict, run: dict | None) -> dict[str, float | None]:
    """The flat table metrics of one evaluated model: ``ruler@L``, ``ppl@L``, ``drift_<setting>``, ``train_loss``."""
    m: dict[str, float | None] = {}
    for L, v in ((ev.get("ruler") or {}).get("average") or {}).items():
        m[f"ruler@{L}"] = v
    for L, v in ((ev.get("perplexity") or {}).get("by_length") or {}).items():
        m[f"ppl@{L}"] = v.get("ppl")
    for row in (ev.get("drift") or {}).get("summary", []):
        m[f"drift_{row['setting']}"] = row["mean_D"]
    m["train_loss"] = None if run is None else run.get("train_loss")
    return m


def _family(metric: str) -> str:
    return metric.split("@")[0].split("_")[0] if not metric.startswith("train_loss") else "train_loss"


def aggregate(rows: dict[str, list[dict]], reference: str) -> dict:
    """``{row: {metric: spread + verdict vs reference}}`` from ``{row: [metrics of each seed]}``."""
    out: dict[str, dict] = {}
    keys = list(dict.fromkeys(k for ms in rows.values() for m in ms for k in m))
    for row, ms in rows.items():
        out[row] = {k: spread([m.get(k) for m in ms]) for k in keys}
    if reference in out:
        for row in out:
            for k in keys:
                out[row][k]["vs_reference"] = (
                    None if row == reference else verdict(out[row][k], out[reference][k], HIGHER_IS_BETTER[_family(k)])
                )
    return out


def _cell(s: dict, mark: str | None, digits: int) -> str:
    if s["mean"] is None:
        return "-"
    fmt = f"{{:.{digits}f}}" if abs(s["mean"]) >= 1e-2 or s["mean"] == 0 else "{:.2e}"
    text = fmt.format(s["mean"])
    if s["sd"] is not None:
        text += " ± " + fmt.format(s["sd"])
    return text + (f" {MARKS[mark]}" if mark and MARKS.get(mark) else "")


def format_table(agg: dict, reference: str) -> str:
    """Variant x metric table; marks vs the reference variant: + better, - worse, ~ within seed spread, ? one seed."""
    rows = list(agg)
    metrics = list(dict.fromkeys(k for r in rows for k in agg[r]))
    metrics = [k for k in metrics if any(agg[r][k]["mean"] is not None for r in rows)]
    head = ["model", "seeds", *metrics]
    lines = [head]
    for r in rows:
        n = max((agg[r][k]["n"] for k in metrics), default=0)
        digits = {"ruler": 1, "ppl": 2, "drift": 3, "train_loss": 3}
        lines.append([r, str(n), *(_cell(agg[r][k], agg[r][k].get("vs_reference"), digits[_family(k)]) for k in metrics)])
    widths = [max(len(x[c]) for x in lines) for c in range(len(head))]
    fmt = lambda x: "  ".join(s.ljust(w) if c == 0 else s.rjust(w) for c, (s, w) in enumerate(zip(x, widths)))
    legend = (f"ruler@L: RULER-style accuracy (%) at L tokens; ppl@L: held-out perplexity; drift_<s>: mean RoPE shift "
              f"deviation D (Eq. 4) in setting s; mean ± sd over seeds. Marks vs {reference}: + better, - worse "
              "(difference larger than both seed ranges), ~ within seed spread, ? one seed (no spread: no direction "
              "claimed).")  # fmt: skip
    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths]), *(fmt(x) for x in lines[1:]), "", legend])


# ---------------------------------------------------------------------------------------------- plots


def write_plots(agg: dict, evals: dict, out: pathlib.Path) -> list[str]:
    """``accuracy_vs_length.png``, ``perplexity.png`` (by length; NLL by position), ``drift.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[anchorcontext] compare: matplotlib is not installed; no plots", file=sys.stderr)
        return []
    paths = []

    def series(prefix):
        return {r: sorted(((int(k.split("@")[1]), v) for k, v in agg[r].items() if k.startswith(prefix + "@")
                           and v["mean"] is not None)) for r in agg}  # fmt: skip

    for prefix, fname, ylabel in (("ruler", "accuracy_vs_length.png", "RULER-style accuracy (%)"),):
        s = series(prefix)
        if any(s.values()):
            fig, ax = plt.subplots(figsize=(6, 3.8))
            for r, pts in s.items():
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                                yerr=[p[1]["sd"] or 0.0 for p in pts], marker="o", ms=3, capsize=3, label=r,
                                ls="--" if r == "base" else "-")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            paths.append(_save(plt, fig, ax, out / fname))
    s = series("ppl")
    if any(s.values()):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for r, pts in s.items():
            if pts:
                a1.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["sd"] or 0.0 for p in pts],
                            marker="o", ms=3, capsize=3, label=r, ls="--" if r == "base" else "-")  # fmt: skip
        for r, evs in evals.items():  # NLL by position at the longest length, first seed
            by_len = (evs[0].get("perplexity") or {}).get("by_length") or {}
            if by_len:
                L = max(by_len, key=int)
                bins = by_len[L].get("by_position") or []
                if bins:
                    a2.plot([b["end"] for b in bins], [b["nll"] for b in bins], marker="o", ms=3, label=r,
                            ls="--" if r == "base" else "-")  # fmt: skip
        a1.set_xscale("log", base=2)
        a1.set_xlabel("context length (tokens)")
        a1.set_ylabel("held-out perplexity")
        a2.set_xscale("log", base=2)
        a2.set_xlabel("token position (log2 bin end)")
        a2.set_ylabel("mean NLL (nats)")
        paths.append(_save(plt, fig, a1, out / "perplexity.png"))
    drift_keys = [k for k in next(iter(agg.values()), {}) if k.startswith("drift_")]
    if drift_keys:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        width = 0.8 / len(drift_keys)
        names = list(agg)
        for i, k in enumerate(drift_keys):
            ax.bar([j + i * width for j in range(len(names))], [agg[r][k]["mean"] or 0.0 for r in names], width,
                   yerr=[agg[r][k]["sd"] or 0.0 for r in names], capsize=3, label=k.removeprefix("drift_"))  # fmt: skip
        ax.set_xticks([j + width * (len(drift_keys) - 1) / 2 for j in range(len(names))], names, rotation=20, fontsize=8)
        ax.set_ylabel("mean shift deviation D (Eq. 4)")
        paths.append(_save(plt, fig, ax, out / "drift.png"))
    return paths


def _save(plt, fig, legend_ax, path) -> str:
    """Legend, layout, PNG at 120 dpi, figure closed; the path as a string."""
    legend_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------------------ run


def _device_of(model) -> str:
    p = next(model.parameters())
    return p.device.type + (f" ({torch.cuda.get_device_name(p.device)})" if p.device.type == "cuda" else "")


def _config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_name(variant: str, precision: str, seed: int) -> str:
    return f"{variant}-{precision}-s{seed}"


def compare(argv: list[str] | None = None, *, opts: CompareOptions | None = None, config: str | None = None,
            callbacks_for_run=None) -> dict:  # fmt: skip
    """Train every variant x precision x seed, evaluate all (+ the base model); returns what compare.json holds.

    ``argv``: training flags (``anchorcontext train`` options) overriding ``config``'s training keys.
    ``opts``: the compare options (default: the config's ``compare:`` block). ``callbacks_for_run``: an optional
    ``fn(run_name) -> list[TrainerCallback]`` (tests use it to observe a run).
    """
    from tqdm.auto import tqdm

    from .training import build_model, parse_args, run

    train_defaults, block = load_compare_config(config)
    opts = opts or CompareOptions(**block)
    argv = list(argv or [])
    base_args = parse_args(argv, defaults=train_defaults)
    margs0, dargs0, _aargs0, rargs0, targs0 = base_args
    precisions = opts.precisions or [next(k for k, v in PRECISIONS.items() if v == margs0.dtype)
                                     if margs0.dtype in PRECISIONS.values() else margs0.dtype]  # fmt: skip
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be among {sorted(PRECISIONS)}, got {p!r} (from the config's dtype)")
    seeds = opts.seeds or [targs0.seed]
    lengths = list(rargs0.eval_lengths or sorted({max(2, dargs0.seq_len // 2), dargs0.seq_len, 2 * dargs0.seq_len}))
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    phases: list[dict] = []
    runs: dict[str, dict] = {}
    plan = [(v, p, s) for p in precisions for s in seeds for v in opts.variants]
    print(f"[anchorcontext] compare: {len(plan)} training runs ({', '.join(opts.variants)} x {', '.join(precisions)} "
          f"x seeds {seeds}) -> {out}", file=sys.stderr)  # fmt: skip

    bar = tqdm(plan, desc="compare: train", unit="run", disable=not opts.progress)
    for variant, precision, seed in bar:
        mask, positions = parse_variant(variant)
        name = _run_name(variant, precision, seed)
        bar.set_postfix(run=name)
        run_dir = out / "runs" / name
        run_argv = [*argv, "--mask", mask, "--positions", positions, "--dtype", PRECISIONS[precision], "--seed",
                    str(seed), "--output_dir", str(run_dir), "--eval_before_after", "false",
                    "--plots", str(bool(opts.plots)).lower()]  # fmt: skip
        if not opts.force and any(run_dir.glob("checkpoint-*/trainer_state.json")):
            run_argv += ["--resume_from_checkpoint", "last"]  # an interrupted run of this variant: continue it
        elif run_dir.is_dir() and any(run_dir.iterdir()):
            run_argv += ["--overwrite_output_dir", "true"]  # --force, or a run that left no checkpoint
        m, d, a, r, t = parse_args(run_argv, defaults=train_defaults)
        # anchor and run options in one block, as before RunArguments existed: earlier runs' config_hash still holds
        # the options that change what trains (training's own resume check drops the rest: eval, threads, plots...)
        cfg = {"model": _jsonable(vars(m)), "data": _jsonable(vars(d)),
               "anchor": {k: _jsonable(v) for k, v in {**vars(a), **vars(r)}.items() if k not in RESUME_MAY_DIFFER},
               "training": {k: _jsonable(v) for k, v in t.to_dict().items()
                            if k not in RESUME_MAY_DIFFER}}  # fmt: skip
        chash = _config_hash(cfg)
        rec_path = run_dir / "compare_run.json"
        if rec_path.is_file() and (run_dir / "model").is_dir() and not opts.force:
            rec = json.loads(rec_path.read_text())
            if rec.get("config_hash") != chash:
                raise ValueError(f"{run_dir} holds a finished run with another configuration (config_hash "
                                 f"{rec.get('config_hash')} != {chash}); use a new --out or --force")  # fmt: skip
            rec["resumed"] = True
            runs[name] = rec
            phases.append({"phase": "train", "run": name, "skipped": "finished earlier", **rec["phase"]})
            continue
        recorder = RunRecorder()
        extra = list(callbacks_for_run(name)) if callbacks_for_run else []
        t0 = time.perf_counter()
        summary = run(m, d, a, r, t, callbacks=[recorder, *extra])
        wall = time.perf_counter() - t0
        phase = {"device": summary["machine"]["device"], "dtype": m.dtype, "wall_s": wall,
                 "torch_threads": summary["machine"]["torch_threads"]}  # fmt: skip
        rec = {"run": name, "variant": variant, "mask": mask, "positions": positions, "precision": precision,
               "seed": seed, "config_hash": chash, "config": cfg, "phase": phase, "resumed": False,
               "recorded": recorder.to_dict(), "train_loss": summary.get("train_loss"),
               "first_loss": summary.get("first_loss"), "last_loss": summary.get("last_loss"),
               "steps": summary.get("steps"), "interrupted": summary.get("interrupted"),
               "rows_fingerprint": summary["data"]["rows_fingerprint"], "model_source": summary.get("model_source"),
               "losses": summary.get("losses")}  # fmt: skip
        if summary.get("interrupted"):
            raise RuntimeError(f"{name} was interrupted; rerun compare to resume (finished runs are kept)")
        rec_path.write_text(json.dumps(rec, indent=1, default=str))
        runs[name] = rec
        phases.append({"phase": "train", "run": name, **phase})
    bar.close()

    checks = check_invariants(runs)
    for problem in checks["problems"]:
        print(f"[anchorcontext] compare: WARNING: {problem}", file=sys.stderr)

    # ---- evaluation: the base model(s) and every trained model, in eval_dtype, stock (unpatched) attention
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evals: dict[str, list[dict]] = {}
    run_rows: dict[str, list[dict]] = {}
    eval_cfg = {"lengths": lengths, "tasks": rargs0.eval_tasks, "samples": rargs0.eval_samples,
                "opts": {k: v for k, v in asdict(opts).items() if k not in ("out", "force", "progress", "plots")}}
    seed_dependent_base = margs0.model_name_or_path == "tiny" or margs0.from_scratch
    todo: list[tuple[str, str, int | None]] = []
    if opts.base:
        todo += [("base", f"base-s{s}", s) for s in (seeds if seed_dependent_base else seeds[:1])]
    todo += [(f"{v}@{p}" if len(precisions) > 1 else v, _run_name(v, p, s), None) for p in precisions
             for v in opts.variants for s in seeds]  # fmt: skip
    ebar = tqdm(todo, desc="compare: evaluate", unit="model", disable=not opts.progress)
    for row, name, base_seed in ebar:
        ebar.set_postfix(model=name)
        path = out / "evals" / f"{name}.json"
        mdir = out / "runs" / name / "model"
        if base_seed is not None:  # built from the options (+ the files of a local checkpoint)
            local = [q for q in (margs0.model_name_or_path, margs0.tokenizer_name_or_path) if q and os.path.isdir(q)]
            evaluated = {"base": _jsonable(vars(margs0)), "seed": base_seed, "files": [files_sha(q) for q in local]}
        else:  # the saved model's files: a retrained or replaced model is evaluated again
            evaluated = {"run": runs[name]["config_hash"], "files": files_sha(mdir)}
        ehash = _config_hash({**eval_cfg, "evaluated": evaluated})
        if path.is_file() and not opts.force:
            stored = json.loads(path.read_text())
            if stored.get("eval_hash") == ehash:
                evals.setdefault(row, []).append(stored)
                run_rows.setdefault(row, []).append(metrics_of(stored, runs.get(name)))
                phases.append({"phase": "eval", "run": name, "skipped": "finished earlier", **stored["phase"]})
                continue
        t0 = time.perf_counter()
        if base_seed is not None:
            model, tok, _ = build_model(margs0, seed=base_seed)
            model = model.to(getattr(torch, opts.eval_dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(mdir, dtype=getattr(torch, opts.eval_dtype))
            tok = AutoTokenizer.from_pretrained(mdir)
        if torch.cuda.is_available():
            model = model.to("cuda")
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate_suite(model, tok, lengths=lengths, opts=opts, rargs=rargs0, name=name)
        phase = {"device": _device_of(model), "dtype": opts.eval_dtype, "wall_s": time.perf_counter() - t0,
                 "load_s": t_load}  # fmt: skip
        ev.update({"model": name, "row": row, "eval_hash": ehash, "evaluated": evaluated, "phase": phase})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ev, indent=1, default=str))
        evals.setdefault(row, []).append(ev)
        run_rows.setdefault(row, []).append(metrics_of(ev, runs.get(name)))
        phases.append({"phase": "eval", "run": name, **phase})
        del model
    ebar.close()

    reference = opts.reference_variant
    if len(precisions) > 1:
        reference = f"{reference}@{precisions[0]}"
    agg = aggregate(run_rows, reference)
    table = format_table(agg, reference)
    result = {
        "config": {"argv": argv, "config_file": config, "training_defaults": train_defaults, "compare": asdict(opts),
                   "precisions": precisions, "seeds": seeds, "eval_lengths": lengths, "train_seq_len": dargs0.seq_len,
                   "eval_tasks": rargs0.eval_tasks, "eval_samples": rargs0.eval_samples},
        "runs": runs,
        "checks": checks,
        "evals": evals,
        "aggregate": agg,
        "reference": reference,
        "table": table,
        "phases": phases,
        "machine": {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count()},
    }
    if opts.plots:
        result["plots"] = write_plots(agg, evals, out)
    (out / "table.txt").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=str))
    print(table)
    return result


def check_invariants(runs: dict[str, dict]) -> dict:
    """Within each (precision, seed): same initial weights, same batches in the same order, same packed rows;
    every run's attention saw only its own mask and position policy."""
    problems = []
    groups: dict[tuple, list[dict]] = {}
    for r in runs.values():
        groups.setdefault((r["precision"], r["seed"]), []).append(r)
    same = {}
    for (p, s), rs in groups.items():
        for key in ("initial_weights", "data_order"):
            vals = {r["recorded"][key] for r in rs}
            same[f"{key}@{p}-s{s}"] = len(vals) == 1
            if len(vals) != 1:
                problems.append(f"{key} differs between the runs of {p} seed {s}: "
                                f"{ {r['run']: r['recorded'][key] for r in rs} }")  # fmt: skip
        if len({r["rows_fingerprint"] for r in rs}) != 1:
            problems.append(f"packed rows differ between the runs of {p} seed {s}")
    for r in runs.values():
        masks, pos = r["recorded"]["attention_masks"], r["recorded"]["attention_positions"]
        if set(masks) != {r["mask"]}:
            problems.append(f"{r['run']}: attention saw masks {masks}, expected only {r['mask']!r}")
        if not set(pos) <= {r["positions"], "either"}:
            problems.append(f"{r['run']}: attention saw position policies {pos}, expected only {r['positions']!r}")
    return {"ok": not problems, "problems": problems, "identical_within_precision_and_seed": same}


# ------------------------------------------------------------------------------------------------ CLI


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anchorcontext compare",
        description="Train the same model once per attention variant (same weights, same rows, same order) and "
        "evaluate all of them with one suite. Other flags are `anchorcontext train` options.",
    )
    p.add_argument("--config", help="YAML: training options + a 'compare:' block (see configs/compare_cpu.yaml)")
    p.add_argument("--variants", help="comma list: full,intra_doc,anchor,anchor_reset,intra_doc_reset")
    p.add_argument("--precision", dest="precisions", help="comma list of training precisions: bf16,fp32")
    p.add_argument("--seeds", help="comma list of seeds (several: spread is reported)")
    p.add_argument("--out", help="output directory (default runs/compare)")
    p.add_argument("--reference", help="variant the others are compared with (default full)")
    p.add_argument("--eval_dtype", help="dtype of every evaluated model (default float32)")
    p.add_argument("--ppl_samples", type=int, help="held-out windows for perplexity (default eval_samples)")
    p.add_argument("--max_new_tokens", type=int, help="cap on each task's generation budget")
    p.add_argument("--bos", help="auto | always | never: BOS at the start of every eval prompt")
    p.add_argument("--drift", type=_bool, help="measure the RoPE drift (true/false)")
    p.add_argument("--drift_length", type=int, help="tokens per drift sequence")
    p.add_argument("--drift_sequences", type=int, help="sequences averaged for the drift")
    p.add_argument("--base", type=_bool, help="evaluate the base model as a row (true/false)")
    p.add_argument("--compare_plots", dest="plots", type=_bool, help="write the comparison PNGs (true/false)")
    p.add_argument("--progress", type=_bool, help="progress bars (true/false)")
    p.add_argument("--force", action="store_true", default=None, help="retrain and re-evaluate finished runs")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    try:
        _, block = load_compare_config(ns.config)
        given = {k: v for k, v in vars(ns).items() if k != "config" and v is not None}
        opts = CompareOptions(**{**block, **given})
        compare(rest, opts=opts, config=ns.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"anchorcontext compare: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["CompareOptions", "RunRecorder", "aggregate", "check_invariants", "compare", "evaluate_suite",
           "format_table", "load_compare_config", "main", "metrics_of", "parse_variant", "spread", "verdict"]
