"""Attention kernel benchmark: AnchorAttention backends vs full causal SDPA on the same packed row.

For each sequence length L and each layout seed (``--seeds``), one packed row is built: the anchor at
index 0, then documents whose lengths are drawn from a seeded lognormal (mean ``--mean-doc`` tokens, ``--sigma``), the last one truncated to fill
the row (no padding). Every available backend runs in anchor mode beside full causal SDPA
(``is_causal=True`` over the whole row, the thing anchor attention replaces), interleaved repeat by repeat
so that load from other processes hits both alike. Warm-up runs are excluded; the figure is the median
over ``--repeats``.

A single row's FLOP-ratio limit and achieved fraction depend strongly on its layout (one long document
dominates the FLOPs; many ~1K documents run the CPU kernel at lower efficiency), hence several seeds.

Masks (``--masks``): each backend runs each of ``anchor``, ``intra_doc``, ``full`` beside the same full causal
SDPA baseline; ``anchor_ms`` and its derived figures are the backend's time with the record's ``mask`` (for ``full``
the limit is 1). Backends ``varlen`` (K/V gather) and ``varlen_merge`` (gather-free LSE merge) time the two
varlen designs side by side; ``flex_*`` are FlexAttention ``kernel_options`` variants (``FLEX_VARIANTS``). A
backend that fails (e.g. a kernel option the installed torch lacks) is recorded with its ``error``.

Reported per (L, seed, mask, backend, pass):

* ``full_ms`` / ``anchor_ms``: median wall time of forward+backward (``fwd_bwd``) or forward alone
  (``fwd``, for backends without a backward on the device, e.g. FlexAttention on CPU).
* ``speedup = full_ms / anchor_ms`` and the FLOP-ratio limit ``full-causal FLOPs / anchor FLOPs``
  (both counted exactly, causal halves included, :meth:`AnchorLayout.attention_flops`); ``fraction =
  speedup / limit`` is the share of the ideal speedup achieved.
* peak memory of one pass, as an increase over the state just before it. CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (allocator bytes). CPU: the
  process's peak resident set (``VmHWM``) after resetting it through ``/proc/self/clear_refs`` and
  releasing cached heap with ``malloc_trim``, minus the resident set before the pass (OS-level bytes,
  includes the ``.grad`` buffers of q/k/v and allocator slack; Linux only, else ``null``).

Usage::

    python benchmarks/attention.py --lengths 4096,8192,16384 --seeds 0,1,2 --threads 1 --repeats 5 \\
        --out benchmarks/results/attention_cpu.json
    python benchmarks/attention.py --device cuda --dtype bfloat16 --out benchmarks/results/attention_cuda.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorcontext.attention import cpu_kernel, flex_attention, sdpa_attention, varlen_attention
from anchorcontext.attention import flex as _flex
from anchorcontext.attention import varlen as _varlen
from anchorcontext.attention import varlen_merge as _varlen_merge
from anchorcontext.attention.flex import block_mask_for
from anchorcontext.bench import PeakMemory, machine_info
from anchorcontext.layout import AnchorLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------- data
def lognormal_doc_ids(length: int, mean: float, sigma: float, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """A ``(1, length)`` doc-id row: anchor (0) then documents 1..n with lognormal lengths (mean ``mean``).

    ``mu`` is chosen so that ``E[len] = exp(mu + sigma^2/2) = mean``; lengths are rounded up to >= 1 and
    the last document is truncated to end the row exactly.
    """
    mu = math.log(mean) - sigma**2 / 2
    lens: list[int] = []
    left = length - 1
    while left > 0:
        n = float(torch.empty(()).log_normal_(mu, sigma, generator=generator))
        n = min(max(1, round(n)), left)
        lens.append(n)
        left -= n
    ids = torch.cat([torch.zeros(1, dtype=torch.int64)] + [torch.full((n,), i + 1, dtype=torch.int64) for i, n in enumerate(lens)])
    return ids[None], lens


# -------------------------------------------------------------------------------------------- memory
def peak_increase(mem: PeakMemory, fn) -> int | None:
    """Peak memory increase of one call of ``fn`` over the state just before it (bytes; ``None`` where
    :class:`anchorcontext.bench.PeakMemory` cannot measure)."""
    before = mem.start()
    fn()
    peak = mem.stop()
    return None if before is None or peak is None else peak - before


# -------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_pass(attn, q, k, v, grad_out, backward: bool):
    """A closure running one pass of ``attn(q, k, v) -> (B, L, H, D)`` (+ backward with ``grad_out``)."""

    def run():
        for t in (q, k, v):
            t.grad = None
        if backward:
            attn(q, k, v).backward(grad_out)
        else:  # detached: FlexAttention refuses CPU inputs that require grad even under no_grad
            with torch.no_grad():
                attn(q.detach(), k.detach(), v.detach())

    return run


def time_pair(full, anchor, *, repeats: int, warmup: int, device) -> dict[str, list[float]]:
    """Interleaved timings (seconds) of two closures, warm-up excluded: wall clock and process CPU time.

    The CPU time (all threads of this process) is less sensitive than wall time to other processes on a
    shared machine; with one thread and an idle machine the two agree.
    """
    for _ in range(warmup):
        full()
        anchor()
    _sync(device)
    out = {"full_wall": [], "anchor_wall": [], "full_cpu": [], "anchor_cpu": []}
    for _ in range(repeats):
        for fn, name in ((full, "full"), (anchor, "anchor")):
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            _sync(device)
            out[name + "_wall"].append(time.perf_counter() - t0)
            out[name + "_cpu"].append(time.process_time() - c0)
    return out


# ------------------------------------------------------------------------------------------ backends
def available_backends(device: torch.device, wanted: list[str] | None) -> list[tuple[str, bool, str]]:
    """``(name, with_backward, note)`` for each backend that can run here."""
    out = [("sdpa", True, "")]
    if device.type == "cuda":
        out.append(("flex", True, ""))
        out += [(name, True, f"FlexAttention kernel_options={opts}") for name, opts in FLEX_VARIANTS.items()]
        why = _varlen.unavailable_reason(device)
        if why is None:
            fn, src = _varlen.flash_varlen_kernel()
            out.append(("varlen", True, "K/V gather, " + (src if fn is not None else "torch varlen_attn (flash pinned)")))
        else:
            print(f"# varlen skipped: {why}", file=sys.stderr)
        why = _varlen_merge.unavailable_reason(device)
        if why is None:
            out.append(("varlen_merge", True, "no gather: aten flash varlen + anchor LSE merge"))
        else:
            print(f"# varlen_merge skipped: {why}", file=sys.stderr)
    else:
        out.append(("flex", False, "forward only on CPU (no FlexAttention backward)"))
        out += [(name, False, f"forward only on CPU; kernel_options={opts}") for name, opts in FLEX_VARIANTS.items()
                if wanted and name in wanted]  # on CPU only when asked for
        if device.type == "cpu" and cpu_kernel.get() is not None:
            # sdpa runs the compiled exact-tile kernel here; time its fallback path too, side by side
            out.insert(1, ("sdpa_stock", True, "sdpa without the compiled kernel: torch's CPU flash kernel per document"))
    if wanted:
        out = [b for b in out if b[0] in wanted]
    return out


def sdpa_stock(*args, **kw):
    with cpu_kernel.disabled():
        return sdpa_attention(*args, **kw)


def varlen_gather(*args, **kw):
    with _varlen_merge.use_impl("gather"):
        return varlen_attention(*args, **kw)


# FlexAttention kernel_options variants (issue 16 item 3), each compiled once per (L, mask). ROWS_GUARANTEED_SAFE holds
# for every mask (each query sees itself); BLOCKS_ARE_CONTIGUOUS holds for full/intra_doc only (the anchor column
# breaks it), so it runs only there; BACKEND=FLASH is torch's FA4 (cute-dsl) flex kernel, where installed.
FLEX_VARIANTS = {
    "flex_safe": {"ROWS_GUARANTEED_SAFE": True},
    "flex_b64": {"BLOCK_M": 64, "BLOCK_N": 64},
    "flex_contig": {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True},
    "flex_fa4": {"BACKEND": "FLASH"},
    "flex_merge": None,  # not kernel options: the anchor merged through flex's LSE (flex_merge below)
}
FLEX_VARIANT_MASKS = {"flex_contig": ("full", "intra_doc"), "flex_merge": ("anchor",)}


def flex_variant(options):
    def run(*args, **kw):
        old, _flex.KERNEL_OPTIONS = _flex.KERNEL_OPTIONS, dict(options)
        try:
            return flex_attention(*args, **kw)
        finally:
            _flex.KERNEL_OPTIONS = old

    return run


def flex_merge(query, key, value, layout, *, scaling=None):
    """Experimental anchor variant: FlexAttention on the intra_doc BlockMask (no anchor column, so no partial block
    per query-block row) returning its LSE, the anchor merged as one extra key per query through the LSE; plain
    autograd (flex's backward takes the LSE's gradient). If it beats ``flex`` on the GPU, it moves into the backend."""
    intra = layout._cache.get("bench_flex_merge_intra")
    if intra is None:
        intra = layout._cache["bench_flex_merge_intra"] = AnchorLayout.from_doc_ids(layout.doc_ids, "intra_doc")
    B, H, L, D = query.shape
    Hkv = key.shape[1]
    scale = D**-0.5 if scaling is None else scaling
    out, lse = _flex._compiled_flex()(query, key, value, block_mask=block_mask_for(intra, None, query.device),
                                       scale=scale, enable_gqa=Hkv != H, return_lse=True)  # (B,H,L,D), (B,H,L)
    G = H // Hkv
    ka, va = key[:, :, :1], value[:, :, :1]  # (B, Hkv, 1, D): each row's anchor
    s = torch.matmul(query.reshape(B, Hkv, G * L, D), ka.transpose(-1, -2)).view(B, H, L).float() * scale
    s = s.masked_fill((layout.doc_ids.to(query.device) <= 0)[:, None, :], float("-inf"))  # documents only
    lse_m = torch.logaddexp(lse.float(), s)
    w, p = torch.exp(lse.float() - lse_m), torch.exp(s - lse_m)
    merged = out * w[..., None] + (p.view(B, Hkv, G * L, 1) * va.float()).view(B, H, L, D)
    return merged.to(query.dtype).transpose(1, 2)


BACKEND_FNS = {"sdpa": sdpa_attention, "sdpa_stock": sdpa_stock, "flex": flex_attention, "varlen": varlen_gather,
               "varlen_merge": _varlen_merge.varlen_merge_attention,
               **{name: flex_variant(opts) for name, opts in FLEX_VARIANTS.items() if opts is not None},
               "flex_merge": flex_merge}


# ---------------------------------------------------------------------------------------------- main
def summarize(results: list[dict]) -> list[dict]:
    """Mean / min / max fraction of the FLOP-ratio limit per (L, mask, backend, pass) over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["L"], r.get("mask", "anchor"), r["backend"], r["pass"]), []).append(r)
    return [
        {"L": L, "mask": m, "backend": b, "pass": p, "seeds": [r["seed"] for r in rs],
         "mean_fraction": statistics.mean(r["fraction_of_limit"] for r in rs),
         "min_fraction": min(r["fraction_of_limit"] for r in rs),
         "max_fraction": max(r["fraction_of_limit"] for r in rs)}
        for (L, m, b, p), rs in groups.items()
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384", help="comma-separated sequence lengths L")
    p.add_argument("--batch", type=int, default=1, help="rows per batch (each with its own document layout)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mean-doc", type=float, default=1024.0, help="mean document length (lognormal)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of document lengths")
    p.add_argument("--seeds", default="0", help="comma-separated layout seeds: one packed row (layout) per seed and length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--layout", default="blhd", choices=["blhd", "bhld"],
                   help="memory order of the q/k/v leaves: blhd = (B, L, H, D) viewed as (B, H, L, D), what a "
                        "transformers attention module passes (default); bhld = contiguous (B, H, L, D), whose "
                        "gradients cost both sides a transposing copy into .grad")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per configuration")
    p.add_argument("--backends", default=None, help="comma-separated subset of " + ",".join(BACKEND_FNS)
                   + " (default: all available)")
    p.add_argument("--masks", default="anchor", help="comma-separated masks timed against full causal SDPA: "
                   "anchor, intra_doc, full (the backend's own full causal path)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory passes")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    for name in ("batch", "heads", "kv_heads", "head_dim", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if not args.seeds:
        raise ValueError("--seeds must name at least one seed")
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if not args.lengths or min(args.lengths) < 2:
        raise ValueError(f"--lengths must be integers >= 2, got {args.lengths}")
    args.masks = [m.strip() for m in args.masks.split(",") if m.strip()]
    bad = [m for m in args.masks if m not in ("anchor", "intra_doc", "full")]
    if bad or not args.masks:
        raise ValueError(f"--masks must name some of anchor,intra_doc,full, got {bad or args.masks}")
    bad = [b for b in (args.backends.split(",") if args.backends else []) if b not in BACKEND_FNS]
    if bad:
        raise ValueError(f"--backends: unknown {bad}; choose from {','.join(BACKEND_FNS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    # flex compiles once per (L, mask, kernel_options): room for every combination (dynamo's default of 8 would fall
    # back to eager, O(L^2) memory, and time the wrong thing)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 2048)
    wanted = args.backends.split(",") if args.backends else None
    backends = available_backends(device, wanted)
    mem = PeakMemory(device)
    H, Hkv, D, B = args.heads, args.kv_heads, args.head_dim, args.batch
    gqa = Hkv != H
    info = machine_info(device)
    print(f"# torch {torch.__version__} | device {device} {info.get('cuda_device', info['cpu_model'])} | "
          f"threads {torch.get_num_threads()} | dtype {args.dtype} | qkv {args.layout} | B={B} H={H} Hkv={Hkv} D={D} | "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    load_before = os.getloadavg()
    for L, seed in ((L, seed) for L in args.lengths for seed in args.seeds):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + L)  # each (seed, length) layout independent
        rows = [lognormal_doc_ids(L, args.mean_doc, args.sigma, gen) for _ in range(B)]
        doc_ids = torch.cat([r[0] for r in rows]).to(device)
        doc_lens = [r[1] for r in rows]
        full_layout = AnchorLayout.from_doc_ids(doc_ids, "full")
        flops_full = full_layout.attention_flops(D, H)
        tg = torch.Generator(device=device).manual_seed(seed + L)
        if args.layout == "blhd":  # (B, L, H, D) memory viewed as (B, H, L, D), as HF attention modules pass them
            q = torch.randn(B, L, H, D, device=device, dtype=dtype, generator=tg).transpose(1, 2).requires_grad_()
            k = torch.randn(B, L, Hkv, D, device=device, dtype=dtype, generator=tg).transpose(1, 2).requires_grad_()
            v = torch.randn(B, L, Hkv, D, device=device, dtype=dtype, generator=tg).transpose(1, 2).requires_grad_()
        else:
            q = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=tg).requires_grad_()
            k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=tg).requires_grad_()
            v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=tg).requires_grad_()
        g = torch.randn(B, L, H, D, device=device, dtype=dtype, generator=tg)

        def full_attn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)

        for (mask, name, with_bwd, note) in ((m, *b) for m in args.masks for b in backends):
            if mask not in FLEX_VARIANT_MASKS.get(name, (mask,)):
                continue
            layout = AnchorLayout.from_doc_ids(doc_ids, mask)
            flops_anchor = layout.attention_flops(D, H)
            limit = flops_full / flops_anchor
            fn = BACKEND_FNS[name]
            extra = {}
            if name.startswith("flex"):
                t0 = time.perf_counter()
                block_mask_for(layout, None, device)
                _sync(device)
                extra["block_mask_build_s"] = time.perf_counter() - t0

            def anchor_attn(q, k, v, fn=fn, layout=layout):
                return fn(q, k, v, layout)

            full_pass = make_pass(full_attn, q, k, v, g, with_bwd)
            anchor_pass = make_pass(anchor_attn, q, k, v, g, with_bwd)
            t0 = time.perf_counter()
            try:  # the first call compiles (flex); a variant the installed torch cannot run is recorded, not fatal
                anchor_pass()
                _sync(device)
            except Exception as e:  # any failure of one variant (unsupported option, compile error) is recorded
                print(f"L={L:6d} seed={seed} {mask:9s} {name:12s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
                results.append({"L": L, "seed": seed, "mask": mask, "backend": name, "note": note,
                                "error": f"{type(e).__name__}: {str(e)[:1000]}"})
                continue
            extra["first_call_s"] = time.perf_counter() - t0
            ts = time_pair(full_pass, anchor_pass, repeats=args.repeats, warmup=args.warmup, device=device)
            tf, ta = ts["full_wall"], ts["anchor_wall"]
            cpu_f, cpu_a = (1e3 * statistics.median(ts[n]) for n in ("full_cpu", "anchor_cpu"))
            mf = ma = None
            if not args.no_memory:
                mf, ma = peak_increase(mem, full_pass), peak_increase(mem, anchor_pass)
            full_ms, anchor_ms = 1e3 * statistics.median(tf), 1e3 * statistics.median(ta)
            speedup = full_ms / anchor_ms
            rec = {
                "L": L, "seed": seed, "mask": mask, "backend": name, "pass": "fwd_bwd" if with_bwd else "fwd", "note": note,
                "num_docs": [len(x) for x in doc_lens], "max_doc": max(max(x) for x in doc_lens),
                "full_ms": full_ms, "anchor_ms": anchor_ms, "speedup": speedup,
                "flops_full": flops_full, "flops_anchor": flops_anchor, "flop_limit": limit,
                "fraction_of_limit": speedup / limit,
                "full_cpu_ms": cpu_f, "anchor_cpu_ms": cpu_a, "speedup_cpu": cpu_f / cpu_a,
                "fraction_of_limit_cpu": cpu_f / cpu_a / limit,
                "full_times_ms": [1e3 * t for t in tf], "anchor_times_ms": [1e3 * t for t in ta],
                "peak_mem_full_bytes": mf, "peak_mem_anchor_bytes": ma, **extra,
            }
            results.append(rec)
            mem_s = "" if mf is None else f" | mem full {mf / 2**20:7.1f} MiB anchor {ma / 2**20:7.1f} MiB"
            print(f"L={L:6d} seed={seed} {mask:9s} {name:12s} {rec['pass']:7s} docs={sum(rec['num_docs']):3d} full {full_ms:9.1f} ms "
                  f"anchor {anchor_ms:8.1f} ms speedup {speedup:5.2f} limit {limit:5.2f} "
                  f"fraction {speedup / limit:5.1%} (cpu-time fraction {cpu_f / cpu_a / limit:5.1%}){mem_s}", flush=True)
        del q, k, v, g

    print()
    hdr = (f"{'L':>6} {'seed':>4} {'mask':9} {'backend':12} {'pass':7} {'full ms':>9} {'anchor ms':>9} {'speedup':>7} {'limit':>6} {'fraction':>8}"
           f" {'cpu-time fraction':>17}")
    print(hdr)
    print("-" * len(hdr))
    for r in (r for r in results if "error" not in r):
        print(f"{r['L']:6d} {r['seed']:4d} {r['mask']:9} {r['backend']:12} {r['pass']:7} {r['full_ms']:9.1f} {r['anchor_ms']:9.1f} "
              f"{r['speedup']:7.2f} {r['flop_limit']:6.2f} {r['fraction_of_limit']:8.1%} {r['fraction_of_limit_cpu']:17.1%}")
    summary = summarize(results)
    if len(args.seeds) > 1:
        print("\nper length and backend, over the seeds (the layouts differ a lot: report the spread, not one row):")
        for r in summary:
            print(f"L={r['L']:6d} {r['mask']:9} {r['backend']:12} {r['pass']:7} seeds={r['seeds']} fraction of limit: mean {r['mean_fraction']:6.1%} "
                  f"min {r['min_fraction']:6.1%} max {r['max_fraction']:6.1%}")
    if args.out:
        out = {
            "benchmark": "anchor attention vs full causal SDPA",
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": info,
            "config": {
                "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "batch": B,
                "qkv_layout": args.layout,
                "heads": H, "kv_heads": Hkv, "head_dim": D, "doc_lengths": f"lognormal(mean={args.mean_doc}, sigma={args.sigma})",
                "seeds": args.seeds, "repeats": args.repeats, "warmup": args.warmup, "statistic": "median",
                "full_baseline": "F.scaled_dot_product_attention(is_causal=True) over the whole row",
                "sdpa_cpu_kernel": (getattr(cpu_kernel.get(), "__name__", None) if device.type == "cpu" else None),
            },
            "memory_method": mem.method,
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
            "summary": summary,
            "results": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\n# wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
