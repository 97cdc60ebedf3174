"""Validate :func:`anchorcontext.plan_memory` against the measured peak of real CPU training steps.

Each configuration runs in a fresh subprocess (one torch thread): a random Llama with SmolLM2-135M's widths
(hidden 576, MLP 1536, 9 heads, 3 KV heads, head_dim 64, tied embeddings) and the given layers and vocabulary,
float32, ``patch_model(backend="sdpa")`` (stock CPU path: ``ANCHORCONTEXT_CPU_KERNEL=0``), AnchorAttention on
rows of several documents, HF's stock loss or (configurations with ``chunked``) ``patch_model(chunked_loss=True,
loss_chunk_tokens=chunk)``, ``torch.optim.AdamW``. Two optimizer steps run; the second is
measured, so the Adam moments exist. Measured = Linux peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``
after ``malloc_trim``, with glibc ``M_MMAP_THRESHOLD`` = 64 KiB so freed tensors leave RSS) during step 2, minus
the RSS after imports and before the model was built: weights + gradients + Adam state + activations + loss.
Estimated = ``plan_memory(engine="ddp", world_size=1, param_dtype="float32", mixed_precision="no",
attention="sdpa", device_reserve_gib=0, fragmentation=0, chunked_loss=..., loss_chunk_tokens=...)``.

    python benchmarks/memory_plan.py                    # all configurations -> benchmarks/results/cpu/memory_plan.json
    python benchmarks/memory_plan.py --only 0 2          # a subset (merged into the existing file)
    python benchmarks/memory_plan.py --only 6 --alone    # ... and the losses measured alone
    python benchmarks/memory_plan.py --replan            # no measurement: today's estimates beside the measured

It also measures each loss alone (fp32): HF's stock loss (LM head + ``ForCausalLMLoss`` forward and backward), the
figure the plan's stock loss term is calibrated on (bytes per token and vocabulary entry), and
:func:`anchorcontext.loss.chunked_linear_cross_entropy` against the plan's chunked loss term.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOL = dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64, tied_embeddings=True)
CONFIGS = [
    dict(layers=4, vocab=49152, seq_len=2048, ckpt=False),
    dict(layers=4, vocab=8192, seq_len=8192, ckpt=False),
    dict(layers=8, vocab=8192, seq_len=8192, ckpt=True),
    dict(layers=2, vocab=8192, seq_len=4096, ckpt=False),
    dict(layers=30, vocab=49152, seq_len=2048, ckpt=True),
    dict(layers=8, vocab=512, seq_len=8192, ckpt=True),  # small vocabulary: the layer recompute sets the peak
    # the chunked loss (patch_model(chunked_loss=True)): several chunks, one chunk, without checkpointing
    dict(layers=4, vocab=49152, seq_len=8192, ckpt=True, chunked=True, chunk=2048),
    dict(layers=30, vocab=49152, seq_len=4096, ckpt=True, chunked=True, chunk=2048),
    dict(layers=2, vocab=49152, seq_len=4096, ckpt=False, chunked=True, chunk=8192),
]
LOSS_CONFIGS = [(2048, 49152), (4096, 8192)]  # (tokens, vocab) of the loss-only measurement
# (tokens, vocab, chunk, path): "fused" = the nn.Linear head's Function (engine ddp), "module" = the per-chunk
# checkpointed head (a ZeRO-3 / FSDP2 head)
CHUNKED_LOSS_CONFIGS = [(8192, 49152, 2048, "fused"), (16384, 49152, 4096, "fused"), (2048, 49152, 2048, "fused"),
                        (8192, 49152, 2048, "module")]
TOLERANCE = 0.15
DOC_LEN = 700  # tokens per document (the last one of a row is shorter)


def estimate(c: dict):
    from anchorcontext.memory import ModelDims, plan_memory

    dims = ModelDims(num_layers=c["layers"], vocab_size=c["vocab"], name=f"SmolLM2-widths x{c['layers']}", **SMOL)
    return plan_memory(model=dims, seq_len=c["seq_len"], engine="ddp", param_dtype="float32", mixed_precision="no",
                       gradient_checkpointing=c["ckpt"], attention="sdpa", device_reserve_gib=0, fragmentation=0,
                       num_documents=-(-(c["seq_len"] - 1) // DOC_LEN), chunked_loss=c.get("chunked", False),
                       loss_chunk_tokens=c.get("chunk", 2048), variants=False)


def worker(c: dict) -> dict:
    os.environ["ANCHORCONTEXT_CPU_KERNEL"] = "0"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from anchorcontext import anchor_inputs, patch_model
    from anchorcontext.measure import PeakMemory

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mem = PeakMemory(torch.device("cpu"), 65536)
    base = mem.start()
    cfg = LlamaConfig(hidden_size=SMOL["hidden_size"], intermediate_size=SMOL["intermediate_size"],
                      num_hidden_layers=c["layers"], num_attention_heads=SMOL["num_heads"],
                      num_key_value_heads=SMOL["num_kv_heads"], head_dim=SMOL["head_dim"], vocab_size=c["vocab"],
                      tie_word_embeddings=True, max_position_embeddings=c["seq_len"], use_cache=False)
    model = LlamaForCausalLM(cfg).float().train()
    patch_model(model, backend="sdpa", chunked_loss=c.get("chunked", False), loss_chunk_tokens=c.get("chunk", 2048))
    if c["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    L = c["seq_len"]
    doc = torch.arange(L) - 1
    doc = torch.where(doc < 0, torch.zeros_like(doc), doc // DOC_LEN + 1)[None]  # anchor 0, documents 1..n
    ids = torch.randint(0, c["vocab"], (1, L))
    extra = anchor_inputs(doc)
    peaks = []
    for _ in range(2):
        mem.start()
        loss = model(input_ids=ids, labels=ids, **extra).loss  # the output (logits) dropped, as Trainer does
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(mem.stop() - base)
    return {"measured_bytes": peaks[-1], "step1_bytes": peaks[0], "method": mem.method,
            "parameters": sum(p.numel() for p in model.parameters())}


def loss_worker(T: int, V: int, h: int = 576) -> dict:
    """Peak of HF's stock causal-LM loss alone (fp32): LM head forward, ``ForCausalLMLoss``, backward."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from anchorcontext.measure import PeakMemory

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = torch.randn(1, T, h, requires_grad=True)
    head = torch.nn.Linear(h, V, bias=False)
    labels = torch.randint(0, V, (1, T))
    for p in head.parameters():  # the weight gradient exists before the measured step, as the model's would
        p.grad = torch.zeros_like(p)
    hidden.grad = torch.zeros_like(hidden)
    mem = PeakMemory(torch.device("cpu"), 65536)
    base = mem.start()
    loss = ForCausalLMLoss(head(hidden), labels, vocab_size=V)  # the logits not kept, as in a Trainer step
    loss.backward()
    peak = mem.stop() - base
    return {"measured_bytes": peak, "bytes_per_token_and_vocab": peak / (T * V), "method": mem.method}


def chunked_loss_worker(T: int, V: int, chunk: int, path: str, h: int = 576) -> dict:
    """Peak of the chunked loss alone (fp32), forward and backward: :func:`anchorcontext.loss.
    chunked_linear_cross_entropy` (``path="fused"``) or :func:`~anchorcontext.loss.chunked_module_cross_entropy`."""
    import torch

    from anchorcontext.loss import chunked_linear_cross_entropy, chunked_module_cross_entropy
    from anchorcontext.measure import PeakMemory

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = torch.randn(T, h, requires_grad=True)
    head = torch.nn.Linear(h, V, bias=False)
    labels = torch.randint(0, V, (T,))
    hidden.grad, head.weight.grad = torch.zeros_like(hidden), torch.zeros_like(head.weight)  # as in loss_worker
    mem = PeakMemory(torch.device("cpu"), 65536)
    base = mem.start()
    if path == "fused":
        loss = chunked_linear_cross_entropy(hidden, head.weight, None, labels, chunk_size=chunk)
    else:
        loss = chunked_module_cross_entropy(hidden, head, labels, chunk_size=chunk)
    loss.backward()
    peak = mem.stop() - base
    return {"measured_bytes": peak, "method": mem.method}


def chunked_loss_term(T: int, V: int, chunk: int, path: str, h: int = 576) -> int:
    """The plan's ``loss (chunked)`` component for ``T`` tokens (fp32, one rank; ``ddp`` runs the fused path,
    ``zero3`` the per-chunk checkpointed one)."""
    from anchorcontext.memory import ModelDims, plan_memory

    dims = ModelDims(hidden_size=h, intermediate_size=h, num_layers=1, num_heads=1, num_kv_heads=1, vocab_size=V)
    return plan_memory(model=dims, seq_len=T, engine="ddp" if path == "fused" else "zero3", param_dtype="float32",
                       mixed_precision="no", chunked_loss=True,
                       loss_chunk_tokens=chunk, device_reserve_gib=0, fragmentation=0,
                       variants=False).components["loss (chunked)"]


def replan(out: Path) -> int:
    """Today's estimates beside the recorded measurements (after a change to the plan's arithmetic)."""
    doc = json.loads(out.read_text())
    for r in doc["results"]:
        plan = estimate(r["config"])
        err = plan.total / r["measured_bytes"] - 1
        print(f"{r['config']}: estimated {r['estimated_bytes'] / 2**30:.3f} -> {plan.total / 2**30:.3f} GiB, "
              f"error {r['relative_error']:+.1%} -> {err:+.1%}")
        r.update(estimated_bytes=plan.total, components=plan.components, relative_error=err,
                 within_tolerance=abs(err) <= TOLERANCE)
    for r in doc.get("chunked_loss_alone", []):
        r["planned_bytes"] = chunked_loss_term(r["tokens"], r["vocab"], r["chunk"], r.get("path", "fused"))
        r["relative_error"] = r["planned_bytes"] / r["measured_bytes"] - 1
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["within_tolerance"] for r in doc["results"]) else 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=int, nargs="*", help="indices into CONFIGS")
    ap.add_argument("--alone", action="store_true", help="with --only: measure the losses alone too")
    ap.add_argument("--replan", action="store_true",
                    help="measure nothing: recompute the estimates in --out from today's plan_memory")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu/memory_plan.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        c = json.loads(args.worker)
        if "chunk" in c and "T" in c:
            print(json.dumps(chunked_loss_worker(c["T"], c["V"], c["chunk"], c["path"])))
        else:
            print(json.dumps(loss_worker(c["T"], c["V"]) if "T" in c else worker(c)))
        return 0
    if args.replan:
        return replan(Path(args.out))
    import torch

    from anchorcontext.measure import machine_info

    torch.set_num_threads(1)
    rows = []
    for i, c in enumerate(CONFIGS):
        if args.only is not None and i not in args.only:
            continue
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(c)], capture_output=True, text=True,
                           env=env, check=False)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        got = json.loads(r.stdout.strip().splitlines()[-1])
        plan = estimate(c)
        assert plan.inputs["parameters"] == got["parameters"], (plan.inputs["parameters"], got["parameters"])
        err = plan.total / got["measured_bytes"] - 1
        row = {"config": c, **got, "estimated_bytes": plan.total, "components": plan.components,
               "relative_error": err, "within_tolerance": abs(err) <= TOLERANCE}
        rows.append(row)
        loss = f"chunked loss ({c['chunk']} tokens)" if c.get("chunked") else "stock loss"
        print(f"[{i}] layers {c['layers']} vocab {c['vocab']} L {c['seq_len']} ckpt {c['ckpt']} {loss}: measured "
              f"{got['measured_bytes'] / 2**30:.3f} GiB, estimated {plan.total / 2**30:.3f} GiB ({err:+.1%}); "
              + ", ".join(f"{k} {v / 2**30:.3f}" for k, v in plan.components.items()), flush=True)
    loss_rows = []
    alone = args.only is None or args.alone
    for T, V in LOSS_CONFIGS if alone else ():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"T": T, "V": V})], capture_output=True,
                           text=True, env=env, check=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        loss_rows.append({"tokens": T, "vocab": V, **got, "planned_bytes_per_token_and_vocab": 12})
        print(f"stock loss alone, T {T} x V {V} fp32: measured {got['bytes_per_token_and_vocab']:.2f} bytes per token "
              "and vocabulary entry (planned 12: fp32 log-softmax + 2 fp32 gradients)", flush=True)
    chunked_rows = []
    for T, V, chunk, path in CHUNKED_LOSS_CONFIGS if alone else ():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, __file__, "--worker",
                            json.dumps({"T": T, "V": V, "chunk": chunk, "path": path})],
                           capture_output=True, text=True, env=env, check=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        planned = chunked_loss_term(T, V, chunk, path)
        chunked_rows.append({"tokens": T, "vocab": V, "chunk": chunk, "path": path, **got, "planned_bytes": planned,
                             "relative_error": planned / got["measured_bytes"] - 1})
        print(f"chunked loss alone ({path}), T {T} x V {V}, chunk {chunk}, fp32: measured "
              f"{got['measured_bytes'] / 2**30:.3f} GiB, planned {planned / 2**30:.3f} GiB "
              f"({planned / got['measured_bytes'] - 1:+.1%})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() and args.only is not None else {}
    by_cfg = {json.dumps(r["config"], sort_keys=True): r for r in old.get("results", [])}
    by_cfg.update({json.dumps(r["config"], sort_keys=True): r for r in rows})
    result = {"benchmark": "memory plan vs measured peak of a CPU training step (fwd + bwd + AdamW), float32",
              "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(torch.device("cpu")), "tolerance": TOLERANCE, "model_widths": SMOL,
              "doc_len": DOC_LEN, "results": list(by_cfg.values()),
              "stock_loss_alone": loss_rows or old.get("stock_loss_alone", []),
              "chunked_loss_alone": chunked_rows or old.get("chunked_loss_alone", [])}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["within_tolerance"] for r in rows) else 2


if __name__ == "__main__":
    raise SystemExit(main())
