"""The run recipe: model + RoPE overrides -> ``patch_model`` -> packed rows -> HF ``Trainer`` with ``AnchorCollator``.

The parts live beside it: :mod:`.model` (model building, RoPE overrides), :mod:`.callbacks` (throughput,
Ctrl-C/SIGTERM), :mod:`.checkpoints` (output dir, complete checkpoints, resume checks) and :mod:`.report` (table,
plots); their public names are re-exported here.

:func:`run` is what ``anchorcontext train`` calls. It evaluates before and after training (held-out ``eval_loss`` on
packed rows with the run's mask, plus :func:`anchorcontext.evaluation.evaluate` when ``eval_tasks`` are set), writes
``<output_dir>/model``, ``summary.json``, ``loss.png`` and ``throughput.png`` and prints a short table.

Ctrl-C finishes the current optimizer step, saves a full checkpoint (``checkpoint-N``: weights, optimizer, scheduler,
RNG, data position) and stops; ``--resume_from_checkpoint last`` continues it with the same data order, so the loss
curve equals an uninterrupted run's. A second Ctrl-C aborts at once; SIGTERM saves and stops as Ctrl-C does.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import time
from typing import Any

import torch

from ..memory import format_plan
from .args import AnchorArguments, DataArguments, ModelArguments, RunArguments
from .callbacks import InterruptCallback, ThroughputCallback, _main_thread  # noqa: F401  (re-exported)
from .checkpoints import (  # noqa: F401  (re-exported)
    RESUME_MAY_DIFFER,
    RUN_ARGS_FILE,
    RecordArgsCallback,
    _jsonable,
    _resolve_resume,
    _save_after_failure,
    check_output_dir,
    check_resume_matches,
    last_complete_checkpoint,
    record_run_args,
    remove_old_checkpoints,
)
from .model import (  # noqa: F401  (re-exported)
    SHAPE_KEYS,
    RopeRangeWarning,
    apply_rope_overrides,
    build_model,
    build_model_on_meta,
    check_rope_range,
    config_from_block,
    rope_summary,
)
from .report import _eval_brief, format_summary, write_plots

logger = logging.getLogger("anchorcontext")


def _world_dp(training_args, sp_size: int) -> int:
    return max(1, int(getattr(training_args, "world_size", 1) or 1) // sp_size)


def tokens_per_step(dargs: DataArguments, training_args, sp_size: int) -> int:
    """Tokens per optimizer step: ``seq_len x per_device_train_batch_size x accumulation x data-parallel ranks``."""
    return (dargs.seq_len * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * _world_dp(training_args, sp_size))


def apply_tokens_per_step(rargs: RunArguments, dargs: DataArguments, training_args) -> None:
    """Derive ``gradient_accumulation_steps`` from ``tokens_per_step`` (when set); it must divide exactly."""
    if rargs.tokens_per_step is None:
        return
    per_micro = tokens_per_step(dargs, training_args, rargs.sp_size) // training_args.gradient_accumulation_steps
    if rargs.tokens_per_step % per_micro:
        raise ValueError(
            f"tokens_per_step={rargs.tokens_per_step} is not a multiple of seq_len x per_device_train_batch_size x "
            f"data-parallel ranks = {dargs.seq_len} x {training_args.per_device_train_batch_size} x "
            f"{_world_dp(training_args, rargs.sp_size)} = {per_micro}"
        )
    training_args.gradient_accumulation_steps = rargs.tokens_per_step // per_micro


def _meta_model_without_zero3_init(margs: ModelArguments, training_args):
    """``build_model_on_meta``, with a ``--deepspeed`` ZeRO-3 config set aside: transformers would otherwise build the
    model inside ``deepspeed.zero.Init``, which starts a process group (a dry run is a single process)."""
    hf_ds = getattr(training_args, "hf_deepspeed_config", None)
    if hf_ds is None:
        return build_model_on_meta(margs)
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return build_model_on_meta(margs)
    finally:
        set_hf_deepspeed_config(hf_ds)


def dry_run(margs: ModelArguments, dargs: DataArguments, aargs: AnchorArguments, rargs: RunArguments,
            training_args) -> dict:
    """Build the model on the meta device, describe the recipe and print its per-device memory plan.

    No weights, no data, no download with ``model_config`` (or for a paper recipe's hub id: its dims are known,
    :data:`anchorcontext.memory.KNOWN_MODELS`). Prints the recipe as JSON (``memory_plan`` inside, in bytes), then
    :func:`anchorcontext.memory.format_plan`'s table in GiB with "fits" / "does not fit" for ``device_memory_gib``.
    """
    from .plan import plan_for_run

    apply_tokens_per_step(rargs, dargs, training_args)
    try:
        model = _meta_model_without_zero3_init(margs, training_args)
    except OSError:  # a hub id that cannot be read here: plan from the known dims, if any
        from ..memory import KNOWN_MODELS

        if margs.model_name_or_path not in KNOWN_MODELS:
            raise
        model = None
    plan = plan_for_run(margs, dargs, aargs, rargs, training_args, config=None if model is None else model.config)
    info = {
        "model_type": model.config.model_type if model is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()) if model is not None else plan.inputs["parameters"],
        "rope": rope_summary(model.config) if model is not None else None,
        "seq_len": dargs.seq_len,
        "tokens_per_step": tokens_per_step(dargs, training_args, rargs.sp_size),
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "max_steps": training_args.max_steps,
        "learning_rate": training_args.learning_rate,
        "mask": aargs.mask,
        "positions": aargs.positions,
        "memory_plan": plan.to_dict(),
    }
    if model is not None:
        check_rope_range(model.config, dargs.seq_len)
    print(json.dumps(info, indent=2))
    print(format_plan(plan))
    return info


def _run_eval(model, tokenizer, rargs: RunArguments, dargs: DataArguments, seed: int, out_dir: pathlib.Path) -> dict | None:
    """RULER-style evaluation (+ perplexity) from :mod:`anchorcontext.evaluation`, or None when it is not set/installed."""
    if not rargs.eval_tasks:
        return None
    try:
        from ..evaluation import evaluate
    except ImportError as e:
        print(f"[anchorcontext] evaluation skipped: anchorcontext.evaluation is not available ({e})", file=sys.stderr)
        return {"error": f"anchorcontext.evaluation unavailable: {e}"}
    lengths = rargs.eval_lengths or [dargs.seq_len]
    was_training = model.training
    try:
        return evaluate(model, tokenizer, tasks=list(rargs.eval_tasks), lengths=lengths, samples=rargs.eval_samples,
                        seed=seed, out_dir=str(out_dir), ppl_samples=rargs.eval_samples, progress=False)
    except Exception as e:  # an evaluation failure must not lose a finished training run
        logger.warning("anchorcontext: evaluation failed: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        model.train(was_training)


def run(margs: ModelArguments, dargs: DataArguments, aargs: AnchorArguments, rargs: RunArguments, training_args,
        *, callbacks: list | None = None) -> dict:
    """Fine-tune as configured; returns the summary dict (also written to ``<output_dir>/summary.json``).

    ``callbacks``: extra ``TrainerCallback`` objects. ``rargs.threads`` sets torch's thread count for the
    run and restores it afterwards.
    """
    threads = torch.get_num_threads()
    want = rargs.threads or busy_machine_threads()
    if want:
        torch.set_num_threads(want)
    try:
        if rargs.dry_run:
            return dry_run(margs, dargs, aargs, rargs, training_args)
        return _run(margs, dargs, aargs, rargs, training_args, callbacks)
    finally:
        torch.set_num_threads(threads)


def busy_machine_threads() -> int | None:
    """1 when this CPU is already busy (1-minute load average >= CPU count), else None (torch's default).

    Measured on a shared 2-core machine: with other processes running, 2 OpenMP threads wait at barriers and
    SmolLM2 steps at 2K tokens took 145-215 s; 1 thread took ~60 s (the tiny model: 7.5 s vs 1.1 s).
    """
    if not hasattr(os, "getloadavg") or torch.cuda.is_available():
        return None
    cpus = os.cpu_count() or 1
    if cpus > 1 and os.getloadavg()[0] >= cpus:
        logger.info("anchorcontext: CPU busy (load %.1f on %d cores): using 1 torch thread (set --threads to override)",
                    os.getloadavg()[0], cpus)
        return 1
    return None


def _run(margs, dargs, aargs, rargs, training_args, callbacks) -> dict:
    from transformers import Trainer, set_seed

    from ..collator import AnchorCollator
    from ..patches import patch_model
    from .data import build_datasets

    t_start = time.perf_counter()
    if training_args.remove_unused_columns:
        training_args.remove_unused_columns = False  # doc_lens is not a model argument but must reach the collator
    ckpt_kw = "activation_checkpointing" if hasattr(training_args, "activation_checkpointing") else "gradient_checkpointing"
    if getattr(training_args, ckpt_kw) and not getattr(training_args, ckpt_kw + "_kwargs"):
        setattr(training_args, ckpt_kw + "_kwargs", {"use_reentrant": False})
    resume = _resolve_resume(training_args)
    out = pathlib.Path(training_args.output_dir)
    check_output_dir(out, resume, rargs.overwrite_output_dir)
    if resume is None:
        remove_old_checkpoints(out)  # --overwrite_output_dir: `last` must never resume the earlier run
    apply_tokens_per_step(rargs, dargs, training_args)
    if resume is not None:
        check_resume_matches(resume, margs, dargs, aargs, rargs, training_args)
    record_args = RecordArgsCallback(margs, dargs, aargs, rargs, training_args)  # before sequence parallelism edits them
    set_seed(training_args.seed)

    t0 = time.perf_counter()
    model, tokenizer, source = build_model(margs, seed=training_args.seed)
    t_model = time.perf_counter() - t0
    rope_warning = check_rope_range(model.config, dargs.seq_len)
    # one checkpoint: the weights plus Adam's two moments, in the weights' dtype or float32
    check_output_dir(out, resume, True, model_bytes=sum(p.numel() * (p.element_size() + 8) for p in model.parameters()))
    patch_model(model, backend=aargs.attn_backend, chunked_loss=aargs.chunked_loss,
                loss_chunk_tokens=aargs.loss_chunk_tokens)
    if rargs.sp_size > 1:
        try:
            from ..parallel import configure_sequence_parallel
        except ImportError as e:
            raise RuntimeError(f"sp_size={rargs.sp_size} needs anchorcontext.parallel ({e})") from None
        training_args = configure_sequence_parallel(model=model, training_args=training_args, sp_size=rargs.sp_size)
        from ..parallel import sequence_parallel_trainer_class

        Trainer = sequence_parallel_trainer_class(Trainer)  # token-weighted loss across DP x SP x grad accumulation

    t0 = time.perf_counter()
    data = build_datasets(dargs, tokenizer, seed=training_args.seed)
    t_data = time.perf_counter() - t0
    collator = AnchorCollator(tokenizer=tokenizer, mask=aargs.mask, positions=aargs.positions,
                              pad_to_multiple_of=rargs.sp_size if rargs.sp_size > 1 else None)
    step_tokens = tokens_per_step(dargs, training_args, rargs.sp_size)
    if data.train_rows is None and training_args.max_steps <= 0:
        raise ValueError("streaming=True needs max_steps > 0 (a stream has no length)")
    throughput = ThroughputCallback(step_tokens)
    interrupt = InterruptCallback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), throughput, interrupt, record_args],
    )
    main = trainer.is_world_process_zero()
    if main:
        print(f"[anchorcontext] model: {source}\n[anchorcontext] data: {data.source}; "
              f"{data.train_rows if data.train_rows is not None else 'streaming'} training rows x {dargs.seq_len} tokens"
              f"{'' if data.eval is None else f', {len(data.eval)} held-out rows'}; mask={aargs.mask}, "
              f"positions={aargs.positions}, backend={aargs.attn_backend}", file=sys.stderr)

    evals: dict[str, Any] = {}
    t0 = time.perf_counter()
    if rargs.eval_before_after and resume is None:
        if data.eval is not None:
            evals["heldout_before"] = trainer.evaluate(metric_key_prefix="heldout")
        evals["eval_before"] = _run_eval(model, tokenizer, rargs, dargs, training_args.seed, out / "eval_before")
    t_eval_before = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        raise _save_after_failure(trainer, e, record_args) from e
    t_train = time.perf_counter() - t0
    interrupted = interrupt.interrupted

    t0 = time.perf_counter()
    if main:
        trainer.save_model(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))
    t_save = time.perf_counter() - t0

    t0 = time.perf_counter()
    if rargs.eval_before_after and not interrupted:
        if data.eval is not None:
            evals["heldout_after"] = trainer.evaluate(metric_key_prefix="heldout")
        evals["eval_after"] = _run_eval(model, tokenizer, rargs, dargs, training_args.seed, out / "eval_after")
    t_eval_after = time.perf_counter() - t0

    losses = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate"),
               "grad_norm": h.get("grad_norm")} for h in trainer.state.log_history if "loss" in h]
    steps_timed = throughput.records
    tps = [r["tokens_per_second"] for r in steps_timed]
    last_ckpt = None
    if interrupted:
        from transformers.trainer_utils import get_last_checkpoint

        last_ckpt = get_last_checkpoint(str(out))
    summary = {
        "model_source": source,
        "model_name_or_path": margs.model_name_or_path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rope": rope_summary(model.config),
        "rope_warning": rope_warning,
        "mask": aargs.mask,
        "positions": aargs.positions,
        "attn_backend": aargs.attn_backend,
        "data": {"source": data.source, "seq_len": dargs.seq_len, "train_rows": data.train_rows,
                 "eval_rows": None if data.eval is None else len(data.eval), "rows_fingerprint": data.fingerprint,
                 "packing": data.stats},
        "steps": trainer.state.global_step,
        "tokens_per_step": step_tokens,
        "resumed_from": resume,
        "interrupted": interrupted,
        "signal": interrupt.signal,
        "checkpoint": last_ckpt,
        "losses": losses,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "train_loss": getattr(train_result, "training_loss", None),
        "step_times": steps_timed,
        "tokens_per_second_median": sorted(tps)[len(tps) // 2] if tps else None,
        "heldout_before": evals.get("heldout_before"),
        "heldout_after": evals.get("heldout_after"),
        "eval_before": _eval_brief(evals.get("eval_before")),
        "eval_after": _eval_brief(evals.get("eval_after")),
        "timings_s": {"model": t_model, "data": t_data, "eval_before": t_eval_before, "train": t_train,
                      "save": t_save, "eval_after": t_eval_after, "total": time.perf_counter() - t_start},
        "machine": {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "device": str(training_args.device)},
        "output_dir": str(out),
        "args": {"model": _jsonable(vars(margs)), "data": _jsonable(vars(dargs)), "anchor": _jsonable(vars(aargs)),
                 "run": _jsonable(vars(rargs)), "training": {k: _jsonable(v) for k, v in training_args.to_dict().items()}},
    }
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if rargs.plots:
            summary["plots"] = write_plots(summary, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(format_summary(summary))
        if interrupted:
            print(f"[anchorcontext] interrupted at step {summary['steps']}; checkpoint {last_ckpt}. Resume with:\n"
                  f"  anchorcontext train ... --output_dir {out} --resume_from_checkpoint last", file=sys.stderr)
    return summary
