"""The memory plan: hand-computed arithmetic, bad inputs, and `anchorcontext train --dry_run` printing it.

The estimate against measured CPU peaks is benchmarks/memory_plan.py (results in benchmarks/results/cpu/).
"""

import json

import pytest

from anchorcontext.memory import GIB, KNOWN_MODELS, OVERLAP, ModelDims, format_plan, plan_memory, variant_key

LLAMA3 = KNOWN_MODELS["meta-llama/Meta-Llama-3-8B"]
LLAMA2 = KNOWN_MODELS["meta-llama/Llama-2-7b-hf"]
CPU = dict(device_reserve_gib=0, fragmentation=0, variants=False)


def test_parameters_of_the_recipe_models():
    # the counts the meta-device builds of configs/*.yaml give (tests/test_training.py checks those)
    assert LLAMA3.parameters == 8_030_261_248
    assert LLAMA2.parameters == 6_738_415_616
    assert KNOWN_MODELS["Qwen/Qwen2.5-7B"].parameters == 7_615_616_512
    assert KNOWN_MODELS["mistralai/Mistral-7B-v0.3"].parameters == 7_248_023_552
    assert KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M"].parameters == 134_515_008


def test_dims_from_a_transformers_config_match_the_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    for cls, cfg in ((LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300)),
                     (Qwen2ForCausalLM, Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                                    tie_word_embeddings=True))):
        with torch.device("meta"):
            model = cls(cfg)
        assert ModelDims.from_config(cfg).parameters == sum(p.numel() for p in model.parameters())


def test_state_by_engine_hand_computed():
    P = LLAMA3.parameters
    kw = dict(model=LLAMA3, seq_len=4096, gradient_checkpointing=True, **CPU)
    # fp32 weights, no mixed precision, one rank: weights 4P, gradients 4P, Adam 8P
    c = plan_memory(engine="ddp", param_dtype="float32", mixed_precision="no", **kw).components
    assert (c["weights"], c["gradients"], c["optimizer state"]) == (4 * P, 4 * P, 8 * P)
    # ZeRO-3, bf16: 16-bit partition + fp32 master + gathered; moments 8P/N + one sub-group's fp32 gradient
    for n in (1, 8):
        c = plan_memory(engine="zero3", world_size=n, zero3_max_live_parameters=10**6, zero3_sub_group_size=1000,
                        **kw).components
        assert c["weights"] == 2 * P // n + 4 * P // n + 2 * 10**6
        assert c["optimizer state"] == 8 * P // n + 4 * 1000
    # offload: the optimizer state (and master weights, fp32 gradients) live in host RAM
    p = plan_memory(engine="zero3_offload", world_size=8, **kw)
    assert p.components["optimizer state"] == 0
    assert p.host["optimizer state"] == 8 * P // 8 and p.host["fp32 master weights"] == 4 * P // 8
    assert p.total < plan_memory(engine="zero3", world_size=8, **kw).total
    # FSDP2 under bf16: fp32 shards (accelerate upcasts) + the unsharded root and two layers in bf16
    c = plan_memory(engine="fsdp2", world_size=8, **kw).components
    root = LLAMA3.embedding_parameters + LLAMA3.hidden_size
    assert c["weights"] == 4 * P // 8 + (root + 2 * LLAMA3.layer_parameters) * 2


def test_activations_hand_computed():
    m = ModelDims(hidden_size=8, intermediate_size=16, num_layers=3, num_heads=2, num_kv_heads=1, vocab_size=50)
    L, a, h, I, d = 10, 4, 8, 16, 4
    per_tok_layer = 2 * (4 + a) * h + 4 * a * I + a * (2 * 2 * d + 2 * 1 * d) + 4 * 2
    final_norm, grad = L * (4 + a) * h, L * a * (2 * h + 2 * I)
    off = plan_memory(model=m, seq_len=L, param_dtype="float32", mixed_precision="no", gradient_checkpointing=False,
                      attention="sdpa", **CPU)
    assert off.components["activations (saved)"] == 3 * L * per_tok_layer + final_norm
    assert off.components["layer backward"] == grad
    on = plan_memory(model=m, seq_len=L, param_dtype="float32", mixed_precision="no", gradient_checkpointing=True,
                     attention="sdpa", **CPU)
    assert on.components["activations (saved)"] == 3 * L * a * h + final_norm  # one checkpoint per layer
    assert on.components["layer backward"] == L * per_tok_layer + grad  # one layer recomputed
    qkv_grads = L * (2 + 2) * d * a
    assert on.components["attention workspace"] == off.components["attention workspace"] == qkv_grads
    loss = L * 50 * 12  # fp32 log-softmax + 2 fp32 gradients (Trainer drops the logits before the backward)
    assert off.components["loss (stock)"] == loss
    # the loss is freed before the layers' backward; each layer's saved tensors go as its gradients come (one rank:
    # no persistent gradient buffer): the peak is the largest phase
    G = m.layer_parameters * 4
    other = m.parameters * 4 - 3 * G
    for p, S in ((on, L * a * h), (off, L * per_tok_layer)):
        c = p.components
        loss_phase = 3 * S + final_norm + loss
        layer_phase = other + c["layer backward"] + qkv_grads + max(3 * S + G, S + 3 * G)
        assert p.total == c["weights"] + c["optimizer state"] + max(loss_phase, layer_phase)
        assert c[OVERLAP] == p.total - sum(v for k, v in c.items() if k != OVERLAP) <= 0


def test_sequence_parallel_divides_activations_and_loss():
    kw = dict(model=LLAMA2, seq_len=65536, world_size=8, engine="zero3", gradient_checkpointing=True, **CPU)
    sp1, sp8 = plan_memory(sp_size=1, **kw).components, plan_memory(sp_size=8, **kw).components
    for k in ("activations (saved)", "layer backward"):  # 32 KV heads split evenly: exactly 1/8
        assert sp1[k] == 8 * sp8[k]
    assert sp1["loss (stock)"] == 8 * sp8["loss (stock)"]
    assert sp1["weights"] == sp8["weights"]  # ZeRO-3 already shards over all 8 ranks


def test_chunked_loss_drops_the_logits_term():
    kw = dict(model=LLAMA3, seq_len=131072, world_size=8, sp_size=8, engine="zero3", **CPU)
    stock = plan_memory(chunked_loss=False, **kw)
    chunked = plan_memory(chunked_loss=True, loss_chunk_tokens=1024, **kw)
    T, V = 131072 // 8, LLAMA3.vocab_size
    assert stock.components["loss (stock)"] == T * V * 12
    # ZeRO-3's head is a partitioned parameter: per-chunk checkpointed cross-entropy (the stock 12 bytes per element
    # on one chunk), one chunk's fp32 head-weight gradient, the hidden-state gradient assembled from the chunks
    assert "loss (stock)" not in chunked.components
    assert chunked.components["loss (chunked)"] == 1024 * V * 12 + 4 * V * 4096 + 2 * T * 4096 * 2
    def loss_phase(p, loss_key):  # ZeRO-3: the gradient buffer is persistent, live in the loss's phase too
        c = p.components
        return c["weights"] + c["gradients"] + c["optimizer state"] + c["activations (saved)"] + c[loss_key]

    assert stock.total == loss_phase(stock, "loss (stock)")  # 128K, stock: the loss's phase is the peak
    assert loss_phase(chunked, "loss (chunked)") <= chunked.total < stock.total - (T - 1024) * V * 12 // 2


def test_chunked_loss_fused_path_hand_computed():
    """A plain nn.Linear head (DDP) runs the fused Function (anchorcontext.loss): fp32 logits and one temporary per
    chunk, the previous chunk's gradient beside the next one's logits, fp32 grad_W (V, h) and grad_h (T, h) kept
    for the backward, which copies them once more; the larger phase counts."""
    smol = KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M"]
    h, V = 576, 49152
    kw = dict(model=smol, engine="ddp", chunked_loss=True, **CPU)
    fp32 = dict(param_dtype="float32", mixed_precision="no")
    assert plan_memory(seq_len=8192, loss_chunk_tokens=2048, **fp32, **kw).components["loss (chunked)"] == (
        2048 * V * 12 + 8192 * h * 4 + 4 * V * h)  # several chunks
    assert plan_memory(seq_len=2048, loss_chunk_tokens=8192, **fp32, **kw).components["loss (chunked)"] == (
        2048 * V * 8 + 2048 * h * 4 + 4 * V * h)  # one chunk
    small_vocab = ModelDims(hidden_size=h, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3,
                            vocab_size=512, head_dim=64)
    T = 65536  # bf16 weights, a long row and a small vocabulary: grad_h and the backward's copies dominate
    c = plan_memory(model=small_vocab, seq_len=T, loss_chunk_tokens=2048, engine="ddp", chunked_loss=True,
                    param_dtype="bfloat16", mixed_precision="no", **CPU).components
    assert c["loss (chunked)"] == 2 * T * h * 2 + 512 * h * (8 + 2)


def test_varlen_gather_kept_per_layer_without_checkpointing():
    kw = dict(model=LLAMA3, seq_len=8192, attention="varlen", **CPU)
    on = plan_memory(gradient_checkpointing=True, **kw).components["attention workspace"]
    off = plan_memory(gradient_checkpointing=False, **kw).components["attention workspace"]
    gathered = 2 * (8192 + 1) * 8 * 128 * 2
    assert off - on == (LLAMA3.num_layers - 1) * gathered


def test_fits_and_format():
    p = plan_memory(model=LLAMA3, seq_len=131072, world_size=8, sp_size=8, engine="zero3", device_memory_gib=80,
                    device_name="H100 80GB")
    assert p.fits is True and p.total < 80 * GIB
    text = format_plan(p)
    assert "8 x H100 80GB, 80.0 GiB each" in text and "fits:" in text and "zero3_offload" in text
    assert p.variants[variant_key("zero3", False, False)] > 80 * GIB  # no checkpointing at 128K: does not fit
    small = plan_memory(model=LLAMA3, seq_len=131072, world_size=8, sp_size=8, engine="zero3", device_memory_gib=24)
    assert small.fits is False and "does not fit" in format_plan(small)
    assert plan_memory(model=LLAMA3, seq_len=4096).fits is None
    json.dumps(p.to_dict())


@pytest.mark.parametrize("kw, match", [
    (dict(engine="zero2"), "engine"),
    (dict(sp_size=8, world_size=8, engine="ddp"), "sp_size=8 runs on DeepSpeed ZeRO-3"),
    (dict(sp_size=3, world_size=3, engine="zero3"), "seq_len=4096 is not divisible by sp_size=3"),
    (dict(world_size=6, sp_size=4, engine="zero3"), "world_size=6"),
    (dict(seq_len=0), "seq_len"),
    (dict(micro_batch=True), "micro_batch"),
    (dict(device_memory_gib=-1), "device_memory_gib"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(attention="flash"), "attention"),
    (dict(chunked_loss="yes"), "chunked_loss"),
    (dict(fragmentation=1.5), "fragmentation"),
])
def test_bad_inputs_name_the_field(kw, match):
    args = dict(model=LLAMA3, seq_len=4096)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        plan_memory(**args)
    with pytest.raises(ValueError, match="num_heads=32 is not divisible by num_kv_heads=5"):
        ModelDims(hidden_size=4096, intermediate_size=1, num_layers=1, num_heads=32, num_kv_heads=5, vocab_size=2)


def _plan_out(capsys, argv):
    from anchorcontext.training.args import parse_args
    from anchorcontext.training.train import dry_run

    info = dry_run(*parse_args(argv))
    out = capsys.readouterr().out
    recipe, end = json.JSONDecoder().raw_decode(out)
    return info, recipe, out[end:]


def test_dry_run_prints_the_plan_and_the_verdict(monkeypatch, capsys):
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["--config", "llama3-8b-128k", "--dry_run", "true", "--use_cpu", "true"]
    try:
        info, recipe, table = _plan_out(capsys, base + ["--sp_size", "8", "--dry_run_world_size", "8", "--deepspeed",
                                                        "configs/accelerate/ds_zero3.json", "--device_memory_gib", "80"])
    finally:
        unset_hf_deepspeed_config()
    assert recipe["memory_plan"]["fits"] is True and info["memory_plan"]["inputs"]["engine"] == "zero3"
    assert recipe["memory_plan"]["inputs"]["parameters"] == recipe["parameters"] == 8_030_261_248
    assert "8 x device given by --device_memory_gib, 80.0 GiB each" in table and "\n  fits: " in table
    # one 24 GiB device, DDP (no DeepSpeed config): the full 8B state alone does not fit
    _, recipe, table = _plan_out(capsys, base + ["--device_memory_gib", "24"])
    assert recipe["memory_plan"]["inputs"]["engine"] == "ddp" and "does not fit" in table


def test_engine_from_the_run_options(monkeypatch):
    from types import SimpleNamespace

    from anchorcontext.training.plan import engine_for_run

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    t = SimpleNamespace(deepspeed="configs/accelerate/ds_zero3_offload.json", fsdp=None)
    assert engine_for_run(t, 1)[0] == "zero3_offload"
    t.deepspeed = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="stage=2"):
        engine_for_run(t, 1)
    t.deepspeed = None
    assert engine_for_run(t, 4)[0] == "zero3" and engine_for_run(t, 1)[0] == "ddp"
    t.fsdp = ["full_shard"]
    assert engine_for_run(t, 1)[0] == "fsdp2"


def test_run_arguments_validate_the_plan_options():
    from anchorcontext.training.args import RunArguments

    with pytest.raises(ValueError, match="device_memory_gib must be a number > 0"):
        RunArguments(device_memory_gib=0)
    with pytest.raises(ValueError, match="dry_run_world_size=6 is not divisible by sp_size=4"):
        RunArguments(dry_run_world_size=6, sp_size=4)
    assert RunArguments(device_memory_gib=80).device_memory_gib == 80.0


def test_committed_cpu_validation_matches_the_current_plan():
    """benchmarks/results/cpu/memory_plan.json: every configuration within 15% of its measured peak, and its
    estimate is what plan_memory gives today (a change to the arithmetic must rerun benchmarks/memory_plan.py)."""
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from memory_plan import CONFIGS, estimate
    finally:
        sys.path.remove(str(root / "benchmarks"))
    result = json.loads((root / "benchmarks/results/cpu/memory_plan.json").read_text())
    assert len(result["results"]) == len(CONFIGS) >= 3
    for r in result["results"]:
        assert abs(r["estimated_bytes"] / r["measured_bytes"] - 1) <= 0.15, r["config"]
        assert estimate(r["config"]).total == r["estimated_bytes"], r["config"]
    for r in result["stock_loss_alone"]:
        assert abs(r["bytes_per_token_and_vocab"] - 12) < 0.05 * 12
    assert any(r["config"].get("chunked") for r in result["results"])
    assert {r["path"] for r in result["chunked_loss_alone"]} == {"fused", "module"}
    for r in result["chunked_loss_alone"]:  # the loss term alone, against what anchorcontext/loss.py allocates
        assert abs(r["relative_error"]) <= 0.15, r


def test_dry_run_of_a_hub_id_offline_uses_the_known_dims(monkeypatch, capsys):
    import importlib

    train = importlib.import_module("anchorcontext.training.train")

    def unreachable(margs):  # what AutoConfig.from_pretrained raises for a hub id it cannot read
        raise OSError(f"We couldn't connect to the hub to load {margs.model_name_or_path}")

    monkeypatch.setattr(train, "build_model_on_meta", unreachable)
    _, recipe, table = _plan_out(capsys, ["--model_name_or_path", "Qwen/Qwen2.5-7B", "--seq_len", "65536",
                                          "--dtype", "bfloat16", "--dry_run", "true", "--device_memory_gib", "80",
                                          "--output_dir", "runs/unused"])
    assert recipe["parameters"] == KNOWN_MODELS["Qwen/Qwen2.5-7B"].parameters and recipe["model_type"] is None
    assert "Qwen2.5-7B 7.62B params" in table and "does not fit" in table  # one device, pure bf16 DDP, no ckpt
