"""The compiled CPU kernel of the ``sdpa`` backend: exact causal tiles over packed segments.

``csrc/anchor_flash_cpu.cpp`` is a flash-attention forward/backward for CPU that runs a whole packed batch in one
call: every segment attends causally within itself, plus to the row's anchor token when the segment has one,
reading Q/K/V from ``(B, L, H, D)`` memory without full-size copies. Its key blocks end exactly at each query
block's last key, where torch's CPU flash kernel (the fallback, one call per document) always computes whole
512-key blocks; that is why it is faster on short documents (figures in ``docs/performance.md``).

It is JIT-compiled with ``torch.utils.cpp_extension`` on first use (one line on stderr says so) and cached in
``TORCH_EXTENSIONS_DIR`` under :func:`build_name`. That directory must be private to the user: torch loads
whatever ``.so`` sits there. Float32, float64, and bfloat16/float16 storage with float32 arithmetic; machines
where it cannot be built use the stock-kernel path (same results within floating-point error; the tests run
both). ``ANCHORCONTEXT_CPU_KERNEL``: unset or ``auto`` = build and use it when possible (a failed build logs one
warning and falls back), ``0`` = never, ``1`` = required (a failed build raises). A build lock left by an
interrupted build is removed once older than ``ANCHORCONTEXT_CPU_KERNEL_LOCK_S`` seconds (default 600), with a
warning naming it (:func:`_clear_stale_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("anchorcontext")

ENV = "ANCHORCONTEXT_CPU_KERNEL"
SOURCE = Path(__file__).with_name("csrc") / "anchor_flash_cpu.cpp"
# query rows per block (64 for segments of <= 384 tokens, chosen in the kernel) and keys per block: the fastest
# measured combination (docs/performance.md)
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


# -fno-trapping-math lets GCC vectorise the float->int step of the exponential; -fopenmp because
# at::parallel_for is an inline `#pragma omp parallel` (without it, it runs on one thread)
CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
BUILD_MESSAGE = "anchorcontext: building the CPU attention kernel, ~40 s, once"


def build_name() -> str:
    """The extension's name, which is its directory under ``TORCH_EXTENSIONS_DIR``: the CPU ISA, the torch and
    Python versions and a digest of the compiler and its flags, so venvs or machines sharing the directory never
    load or rebuild each other's copy. The directory must be private to the user: torch loads whatever ``.so``
    sits there."""
    tag, isa = _isa()
    compiler = os.environ.get("CXX", "c++")
    key = " ".join([compiler, *CFLAGS, *isa, "-fopenmp", sys.version.split()[0]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    torch_version = re.sub(r"[^0-9A-Za-z]", "_", torch.__version__)
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return f"anchorcontext_flash_cpu_{tag}_torch{torch_version}_py{py}_{digest}"


LOCK_ENV = "ANCHORCONTEXT_CPU_KERNEL_LOCK_S"
LOCK_STALE_S = 600.0  # a build takes ~40-60 s; a lock this old belongs to no running build
LOCK_NOTICE_S = 10.0  # a load of a cached build holds the lock for milliseconds: say nothing unless it lasts


def _lock_limit() -> float:
    """Seconds after which a build lock is stale (``ANCHORCONTEXT_CPU_KERNEL_LOCK_S``, default 600)."""
    value = os.environ.get(LOCK_ENV, "").strip()
    if not value:
        return LOCK_STALE_S
    try:
        limit = float(value)
    except ValueError:
        limit = float("nan")
    if not 0 < limit < float("inf"):
        raise ValueError(f"{LOCK_ENV} must be a positive number of seconds, got {value!r}")
    return limit


def _clear_stale_lock(build_dir: Path, poll_s: float = 1.0) -> None:
    """Wait for or remove ``build_dir/lock``. torch's ``load`` holds that file (a ``FileBaton``) while it checks or
    builds, and every other process, built or not, waits until it is gone: no timeout, no message. A build killed
    mid-way (``timeout``, OOM) leaves it behind, and every later process hangs. A lock younger than the limit is
    waited for (another process is building; a warning if it lasts); an older one is removed with a warning.
    Remaining gap: a build started and killed between this check and ``load`` taking the lock."""
    lock = build_dir / "lock"
    limit = _lock_limit()
    start, told = time.monotonic(), False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= limit:
            logger.warning(
                "anchorcontext: removing the stale lock file %s (%.0f s old, limit %s=%g s): an interrupted build "
                "of the CPU attention kernel left it, and torch would wait on it forever",
                lock, age, LOCK_ENV, limit,
            )
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return
        if not told and time.monotonic() - start >= min(LOCK_NOTICE_S, limit):
            logger.warning(
                "anchorcontext: waiting for %s (another process is building the CPU attention kernel); it is "
                "removed as stale at %g s old (%s), or delete it if no build is running",
                lock, limit, LOCK_ENV,
            )
            told = True
        time.sleep(max(0.0, min(poll_s, limit - age)))


def _built(name: str) -> bool:
    """Whether a build of ``name`` is already cached (then loading it takes a second, not ~40 s)."""
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so"))


def _build():
    from torch.utils.cpp_extension import _get_build_directory, load

    _ensure_ninja()
    _, isa = _isa()
    name = build_name()
    _clear_stale_lock(Path(_get_build_directory(name, verbose=False)))
    with contextlib.suppress(Exception):
        if not _built(name):
            print(BUILD_MESSAGE, file=sys.stderr, flush=True)  # library users see it too, not only the CLI
    return load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=[*CFLAGS, *isa],
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
                _lock_limit()  # a bad value is the user's error, not a failed build
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
