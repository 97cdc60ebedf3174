"""Multi-process tests on CPU (2 gloo ranks): Ulysses SP, DeepSpeed ZeRO-3 via accelerate and HF Trainer, DDP.

Each test launches ``torchrun --nproc_per_node 2`` on this file (the ``__main__`` block below is the worker).
Workers compare the distributed run with a single-process run of the same weights and data inside the same
process, write the measured differences to ``OUT/rank{r}.json`` and end with ``os._exit`` (gloo can abort at
interpreter exit). The pytest side asserts on those figures.

Data: a tiny GQA Llama (4 query heads, 2 key/value heads); rows of 24 tokens hold documents that straddle the
shard boundary at token 12 (SP=2), plus right padding.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
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
    # find_spec, not import: collecting this file must stay cheap (importing deepspeed takes seconds)
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed; install with DS_BUILD_OPS=0 pip install 'anchorcontext[deepspeed]'"
    return None


def _launch(scenario: str, tmp_path, timeout: int = 600) -> list[dict]:
    """Run a scenario on 2 ranks. The timeout covers DeepSpeed's first-use JIT build (40 s idle, ~5 min on a
    busy 2-core host) when TORCH_EXTENSIONS_DIR is not cached yet."""
    out = tmp_path / scenario
    out.mkdir()
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HERE, scenario, str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
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


@needs_ds
def test_zero3_accelerate_sp2_grad_accum_matches_single_process(tmp_path):
    """ZeRO-3 + SP=2 via accelerate, 2 accumulated micro-batches (40 and 34 targets): one SGD step equals the
    single-process token-weighted step; the same recipe on ZeRO-2 is exactly 2x (the refused trap)."""
    for r, d in enumerate(_launch("zero3_accelerate", tmp_path)):
        assert d["num_processes"] == 2, d
        assert d["loss_rel"] <= 2e-6, d
        assert abs(d["grad_norm_ratio"] - 1) <= 2e-6, d
        assert d["grad_max_rel"] <= 2e-5, d
        assert d["ds_grad_norm_rel"] <= 2e-6, d  # DeepSpeed's reported global grad norm
        assert abs(d["zero2"]["grad_norm_ratio"] - 2) <= 1e-5, d


@needs_ds
def test_trainer_zero3_sp2_grad_accum_matches_single_process(tmp_path):
    """HF Trainer + ZeRO-3 + SP=2 + 2 accumulated micro-batches with SequenceParallelLossMixin: the step's
    gradient, the logged loss and the logged grad norm equal single-process token-weighted training."""
    for r, d in enumerate(_launch("trainer", tmp_path)):
        assert d["world_size"] == 2, d
        assert abs(d["grad_norm_ratio"] - 1) <= 2e-6, d
        assert d["grad_max_rel"] <= 2e-5, d
        assert d["loss_rel"] <= 2e-6 and d["logged_loss_rel"] <= 2e-6, d
        assert d["logged_grad_norm_rel"] is not None and d["logged_grad_norm_rel"] <= 2e-6, d


@needs_ds
def test_trainer_zero3_sp2_chunked_loss_matches_single_process(tmp_path):
    """The same run with ``patch_model(chunked_loss=True)``: each rank sums its shard's chunked loss (no logits)
    and the step still equals single-process token-weighted training."""
    for r, d in enumerate(_launch("trainer_chunked", tmp_path)):
        assert d["chunked_calls"] == [2], d  # both micro-batches went through the chunked forward
        assert abs(d["grad_norm_ratio"] - 1) <= 2e-6, d
        assert d["grad_max_rel"] <= 2e-5, d
        assert d["loss_rel"] <= 2e-6 and d["logged_loss_rel"] <= 2e-6, d


@needs_ds
def test_trainer_stock_sp_loss_is_not_token_weighted_across_micro_batches(tmp_path):
    """Control, and the reason for SequenceParallelLossMixin: stock Trainer (transformers 5.24) averages the SP
    micro-batches of a step with equal weight, so the same run misses the single-process gradient. If this starts
    failing, upstream fixed it and the mixin can go."""
    for r, d in enumerate(_launch("trainer_stock", tmp_path)):
        assert d["grad_max_rel"] > 1e-3, d


@needs_ds
def test_ulysses_wrapper_p1_cpu_matches_plain():
    """The P=1 plumbing check of tests/gpu/test_sp_gpu.py (run there with varlen and flex on CUDA), on CPU/sdpa."""
    from repo_scripts import load_script

    mod = load_script("tests/gpu/test_sp_gpu.py")
    r = mod.run_case("cpu", "sdpa", "float32")
    mod.check_result(r)
    assert r["sp_vs_base_logits"] == 0.0, r  # identity all-to-all, same kernel: bit-exact


def test_ddp_two_ranks_matches_single_process(tmp_path):
    for r, d in enumerate(_launch("ddp", tmp_path)):
        assert d["num_processes"] == 2, d
        assert d["loss_rel"] <= 2e-6, d
        assert abs(d["grad_norm_ratio"] - 1) <= 2e-6, d
        assert d["grad_max_rel"] <= 2e-5, d


def test_fsdp2_two_ranks_matches_single_process(tmp_path):
    """FSDP2 fully_shard on the patched model (decoder hooks, AnchorLayout kwargs through sharded layers)."""
    for r, d in enumerate(_launch("fsdp2", tmp_path)):
        assert d["sharded"] and d["n_params"] == 21, d
        assert d["loss_rel"] <= 2e-6 and d["grad"] <= 2e-5, d


# in-process checks (no launch) ----------------------------------------------------------------------------------
def test_deepspeed_config_gradient_scale_guard():
    from anchorcontext.parallel import check_deepspeed_config_for_sp

    ok = {"zero_optimization": {"stage": 3}}
    assert check_deepspeed_config_for_sp(ok, 2) is ok
    assert check_deepspeed_config_for_sp({"zero_optimization": {"stage": 2}}, 1)  # no SP: anything goes
    for cfg, field in (
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2"),
        ({}, "zero_optimization.stage=0"),
        ({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, "reduce_scatter=false"),
    ):
        with pytest.raises(ValueError, match=field):
            check_deepspeed_config_for_sp(cfg, 4)


def test_head_and_length_checks():
    from transformers import LlamaConfig

    from anchorcontext.parallel import check_seq_len, check_sp_heads

    cfg = LlamaConfig(num_attention_heads=8, num_key_value_heads=2)
    for p in (1, 2, 4, 8):  # kv heads split (2) or replicated (4, 8)
        check_sp_heads(cfg, p)
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by sp_size=3"):
        check_sp_heads(cfg, 3)
    with pytest.raises(ValueError, match="num_key_value_heads=3 and sp_size=2"):
        check_sp_heads(LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=3), 2)
    with pytest.raises(ValueError, match="sp_size must be an integer >= 1"):
        check_sp_heads(cfg, 0)
    check_seq_len(24, 4)
    with pytest.raises(ValueError, match="pad_to_multiple_of=4"):
        check_seq_len(26, 4)


def test_collator_pads_to_sp_multiple_without_targets():
    """Rows of 22 tokens padded to 24 for SP=4: the added tokens are padding, never targets; nothing is cut."""
    from anchorcontext import AnchorCollator

    feats = [{"input_ids": [1] + list(range(3, 24)), "doc_lens": [10, 11]}]
    b = AnchorCollator(anchor_id=1, pad_id=0, pad_to_multiple_of=4)(feats)
    assert b["input_ids"].shape == (1, 24)
    assert b["input_ids"][0, :22].tolist() == feats[0]["input_ids"]
    assert (b["labels"][0, 22:] == -100).all() and (b["anchor_layout"].doc_ids[0, 22:] == -1).all()


def test_accelerate_configs_load_and_pass_the_sp_guard():
    """Every configs/accelerate/*.yaml loads with accelerate's own loader; DeepSpeed ones name a JSON that exists,
    is ZeRO-3 with reduce_scatter (the SP gradient-scale guard) and loads as HF Trainer's DeepSpeed config."""
    import glob

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from anchorcontext.parallel import check_deepspeed_config_for_sp

    files = sorted(glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml")))
    kinds = {}
    for f in files:
        c = load_config_from_file(f)
        name = os.path.basename(f)
        kinds[name] = (c.distributed_type, c.num_machines, c.num_processes)
        if c.distributed_type == DistributedType.DEEPSPEED:
            path = os.path.join(ROOT, c.deepspeed_config["deepspeed_config_file"])
            assert os.path.exists(path), (name, path)
            for P in (2, 4, 8):
                check_deepspeed_config_for_sp(path, P)
            HfTrainerDeepSpeedConfig(path)
            if "_sp" in name:
                P = int(name.rsplit("_sp", 1)[1].split(".")[0])
                assert c.num_processes % P == 0 and f"--sp_size {P}" in pathlib.Path(f).read_text(), name
        if c.distributed_type == DistributedType.FSDP:
            assert c.fsdp_config["fsdp_version"] == 2, name
    assert kinds["ddp.yaml"][0] == DistributedType.MULTI_GPU
    assert kinds["fsdp2.yaml"][0] == DistributedType.FSDP
    assert {"deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml", "deepspeed_zero3_sp2.yaml", "deepspeed_zero3_sp4.yaml",
            "deepspeed_zero3_sp8.yaml"} <= set(kinds)
    assert [k for k, v in kinds.items() if v[1] == 2 and v[2] == 16], kinds  # the two-node example
    offload = load_config_from_file(os.path.join(ROOT, "configs", "accelerate", "deepspeed_zero3_offload.yaml"))
    zero = json.loads(pathlib.Path(ROOT, offload.deepspeed_config["deepspeed_config_file"]).read_text())["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"


def test_layout_pickles_with_cpu_tensors_and_no_device_cache():
    """DeepSpeed's adapter all_gather_object's the layout after accelerate moved it to the GPU; it must travel as
    CPU tensors (else every rank unpickles onto the sender's GPU). CPU stand-in: the device cache is dropped."""
    import pickle

    import torch

    from anchorcontext.layout import AnchorLayout
    from anchorcontext.parallel import register_layout_pickling

    register_layout_pickling()
    lay = _collate(ROWS)["anchor_layout"]
    lay._cache[("to", "cuda:3")] = "stand-in for a device copy"
    back = pickle.loads(pickle.dumps(lay))
    assert isinstance(back, AnchorLayout) and back._cache == {} and back is not lay
    for f in ("doc_ids", "cu_seqlens_q", "cu_seqlens_k", "kv_index"):
        assert getattr(back, f).device.type == "cpu" and torch.equal(getattr(back, f), getattr(lay, f)), f
    for f in ("mask", "max_seqlen_q", "max_seqlen_k", "seqlens_q", "seqlens_k", "seg_row", "seg_anchor"):
        assert getattr(back, f) == getattr(lay, f), f


@needs_ds
def test_configure_sequence_parallel_wiring(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from anchorcontext.parallel import SP_ATTN_NAME, configure_sequence_parallel, sp_state, unprepare_model_for_sp

    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(k, raising=False)
    model = _model(__import__("torch").float32)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert configure_sequence_parallel(model=model, training_args=args, sp_size=1) is args
    with pytest.raises(ValueError, match="needs DeepSpeed ZeRO-3"):
        configure_sequence_parallel(model=model, training_args=args, sp_size=2)
    args.deepspeed = _ds_config(3)
    with pytest.raises(ValueError, match="needs at least 2 processes, but the trainer sees world size 1"):
        configure_sequence_parallel(model=model, training_args=args, sp_size=2)
    args.deepspeed = None
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))  # as under torchrun with 2 ranks
    # the DeepSpeed config that `accelerate launch --config_file ...` passes in the environment counts too
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ValueError, match="zero_optimization.stage=2"):
        configure_sequence_parallel(model=model, training_args=args, sp_size=2)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.join(ROOT, "configs", "accelerate", "ds_zero3.json"))
    configure_sequence_parallel(model=model, training_args=args, sp_size=2)
    unprepare_model_for_sp(model)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    args.parallelism_config = None
    args.deepspeed = _ds_config(2)
    with pytest.raises(ValueError, match="zero_optimization.stage=2"):
        configure_sequence_parallel(model=model, training_args=args, sp_size=2)
    args.deepspeed = _ds_config(3)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by sp_size=3"):
        configure_sequence_parallel(model=model, training_args=args, sp_size=3)
    out = configure_sequence_parallel(model=model, training_args=args, sp_size=2)
    pc = out.parallelism_config
    assert (pc.sp_size, pc.sp_backend, pc.sp_handler.sp_attn_implementation) == (2, "deepspeed", SP_ATTN_NAME)
    assert model.config._attn_implementation == SP_ATTN_NAME and sp_state(model)["sp_size"] == 2
    unprepare_model_for_sp(model)
    assert model.config._attn_implementation == "anchor" and sp_state(model) is None


@pytest.mark.parametrize("stock", ["flash_attention_2", "flex_attention", "kernels-community/fake-attn"])
@pytest.mark.parametrize("patched", [False, True])
def test_sp_refuses_a_model_kept_on_another_attention_implementation(stock, patched, monkeypatch):
    """patch_model keeps a flash / flex / kernels-hub name (its guarded entry runs the anchor forwards); SP would
    rename the model to anchor_sp, and transformers' flash path reads its kernel from that name, so plain forwards
    would fail. prepare_model_for_sp refuses such a model and leaves it as it was."""
    import transformers

    import anchorcontext as ac
    from anchorcontext.parallel import SP_ATTN_NAME, prepare_model_for_sp, sp_state, unprepare_model_for_sp
    from anchorcontext.patches import patch_state

    if stock not in transformers.AttentionInterface._global_mapping:  # a kernels-hub name, registered on load
        monkeypatch.setitem(transformers.AttentionInterface._global_mapping, stock,
                            transformers.AttentionInterface._global_mapping["sdpa"])  # fmt: skip
    model = _model(__import__("torch").float32)
    model.config._attn_implementation = stock  # as from_pretrained(attn_implementation=stock) leaves it
    if patched:
        ac.patch_model(model)
        assert patch_state(model)["name"] == stock
    with pytest.raises(ValueError, match=rf"attn_implementation {stock!r}.*'sdpa'"):
        prepare_model_for_sp(model, sp_size=1, group_fn=lambda: None)
    assert model.config._attn_implementation == stock and sp_state(model) is None
    assert ac.is_patched(model) == patched
    # control: the same model on sdpa is prepared
    if patched:
        ac.unpatch_model(model)
    model.set_attn_implementation("sdpa")
    prepare_model_for_sp(model, sp_size=1, group_fn=lambda: None)
    assert model.config._attn_implementation == SP_ATTN_NAME
    unprepare_model_for_sp(model)
    assert model.config._attn_implementation == "anchor"


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



LR = 10.0  # SGD step: delta / LR is the gradient (large LR keeps fp32 rounding of the update at ~1e-8 relative)


def _ds_config(stage=3, ga=1, **zero):
    return {
        "zero_optimization": {"stage": stage, **zero},
        "train_micro_batch_size_per_gpu": len(ROWS),
        "gradient_accumulation_steps": ga,
        "gradient_clipping": 1e9,  # computed (reported), never applied
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _full_params(model) -> dict:
    """Full (unpartitioned) fp64 copies of a ZeRO-3 / DDP / plain model's parameters, by HF name."""
    import contextlib

    import torch

    inner = getattr(model, "module", model)
    params = list(inner.named_parameters())
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    with ctx:
        return {n: p.detach().to(torch.float64).clone() for n, p in params}


def _step_ratio(before: dict, after: dict, ref_grads: dict, lr: float = LR) -> dict:
    """Compare the applied SGD update with ``lr * reference gradient``."""
    import torch

    num = sum(float(((before[n] - after[n]) / lr).pow(2).sum()) for n in ref_grads)
    den = sum(float(g.to(torch.float64).pow(2).sum()) for g in ref_grads.values())
    worst = max(_rel((before[n] - after[n]) / lr, ref_grads[n].to(torch.float64)) for n in ref_grads)
    return {"grad_norm_ratio": (num / den) ** 0.5, "grad_max_rel": worst, "ref_grad_norm": den ** 0.5}


def _reference_steps(base, batches):
    """Single-process token-weighted gradient over ``batches`` (one optimizer step) and its loss."""
    import copy

    import anchorcontext
    from anchorcontext.parallel import count_targets, sp_causal_lm_loss

    model = anchorcontext.patch_model(copy.deepcopy(base), backend="sdpa")
    n = sum(int(count_targets(_shift(b["labels"]))) for b in batches)
    total = 0.0
    for b in batches:
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], anchor_layout=b["anchor_layout"])
        loss, s, _ = sp_causal_lm_loss(out.logits, _shift(b["labels"]), num_items_in_batch=n, grad_accum=1)
        loss.backward()
        total += float(s)
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}, total / n


def scenario_zero3_accelerate(rank, world, res):
    """ZeRO-3 + Ulysses SP=2 through accelerate, 2 accumulated micro-batches with different target counts."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

    import anchorcontext
    from anchorcontext.parallel import count_targets, make_parallelism_config, prepare_model_for_sp, sp_causal_lm_loss

    P, GA = world, 2
    base = _model(torch.float32)
    ref_grads, ref_loss = _reference_steps(base, [_collate(ROWS, P), _collate(ROWS_B, P)])
    before = _full_params(base)

    acc = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_ds_config(3, GA)),
        # the step boundary is every GA micro-batches (the SP adapter yields P micro-batches per DP batch)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=GA, sync_with_dataloader=False),
        parallelism_config=make_parallelism_config(P), kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    res["num_processes"] = acc.num_processes
    model = prepare_model_for_sp(base, sp_size=P, backend="sdpa")
    loader = torch.utils.data.DataLoader(
        _features(ROWS) + _features(ROWS_B), batch_size=len(ROWS), shuffle=False,
        collate_fn=anchorcontext.AnchorCollator(anchor_id=1, pad_id=0, pad_to_multiple_of=P),
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine, opt, loader = acc.prepare(model, opt, loader)
    from deepspeed.utils import groups

    group = groups._get_sequence_parallel_group()
    it = iter(loader)
    micro = [next(it) for _ in range(GA)]  # rank 0's batch, then rank 1's, each sharded over the SP group
    n = sum(count_targets(m["shift_labels"], group) for m in micro)  # (all-reduce over DP too when DP > 1)
    logged = 0.0
    for m in micro:
        with acc.accumulate(engine):
            out = engine(input_ids=m["input_ids"], position_ids=m["position_ids"], anchor_layout=m["anchor_layout"])
            loss, s, _ = sp_causal_lm_loss(out.logits, m["shift_labels"], sp_group=group, num_items_in_batch=n,
                                           dp_size=1, grad_accum=GA)
            acc.backward(loss)
            logged += float(s)
    res["loss_rel"] = abs(logged / float(n) - ref_loss) / ref_loss
    res["ds_grad_norm_rel"] = abs(float(engine.get_global_grad_norm()) - _step_ratio(before, before, ref_grads)["ref_grad_norm"]) / \
        _step_ratio(before, before, ref_grads)["ref_grad_norm"]
    res.update(_step_ratio(before, _full_params(engine), ref_grads))

    # the trap that check_deepspeed_config_for_sp refuses: ZeRO-2, same SP groups, same loss recipe
    import deepspeed

    model2 = _model(torch.float32)
    prepare_model_for_sp(model2, sp_size=P, backend="sdpa")
    cfg2 = _ds_config(2, GA)
    cfg2["train_batch_size"] = len(ROWS) * GA  # DP = world / P = 1
    eng2, _, _, _ = deepspeed.initialize(model=model2, optimizer=torch.optim.SGD(model2.parameters(), lr=LR),
                                         config=cfg2, mpu=groups.mpu)  # the SP mpu from above
    for i, m in enumerate(micro):
        eng2.set_gradient_accumulation_boundary(i == GA - 1)
        out = eng2(input_ids=m["input_ids"], position_ids=m["position_ids"], anchor_layout=m["anchor_layout"])
        loss, _, _ = sp_causal_lm_loss(out.logits, m["shift_labels"], sp_group=group, num_items_in_batch=n,
                                       grad_accum=GA)
        eng2.backward(loss)
        eng2.step()
    res["zero2"] = _step_ratio(before, _full_params(eng2), ref_grads)


def _trainer_run(rank, world, res, *, mixin: bool, chunked: bool = False):
    """HF Trainer with ZeRO-3 + Ulysses SP=2 wired by configure_sequence_parallel; one SGD step over 4 rows in
    2 accumulated micro-batches (their target counts differ). ``mixin``: SequenceParallelLossMixin; else the
    stock Trainer, whose SP loss weighs the micro-batches equally. ``chunked``: the model is patched with
    ``chunked_loss=True``, so each rank's loss is the chunked sum over its shard (no logits)."""
    import tempfile

    import torch
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    import anchorcontext
    from anchorcontext.parallel import configure_sequence_parallel, sequence_parallel_trainer_class

    P = world
    GA = 2
    rows = ROWS + ROWS_B
    # CPU host: accelerate would pick world size 1; a pre-configured DeepSpeed state on gloo is reused by Trainer
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    base = _model(torch.float32)
    # the step covers all rows whatever the sampler's order: its token-weighted gradient is order-invariant
    ref_grads, ref_loss = _reference_steps(base, [_collate(rows, P)])
    before = _full_params(base)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, gradient_accumulation_steps=GA, max_steps=1,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1e9,
        deepspeed=_ds_config(3, GA), remove_unused_columns=False, report_to=[], save_strategy="no", logging_steps=1,
        accelerator_config={"use_configured_state": True}, disable_tqdm=True, seed=1,
    )
    args = configure_sequence_parallel(model=base, training_args=args, sp_size=P)
    anchorcontext.patch_model(base, backend="sdpa", chunked_loss=chunked, loss_chunk_tokens=5)
    if chunked:  # count the chunked losses the mixin asks for (summed over the rank's shard)
        from anchorcontext.patches import loss_hook

        calls = res.setdefault("chunked_calls", [0])
        inner = loss_hook.chunked_lm_loss

        def counted(*a, summed=False, **k):
            calls[0] += bool(summed)
            return inner(*a, summed=summed, **k)

        loss_hook.chunked_lm_loss = counted
    cls = sequence_parallel_trainer_class(Trainer) if mixin else Trainer
    # features: one dataset row per packed row; the Trainer's DP split gives rank r every other batch
    trainer = cls(model=base, args=args, train_dataset=_features(rows),
                  data_collator=anchorcontext.AnchorCollator(anchor_id=1, pad_id=0, pad_to_multiple_of=P))
    out = trainer.train()
    res["world_size"] = args.world_size
    res["loss_rel"] = abs(out.training_loss - ref_loss) / ref_loss
    logged = [h for h in trainer.state.log_history if "loss" in h]
    res["logged_loss_rel"] = abs(logged[0]["loss"] - ref_loss) / ref_loss if logged else None
    res["logged_grad_norm_rel"] = None
    if logged and logged[0].get("grad_norm") is not None:
        ref_norm = _step_ratio(before, before, ref_grads)["ref_grad_norm"]
        res["logged_grad_norm_rel"] = abs(logged[0]["grad_norm"] - ref_norm) / ref_norm
    res.update(_step_ratio(before, _full_params(trainer.model_wrapped), ref_grads))


def scenario_trainer(rank, world, res):
    _trainer_run(rank, world, res, mixin=True)


def scenario_trainer_chunked(rank, world, res):
    _trainer_run(rank, world, res, mixin=True, chunked=True)


def scenario_trainer_stock(rank, world, res):
    _trainer_run(rank, world, res, mixin=False)


def scenario_fsdp2(rank, world, res):
    """FSDP2 (``torch.distributed.fsdp.fully_shard`` per decoder layer + root, what accelerate's fsdp2.yaml applies;
    accelerate itself enables FSDP only on GPU hosts) with the anchor patch: rank r trains on its own batch."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import anchorcontext
    from anchorcontext.parallel import count_targets, sp_causal_lm_loss

    dist.init_process_group("gloo")
    base = _model(torch.float32)
    batches = [_collate(ROWS), _collate(ROWS_B)]
    ref_grads, ref_loss = _reference_steps(base, batches)
    model = anchorcontext.patch_model(base, backend="sdpa")
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    b = batches[rank]
    n = count_targets(_shift(b["labels"]))
    dist.all_reduce(n)
    out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], anchor_layout=b["anchor_layout"])
    loss, s, _ = sp_causal_lm_loss(out.logits, _shift(b["labels"]), num_items_in_batch=n, dp_size=world)
    loss.backward()
    dist.all_reduce(s)
    res["loss_rel"] = abs(float(s) / float(n) - ref_loss) / ref_loss
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}  # FSDP2 averages over the DP ranks
    res["sharded"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    res["grad"] = max(_rel(grads[k], ref_grads[k]) for k in ref_grads)
    res["n_params"] = sum(1 for k in ref_grads if k in grads)


def scenario_ddp(rank, world, res):
    """Plain DDP through accelerate (no SP): rank r trains on its own batch; one SGD step."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    import anchorcontext
    from anchorcontext.parallel import count_targets, sp_causal_lm_loss

    base = _model(torch.float32)
    batches = [_collate(ROWS), _collate(ROWS_B)]
    ref_grads, ref_loss = _reference_steps(base, batches)
    before = _full_params(base)
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    res["num_processes"] = acc.num_processes
    model = anchorcontext.patch_model(base, backend="sdpa")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt = acc.prepare(model, opt)
    b = batches[rank]
    # token-weighted over the global batch: N counted on every rank; DDP averages, so scale by the DP size
    n = acc.reduce(count_targets(_shift(b["labels"])), reduction="sum")
    out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], anchor_layout=b["anchor_layout"])
    loss, s, _ = sp_causal_lm_loss(out.logits, _shift(b["labels"]), num_items_in_batch=n, dp_size=world)
    acc.backward(loss)
    opt.step()
    res["loss_rel"] = abs(float(acc.reduce(s, reduction="sum")) / float(n) - ref_loss) / ref_loss
    res.update(_step_ratio(before, _full_params(acc.unwrap_model(model)), ref_grads))


def _worker_main(scenario: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    res: dict = {}
    code = 0
    try:
        if scenario == "ulysses":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        globals()[f"scenario_{scenario}"](rank, world, res)
    except BaseException:  # reported to the pytest side through the result file
        res["error"] = traceback.format_exc()
        code = 1
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(RuntimeError):  # a peer that failed may be gone already
        if code == 0 and dist.is_initialized():
            dist.barrier()
    os._exit(code)


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
