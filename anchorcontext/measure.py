"""Measurement tools shared by ``anchorcontext bench`` and the scripts in ``benchmarks/``: peak memory of one
call, the device's dense matmul rate, and a description of the machine for result files.

Kept apart from :mod:`anchorcontext.bench` so a benchmark script imports them without the training-step CLI.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time

import torch


class PeakMemory:
    """Peak memory of one call: CUDA allocator bytes, or Linux peak RSS (``VmHWM``) on CPU."""

    M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

    def __init__(self, device: torch.device, mmap_threshold: int = 0):
        self.device = device
        self.libc = None
        self.mmap_threshold = None
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self._reset_hwm()
            except OSError:
                self.libc = None
            ok = self.libc is not None and mmap_threshold > 0
            if ok and self.libc.mallopt(self.M_MMAP_THRESHOLD, int(mmap_threshold)) == 1:
                self.mmap_threshold = int(mmap_threshold)

    @staticmethod
    def _status_kib(name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        raise OSError(f"{name} not in /proc/self/status")

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated (peak) and its increase over memory_allocated before the step"
        if self.libc is not None:
            how = (f"glibc M_MMAP_THRESHOLD={self.mmap_threshold} (tensors above it are mapped and unmapped on free, so "
                   "RSS tracks live bytes)" if self.mmap_threshold else "glibc default dynamic mmap threshold")
            return ("Linux VmHWM after malloc_trim + /proc/self/clear_refs reset (peak RSS) and its increase over VmRSS "
                    f"before; {how}")
        return "unavailable on this platform"

    def start(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.libc is None:
            return None
        self.libc.malloc_trim(0)
        self._reset_hwm()
        return self._status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        """Absolute peak since :meth:`start` (bytes)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.libc is None:
            return None
        return self._status_kib("VmHWM") * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured dense matmul throughput (median of timed square matmuls), in TFLOP/s."""
    n = 8192 if device.type == "cuda" else 1024
    iters = 20 if device.type == "cuda" else 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n**3 / t / 1e12, "median_s": t}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers

    info = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(cuda_device=p.name, cuda_memory_gib=round(p.total_memory / 2**30, 1), cuda_version=torch.version.cuda)
        info["device_name"] = p.name
    else:
        info["device_name"] = f"{cpu} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    return info
