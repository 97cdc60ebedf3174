"""GPU backends inside DeepSpeed's Ulysses wrapper with P=1 (one GPU): varlen and flex.

With one rank the all-to-alls are identities, so the wrapped model must match the unwrapped one; this checks
the plumbing on the real kernels (``UlyssesSPAttentionHF`` reshapes, the global-layout hook, ``anchor_sp``),
which the CPU tests cover only with the sdpa backend. Tolerance (STYLE 10): ``err(sp, fp32 reference) <=
2 * err(no-SP same dtype, fp32 reference) + 1e-6``, for logits and every parameter gradient.

Each case runs in a fresh subprocess (``python tests/gpu/test_sp_gpu.py --device D --backend B --dtype T``)
so the process group and DeepSpeed's process-wide registry replacement do not leak into other tests. Nothing
here touches CUDA at import; ``tests/test_distributed.py`` runs the CPU/sdpa case of the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def run_case(device: str, backend: str, dtype: str, timeout: int = 600) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    p = subprocess.run([sys.executable, HERE, "--device", device, "--backend", backend, "--dtype", dtype],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise AssertionError(f"case {device}/{backend}/{dtype} failed (rc={p.returncode})\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def check_result(r: dict) -> None:
    assert r["wrapper_calls"] == r["layers"], r  # every layer's attention went through UlyssesSPAttentionHF
    assert r["wrapper_calls_without_sp"] == 0, r  # and the plain "anchor" model never did
    assert r["sp_logits_err"] <= 2 * r["base_logits_err"] + 1e-6, r
    for n, (sp, base) in r["grad_err"].items():
        assert sp <= 2 * base + 1e-6, (n, sp, base)


def _gpu_skip_reason() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:
        return f"deepspeed does not import: {e}"
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA"
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_gpu_backend_inside_ulysses_p1_matches_plain(backend):
    why = _gpu_skip_reason()  # evaluated at test time, never at import
    if why:
        pytest.skip(why)
    if backend == "varlen":
        import torch

        from anchorcontext.attention.varlen import unavailable_reason

        why = unavailable_reason(torch.device("cuda"), dtype=torch.bfloat16)
        if why:
            pytest.skip(f"varlen backend unavailable: {why}")
    check_result(run_case("cuda", backend, "bfloat16"))


# ------------------------------------------------------------------------------------------------------------
def _case(device: str, backend: str, dtype_name: str) -> dict:
    import copy
    import socket

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    import anchorcontext
    from anchorcontext.parallel import SP_ATTN_NAME, prepare_model_for_sp, sp_causal_lm_loss

    dtype = getattr(torch, dtype_name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    group = dist.new_group([0])

    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, use_cache=False)
    torch.manual_seed(0)
    ref32 = LlamaForCausalLM(cfg).to(device)
    with torch.no_grad():
        for p in ref32.parameters():
            p.add_(0.02 * torch.randn_like(p))
    base = copy.deepcopy(ref32).to(dtype)
    sp = copy.deepcopy(base)
    anchorcontext.patch_model(ref32, backend="reference" if device == "cuda" else "sdpa")
    anchorcontext.patch_model(base, backend=backend)
    prepare_model_for_sp(sp, sp_size=1, backend=backend, group_fn=lambda: group)

    # what register_with_transformers does for P > 1 (it returns early for P == 1), on our 1-rank group
    uattn = UlyssesSPAttentionHF(
        attn=AttentionInterface._global_mapping[SP_ATTN_NAME], batch_size=2, attn_head_count=4, attn_head_size=32,
        kv_head_count=2, num_hidden_layers=2, process_group=group, seq_length_is_variable=True,
    )
    calls = {"n": 0}

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        calls["n"] += 1
        return uattn(module, query, key, value, None, *args, **kwargs)

    AttentionInterface.register(SP_ATTN_NAME, wrapper)

    feats = []
    g = torch.Generator().manual_seed(0)
    for lens in ([100, 200, 150, 60], [511 - 300, 300]):
        n = 1 + sum(lens)
        ids = [1] + torch.randint(3, 128, (n - 1,), generator=g).tolist() + [0] * (512 - n)
        feats.append({"input_ids": ids, "doc_lens": lens})
    batch = anchorcontext.AnchorCollator(anchor_id=1, pad_id=0)(feats)
    batch = {k: v.to(device) for k, v in batch.items()}
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()

    def run(model):
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    anchor_layout=batch["anchor_layout"])
        loss, _, _ = sp_causal_lm_loss(out.logits, shift)
        loss.backward()
        return out.logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}

    def err(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))

    rl, rg = run(ref32)
    bl, bg = run(base)
    n0 = calls["n"]
    sl, sg = run(sp)
    res = {
        "device": device, "backend": backend, "dtype": dtype_name, "layers": cfg.num_hidden_layers,
        "wrapper_calls": calls["n"] - n0, "wrapper_calls_without_sp": n0,
        "base_logits_err": err(bl, rl), "sp_logits_err": err(sl, rl),
        "sp_vs_base_logits": err(sl, bl),
        "grad_err": {n: (err(sg[n], rg[n]), err(bg[n], rg[n])) for n in rg},
    }
    dist.destroy_process_group()
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="varlen")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    r = _case(a.device, a.backend, a.dtype)
    print("RESULT " + json.dumps(r), flush=True)
    sys.stdout.flush()
    os._exit(0)
