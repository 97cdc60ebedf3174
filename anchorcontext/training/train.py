"""The training job: model + RoPE overrides -> ``patch_model`` -> packed rows -> HF ``Trainer`` with ``AnchorCollator``.

:func:`run` is what ``anchorcontext train`` calls. It evaluates before and after training (held-out ``eval_loss`` on
packed rows with the run's mask, plus :func:`anchorcontext.evaluation.evaluate` when ``eval_tasks`` are set), writes
``<output_dir>/model``, ``summary.json``, ``loss.png`` and ``throughput.png`` and prints a short table.

Ctrl-C finishes the current optimizer step, saves a full checkpoint (``checkpoint-N``: weights, optimizer, scheduler,
RNG, data position) and stops; ``--resume_from_checkpoint last`` continues it with the same data order, so the loss
curve equals an uninterrupted run's. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import signal
import sys
import time
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from .args import AnchorArguments, DataArguments, ModelArguments

logger = logging.getLogger("anchorcontext")

SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size")


class RopeRangeWarning(UserWarning):
    """``seq_len`` exceeds the model's RoPE range and no scaling is configured."""


# ------------------------------------------------------------------------------------------- model


def rope_summary(config) -> dict:
    rp = dict(getattr(config, "rope_parameters", None) or {})
    return {"max_position_embeddings": getattr(config, "max_position_embeddings", None), **rp}


def apply_rope_overrides(config, margs: ModelArguments) -> bool:
    """Write ``rope_theta`` / ``rope_scaling`` / ``max_position_embeddings`` into ``config`` (in place).

    Returns True when anything changed. ``rope_scaling`` follows HF (``{"rope_type": "yarn", "factor": 4.0, ...}``);
    ``original_max_position_embeddings`` defaults to the config's range before the override.
    """
    if margs.rope_theta is None and margs.rope_scaling is None and margs.max_position_embeddings is None:
        return False
    original = getattr(config, "max_position_embeddings", None)
    rp = dict(getattr(config, "rope_parameters", None) or {})
    if rp and any(isinstance(v, dict) for v in rp.values()):
        raise ValueError(
            f"{config.model_type} has per-layer-type RoPE parameters ({sorted(rp)}); set them in model_config instead "
            "of rope_theta / rope_scaling"
        )
    if margs.rope_theta is not None:
        rp["rope_theta"] = float(margs.rope_theta)
    if margs.rope_scaling is not None:
        sc = dict(margs.rope_scaling)
        sc["rope_type"] = sc.pop("rope_type", sc.pop("type", "default"))
        for k in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                  "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "short_factor", "long_factor",
                  "truncate"):
            rp.pop(k, None)
        rp.update(sc)
        if sc["rope_type"] in ("yarn", "longrope", "llama3") and original is not None:
            rp.setdefault("original_max_position_embeddings", original)
    if margs.max_position_embeddings is not None:
        config.max_position_embeddings = int(margs.max_position_embeddings)
    config.rope_parameters = rp
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    return True


def _rebuild_rotary(model) -> int:
    """Re-create every rotary-embedding module from its (updated) config; returns how many were rebuilt."""
    n = 0
    for name, module in list(model.named_modules()):
        if not (type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        try:
            new = type(module)(config=module.config)
        except TypeError as e:
            raise ValueError(
                f"cannot rebuild {type(module).__name__} with the new RoPE settings ({e}); build the model with "
                "model_config + from_scratch, or set them in the checkpoint's config.json"
            ) from None
        new.to(device=module.inv_freq.device)
        setattr(parent, name.rsplit(".", 1)[-1], new)
        n += 1
    return n


def config_from_block(block: dict):
    """A ``transformers`` config from an architecture block ``{"model_type": ..., **fields}`` (no download)."""
    from transformers import AutoConfig

    block = dict(block)
    model_type = block.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **block)
    except ValueError as e:
        raise ValueError(f"model_config: unknown model_type {model_type!r}: {e}") from None


def build_model_on_meta(margs: ModelArguments):
    """The model described by ``margs`` (architecture block + RoPE overrides) on the meta device: no memory, no download."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if margs.model_config is not None:
        config = config_from_block(margs.model_config)
    else:
        config = AutoConfig.from_pretrained(margs.model_name_or_path)
    apply_rope_overrides(config, margs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def build_model(margs: ModelArguments, *, seed: int = 0) -> tuple[Any, Any, str]:
    """``(model, tokenizer, source)`` with the RoPE overrides applied; ``use_cache`` off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, margs.dtype)
    name = margs.model_name_or_path
    if name == "tiny":
        from ..assets import tiny_llama, train_bpe_tokenizer

        tok = train_bpe_tokenizer(vocab_size=margs.tiny_vocab_size)
        kw = {}
        if margs.model_config:
            kw = {k: v for k, v in margs.model_config.items() if k != "model_type"}
        model = tiny_llama(tok, seed=seed, hidden_size=margs.tiny_hidden_size, num_layers=margs.tiny_num_layers, **kw)
        model = model.to(dtype)
        source = f"tiny (random Llama, hidden {margs.tiny_hidden_size}, {margs.tiny_num_layers} layers, stdlib BPE {len(tok)})"
    elif margs.from_scratch:
        config = config_from_block(margs.model_config)
        apply_rope_overrides(config, margs)
        tok_name = margs.tokenizer_name_or_path or name
        tok = AutoTokenizer.from_pretrained(tok_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        source = f"from_scratch ({config.model_type} from model_config, random init)"
    else:
        from ..assets import resolve_model

        model, tok, source = resolve_model(name, dtype=dtype)
        if margs.model_config:
            bad = {k: (margs.model_config[k], getattr(model.config, k, None)) for k in SHAPE_KEYS
                   if k in margs.model_config and getattr(model.config, k, None) != margs.model_config[k]}
            if bad:
                warnings.warn(f"model_config disagrees with the loaded {name!r} (key: (config, loaded)): {bad}",
                              stacklevel=2)
    if margs.tokenizer_name_or_path and not margs.from_scratch:
        tok = AutoTokenizer.from_pretrained(margs.tokenizer_name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if (name == "tiny" or not margs.from_scratch) and apply_rope_overrides(model.config, margs):
        _rebuild_rotary(model)  # from_scratch configs got the overrides before the model was built
    model.config.use_cache = False
    return model, tok, source


def check_rope_range(config, seq_len: int) -> str | None:
    """Warn (``RopeRangeWarning``) when ``seq_len`` exceeds ``max_position_embeddings`` and no scaling is set."""
    mpe = getattr(config, "max_position_embeddings", None)
    rp = getattr(config, "rope_parameters", None) or {}
    rtype = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    if mpe is None or seq_len <= mpe or rtype not in (None, "default"):
        return None
    msg = (
        f"seq_len={seq_len} exceeds the model's RoPE range max_position_embeddings={mpe} "
        f"(rope_theta={rp.get('rope_theta')}, no rope_scaling): positions {mpe}..{seq_len - 1} were never trained. "
        "Raise rope_theta (the paper: 5e6 at 64K, 1e7 at 128K) together with --max_position_embeddings, or set "
        "--rope_scaling"
    )
    warnings.warn(msg, RopeRangeWarning, stacklevel=2)
    return msg


# --------------------------------------------------------------------------------------- callbacks


class ThroughputCallback(TrainerCallback):
    """Per-step wall time and tokens/s (tokens = ``seq_len`` x rows per optimizer step, padding included).

    Adds ``tokens_per_second`` and ``step_time`` to each log line (shown by the progress bar) and keeps
    ``records`` (one dict per optimizer step) for the summary and plots.
    """

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.records: list[dict] = []
        self._last = None
        self._since_log: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        dt = now - self._last
        self._last = now
        self._since_log.append(dt)
        self.records.append({"step": state.global_step, "step_time": dt, "tokens_per_second": self.tokens_per_step / dt})

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs and self._since_log:
            dt = sum(self._since_log) / len(self._since_log)
            logs["step_time"] = round(dt, 3)
            logs["tokens_per_second"] = round(self.tokens_per_step / dt, 1)
            self._since_log = []
        if logs is not None and self._last is not None:
            self._last = time.perf_counter()  # logging/eval time is not a step's time


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: ``KeyboardInterrupt`` at once."""

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def _handler(self, signum, frame):
        self.interrupted = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        print("\n[anchorcontext] Ctrl-C: finishing this step, saving a checkpoint and stopping "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kw):
        if signal.getsignal(signal.SIGINT) is not None and _main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_step_end(self, args, state, control, **kw):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        if self._previous is not None and _main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------- run


def _resolve_resume(training_args) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    r = training_args.resume_from_checkpoint
    if r is None or (isinstance(r, str) and r.lower() in ("", "false", "no", "none")):
        return None
    if isinstance(r, bool) or r.lower() in ("last", "latest", "true", "yes"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint={r!r}: no checkpoint-* directory in {training_args.output_dir!r}")
        return last
    if not os.path.isdir(r):
        raise FileNotFoundError(f"resume_from_checkpoint {r!r} is not a checkpoint directory")
    return r


def _world_dp(training_args, sp_size: int) -> int:
    return max(1, int(getattr(training_args, "world_size", 1) or 1) // sp_size)


def apply_tokens_per_step(aargs: AnchorArguments, dargs: DataArguments, training_args) -> None:
    if aargs.tokens_per_step is None:
        return
    per_micro = dargs.seq_len * training_args.per_device_train_batch_size * _world_dp(training_args, aargs.sp_size)
    if aargs.tokens_per_step % per_micro:
        raise ValueError(
            f"tokens_per_step={aargs.tokens_per_step} is not a multiple of seq_len x per_device_train_batch_size x "
            f"data-parallel ranks = {dargs.seq_len} x {training_args.per_device_train_batch_size} x "
            f"{_world_dp(training_args, aargs.sp_size)} = {per_micro}"
        )
    training_args.gradient_accumulation_steps = aargs.tokens_per_step // per_micro


def dry_run(margs: ModelArguments, dargs: DataArguments, aargs: AnchorArguments, training_args) -> dict:
    """Build the model on the meta device and describe the recipe (no weights, no data, no download with model_config)."""
    apply_tokens_per_step(aargs, dargs, training_args)
    model = build_model_on_meta(margs)
    n = sum(p.numel() for p in model.parameters())
    info = {
        "model_type": model.config.model_type,
        "parameters": n,
        "rope": rope_summary(model.config),
        "seq_len": dargs.seq_len,
        "tokens_per_step": dargs.seq_len * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * _world_dp(training_args, aargs.sp_size),
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "max_steps": training_args.max_steps,
        "learning_rate": training_args.learning_rate,
        "mask": aargs.mask,
        "positions": aargs.positions,
    }
    check_rope_range(model.config, dargs.seq_len)
    print(json.dumps(info, indent=2))
    return info


def _run_eval(model, tokenizer, aargs: AnchorArguments, dargs: DataArguments, seed: int, out_dir: pathlib.Path) -> dict | None:
    """RULER-style evaluation (+ perplexity) from :mod:`anchorcontext.evaluation`, or None when it is not set/installed."""
    if not aargs.eval_tasks:
        return None
    try:
        from ..evaluation import evaluate
    except ImportError as e:
        print(f"[anchorcontext] evaluation skipped: anchorcontext.evaluation is not available ({e})", file=sys.stderr)
        return {"error": f"anchorcontext.evaluation unavailable: {e}"}
    lengths = aargs.eval_lengths or [dargs.seq_len]
    was_training = model.training
    try:
        return evaluate(model, tokenizer, tasks=list(aargs.eval_tasks), lengths=lengths, samples=aargs.eval_samples,
                        seed=seed, out_dir=str(out_dir), ppl_samples=aargs.eval_samples, progress=False)
    except Exception as e:  # an evaluation failure must not lose a finished training run
        logger.warning("anchorcontext: evaluation failed: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        model.train(was_training)


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


def run(margs: ModelArguments, dargs: DataArguments, aargs: AnchorArguments, training_args,
        *, callbacks: list | None = None) -> dict:
    """Fine-tune as configured; returns the summary dict (also written to ``<output_dir>/summary.json``).

    ``callbacks``: extra ``TrainerCallback`` objects. ``anchor_args.threads`` sets torch's thread count for the
    run and restores it afterwards.
    """
    threads = torch.get_num_threads()
    want = aargs.threads or busy_machine_threads()
    if want:
        torch.set_num_threads(want)
    try:
        if aargs.dry_run:
            return dry_run(margs, dargs, aargs, training_args)
        return _run(margs, dargs, aargs, training_args, callbacks)
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


def _run(margs, dargs, aargs, training_args, callbacks) -> dict:
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
    if resume is None and out.is_dir() and any(out.glob("checkpoint-*")):
        logger.warning("anchorcontext: %s already holds checkpoints; this run starts from scratch "
                       "(use --resume_from_checkpoint last to continue)", out)
    apply_tokens_per_step(aargs, dargs, training_args)
    set_seed(training_args.seed)

    t0 = time.perf_counter()
    model, tokenizer, source = build_model(margs, seed=training_args.seed)
    t_model = time.perf_counter() - t0
    rope_warning = check_rope_range(model.config, dargs.seq_len)
    patch_model(model, backend=aargs.attn_backend)
    if aargs.sp_size > 1:
        try:
            from ..parallel import configure_sequence_parallel
        except ImportError as e:
            raise RuntimeError(f"sp_size={aargs.sp_size} needs anchorcontext.parallel ({e})") from None
        training_args = configure_sequence_parallel(model=model, training_args=training_args, sp_size=aargs.sp_size)
        from ..parallel import sequence_parallel_trainer_class

        Trainer = sequence_parallel_trainer_class(Trainer)  # token-weighted loss across DP x SP x grad accumulation

    t0 = time.perf_counter()
    data = build_datasets(dargs, tokenizer, seed=training_args.seed)
    t_data = time.perf_counter() - t0
    collator = AnchorCollator(tokenizer=tokenizer, mask=aargs.mask, positions=aargs.positions,
                              pad_to_multiple_of=aargs.sp_size if aargs.sp_size > 1 else None)
    tokens_per_step = (dargs.seq_len * training_args.per_device_train_batch_size
                       * training_args.gradient_accumulation_steps * _world_dp(training_args, aargs.sp_size))
    if data.train_rows is None and training_args.max_steps <= 0:
        raise ValueError("streaming=True needs max_steps > 0 (a stream has no length)")
    throughput = ThroughputCallback(tokens_per_step)
    interrupt = InterruptCallback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[*(callbacks or []), throughput, interrupt],
    )
    main = trainer.is_world_process_zero()
    if main:
        print(f"[anchorcontext] model: {source}\n[anchorcontext] data: {data.source}; "
              f"{data.train_rows if data.train_rows is not None else 'streaming'} training rows x {dargs.seq_len} tokens"
              f"{'' if data.eval is None else f', {len(data.eval)} held-out rows'}; mask={aargs.mask}, "
              f"positions={aargs.positions}, backend={aargs.attn_backend}", file=sys.stderr)

    evals: dict[str, Any] = {}
    t0 = time.perf_counter()
    if aargs.eval_before_after and resume is None:
        if data.eval is not None:
            evals["heldout_before"] = trainer.evaluate(metric_key_prefix="heldout")
        evals["eval_before"] = _run_eval(model, tokenizer, aargs, dargs, training_args.seed, out / "eval_before")
    t_eval_before = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    t_train = time.perf_counter() - t0
    interrupted = interrupt.interrupted

    t0 = time.perf_counter()
    if main:
        trainer.save_model(str(out / "model"))
        tokenizer.save_pretrained(str(out / "model"))
    t_save = time.perf_counter() - t0

    t0 = time.perf_counter()
    if aargs.eval_before_after and not interrupted:
        if data.eval is not None:
            evals["heldout_after"] = trainer.evaluate(metric_key_prefix="heldout")
        evals["eval_after"] = _run_eval(model, tokenizer, aargs, dargs, training_args.seed, out / "eval_after")
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
        "tokens_per_step": tokens_per_step,
        "resumed_from": resume,
        "interrupted": interrupted,
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
                 "training": {k: _jsonable(v) for k, v in training_args.to_dict().items()}},
    }
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if aargs.plots:
            summary["plots"] = write_plots(summary, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(format_summary(summary))
        if interrupted:
            print(f"[anchorcontext] interrupted at step {summary['steps']}; checkpoint {last_ckpt}. Resume with:\n"
                  f"  anchorcontext train ... --output_dir {out} --resume_from_checkpoint last", file=sys.stderr)
    return summary


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


# ----------------------------------------------------------------------------------- report, plots


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
