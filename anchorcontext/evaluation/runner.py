"""Run the RULER-style tasks (and perplexity) on a model: batched greedy generation, scoring, tables, files."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .ruler import DEFAULT_TASKS, TASKS, RulerGenerator, Sample, parse_lengths, parse_tasks, score_prediction

logger = logging.getLogger(__name__)

__all__ = ["GenerateFn", "evaluate", "format_table", "hf_generate_fn", "summarise", "write_outputs"]

#: ``fn(batch_input_ids, max_new_tokens) -> predictions``: every prompt in a batch has the same length.
GenerateFn = Callable[[list[list[int]], int], list[str]]


def hf_generate_fn(model: Any, tokenizer: Any) -> GenerateFn:
    """Greedy ``model.generate`` with the KV cache (``use_cache=True`` even if the config says False).

    Prompts of one batch share their length (every prompt of a task × length cell is exactly ``length``
    tokens), so no padding is needed; generation stops at EOS, and special tokens are dropped on decoding.
    """
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    @torch.no_grad()
    def generate(batch: list[list[int]], max_new_tokens: int) -> list[str]:
        device = next(model.parameters()).device
        ids = torch.tensor(batch, dtype=torch.long, device=device)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1] :].tolist()]

    return generate


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def summarise(records: list[dict]) -> dict:
    """Scores in percent from per-sample records: ``scores[task][str(L)]``, ``average[str(L)]`` (mean over
    tasks) and ``niah_depth[str(L)][str(depth)]`` (NIAH + passkey samples that have a depth)."""
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    depth: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[r["task"]][str(r["length"])].append(100.0 * r["score"])
        if r.get("depth") is not None:
            depth[str(r["length"])][f"{r['depth']:.3g}"].append(100.0 * r["score"])
    scores = {t: {L: _mean(v) for L, v in by_len.items()} for t, by_len in cells.items()}
    lengths = sorted({L for by_len in scores.values() for L in by_len}, key=int)
    average = {L: _mean([scores[t][L] for t in scores if L in scores[t]]) for L in lengths}
    niah_depth = {
        L: {d: _mean(v) for d, v in sorted(by_d.items(), key=lambda kv: float(kv[0]))}
        for L, by_d in sorted(depth.items(), key=lambda kv: int(kv[0]))
    }
    return {"scores": scores, "average": average, "niah_depth": niah_depth}


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | list[str] | None = DEFAULT_TASKS,
    lengths: str | list = (512, 1024, 2048),
    samples: int = 4,
    seed: int = 0,
    out_dir: str | pathlib.Path | None = None,
    *,
    name: str = "model",
    batch_size: int = 1,
    depths: list[float] | None = None,
    bos: str = "auto",
    max_new_tokens: int | None = None,
    perplexity: bool = True,
    ppl_samples: int | None = None,
    ppl_nested: bool = True,
    progress: bool = True,
    save_prompts: bool = False,
) -> dict:
    """Evaluate one model on RULER-style tasks (+ perplexity by length); return the results dict.

    ``model``: a Hugging Face causal LM (run with its own, unpatched attention, greedy, batched) or a
    :data:`GenerateFn` callable (perplexity is then skipped). ``tasks``: names, a comma list or a group
    (``"all"``, ``"niah"``). ``lengths``: exact prompt lengths in tokens (``"512,1k,2k"``). ``samples``: prompts
    per task × length. ``ppl_samples``/``ppl_nested``: see :func:`perplexity_by_length`. ``max_new_tokens`` caps each task's RULER budget (128 NIAH, 30 vt, 120 cwe, 50 fwe).

    Returns ``{"name", "tasks", "lengths", "samples", "seed", "scores", "average", "niah_depth", "records",
    "perplexity", "timing", "model_info"}``; scores are percent (RULER). ``records`` holds every sample's
    prompt length, depth, references, prediction, score and generation seconds. With ``out_dir``, writes ``results.json`` and
    the PNG plots there (see :func:`write_outputs`).
    """
    from tqdm.auto import tqdm

    names = parse_tasks(tasks)
    lens = parse_lengths(lengths)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")

    is_hf = hasattr(model, "generate") and hasattr(model, "config")
    if is_hf:
        generate = hf_generate_fn(model, tokenizer)
        was_training = model.training
        model.eval()
    elif callable(model):
        generate = model
    else:
        raise ValueError(f"model must be a Hugging Face causal LM or a generate callable, got {type(model).__name__}")

    if is_hf:
        max_pos = getattr(model.config, "max_position_embeddings", None)
        longest = max(lens) + max(TASKS[t].max_new_tokens for t in names)
        if max_pos and longest > max_pos:
            logger.warning(
                "prompts of %d tokens plus generation exceed the model's max_position_embeddings=%d "
                "(RoPE extrapolation without scaling: expect degraded scores past %d)",
                max(lens),
                max_pos,
                max_pos,
            )
    gen = RulerGenerator(tokenizer, seed=seed, bos=bos)
    t0 = time.perf_counter()
    all_samples: list[Sample] = gen.generate(names, lens, samples, depths)  # validates everything up front
    t_gen = time.perf_counter() - t0

    records: list[dict] = []
    t1 = time.perf_counter()
    try:
        bar = tqdm(total=len(all_samples), desc=f"ruler[{name}]", unit="prompt", disable=not progress)
        groups: dict[tuple[str, int], list[Sample]] = defaultdict(list)
        for s in all_samples:
            groups[(s.task, s.length)].append(s)
        for (task, length), group in groups.items():
            budget = (
                TASKS[task].max_new_tokens
                if max_new_tokens is None
                else min(max_new_tokens, TASKS[task].max_new_tokens)
            )
            bar.set_postfix(task=task, length=length)
            for b in range(0, len(group), batch_size):
                chunk = group[b : b + batch_size]
                t_batch = time.perf_counter()
                preds = generate([s.input_ids for s in chunk], budget)
                t_batch = time.perf_counter() - t_batch
                if len(preds) != len(chunk):
                    raise RuntimeError(f"generate returned {len(preds)} predictions for {len(chunk)} prompts")
                for s, pred in zip(chunk, preds):
                    rec = s.record()
                    rec["prediction"] = pred
                    rec["score"] = score_prediction(task, pred, s.references)
                    rec["seconds"] = t_batch / len(chunk)  # generation wall time, shared equally within a batch
                    if save_prompts:
                        rec["prompt"] = tokenizer.decode(s.input_ids)
                    records.append(rec)
                bar.update(len(chunk))
        bar.close()
    finally:
        if is_hf:
            model.train(was_training)
    t_ruler = time.perf_counter() - t1

    ppl = None
    t_ppl = 0.0
    if perplexity and is_hf:
        from .perplexity import perplexity_by_length

        t2 = time.perf_counter()
        ppl = perplexity_by_length(
            model, tokenizer, lens, samples=ppl_samples or samples, seed=seed, bos=bos, batch_size=batch_size,
            nested=ppl_nested, progress=progress,
        )  # fmt: skip
        t_ppl = time.perf_counter() - t2

    info: dict[str, Any] = {}
    if is_hf:
        cfg = model.config
        info = {
            "class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "dtype": str(next(model.parameters()).dtype),
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        }
    result = {
        "name": name,
        "tasks": names,
        "lengths": lens,
        "samples": samples,
        "seed": seed,
        "bos": bos,
        **summarise(records),
        "records": records,
        "perplexity": ppl,
        "timing": {
            "generate_prompts_s": t_gen,
            "ruler_s": t_ruler,
            "ruler_s_by_length": {str(L): sum(r["seconds"] for r in records if r["length"] == L) for L in lens},
            "perplexity_s": t_ppl,
        },
        "model_info": info,
    }
    if out_dir is not None:
        write_outputs([result], out_dir)
    return result


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def format_table(results: list[dict]) -> str:
    """A plain-text task × length table (percent) for one or several models, plus perplexity rows."""
    lengths = sorted({int(L) for r in results for L in r["average"]})
    multi = len(results) > 1
    head = (["model"] if multi else []) + ["task"] + [_len_label(L) for L in lengths] + ["avg"]
    rows: list[list[str]] = []
    tasks = [t for t in TASKS if any(t in r["scores"] for r in results)]
    for t in tasks + ["average"]:
        for r in results:
            src = r["average"] if t == "average" else r["scores"].get(t, {})
            vals = [src.get(str(L)) for L in lengths]
            present = [v for v in vals if v is not None]
            rows.append(([r["name"]] if multi else []) + [t] + [_fmt(v) for v in vals] + [_fmt(_mean(present))])
    for r in results:
        ppl = (r.get("perplexity") or {}).get("by_length", {})
        if ppl:
            vals = [ppl.get(str(L), {}).get("ppl") for L in lengths]
            rows.append(([r["name"]] if multi else []) + ["perplexity"] + [_fmt(v, 2) for v in vals] + [""])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    n_left = 2 if multi else 1

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < n_left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep] + [line(row) for row in rows])


def _len_label(L: int) -> str:
    return f"{L // 1024}k" if L % 1024 == 0 else str(L)


def write_outputs(results: list[dict], out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write ``results.json`` (every model, every sample), ``table.txt`` and the PNG plots into ``out_dir``."""
    from .plots import plot_accuracy, plot_niah_depth, plot_perplexity

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "table": out / "table.txt"}
    with open(paths["results"], "w") as f:
        json.dump({"models": results}, f, indent=1, default=str)
    paths["table"].write_text(format_table(results) + "\n")
    paths["accuracy"] = plot_accuracy(results, out / "accuracy_vs_length.png")
    if any(r.get("niah_depth") for r in results):
        paths["niah_depth"] = plot_niah_depth(results, out / "niah_depth.png")
    if any((r.get("perplexity") or {}).get("by_length") for r in results):
        paths["perplexity"] = plot_perplexity(results, out / "perplexity.png")
    return paths


def load_results(path: str | pathlib.Path) -> list[dict]:
    """The model results stored in a ``results.json`` written by :func:`write_outputs`."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ValueError(f"{path}: not an anchorcontext eval results.json (no 'models' list)")
    return data["models"]
