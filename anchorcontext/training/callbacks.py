"""Trainer callbacks of a training run: throughput per step, and Ctrl-C / SIGTERM -> checkpoint and stop."""

from __future__ import annotations

import signal
import sys
import threading
import time

from transformers import TrainerCallback


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
    return threading.current_thread() is threading.main_thread()
