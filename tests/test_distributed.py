"""Multi-process tests on CPU (2 gloo ranks): Ulysses SP, DeepSpeed ZeRO-3 via accelerate and HF Trainer, DDP.

Each test launches ``torchrun --nproc_per_node 2`` on this file (the ``__main__`` block below is the worker).
Workers compare the distributed run with a single-process run of the same weights and data inside the same
process, write the measured differences to ``OUT/rank{r}.json`` and end with ``os._exit`` (gloo can abort at
interpreter exit). The pytest side asserts on those figures.

Data: a tiny GQA Llama (4 query heads, 2 key/value heads); rows of 24 tokens hold documents that straddle the
shard boundary at token 12 (SP=2), plus right padding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
SEQ = 24
# document lengths per row (anchor excluded): doc 2 of both rows straddles token 12 (the SP=2 shard boundary)
ROWS = [[5, 10, 6], [3, 14, 6]]
ROWS_B = [[9, 9], [2, 4, 7, 5, 3]]  # a second batch (different target counts) for gradient accumulation / DDP
VOCAB = 96


# --------------------------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------------------------
def _deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"deepspeed does not import ({e}); install with DS_BUILD_OPS=0 pip install 'anchorcontext[deepspeed]'"
    return None


def _launch(scenario: str, tmp_path, timeout: int = 240) -> list[dict]:
    out = tmp_path / scenario
    out.mkdir()
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HERE, scenario, str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    res = []
    for r in range(2):
        f = out / f"rank{r}.json"
        if not f.exists():
            raise AssertionError(
                f"{scenario}: rank {r} wrote no result (rc={p.returncode}, {wall:.0f}s)\n--- stdout\n{p.stdout[-4000:]}\n"
                f"--- stderr\n{p.stderr[-6000:]}"
            )
        res.append(json.loads(f.read_text()))
    for r, d in enumerate(res):
        assert "error" not in d, f"{scenario} rank {r} failed:\n{d['error']}"
    print(f"{scenario}: {wall:.1f}s wall", res[0])
    return res


needs_ds = pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))
pytestmark = pytest.mark.distributed


@needs_ds
def test_ulysses_sp2_matches_single_process(tmp_path):
    res = _launch("ulysses", tmp_path)
    for r, d in enumerate(res):
        # DeepSpeed's dataloader adapter hands the AnchorLayout (not a tensor) to every rank unsharded
        assert d["adapter_layout_len"] == SEQ and d["adapter_ids_len"] == SEQ // 2, d
        for dt, tol in (("fp64", 1e-10), ("fp32", 2e-5)):
            for path in ("layout", "doc_ids"):
                m = d[f"{dt}_{path}"]
                assert m["logits"] <= tol, (r, dt, path, m)
                assert m["loss"] <= tol, (r, dt, path, m)
                assert m["grad"] <= tol, (r, dt, path, m)
                assert m["n_params"] == d["n_params"], (r, dt, path, m)
        # negative controls: a layout whose boundaries were derived per shard must fail the same assertions
        neg = d["fp64_split_at_shard"]
        assert neg["logits"] > 1e-3 and neg["grad"] > 1e-3, neg
        assert neg["logits_before_boundary"] <= 1e-10, neg  # only tokens after the shard boundary change
        assert "anchor layout has length" in d["not_gathered_error"], d["not_gathered_error"]


# --------------------------------------------------------------------------------------------------------------
# worker side (run by torchrun)
# --------------------------------------------------------------------------------------------------------------
def _features(rows):
    """Packed rows as DocumentPacker makes them: input_ids (anchor 1 first) + doc_lens."""
    import torch

    g = torch.Generator().manual_seed(sum(map(sum, rows)))
    feats = []
    for lens in rows:
        n = 1 + sum(lens)
        ids = [1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() + [0] * (SEQ - n)
        feats.append({"input_ids": ids, "doc_lens": lens})
    return feats


def _collate(rows, pad_to=None):
    from anchorcontext import AnchorCollator

    return AnchorCollator(anchor_id=1, pad_id=0, pad_to_multiple_of=pad_to)(_features(rows))


def _model(dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial weights everywhere (default init leaves norms at 1)
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _shift(labels):
    import torch

    return torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _reference(model, batch):
    """Single-process logits, loss (token-weighted mean) and parameter gradients."""
    from anchorcontext.parallel import sp_causal_lm_loss

    model.zero_grad()
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], anchor_layout=batch["anchor_layout"])
    loss, _, _ = sp_causal_lm_loss(out.logits, _shift(batch["labels"]))
    loss.backward()
    return out.logits.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _sp_step(model, local, group, P, **extra):
    """One SP forward/backward on this rank's shard; returns global logits, loss and DP-averaged gradients."""
    import torch
    import torch.distributed as dist

    from anchorcontext.parallel import sp_causal_lm_loss

    model.zero_grad()
    out = model(input_ids=local["input_ids"], position_ids=local["position_ids"], **extra)
    loss, _, _ = sp_causal_lm_loss(out.logits, local["shift_labels"], sp_group=group)
    loss.backward()
    parts = [torch.empty_like(out.logits) for _ in range(P)]
    dist.all_gather(parts, out.logits.detach().contiguous(), group=group)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=group)
        grads[n] = g / P  # what ZeRO-3's reduce-scatter does: the mean over all ranks
    return torch.cat(parts, dim=1), loss.detach(), grads


def _compare(sp, ref, L=None):
    logits, loss, grads = sp
    rl, rloss, rgrads = ref
    d = {
        "logits": _rel(logits, rl),
        "loss": float((loss - rloss).abs() / rloss.abs()),
        "grad": max(_rel(grads[n], rgrads[n]) for n in rgrads),
        "n_params": sum(1 for n in rgrads if n in grads),
    }
    if L is not None:
        d["logits_before_boundary"] = _rel(logits[:, :L], rl[:, :L])
    return d


def scenario_ulysses(rank, world, res):
    import copy

    import torch
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    import anchorcontext
    from anchorcontext.layout import AnchorLayout
    from anchorcontext.parallel import register_ulysses, sp_state

    P = world
    batch = _collate(ROWS, pad_to=P)
    base = _model(torch.float64)
    ref_model = anchorcontext.patch_model(copy.deepcopy(base), backend="sdpa")
    sp_model = copy.deepcopy(base)
    mpu = register_ulysses(sp_model, sp_size=P, micro_batch_size=len(ROWS))
    anchorcontext.patch_model(sp_model, backend="sdpa")
    group = mpu.get_sequence_parallel_group()

    # the real DeepSpeed dataloader adapter: what does it do with the AnchorLayout?
    loader = torch.utils.data.DataLoader(_features(ROWS), batch_size=len(ROWS), collate_fn=anchorcontext.AnchorCollator(
        anchor_id=1, pad_id=0, pad_to_multiple_of=P))
    local = next(iter(UlyssesSPDataLoaderAdapter(loader, sp_rank=rank, sp_group=group, sp_world_size=P, device="cpu")))
    lay = local["anchor_layout"]
    res["adapter_layout_len"] = lay.seq_len if isinstance(lay, AnchorLayout) else -1
    res["adapter_ids_len"] = int(local["input_ids"].shape[1])
    res["n_params"] = sum(1 for _ in base.parameters())

    # doc ids sharded like input_ids (what the adapter does to any (B, L) tensor)
    Ll = SEQ // P
    local_doc_ids = batch["anchor_layout"].doc_ids[:, rank * Ll:(rank + 1) * Ll]
    for dt, name in ((torch.float64, "fp64"), (torch.float32, "fp32")):
        ref_model.to(dt)
        sp_model.to(dt)
        ref = _reference(ref_model, batch)
        res[f"{name}_layout"] = _compare(_sp_step(sp_model, local, group, P, anchor_layout=lay), ref)
        res[f"{name}_doc_ids"] = _compare(_sp_step(sp_model, local, group, P, anchor_doc_ids=local_doc_ids), ref)
        if name == "fp64":
            # negative control: boundaries derived per shard (the straddling documents cut at token Ll)
            d = batch["anchor_layout"].doc_ids.clone()
            d[:, Ll:] = torch.where(d[:, Ll:] > 0, d[:, Ll:] + 1, d[:, Ll:])
            bad = AnchorLayout.from_doc_ids(d)
            res["fp64_split_at_shard"] = _compare(_sp_step(sp_model, local, group, P, anchor_layout=bad), ref, Ll)
            # negative control: doc ids not gathered -> the layout cannot describe the row; must raise
            sp_state(sp_model)["gather"] = False
            try:
                _sp_step(sp_model, local, group, P, anchor_doc_ids=local_doc_ids)
                res["not_gathered_error"] = "no error"
            except ValueError as e:
                res["not_gathered_error"] = str(e)
            sp_state(sp_model)["gather"] = True
            dist.barrier()


def _worker_main(scenario: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    res: dict = {}
    code = 0
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        globals()[f"scenario_{scenario}"](rank, world, res)
    except BaseException:
        res["error"] = traceback.format_exc()
        code = 1
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if code == 0 and dist.is_initialized():
            dist.barrier()
    except Exception:
        pass
    os._exit(code)


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
