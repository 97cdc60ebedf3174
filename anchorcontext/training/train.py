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
    """Ctrl-C or SIGTERM: finish the step, save a checkpoint, stop. A second Ctrl-C: ``KeyboardInterrupt`` at once.

    ``signal`` names the signal received (``"SIGINT"`` / ``"SIGTERM"``), so the CLI exits 130 / 143 after saving.
    """

    def __init__(self):
        self.interrupted = False
        self.signal: str | None = None
        self._previous = {}

    def _handler(self, signum, frame):
        self.interrupted = True
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT) or signal.default_int_handler)
        print(f"\n[anchorcontext] {self.signal}: finishing this step, saving a checkpoint and stopping"
              + (" (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kw):
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not None:
                    self._previous[sig] = signal.signal(sig, self._handler)

    def on_step_end(self, args, state, control, **kw):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        if _main_thread():
            for sig, prev in self._previous.items():
                signal.signal(sig, prev)
        self._previous = {}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------- run


def _complete(ckpt: pathlib.Path) -> bool:
    """A checkpoint whose save finished: ``trainer_state.json`` is the file the Trainer writes last."""
    return (ckpt / "trainer_state.json").is_file()


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` with a ``trainer_state.json``; torn ones (a save killed midway) are skipped with a warning."""
    ckpts = sorted((p for p in pathlib.Path(output_dir).glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-", 1)[1].isdigit()), key=lambda p: int(p.name.split("-", 1)[1]))
    for ck in reversed(ckpts):
        if _complete(ck):
            return str(ck)
        logger.warning("anchorcontext: skipping %s: incomplete checkpoint (no trainer_state.json; its save was "
                       "interrupted)", ck)
    return None


def _resolve_resume(training_args) -> str | None:
    r = training_args.resume_from_checkpoint
    if r is None or (isinstance(r, str) and r.lower() in ("", "false", "no", "none")):
        return None
    out = training_args.output_dir
    if isinstance(r, bool) or r.lower() in ("last", "latest", "true", "yes"):
        last = last_complete_checkpoint(out) if os.path.isdir(out) else None
        if last is None:
            torn = sorted(p.name for p in pathlib.Path(out).glob("checkpoint-*")) if os.path.isdir(out) else []
            extra = f" ({', '.join(torn)}: incomplete, no trainer_state.json)" if torn else ""
            raise FileNotFoundError(f"resume_from_checkpoint={r!r}: no checkpoint-* directory to resume in {out!r}{extra}")
        return last
    if not os.path.isdir(r):
        raise FileNotFoundError(f"resume_from_checkpoint {r!r} is not a checkpoint directory")
    if not _complete(pathlib.Path(r)):
        raise FileNotFoundError(f"resume_from_checkpoint {r!r} is incomplete: no trainer_state.json (its save was "
                                "interrupted); pick an earlier checkpoint")
    return r


RUN_ARGS_FILE = "anchorcontext_args.json"
# Options that may change between a run and its resumption (where files go, how much is printed or evaluated).
RESUME_MAY_DIFFER = {
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "threads", "plots", "dry_run", "eval_before_after",
    "eval_tasks", "eval_lengths", "eval_samples", "logging_steps", "logging_dir", "report_to", "run_name",
    "disable_tqdm", "save_steps", "save_total_limit", "dataloader_num_workers", "per_device_eval_batch_size",
    "eval_steps", "eval_strategy", "hub_token", "push_to_hub", "max_eval_rows", "local_rank",
}


def _run_args(margs, dargs, aargs, training_args) -> dict:
    out = {}
    for part in (vars(margs), vars(dargs), vars(aargs), training_args.to_dict()):
        out.update({k: _jsonable(v) for k, v in part.items() if k not in RESUME_MAY_DIFFER})
    return out


def record_run_args(directory, margs, dargs, aargs, training_args) -> None:
    """Write the run's options into ``directory`` (each checkpoint) so a resumption can be checked against them."""
    pathlib.Path(directory, RUN_ARGS_FILE).write_text(json.dumps(_run_args(margs, dargs, aargs, training_args), indent=1))


def check_resume_matches(checkpoint, margs, dargs, aargs, training_args) -> None:
    """Refuse to resume a checkpoint written by a run with other options; the error names each difference."""
    f = pathlib.Path(checkpoint, RUN_ARGS_FILE)
    if not f.is_file():
        logger.warning("anchorcontext: %s has no %s: cannot check that it belongs to this run", checkpoint, RUN_ARGS_FILE)
        return
    then = json.loads(f.read_text())
    now = _run_args(margs, dargs, aargs, training_args)
    diff = [f"{k}: {then.get(k)!r} in the checkpoint's run, {now.get(k)!r} now" for k in sorted(set(then) | set(now))
            if then.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"cannot resume {str(checkpoint)!r}: it was written by a run with other options ("
                         + "; ".join(diff) + "). Use the same options, or a new --output_dir")


class RecordArgsCallback(TrainerCallback):
    """Writes the run's options into every checkpoint it saves (see :func:`check_resume_matches`)."""

    def __init__(self, *run_args):
        self.record = _run_args(*run_args)

    def on_save(self, args, state, control, **kw):
        ck = pathlib.Path(args.output_dir, f"checkpoint-{state.global_step}")
        if ck.is_dir() and state.is_world_process_zero:
            (ck / RUN_ARGS_FILE).write_text(json.dumps(self.record, indent=1))


def check_output_dir(out: pathlib.Path, resume: str | None, overwrite: bool, *, model_bytes: int = 0) -> None:
    """Refuse a non-empty output dir (unless resumed or overwritten) and an unwritable or full one, before training."""
    if out.is_dir() and any(out.iterdir()) and resume is None and not overwrite:
        held = sorted(p.name for p in out.iterdir())[:5]
        raise ValueError(f"output_dir {str(out)!r} is not empty (holds {', '.join(held)}); continue it with "
                         "--resume_from_checkpoint last, write over it with --overwrite_output_dir true, or pick a "
                         "new --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".anchorcontext-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output_dir {str(out)!r} is not writable: {e.strerror or e}") from None
    import shutil

    free = shutil.disk_usage(out).free
    if model_bytes and free < model_bytes:
        raise ValueError(f"output_dir {str(out)!r} has {free / 2**30:.2f} GiB free; one checkpoint (weights + "
                         f"optimizer state) needs about {model_bytes / 2**30:.2f} GiB")


def _world_dp(training_args, sp_size: int) -> int:
    return max(1, int(getattr(training_args, "world_size", 1) or 1) // sp_size)


def tokens_per_step(dargs: DataArguments, training_args, sp_size: int) -> int:
    """Tokens per optimizer step: ``seq_len x per_device_train_batch_size x accumulation x data-parallel ranks``."""
    return (dargs.seq_len * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * _world_dp(training_args, sp_size))


def apply_tokens_per_step(aargs: AnchorArguments, dargs: DataArguments, training_args) -> None:
    """Derive ``gradient_accumulation_steps`` from ``tokens_per_step`` (when set); it must divide exactly."""
    if aargs.tokens_per_step is None:
        return
    per_micro = tokens_per_step(dargs, training_args, aargs.sp_size) // training_args.gradient_accumulation_steps
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
        "tokens_per_step": tokens_per_step(dargs, training_args, aargs.sp_size),
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
    check_output_dir(out, resume, aargs.overwrite_output_dir)
    if resume is None and any(out.glob("checkpoint-*")):
        logger.warning("anchorcontext: --overwrite_output_dir: %s holds checkpoints of an earlier run; this run starts "
                       "from scratch and writes over them", out)
    apply_tokens_per_step(aargs, dargs, training_args)
    if resume is not None:
        check_resume_matches(resume, margs, dargs, aargs, training_args)
    record_args = RecordArgsCallback(margs, dargs, aargs, training_args)  # before sequence parallelism edits them
    set_seed(training_args.seed)

    t0 = time.perf_counter()
    model, tokenizer, source = build_model(margs, seed=training_args.seed)
    t_model = time.perf_counter() - t0
    rope_warning = check_rope_range(model.config, dargs.seq_len)
    # one checkpoint: the weights plus Adam's two moments, in the weights' dtype or float32
    check_output_dir(out, resume, True, model_bytes=sum(p.numel() * (p.element_size() + 8) for p in model.parameters()))
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
    step_tokens = tokens_per_step(dargs, training_args, aargs.sp_size)
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
    if aargs.eval_before_after and resume is None:
        if data.eval is not None:
            evals["heldout_before"] = trainer.evaluate(metric_key_prefix="heldout")
        evals["eval_before"] = _run_eval(model, tokenizer, aargs, dargs, training_args.seed, out / "eval_before")
    t_eval_before = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        raise _save_after_failure(trainer, e) from e
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


def _save_after_failure(trainer, error: Exception) -> Exception:
    """Save a resumable checkpoint at the last finished step, then return ``error`` with where the run can resume.

    The exception (e.g. a bad record late in a streaming dataset, whose message names its file and line) is
    re-raised with the checkpoint's path added, so no finished step is lost.
    """
    step = trainer.state.global_step
    where = "no checkpoint (no step had finished)"
    if step > 0:
        try:
            trainer._save_checkpoint(trainer.model, trial=None)
            where = f"checkpoint {os.path.join(trainer.args.output_dir, f'checkpoint-{step}')} saved at step {step}; " \
                    "fix the cause and resume with --resume_from_checkpoint last"
        except Exception as save_error:  # report the training error, not the failed save
            where = f"saving a checkpoint failed too ({type(save_error).__name__}: {save_error})"
    logger.error("anchorcontext: training failed at step %d: %s: %s; %s", step, type(error).__name__, error, where)
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"{error} ({where})")
    if isinstance(error, ValueError):
        return ValueError(f"{error} ({where})")
    return RuntimeError(f"training failed at step {step}: {type(error).__name__}: {error} ({where})")


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
