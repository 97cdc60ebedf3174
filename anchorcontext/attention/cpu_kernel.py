"""The compiled CPU kernel of the ``sdpa`` backend: exact causal tiles over packed segments.

``csrc/anchor_flash_cpu.cpp`` is a flash-attention forward/backward for CPU that runs a whole packed
batch in one call: every segment attends causally within itself, plus to the row's anchor token when the
segment has one, reading Q/K/V from ``(B, L, H, D)`` memory without full-size copies (each task copies one
segment of one head). Its key blocks end exactly at each query block's last key. torch's own CPU flash kernel (what the fallback path calls once per document)
always computes whole 512-key blocks, so a causal call on ``n <= 512`` tokens costs a full ``n x n``
square and a 1K-token document ~1.5x its causal pairs; on the 2-core Xeon this kernel runs 1K-token
documents ~1.3x and 512-token documents ~1.8x faster per useful pair than torch's, and a full 8K causal
row at the same speed (``docs/performance.md``).

It is JIT-compiled with ``torch.utils.cpp_extension`` on first use (~40 s with g++, cached in
``TORCH_EXTENSIONS_DIR``; rebuilt only when the source or the flags change). Float32, float64, and
bfloat16/float16 storage with float32 arithmetic; machines where it cannot be built use the stock-kernel path
(same results within floating-point error; the tests run both). ``ANCHORCONTEXT_CPU_KERNEL``: unset or ``auto`` = build and use
it when possible (a failed build logs one warning and falls back), ``0`` = never, ``1`` = required (a
failed build raises).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger("anchorcontext")

ENV = "ANCHORCONTEXT_CPU_KERNEL"
SOURCE = Path(__file__).with_name("csrc") / "anchor_flash_cpu.cpp"
# query rows per block (64 for segments of <= 384 tokens, chosen in the kernel) and keys per block:
# the fastest of 64/128/256 x 256/512 measured per segment length on the 2-core Xeon (fp32, H=8, D=64)
Q_BLOCK, KV_BLOCK = 128, 512
# storage dtypes it runs; bfloat16/float16 rows are converted to float32 per task, every product and sum is
# float32 (the log-sum-exp too), results are rounded once to the storage type
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}
_local = threading.local()


def _isa() -> tuple[str, list[str]]:
    """A tag and the ISA flags for this machine's CPU (the build is cached per tag: a cache directory shared
    between machines never hands an AVX-512 build to a CPU without it)."""
    flags = ""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = " " + line.split(":", 1)[1] + " "
                break
        if all(f" {f} " in flags for f in ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma")):
            return "avx512", ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]
        if all(f" {f} " in flags for f in ("avx2", "fma")):
            return "avx2", ["-mavx2", "-mfma"]
    return "base", []


def _mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "0", "1", ""):
        raise ValueError(f"{ENV} must be 'auto', '0' or '1', got {value!r}")
    return value or "auto"


def _ensure_ninja() -> None:
    """torch's JIT build runs ``ninja`` from PATH. The ``ninja`` wheel (a dependency) puts it next to the
    interpreter, which is not on PATH when a venv's python is run without activating the venv: add that
    directory (only when no ninja is found)."""
    if shutil.which("ninja"):
        return
    dirs = [Path(sys.executable).parent]
    with contextlib.suppress(Exception):
        import ninja

        dirs.insert(0, Path(ninja.BIN_DIR))
    for d in dirs:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _build():
    from torch.utils.cpp_extension import load

    _ensure_ninja()
    tag, isa = _isa()
    logger.info("anchorcontext: loading the CPU attention kernel (compiled on first use, ~40 s)")
    return load(
        name=f"anchorcontext_flash_cpu_{tag}",
        sources=[str(SOURCE)],
        # -fno-trapping-math lets GCC vectorise the float->int step of the exponential; -fopenmp because
        # at::parallel_for is an inline `#pragma omp parallel` (without it, it runs on one thread)
        extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", *isa],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _summary(error: str) -> str:
    """The compiler's error lines when there are any (a failed build's message starts with the long command)."""
    lines = [ln.strip() for ln in error.splitlines() if "error" in ln.lower() and ln.strip()]
    picked = [ln for ln in lines if ": error:" in ln] or lines[:1] or error.splitlines()[:1]
    return "; ".join(picked[:3])[:600]


def get():
    """The compiled module, or ``None`` when it is switched off or cannot be built (then the caller falls back)."""
    if getattr(_local, "disabled", 0):
        return None
    mode = _mode()  # read once: this runs in every attention layer
    if mode == "0":
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["module"] = _build()
                except Exception as e:  # no compiler, no headers, ...: fall back, say why once
                    _state["error"] = f"{type(e).__name__}: {e}"
                    logger.warning(
                        "anchorcontext: the CPU attention kernel could not be built (%s); the sdpa backend uses "
                        "torch's CPU flash kernel per document instead (slower on short documents)",
                        _summary(_state["error"]),
                    )
                _state["tried"] = True
    if _state["module"] is None and mode == "1":
        raise RuntimeError(f"{ENV}=1 but the CPU attention kernel could not be built: {_state['error']}")
    return _state["module"]


@contextlib.contextmanager
def disabled():
    """Within this block (this thread), the ``sdpa`` backend uses torch's stock CPU kernel path."""
    _local.disabled = getattr(_local, "disabled", 0) + 1
    try:
        yield
    finally:
        _local.disabled -= 1
