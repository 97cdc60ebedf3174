"""A run never loses or overwrites another: output-dir checks, complete checkpoints, the resume-options check, and a
checkpoint saved when training fails."""

from __future__ import annotations

import json
import logging
import os
import pathlib

from transformers import TrainerCallback

logger = logging.getLogger("anchorcontext")


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


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
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "threads", "plots", "dry_run", "dry_run_world_size",
    "device_memory_gib", "eval_before_after",
    "eval_tasks", "eval_lengths", "eval_samples", "logging_steps", "logging_dir", "report_to", "run_name",
    "disable_tqdm", "save_steps", "save_total_limit", "dataloader_num_workers", "per_device_eval_batch_size",
    "eval_steps", "eval_strategy", "hub_token", "push_to_hub", "max_eval_rows", "local_rank",
    # the loss path: the same loss and gradients (within float rounding), a memory choice
    "chunked_loss", "loss_chunk_tokens",
}


def _run_args(margs, dargs, aargs, rargs, training_args) -> dict:
    out = {}
    for part in (vars(margs), vars(dargs), vars(aargs), vars(rargs), training_args.to_dict()):
        out.update({k: _jsonable(v) for k, v in part.items() if k not in RESUME_MAY_DIFFER})
    return out


def record_run_args(directory, margs, dargs, aargs, rargs, training_args) -> None:
    """Write the run's options into ``directory`` (each checkpoint) so a resumption can be checked against them."""
    pathlib.Path(directory, RUN_ARGS_FILE).write_text(json.dumps(_run_args(margs, dargs, aargs, rargs, training_args), indent=1))


def check_resume_matches(checkpoint, margs, dargs, aargs, rargs, training_args) -> None:
    """Refuse to resume a checkpoint written by a run with other options; the error names each difference."""
    f = pathlib.Path(checkpoint, RUN_ARGS_FILE)
    if not f.is_file():
        logger.warning("anchorcontext: %s has no %s: cannot check that it belongs to this run", checkpoint, RUN_ARGS_FILE)
        return
    then = json.loads(f.read_text())
    now = _run_args(margs, dargs, aargs, rargs, training_args)
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


def remove_old_checkpoints(out: pathlib.Path) -> None:
    """Delete an earlier run's ``checkpoint-*`` folders from ``out`` (a run started over with
    ``--overwrite_output_dir``), so ``--resume_from_checkpoint last`` can only find this run's."""
    import shutil

    old = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    if old:
        logger.warning("anchorcontext: --overwrite_output_dir: removing the earlier run's checkpoints in %s: %s", out,
                       ", ".join(p.name for p in old))
        for p in old:
            shutil.rmtree(p)


def _save_after_failure(trainer, error: Exception, record_args: RecordArgsCallback | None = None) -> Exception:
    """Save a resumable checkpoint at the last finished step, then return ``error`` with where the run can resume.

    The exception (e.g. a bad record late in a streaming dataset, whose message names its file and line) is
    re-raised with the checkpoint's path added, so no finished step is lost.
    """
    step = trainer.state.global_step
    where = "no checkpoint (no step had finished)"
    if step > 0:
        try:
            trainer._save_checkpoint(trainer.model, trial=None)  # calls no on_save: tag it with the run's options
            if record_args is not None:
                record_args.on_save(trainer.args, trainer.state, None)
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
