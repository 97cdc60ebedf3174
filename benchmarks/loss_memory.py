"""Peak memory and step time of the chunked loss against the stock loss, by row length (issue 22).

One configuration per fresh subprocess: a random ``LlamaForCausalLM`` with SmolLM2-135M's widths (vocab 49152,
hidden 576, 9 heads / 3 KV heads, head_dim 64, MLP 1536, tied embeddings, RoPE theta 1e5, RMSNorm eps 1e-5) and
``--layers`` decoder layers, gradient checkpointing (non-reentrant), ``ac.patch_model(model, chunked_loss=...,
loss_chunk_tokens=...)`` (AnchorAttention, ``backend="auto"``: on CPU the ``sdpa`` backend with its compiled
kernel), one packed row of ``--docs`` equal documents made by :class:`anchorcontext.AnchorCollator` (anchor at index
0, labels -100 at the anchor and at each later document's first token). The Adam moments are created before the
measured step (an ``AdamW.step()`` on zero gradients), so the step's peak holds what a training step holds:

    measured step = forward with labels -> loss.backward() -> AdamW.step() -> zero_grad(set_to_none=True)
    step time     = forward + backward (the optimizer's time is recorded beside it)

The model's output (the stock loss's logits with it) is dropped before the backward, as ``Trainer.training_step``
does; a short warm-up step (512 tokens) runs first, outside the measurement.

Memory (CPU, Linux): peak RSS of the subprocess during the measured step (``VmHWM``, reset through
``/proc/self/clear_refs`` after ``malloc_trim`` just before it; glibc ``M_MMAP_THRESHOLD`` = 64 KiB so freed tensors
leave RSS), absolute (what has to fit in RAM) and as the increase over the RSS after imports; ``ru_maxrss`` at exit
is recorded as a cross-check. Snapshots inside the step: RSS at the end of the forward (what the forward leaves for
the backward), the peak through the forward (the loss included) and the peak through the backward of the first
decoder layer processed. CUDA: ``torch.cuda.max_memory_allocated``.

A configuration that would obviously not fit is not started: its planned peak (``anchorcontext.plan_memory``)
exceeds ``--guard`` (1.1) x ``--mem-cap-gib``. Every CPU subprocess runs under ``RLIMIT_DATA`` = ``--mem-cap-gib``
(default: the RAM available at start minus 2 GiB; it bounds the virtual data size, which is at least the RSS) and
with ``oom_score_adj`` 1000, so a row that does not fit fails its allocation ("does not fit") instead of waking
the OOM killer against other processes of a shared machine; one that runs past ``--time-cap-s`` is killed
("exceeds the time cap"). Either ends that loss's sweep (longer rows are not tried).

``--stop-after-layers K`` ends the backward after the K-th decoder layer (a partial step: forward, loss and K layer
backwards). With checkpointing the step's peak falls in that span (the loss, or the first layers' recompute), so a
row too slow to run whole on a CPU still gets a measured peak; a full step records the same snapshot, which checks
the claim.

``--overhead L`` (default 8192; 0 = off) times the two losses in one process on the same model and batch, stock
and chunked alternately (ABBA order) after one warm-up step of each, and reports the median of the per-round
chunked / stock ratios (goal <= 1.05).

    python benchmarks/loss_memory.py                                    # 2 layers, 4K..128K, both losses, 8K overhead
    python benchmarks/loss_memory.py --layers 30 --chunked --lengths 32768 --overhead 0
    python benchmarks/loss_memory.py --preset cuda --out $OUT/loss_memory_cuda.json    # bf16, 30 layers, 16K..128K

Results are merged into ``--out`` by configuration (default ``benchmarks/results/cpu/loss_memory.json``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json); the layer count is --layers
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
            head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu")
ANCHOR_ID, PAD_ID = 1, 2
GIB = 2**30
PRESETS = {
    "cpu": dict(device="cpu", dtype="float32", layers=2, lengths=[4096, 8192, 16384, 32768, 65536, 131072]),
    "cuda": dict(device="cuda", dtype="bfloat16", layers=30, lengths=[16384, 32768, 65536, 131072]),
}


class _StopBackward(Exception):
    """Raised from a gradient hook to end a partial step's backward."""


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _status_bytes(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(name)


def _row(L: int, docs: int, doc_len: int | None, vocab: int, seed: int = 0) -> dict:
    """One packed row (``input_ids`` with the anchor at 0, ``doc_lens``): ``docs`` equal documents filling ``L``,
    or documents of ``doc_len`` tokens (the last one shorter)."""
    import torch

    n = L - 1
    if doc_len:
        lens = [doc_len] * (n // doc_len) + ([n % doc_len] if n % doc_len else [])
    else:
        lens = [n // docs + (1 if i < n % docs else 0) for i in range(docs)]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (L,), generator=g)
    ids[0] = ANCHOR_ID
    return {"input_ids": ids.tolist(), "doc_lens": lens}


def _build(c: dict):
    """(model, optimizer, batch, device, mem probe) for worker config ``c``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import anchorcontext as ac
    from anchorcontext.measure import PeakMemory

    dev = torch.device(c["device"])
    dtype = getattr(torch, c["dtype"])
    mem = PeakMemory(dev, 65536)  # first: glibc's mmap threshold applies to every tensor after it
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=c["layers"], max_position_embeddings=max(c["L"], 8192), use_cache=False,
                      bos_token_id=ANCHOR_ID, eos_token_id=ANCHOR_ID, pad_token_id=PAD_ID, **SMOL)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):  # transformers 5 keeps the theta here
        rp["rope_theta"] = SMOL["rope_theta"]
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=dtype).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ac.patch_model(model, chunked_loss=c["loss"] == "chunked", loss_chunk_tokens=c["chunk"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():  # create the Adam moments, as after a first training step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    batch = _batch(c["L"], c, dev)
    warm = _batch(min(c["L"], 512), c, dev)  # loads the kernels and lazy state outside the measured step
    model(**warm).loss.backward()
    model.zero_grad(set_to_none=True)
    return model, opt, batch, dev, mem


def _batch(L: int, c: dict, dev) -> dict:
    import anchorcontext as ac

    collate = ac.AnchorCollator(anchor_id=ANCHOR_ID, pad_id=PAD_ID, mask="anchor")
    batch = collate([_row(L, c["docs"], c.get("doc_len"), SMOL["vocab_size"])])
    return {k: v.to(dev) for k, v in batch.items()}  # tensors and the AnchorLayout


class _Probe:
    """Current and peak memory at points inside one step (CPU: VmRSS / VmHWM; CUDA: allocator counters)."""

    def __init__(self, dev):
        import torch

        self.torch, self.dev = torch, dev

    def now(self) -> int:
        if self.dev.type == "cuda":
            return self.torch.cuda.memory_allocated(self.dev)
        return _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.dev.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.dev)
        return _status_bytes("VmHWM")


def _layer_hook(model, k: int, probe: _Probe, marks: dict, stop: bool):
    """A hook on the input of decoder layer ``n_layers - k``: its gradient exists once the backward of the last
    ``k`` layers is done. Records the peak then; raises :class:`_StopBackward` when ``stop``."""
    layers = model.model.layers
    layer = layers[len(layers) - k]

    def on_grad(grad):
        marks["peak_after_layer_backward"] = probe.peak()
        marks["t_layer_backward"] = time.perf_counter()
        if stop:
            raise _StopBackward

    def pre(module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        if h is not None and h.requires_grad and not marks.get("hooked"):
            h.register_hook(on_grad)
            marks["hooked"] = True

    return layer.register_forward_pre_hook(pre, with_kwargs=True)


def _sync(dev):
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def worker(c: dict) -> dict:
    """One measured step of config ``c`` in this (fresh) process."""
    import resource

    if c["device"] == "cpu" and c.get("mem_cap"):
        resource.setrlimit(resource.RLIMIT_DATA, (int(c["mem_cap"]), int(c["mem_cap"])))
        try:  # if RAM runs out all the same, the kernel's OOM killer takes this process first
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
    import torch
    import transformers  # noqa: F401  (the baseline is the RSS after imports, as in benchmarks/memory_plan.py)

    import anchorcontext  # noqa: F401

    torch.set_num_threads(c["threads"])
    base = _status_bytes("VmRSS")
    model, opt, batch, dev, mem = _build(c)
    probe = _Probe(dev)
    marks: dict = {}
    k = c.get("stop_after_layers") or 1
    hook = _layer_hook(model, k, probe, marks, stop=bool(c.get("stop_after_layers")))
    state = probe.now()
    out: dict = {"status": "ok", "base_rss_bytes": base, "state_bytes": state}
    mem.start()
    t0 = time.perf_counter()
    try:
        res = model(**batch)
        loss = res.loss
        _sync(dev)
        t1 = time.perf_counter()
        out.update(loss=float(loss), logits_is_none=res.logits is None, forward_s=t1 - t0,
                   after_forward_bytes=probe.now(), peak_forward_bytes=probe.peak())
        del res
        stopped = False
        try:
            loss.backward()
        except _StopBackward:
            stopped = True
        except RuntimeError as e:  # the autograd engine may wrap an exception raised in a hook
            if "_StopBackward" not in repr(e):
                raise
            stopped = True
        _sync(dev)
        t2 = time.perf_counter()
        del loss
        if stopped:
            out.update(partial=True, backward_s=None, step_s=None, layers_backward=k,
                       partial_backward_s=marks["t_layer_backward"] - t1)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(dev)
            out.update(partial=False, backward_s=t2 - t1, step_s=t2 - t0, optimizer_s=time.perf_counter() - t2)
        out["peak_after_layer_backward_bytes"] = marks.get("peak_after_layer_backward")
        out["layer_backward_s"] = marks["t_layer_backward"] - t1 if "t_layer_backward" in marks else None
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        msg = f"{type(e).__name__}: {e}"
        if "alloc" not in msg.lower() and "out of memory" not in msg.lower():
            raise
        out.update(status="does not fit", error=msg.splitlines()[0][:300])
    peak = mem.stop()
    hook.remove()
    from anchorcontext.attention import cpu_kernel
    from anchorcontext.attention.dispatch import resolve_backend

    out.update(peak_bytes=peak, peak_increase_bytes=None if peak is None else peak - (0 if dev.type == "cuda" else base),
               ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, memory_method=mem.method,
               parameters=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads(),
               device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               backend=resolve_backend("auto", dev),
               cpu_kernel=dev.type == "cpu" and cpu_kernel._state.get("module") is not None,
               documents=int(batch["anchor_layout"].doc_ids.max()))
    return out


def overhead_worker(c: dict) -> dict:
    """Stock and chunked steps (forward + backward) alternately on one model and batch; ABBA order."""
    import torch

    import anchorcontext as ac

    torch.set_num_threads(c["threads"])
    model, opt, batch, dev, _ = _build({**c, "loss": "chunked"})
    del opt

    def step(loss_kind: str) -> tuple[float, float]:
        ac.patch_model(model, chunked_loss=loss_kind == "chunked", loss_chunk_tokens=c["chunk"])
        _sync(dev)
        t0 = time.perf_counter()
        res = model(**batch)
        res.loss.backward()
        _sync(dev)
        t = time.perf_counter() - t0
        value = float(res.loss)
        del res
        model.zero_grad(set_to_none=True)
        return t, value

    losses = {kind: step(kind)[1] for kind in ("stock", "chunked")}  # warm-up, and the two losses compared
    times: dict[str, list[float]] = {"stock": [], "chunked": []}
    for r in range(c["repeats"]):
        for kind in (("stock", "chunked") if r % 2 == 0 else ("chunked", "stock")):
            times[kind].append(step(kind)[0])
    ratios = [ch / st for ch, st in zip(times["chunked"], times["stock"])]
    return {"status": "ok", "stock_s": times["stock"], "chunked_s": times["chunked"], "round_ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(times["chunked"]) / statistics.median(times["stock"]),
            "loss_stock": losses["stock"], "loss_chunked": losses["chunked"], "threads": torch.get_num_threads()}


def planned_bytes(c: dict) -> int:
    from anchorcontext.memory import ModelDims, plan_memory

    dims = ModelDims(hidden_size=SMOL["hidden_size"], intermediate_size=SMOL["intermediate_size"],
                     num_layers=c["layers"], num_heads=SMOL["num_attention_heads"],
                     num_kv_heads=SMOL["num_key_value_heads"], vocab_size=SMOL["vocab_size"], head_dim=SMOL["head_dim"],
                     tied_embeddings=True)
    return plan_memory(model=dims, seq_len=c["L"], engine="ddp", param_dtype=c["dtype"], mixed_precision="no",
                       gradient_checkpointing=True, attention="sdpa" if c["device"] == "cpu" else "varlen",
                       chunked_loss=c["loss"] == "chunked", loss_chunk_tokens=c["chunk"], device_reserve_gib=0,
                       fragmentation=0, num_documents=c["docs"], variants=False).total


def _run(c: dict, mode: str, time_cap: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(c["threads"]), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, f"--{mode}", json.dumps(c)], capture_output=True, text=True,
                           env=env, timeout=time_cap, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "exceeds the time cap", "error": f"killed after {time_cap:.0f} s", "wall_s": time_cap}
    wall = time.perf_counter() - t0
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode == 0 and last.startswith("{"):
        return {**json.loads(last), "wall_s": wall}
    if r.returncode < 0:
        status = f"killed by signal {-r.returncode}" + (" (out of memory?)" if r.returncode == -9 else "")
    else:
        status = "does not fit" if "alloc" in r.stderr[-2000:].lower() else f"failed rc={r.returncode}"
    return {"status": status, "error": r.stderr.strip()[-1500:], "wall_s": wall}


def _key(c: dict) -> str:
    keep = ("device", "dtype", "layers", "L", "loss", "chunk", "docs", "doc_len", "stop_after_layers")
    return json.dumps({k: c.get(k) for k in keep}, sort_keys=True)


def _fmt_gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--layers", type=int, help="decoder layers (preset cpu: 2; SmolLM2-135M has 30)")
    ap.add_argument("--lengths", type=int, nargs="+", help="row lengths L, tried shortest first")
    ap.add_argument("--stock", action="store_true", help="measure the stock HF loss (default: both)")
    ap.add_argument("--chunked", action="store_true", help="measure the chunked loss (default: both)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=None, help="default: anchorcontext's (2048)")
    ap.add_argument("--docs", type=int, default=8, help="equal documents per row")
    ap.add_argument("--doc-len", type=int, default=None, help="documents of this many tokens instead of --docs")
    ap.add_argument("--device", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--stop-after-layers", type=int, default=0, help="partial step: end the backward after K layers")
    ap.add_argument("--time-cap-s", type=float, default=1500.0, help="per configuration (subprocess)")
    ap.add_argument("--mem-cap-gib", type=float, default=None,
                    help="RLIMIT_DATA of each CPU subprocess; default: RAM available at start - 2 GiB")
    ap.add_argument("--guard", type=float, default=1.10,
                    help="do not start a configuration planned above this x the memory cap; 0 = start every one")
    ap.add_argument("--overhead", type=int, default=8192, help="L of the in-process stock/chunked timing; 0 = off")
    ap.add_argument("--overhead-repeats", type=int, default=6, help="timed rounds (one stock + one chunked step)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/<cpu|cuda>/loss_memory[_cuda].json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--overhead-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    for k in ("layers", "lengths", "device", "dtype"):
        if getattr(args, k) is None:
            setattr(args, k, p[k])
    if args.loss_chunk_tokens is None:
        from anchorcontext.loss import DEFAULT_CHUNK_SIZE

        args.loss_chunk_tokens = DEFAULT_CHUNK_SIZE
    if args.out is None:
        args.out = str(ROOT / ("benchmarks/results/cpu/loss_memory.json" if args.device == "cpu"
                               else "benchmarks/results/cuda/loss_memory_cuda.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.overhead_worker:
        print(json.dumps(overhead_worker(json.loads(args.overhead_worker))))
        return 0
    import torch

    from anchorcontext.measure import machine_info

    torch.set_num_threads(args.threads)
    kinds = [k for k, on in (("stock", args.stock), ("chunked", args.chunked)) if on] or ["stock", "chunked"]
    avail = _mem_available() if args.device == "cpu" else None
    cap = int(args.mem_cap_gib * GIB) if args.mem_cap_gib else (avail - 2 * GIB if avail else None)
    common = dict(device=args.device, dtype=args.dtype, layers=args.layers, chunk=args.loss_chunk_tokens,
                  docs=args.docs, doc_len=args.doc_len, threads=args.threads, mem_cap=cap,
                  stop_after_layers=args.stop_after_layers or None)
    print(f"# loss_memory: {args.layers} layers, {args.dtype} on {args.device}, {args.threads} threads, lengths "
          f"{args.lengths}, losses {kinds}, chunk {args.loss_chunk_tokens}, memory cap "
          f"{_fmt_gib(cap)} GiB (available {_fmt_gib(avail)} GiB), time cap {args.time_cap_s:.0f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    by_cfg = {_key(r["config"]): r for r in old.get("results", [])}
    over = {_key(o["config"]): o for o in old.get("overhead", [])}
    run = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:] if argv is None else list(argv), "host": machine_info(torch.device("cpu")),
           "ram_available_bytes": avail, "memory_cap_bytes": cap}
    runs = old.get("runs", []) + [run]

    def save():  # after every row: a run cut short keeps what it measured
        result = {"benchmark": "chunked vs stock causal-LM loss: peak memory and step time by row length (issue 22)",
                  "model_widths": SMOL, "method": __doc__.split("\n\n")[1:8], "runs": runs,
                  "results": sorted(by_cfg.values(), key=lambda r: (r["config"]["device"], r["config"]["layers"],
                                                                   r["config"]["L"], r["config"]["loss"])),
                  "overhead": list(over.values())}
        out.write_text(json.dumps(result, indent=1) + "\n")

    ended: dict[str, str] = {}
    for L in sorted(args.lengths):
        for kind in kinds:
            c = {**common, "L": L, "loss": kind}
            row = {"config": {k: v for k, v in c.items() if k != "mem_cap"}, "planned_bytes": planned_bytes(c),
                   "load_average": os.getloadavg()}
            if kind in ended:
                row.update(status="not run", error=f"a shorter row {ended[kind]}")
            elif cap is not None and args.guard and row["planned_bytes"] > args.guard * cap:
                row.update(status="does not fit", error=f"not started: planned {_fmt_gib(row['planned_bytes'])} GiB "
                                                        f"> {args.guard:g} x the memory cap {_fmt_gib(cap)} GiB")
            else:
                row.update(_run(c, "worker", args.time_cap_s))
            if row["status"] != "ok" and kind not in ended:
                ended[kind] = row["status"]
            by_cfg[_key(row["config"])] = row
            save()
            t = row.get("step_s") or row.get("partial_backward_s")
            print(f"L {L:6d} {kind:7s} {row['status']:>14s}: peak {_fmt_gib(row.get('peak_bytes'))} GiB, "
                  f"+{_fmt_gib(row.get('peak_increase_bytes'))} over imports (planned {_fmt_gib(row['planned_bytes'])}),"
                  f" after forward {_fmt_gib(row.get('after_forward_bytes'))}, "
                  f"peak through forward {_fmt_gib(row.get('peak_forward_bytes'))}, through the first layer's backward "
                  f"{_fmt_gib(row.get('peak_after_layer_backward_bytes'))}; "
                  + (row.get("error", "")[-300:] if row["status"] != "ok" else
                     f"step {t:.1f} s (forward {row['forward_s']:.1f})" if row.get("step_s") else
                     f"partial step: forward {row['forward_s']:.1f} s, {row['layers_backward']} layer backward(s) "
                     f"{t:.1f} s"), flush=True)
    if args.overhead:
        c = {**common, "L": args.overhead, "repeats": args.overhead_repeats, "stop_after_layers": None}
        o = {"config": {k: v for k, v in c.items() if k != "mem_cap"}, "load_average": os.getloadavg(),
             **_run(c, "overhead-worker", args.time_cap_s)}
        over[_key(o["config"])] = o
        save()
        if o["status"] == "ok":
            print(f"overhead at L {args.overhead}: chunked / stock step time, median of {args.overhead_repeats} rounds "
                  f"{o['median_ratio']:.3f} (ratio of medians {o['ratio_of_medians']:.3f}; stock "
                  f"{statistics.median(o['stock_s']):.2f} s, chunked {statistics.median(o['chunked_s']):.2f} s); "
                  f"loss stock {o['loss_stock']:.6f} chunked {o['loss_chunked']:.6f}", flush=True)
        else:
            print(f"overhead at L {args.overhead}: {o['status']} {o.get('error', '')[-500:]}")
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
