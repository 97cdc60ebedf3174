"""Training-step benchmark: full vs intra_doc vs AnchorAttention on a Llama-shaped model built from a config.

One process, one model, one AdamW optimizer. For each sequence length ``L`` a set of packed batches is
drawn (anchor at index 0 of every row, then documents whose lengths follow a seeded lognormal, or the
real lengths of the shipped stdlib corpus); every configuration then runs a full training step
(forward with the HF loss, backward, ``AdamW.step``, ``zero_grad(set_to_none=True)``) on the same
batches, interleaved repeat by repeat so that load from other processes hits all alike. Warm-up steps
are excluded; figures are medians over the timed repeats. Configurations:

* ``stock/full``: the *unpatched* model, stock transformers SDPA (``is_causal=True``), no anchor keys.
* ``<backend>/<mask>`` for ``mask`` in ``full | intra_doc | anchor`` and each trainable backend on the
  device (CPU: ``sdpa``; CUDA: ``sdpa``, ``flex``, ``varlen`` when importable): the patched model with
  ``anchor_inputs(doc_ids, mask=mask)`` and ``anchor_backend=backend``.

Limits printed beside each measurement (all FLOPs counted, not estimated from time):

* attention FLOP ratio ``attn_full / attn_mode``: forward attention FLOPs of the batch
  (:meth:`AnchorLayout.attention_flops`, causal halves counted exactly) summed over layers.
* whole-step FLOP ratio ``step_full / step_mode`` with ``step = 6 * P_mm * T + 3 * attn_fwd`` (``P_mm``:
  weights of every ``nn.Linear``, LM head included, embeddings excluded; ``T = B * L`` tokens; backward
  = 2x forward). Gradient checkpointing adds one more forward of the decoder layers
  (``+2 * P_layers * T + attn_fwd``). The fraction ``speedup / limit`` is the share of the ideal
  speedup a mode achieves: element-wise work (norms, RoPE, SiLU, softmax of the loss, AdamW) is the same
  in every mode and is not counted, so it pulls the fraction below 1.
* achieved TFLOP/s of the counted step FLOPs, and the same as a share of a measured dense matmul rate
  on the device (bf16 on CUDA, the benchmark dtype on CPU).

Peak memory per step: CUDA allocator peak (``max_memory_allocated``) and its increase over the state
before the step; CPU: the process's peak resident set (``VmHWM`` after ``malloc_trim`` and a reset via
``/proc/self/clear_refs``) minus the resident set before the step (Linux only, else ``null``).

Run ``anchorcontext bench --preset quick`` (a few minutes on 2 CPU cores), ``--preset cpu`` (the CPU goal:
4 layers, hidden 512, 8 heads at L = 8192 and 16384) or ``--preset gpu-1b`` (a ~1.1B Llama in bf16 at
8K/32K/64K with gradient checkpointing). ``--help`` lists every field.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .collator import anchor_inputs, labels_for
from .layout import MASKS, AnchorLayout
from .packing import doc_ids_from_lens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Model shapes and lengths per preset; any field given on the command line wins.
PRESETS: dict[str, dict[str, Any]] = {
    # the dry-run / test size: seconds on a laptop
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512,
             "lengths": [128, 256], "mean_doc": 32.0},
    # README size: the CPU-goal model at short lengths, a few minutes on 2 cores
    "quick": {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 8, "intermediate": 1408, "vocab": 8192,
              "lengths": [1024, 2048]},
    # the CPU goal of issue 8
    "cpu": {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 8, "intermediate": 1408, "vocab": 8192,
            "lengths": [8192, 16384]},
    # ~1.1B Llama (Llama-3.2-1B shape: 16 layers, hidden 2048, 32 heads, 8 KV heads, MLP 8192; vocab cut to
    # 32000 so the fp32 loss of a 64K row fits beside the model). Gradient checkpointing for 64K.
    "gpu-1b": {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000,
               "lengths": [8192, 32768, 65536], "grad_ckpt": True},
}


@dataclass(kw_only=True)
class BenchConfig:
    """Every knob of the benchmark (the CLI is derived from it with ``HfArgumentParser``)."""

    preset: str = field(default="quick", metadata={"help": "model/length preset", "choices": sorted(PRESETS)})
    lengths: list[int] | None = field(default=None, metadata={"help": "sequence lengths L (default: preset)"})
    masks: list[str] = field(default_factory=lambda: list(MASKS[::-1]), metadata={"help": "patched modes to run"})
    backends: list[str] | None = field(
        default=None, metadata={"help": "anchor backends (default: every trainable one on the device)"})
    stock: bool = field(default=True, metadata={"help": "also run the unpatched model (stock SDPA is_causal)"})
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int | None = None
    batch: int = field(default=1, metadata={"help": "rows per batch, each with its own documents"})
    docs: str = field(default="lognormal", metadata={"help": "document lengths", "choices": ["lognormal", "stdlib"]})
    mean_doc: float | None = field(default=None, metadata={"help": "lognormal mean document length (default 1024)"})
    sigma: float = field(default=1.0, metadata={"help": "lognormal sigma"})
    positions: str = field(default="continuous", metadata={"choices": ["continuous", "reset"]})
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = field(default=None, metadata={"help": "float32 on CPU, bfloat16 on CUDA by default"})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default 1 on CPU)"})
    repeats: int = field(default=3, metadata={"help": "timed steps per configuration (median reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps per configuration"})
    warmup_each_length: bool = field(default=True, metadata={"help": (
        "warm up at every length (needed where kernels compile per length, e.g. flex on CUDA); false: only at the "
        "first length (CPU eager has nothing to compile per length)")})
    grad_ckpt: bool | None = field(default=None, metadata={"help": "gradient checkpointing (default: preset)"})
    memory: bool = field(default=True, metadata={"help": "record peak memory of every timed step"})
    matmul_rate: bool = field(default=True, metadata={"help": "measure the device's dense matmul rate"})
    flex_check: bool = field(default=True, metadata={"help": "flex: BlockMask build time and recompile check"})
    profile: bool = field(default=False, metadata={"help": "profile one step per config at the largest L"})
    cpu_mmap_threshold: int = field(default=65536, metadata={"help": (
        "CPU/Linux: glibc M_MMAP_THRESHOLD set with mallopt at start, so every tensor above it is its own mapping "
        "returned to the OS when freed and the peak RSS tracks live tensor bytes (0: keep glibc's dynamic default, "
        "whose heap reuse mixes fragmentation into the RSS)")})
    lr: float = 1e-5
    out: str | None = field(default=None, metadata={"help": "JSON results path (PNG beside it)"})
    png: str | None = field(default=None, metadata={"help": "PNG path (default: --out with .png)"})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for k, v in PRESETS[self.preset].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.mean_doc is None:
            self.mean_doc = 1024.0
        if self.grad_ckpt is None:
            self.grad_ckpt = False
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "batch", "repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if not self.lengths or any((not isinstance(n, int)) or n < 2 for n in self.lengths):
            raise ValueError(f"lengths must be integers >= 2, got {self.lengths!r}")
        self.lengths = list(dict.fromkeys(self.lengths))  # run order as given (e.g. the longest first)
        for m in self.masks:
            if m not in MASKS:
                raise ValueError(f"masks must be a subset of {MASKS}, got {m!r}")
        from .attention.registry import BACKENDS

        for b in self.backends or []:
            if b not in BACKENDS:
                raise ValueError(f"backends must be a subset of {sorted(BACKENDS)}, got {b!r}")
        if self.mean_doc <= 0 or self.sigma < 0:
            raise ValueError(f"mean_doc must be > 0 and sigma >= 0, got mean_doc={self.mean_doc}, sigma={self.sigma}")
        if self.dtype is None:
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.cpu_mmap_threshold < 0:
            raise ValueError(f"cpu_mmap_threshold must be >= 0 (0 = glibc default), got {self.cpu_mmap_threshold!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")
        if self.threads is None and not self.device.startswith("cuda"):
            self.threads = 1


# ---------------------------------------------------------------------------------------------- documents
def lognormal_doc_lens(length: int, mean: float, sigma: float, rng: np.random.Generator) -> list[int]:
    """Document lengths filling a row of ``length`` tokens after the anchor (``sum == length - 1``).

    Lengths are lognormal with ``E[n] = mean`` (``mu = log(mean) - sigma^2 / 2``), rounded, at least 1;
    the last document is truncated to end the row exactly (no padding).
    """
    if length < 2:
        raise ValueError(f"length must be >= 2 (anchor + one token), got {length}")
    mu = math.log(mean) - sigma**2 / 2
    lens: list[int] = []
    left = length - 1
    while left > 0:
        n = min(max(1, round(rng.lognormal(mu, sigma))), left)
        lens.append(n)
        left -= n
    return lens


def stdlib_token_lengths() -> tuple[list[int], str]:
    """Token counts of the shipped corpus (:func:`anchorcontext.assets.stdlib_documents`), with a note.

    Tokenised with the corpus' own byte-level BPE (vocab 8192, :func:`~anchorcontext.assets.train_bpe_tokenizer`)
    when ``tokenizers`` is installed, else approximated as ``chars / 3.8`` (the SmolLM2 ratio on this corpus).
    """
    from .assets import stdlib_documents

    docs = stdlib_documents()
    try:
        from .assets import train_bpe_tokenizer

        tok = train_bpe_tokenizer(8192, docs)
        enc = tok.backend_tokenizer.encode_batch([d["text"] for d in docs], add_special_tokens=False)
        return [len(e.ids) for e in enc], "stdlib corpus, tokenised with its byte-level BPE (vocab 8192)"
    except ImportError:
        return [max(1, round(len(d["text"]) / 3.8)) for d in docs], "stdlib corpus, tokens ~ chars / 3.8"


class DocStream:
    """Seeded shuffled stream of real document lengths, cut into packed rows; a document longer than the
    space left continues as a new document in the next row (nothing is dropped)."""

    def __init__(self, lengths: list[int], rng: np.random.Generator):
        self.lengths = [n for n in lengths if n > 0]
        if not self.lengths:
            raise ValueError("the document stream needs at least one non-empty document")
        self.rng = rng
        self.order: list[int] = []
        self.carry = 0

    def _next(self) -> int:
        if self.carry:
            n, self.carry = self.carry, 0
            return n
        if not self.order:
            self.order = list(self.rng.permutation(len(self.lengths)))
        return self.lengths[self.order.pop()]

    def row(self, length: int) -> list[int]:
        lens, left = [], length - 1
        while left > 0:
            n = self._next()
            if n > left:
                self.carry = n - left
                n = left
            lens.append(n)
            left -= n
        return lens


def make_doc_ids(cfg: BenchConfig, length: int, n_batches: int, rng: np.random.Generator, stream=None) -> list[torch.Tensor]:
    """``n_batches`` doc-id tensors ``(B, L)`` (anchor 0, documents 1..n, no padding)."""
    out = []
    for _ in range(n_batches):
        rows = []
        for _ in range(cfg.batch):
            lens = stream.row(length) if stream is not None else lognormal_doc_lens(length, cfg.mean_doc, cfg.sigma, rng)
            rows.append(doc_ids_from_lens(lens, length))
        out.append(torch.from_numpy(np.stack(rows)))
    return out


# ----------------------------------------------------------------------------------------------- model
def build_model(cfg: BenchConfig, device: torch.device):
    """A randomly initialised ``LlamaForCausalLM`` (stock SDPA attention, ``use_cache=False``), on ``device``."""
    from transformers import LlamaForCausalLM

    from .assets import tiny_llama_config

    config = tiny_llama_config(
        cfg.vocab, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.kv_heads,
        max_position_embeddings=max(cfg.lengths), intermediate_size=cfg.intermediate,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(DTYPES[cfg.dtype])
    model.config.use_cache = False
    model.train()
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def linear_params(model) -> tuple[int, int]:
    """``(P_mm, P_layers)``: weights of every ``nn.Linear`` (LM head included) and of the decoder layers only."""
    total = layers = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            n = mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
            total += n
            if ".layers." in f".{name}":
                layers += n
    return total, layers


def step_flops(attn_fwd: int, p_mm: int, p_layers: int, tokens: int, grad_ckpt: bool) -> int:
    """FLOPs of one training step: ``6 P_mm T + 3 attn_fwd`` (+ one recomputed forward under checkpointing)."""
    flops = 6 * p_mm * tokens + 3 * attn_fwd
    if grad_ckpt:
        flops += 2 * p_layers * tokens + attn_fwd
    return flops


# ---------------------------------------------------------------------------------------------- memory
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


def _sync(device: torch.device) -> None:
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
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
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


# ------------------------------------------------------------------------------------------------ runs
def trainable_backends(device: torch.device, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Backends that can train on ``device`` (in ``wanted`` order) and why the others are skipped."""
    from .attention.registry import trainable

    avail, skipped = trainable(device)
    if wanted is None:
        return avail, skipped
    out = []
    for b in wanted:
        if b in avail or b == "reference":
            out.append(b)
            skipped.pop(b, None)
    return out, {k: v for k, v in skipped.items() if k in wanted}


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # dynamo absent or counters renamed: report nothing rather than fail
        return -1


class Runner:
    """One model + optimizer; runs a training step for a (mode, backend) configuration."""

    def __init__(self, cfg: BenchConfig, device: torch.device):
        from .patches import patch_model

        self.cfg, self.device = cfg, device
        self.model = build_model(cfg, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        patch_model(self.model, backend="auto")
        self.p_mm, self.p_layers = linear_params(self.model)
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def batch(self, doc_ids: torch.Tensor, mode: str, backend: str, gen: torch.Generator) -> dict:
        input_ids = torch.randint(3, self.cfg.vocab, doc_ids.shape, generator=gen)
        input_ids[:, 0] = 0  # the anchor (BOS)
        b = {"input_ids": input_ids, "labels": labels_for(input_ids, doc_ids)}
        if backend != "stock":
            b.update(anchor_inputs(doc_ids, mask=mode, positions=self.cfg.positions))
            b["anchor_backend"] = backend
        return {k: (v.to(self.device) if isinstance(v, (torch.Tensor, AnchorLayout)) else v) for k, v in b.items()}

    def step(self, batch: dict, backend: str) -> float:
        from .patches import patch_model, unpatch_model

        if backend == "stock":
            unpatch_model(self.model)
        try:
            _sync(self.device)
            t0 = time.perf_counter()
            loss = self.model(**batch).loss
            loss.backward()
            loss = loss.detach()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            _sync(self.device)
            dt = time.perf_counter() - t0
        finally:
            self.opt.zero_grad(set_to_none=True)
            if backend == "stock":
                patch_model(self.model, backend="auto")
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"non-finite loss {float(loss)} in {backend} step")
        return dt


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _print(msg: str, verbose: bool = False) -> None:
    print(msg, flush=True)


def run(cfg: BenchConfig, log=_print) -> dict:
    """Run the benchmark; returns the results dict (also written to ``cfg.out`` after every length).

    ``log(message, verbose=False)`` receives progress lines (per-step times are ``verbose``).
    """
    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dtype = DTYPES[cfg.dtype]
    backends, skipped = trainable_backends(device, cfg.backends)
    info = machine_info(device)
    mem = PeakMemory(device, cfg.cpu_mmap_threshold) if cfg.memory else None  # before the model is allocated
    runner = Runner(cfg, device)
    configs = ([("full", "stock")] if cfg.stock else []) + [(m, b) for b in backends for m in cfg.masks]
    H, D = cfg.heads, cfg.hidden // cfg.heads
    doc_note = f"lognormal(mean={cfg.mean_doc:g}, sigma={cfg.sigma:g}), seed {cfg.seed}"
    stream = None
    if cfg.docs == "stdlib":
        lens, doc_note = stdlib_token_lengths()
        stream = DocStream(lens, np.random.default_rng(cfg.seed))
        doc_note += f" ({len(lens)} documents, median {int(np.median(lens))} tokens), shuffled with seed {cfg.seed}"
    rate = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else dtype) if cfg.matmul_rate else None
    log(f"# anchorcontext bench | {info['device_name']} | torch {info['torch']} | threads {torch.get_num_threads()} | "
        f"{cfg.dtype} | Llama {cfg.layers}x{cfg.hidden} H={H} Hkv={cfg.kv_heads} D={D} MLP={cfg.intermediate} "
        f"vocab={cfg.vocab} ({runner.n_params / 1e6:.1f}M params) | B={cfg.batch} | docs {doc_note} | "
        f"grad_ckpt={cfg.grad_ckpt} | load {os.getloadavg()[0]:.2f}")
    if rate:
        log(f"# dense matmul rate: {rate['tflops']:.3f} TFLOP/s ({rate['dtype']}, n={rate['n']})")
    for b, why in skipped.items():
        log(f"# backend {b} skipped: {why}")

    result: dict[str, Any] = {
        "benchmark": "training step (forward + backward + AdamW) full vs intra_doc vs anchor",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "config": {**asdict(cfg), "threads": torch.get_num_threads(), "doc_lengths": doc_note,
                   "n_params": runner.n_params, "linear_params": runner.p_mm, "layer_linear_params": runner.p_layers,
                   "head_dim": D, "statistic": "median over timed repeats, warm-up excluded",
                   "flop_model": "step = 6*P_mm*T + 3*attn_fwd (+2*P_layers*T + attn_fwd with grad_ckpt)"},
        "backends_skipped": skipped,
        "matmul_rate": rate,
        "memory_method": mem.method if mem else None,
        "load_avg_before": os.getloadavg(),
        "results": [],
        "flex": [],
        "profiles": {},
    }
    rng = np.random.default_rng(cfg.seed)
    for L in cfg.lengths:
        T = cfg.batch * L
        n_warm = cfg.warmup if (cfg.warmup_each_length or L == cfg.lengths[0]) else 0
        doc_ids = make_doc_ids(cfg, L, n_warm + cfg.repeats, rng, stream)
        warm_ids, timed_ids = doc_ids[:n_warm], doc_ids[n_warm:]
        # exact FLOPs of the timed batches, per mask
        attn = {m: cfg.layers * sum(AnchorLayout.from_doc_ids(d, m).attention_flops(D, H) for d in timed_ids)
                for m in MASKS}
        step = {m: step_flops(attn[m], runner.p_mm, runner.p_layers, T * len(timed_ids), cfg.grad_ckpt) for m in MASKS}
        n_docs = [int(d[r].max()) for d in timed_ids for r in range(cfg.batch)]
        gen = torch.Generator().manual_seed(cfg.seed + L)
        recs: dict[tuple[str, str], dict] = {}
        for mode, backend in configs:
            recs[(mode, backend)] = {"L": L, "mode": mode, "backend": backend, "times_s": [], "peak_bytes": [],
                                     "peak_increase_bytes": [], "error": None}
        # warm-up (first step per config: compiles flex, allocates)
        for mode, backend in configs:
            r = recs[(mode, backend)]
            g0 = _dynamo_graphs()
            try:
                for w, d in enumerate(warm_ids):
                    dt = runner.step(runner.batch(d, mode, backend, gen), backend)
                    if w == 0:
                        r["first_step_s"] = dt
                    log(f"  L={L} {backend}/{mode} warm-up {w}: {dt:.3f} s", verbose=True)
            except Exception as e:  # an OOM in one config must not end the run
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"L={L} {backend}/{mode}: warm-up failed: {r['error']}")
                _cleanup(device)
            r["compiled_graphs_warmup"] = _dynamo_graphs() - g0
        # timed repeats, interleaved across configs, every config on the same batch
        g_before = _dynamo_graphs()
        for i, d in enumerate(timed_ids):
            for mode, backend in configs:
                r = recs[(mode, backend)]
                if r["error"]:
                    continue
                batch = runner.batch(d, mode, backend, gen)
                try:
                    before = mem.start() if mem else None
                    dt = runner.step(batch, backend)
                    peak = mem.stop() if mem else None
                except Exception as e:  # an OOM in one config must not end the run
                    r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    log(f"L={L} {backend}/{mode}: step failed: {r['error']}")
                    _cleanup(device)
                    continue
                r["times_s"].append(dt)
                log(f"  L={L} {backend}/{mode} repeat {i}: {dt:.3f} s | load {os.getloadavg()[0]:.1f}", verbose=True)
                if peak is not None:
                    r["peak_bytes"].append(peak)
                    r["peak_increase_bytes"].append(peak - before)
                del batch
        recompiles = _dynamo_graphs() - g_before
        # summarise
        base_stock = recs.get(("full", "stock"))
        t_stock = _median(base_stock["times_s"]) if base_stock else None
        for (mode, backend), r in recs.items():
            t = _median(r["times_s"])
            full_r = recs.get(("full", backend))
            t_full = _median(full_r["times_s"]) if full_r else None
            limit = step["full"] / step[mode]
            r.update(
                step_s=t, tokens_per_s=(T / t if t else None), tokens=T, num_docs_median=int(np.median(n_docs)),
                attn_flops=attn[mode], step_flops=step[mode],
                attn_flop_ratio=attn["full"] / attn[mode], step_flop_ratio=limit,
                speedup_vs_stock=(t_stock / t if t and t_stock else None),
                speedup_vs_full=(t_full / t if t and t_full else None),
                peak_mem_bytes=_median(r["peak_bytes"]), peak_mem_increase_bytes=_median(r["peak_increase_bytes"]),
                achieved_tflops=(step[mode] / len(timed_ids) / t / 1e12 if t else None),
            )
            r["fraction_of_limit_vs_full"] = r["speedup_vs_full"] / limit if r["speedup_vs_full"] else None
            r["fraction_of_limit_vs_stock"] = r["speedup_vs_stock"] / limit if r["speedup_vs_stock"] else None
            r["fraction_of_matmul_rate"] = (r["achieved_tflops"] / rate["tflops"]) if (rate and r["achieved_tflops"]) else None
            result["results"].append(r)
        add_paired_speedups(result["results"])
        for r in recs.values():
            log(_row(r))
        if "flex" in backends and cfg.flex_check:
            result["flex"].append(_flex_check(cfg, recs, L, rng, stream, device, recompiles, log))
        result["dynamo_graphs_compiled_during_timed_steps"] = recompiles
        if cfg.profile and L == max(cfg.lengths):
            result["profiles"].update(_profile(runner, cfg, configs, timed_ids[0], gen, log))
        result["load_avg_after"] = os.getloadavg()
        if cfg.out:
            write_outputs(result, cfg)
    return result


def paired_speedup(base_times: list[float], times: list[float]) -> float | None:
    """Median over repeats of ``base[i] / times[i]``: step ``i`` of both ran in the same interleaved round, so
    load that changes between rounds cancels (more robust than a ratio of medians on a shared machine)."""
    pairs = [b / t for b, t in zip(base_times, times) if b and t]
    return statistics.median(pairs) if pairs else None


def add_paired_speedups(results: list[dict]) -> None:
    """Add ``speedup_vs_{full,stock}_paired`` and ``fraction_of_limit_vs_full_paired`` to result records
    (also usable on a JSON written before these fields existed)."""
    by = {(r["L"], r["backend"], r["mode"]): r for r in results}
    for r in results:
        full = by.get((r["L"], r["backend"], "full"))
        stock = by.get((r["L"], "stock", "full"))
        r["speedup_vs_full_paired"] = paired_speedup(full["times_s"], r["times_s"]) if full else None
        r["speedup_vs_stock_paired"] = paired_speedup(stock["times_s"], r["times_s"]) if stock else None
        sp = r["speedup_vs_full_paired"]
        r["fraction_of_limit_vs_full_paired"] = sp / r["step_flop_ratio"] if sp and r.get("step_flop_ratio") else None


def _cleanup(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _flex_check(cfg, recs, L, rng, stream, device, recompiles, log) -> dict:
    """BlockMask build time on fresh layouts, compile time (first step - median), recompiles at fixed L."""
    from .attention.flex import block_mask_for

    builds = []
    for d in make_doc_ids(cfg, L, 3, rng, stream):
        lay = AnchorLayout.from_doc_ids(d.to(device), "anchor")
        _sync(device)
        t0 = time.perf_counter()
        block_mask_for(lay, None, device)
        _sync(device)
        builds.append(time.perf_counter() - t0)
    out = {"L": L, "block_mask_build_s": statistics.median(builds), "dynamo_graphs_compiled_during_timed_steps": recompiles}
    for mode in cfg.masks:
        r = recs.get((mode, "flex"))
        if r and r.get("step_s"):
            out[f"{mode}_step_s"] = r["step_s"]
            out[f"{mode}_first_step_s"] = r.get("first_step_s")
            out[f"{mode}_compile_s_est"] = (r.get("first_step_s") or 0) - r["step_s"]
            out[f"{mode}_build_fraction_of_step"] = out["block_mask_build_s"] / r["step_s"]
    log(f"L={L} flex: BlockMask build {out['block_mask_build_s'] * 1e3:.1f} ms per batch; "
        + ", ".join(f"{m} build/step {out[f'{m}_build_fraction_of_step']:.1%} compile~{out[f'{m}_compile_s_est']:.1f}s"
                    for m in cfg.masks if f"{m}_build_fraction_of_step" in out)
        + f"; graphs compiled while layouts changed at fixed L: {recompiles}")
    return out


def _profile(runner, cfg, configs, doc_ids, gen, log) -> dict:
    """Top operators by self time for one step of each configuration (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    out = {}
    for mode, backend in configs:
        batch = runner.batch(doc_ids, mode, backend, gen)
        with profile(activities=acts) as prof:
            runner.step(batch, backend)
        table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)
        out[f"{backend}/{mode}@{doc_ids.shape[1]}"] = table
        log(f"# profile {backend}/{mode} L={doc_ids.shape[1]}\n{table}")
    return out


# -------------------------------------------------------------------------------------------- output
def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


HEADER = (f"{'L':>6} {'backend':7} {'mode':9} {'step s':>8} {'tok/s':>8} {'x stock':>7} {'x full':>6} "
          f"{'limit':>5} {'frac':>5} {'attn lim':>8} {'peak MiB':>8} {'+MiB':>7} {'TFLOP/s':>8} {'%mm':>5}")


def _row(r: dict) -> str:
    mib = lambda b: None if b is None else b / 2**20
    if r.get("error") and not r.get("step_s"):
        return f"{r['L']:6d} {r['backend']:7} {r['mode']:9} ERROR {r['error']}"
    return (f"{r['L']:6d} {r['backend']:7} {r['mode']:9} {_fmt(r['step_s'], '8.3f')} {_fmt(r['tokens_per_s'], '8.0f')} "
            f"{_fmt(r['speedup_vs_stock'], '7.2f')} {_fmt(r['speedup_vs_full'], '6.2f')} {r['step_flop_ratio']:5.2f} "
            f"{_fmt(r['fraction_of_limit_vs_full'], '5.0%')} {r['attn_flop_ratio']:8.2f} "
            f"{_fmt(mib(r['peak_mem_bytes']), '8.0f')} {_fmt(mib(r['peak_mem_increase_bytes']), '7.0f')} "
            f"{_fmt(r['achieved_tflops'], '8.3f')} {_fmt(r['fraction_of_matmul_rate'], '5.0%')}")


def format_table(result: dict) -> str:
    """The results as a fixed-width text table (one line per length x configuration)."""
    lines = [HEADER, "-" * len(HEADER)] + [_row(r) for r in result["results"]]
    lines.append("x stock / x full: speedup over stock SDPA full causal / over the same backend's full mode; "
                 "limit: whole-step FLOP ratio full/mode; frac: (x full)/limit; +MiB: peak increase during the step")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The results as a Markdown table (for docs/performance.md)."""
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"
    lines = [("| L | backend / mode | step s | tokens/s | x stock | x full | x full, paired | whole-step limit "
              "| of limit (paired) | attn limit | peak MiB | +MiB in step |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        if not r.get("step_s"):
            lines.append(f"| {r['L']} | {r['backend']} / {r['mode']} | error: {r.get('error')} ||||||||||")
            continue
        lines.append(
            f"| {r['L']} | {r['backend']} / {r['mode']} | {r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{_fmt(r['speedup_vs_stock'], '.2f')} | {_fmt(r['speedup_vs_full'], '.2f')} | "
            f"{_fmt(r.get('speedup_vs_full_paired'), '.2f')} | {r['step_flop_ratio']:.2f} | "
            f"{_fmt(r['fraction_of_limit_vs_full'], '.0%')} ({_fmt(r.get('fraction_of_limit_vs_full_paired'), '.0%')}) | "
            f"{r['attn_flop_ratio']:.2f} | {mib(r['peak_mem_bytes'])} | {mib(r['peak_mem_increase_bytes'])} |")
    return "\n".join(lines)


def plot(result: dict, path: str | os.PathLike) -> None:
    """PNG: tokens/s vs L per configuration, speedup over stock full with its FLOP limit, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r.get("step_s")]
    keys = sorted({(r["backend"], r["mode"]) for r in rows}, key=lambda k: (k[0] != "stock", k))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for backend, mode in keys:
        rs = sorted((r for r in rows if r["backend"] == backend and r["mode"] == mode), key=lambda r: r["L"])
        Ls = [r["L"] for r in rs]
        fmt = "-" if backend == "stock" else {"full": "--", "intra_doc": "-.", "anchor": "-"}[mode]
        lab = f"{backend}/{mode}"
        (line,) = axes[0].plot(Ls, [r["tokens_per_s"] for r in rs], fmt, marker="o", label=lab,
                               **({"color": "k"} if backend == "stock" else {}))
        if backend != "stock":
            axes[1].plot(Ls, [r["speedup_vs_stock"] for r in rs], fmt, marker="o", color=line.get_color(), label=lab)
        if rs and rs[0]["peak_mem_bytes"] is not None:
            axes[2].plot(Ls, [r["peak_mem_bytes"] / 2**20 for r in rs], fmt, marker="o", color=line.get_color(), label=lab)
    for mode in ("intra_doc", "anchor"):
        lim = sorted({(r["L"], r["step_flop_ratio"]) for r in rows if r["mode"] == mode})
        if lim:
            axes[1].plot([x for x, _ in lim], [y for _, y in lim], ":", color="gray", marker="x",
                         label=f"FLOP limit ({mode})")
    axes[0].set_ylabel("tokens / s")
    axes[1].set_ylabel("speedup over stock SDPA full causal")
    axes[2].set_ylabel("peak memory (MiB)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    c, m = result["config"], result["machine"]
    fig.suptitle(f"Training step, Llama {c['layers']}x{c['hidden']} ({c['n_params'] / 1e6:.0f}M) {c['dtype']}, "
                 f"{m['device_name']}, {c['doc_lengths']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, cfg: BenchConfig) -> None:
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    try:
        plot(result, cfg.png or out.with_suffix(".png"))
    except ImportError as e:
        print(f"# no PNG ({e}); pip install matplotlib", file=sys.stderr)


def parse_args(argv: list[str]) -> BenchConfig:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(BenchConfig, prog="anchorcontext bench", description=__doc__.split("\n\n")[0])
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    result = run(cfg)
    print()
    print(format_table(result))
    if cfg.out:
        print(f"\n# wrote {cfg.out} and {cfg.png or Path(cfg.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
