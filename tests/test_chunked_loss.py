"""The chunked loss (anchorcontext.loss + patch_model(chunked_loss=...)) against the stock HF loss and the dense
float64 oracle: loss and every parameter gradient, on awkward cases."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import config_kwargs, make_model

import anchorcontext as ac
from anchorcontext.loss import (
    chunked_linear_cross_entropy,
    chunked_module_cross_entropy,
    reference_cross_entropy,
)
from anchorcontext.patches import loss_hook

RTOL, ATOL = 1e-5, 1e-6


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b, rtol=RTOL, atol=ATOL):
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def _batch(B=2, L=23, seed=1, vocab=101):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    labels = ids.clone()
    labels[0, 3:9] = -100  # with chunk 5: chunk [5, 10) has all its targets -100 (labels 6..10 shifted by one)
    mask = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        mask[1, 15:] = 0  # right padding
        labels[1, 15:] = -100
    return ids, labels, mask


def _family(name):
    torch.manual_seed(0)
    if name == "llama_tied":
        cfg = transformers.LlamaConfig(**config_kwargs(tie_word_embeddings=True))
        return transformers.LlamaForCausalLM(cfg).train()
    if name == "cohere":  # logit_scale
        cfg = transformers.CohereConfig(**config_kwargs(logit_scale=0.25))
        return transformers.CohereForCausalLM(cfg).train()
    if name == "granite":  # logits_scaling
        cfg = transformers.GraniteConfig(**config_kwargs(logits_scaling=3.0))
        return transformers.GraniteForCausalLM(cfg).train()
    return make_model(name, "eager" if name.startswith("gemma") else "sdpa").train()


# ---------------------------------------------------------------- the pure-torch core vs the dense oracle


@pytest.mark.parametrize("path", ["linear", "module"])
@pytest.mark.parametrize("transform", [{}, {"scale": 0.3}, {"softcap": 2.0}, {"scale": 2.0, "softcap": 3.0}])
@pytest.mark.parametrize("bias", [False, True])
def test_core_matches_the_dense_reference_forward_and_backward(path, transform, bias):
    torch.manual_seed(0)
    N, H, V = 37, 16, 50
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if bias else None
    y = torch.randint(0, V, (N,))
    y[5:20] = -100  # chunk [8, 16) has no target at all; [0, 8) and [16, 24) are cut by it
    leaves = [t for t in (h, W, b) if t is not None]
    ref = reference_cross_entropy(h, W, b, y, **transform)  # float32, all (N, V) logits at once
    g_ref = torch.autograd.grad(ref, leaves)
    if path == "linear":
        got = chunked_linear_cross_entropy(h, W, b, y, chunk_size=8, **transform)
    else:
        got = chunked_module_cross_entropy(h, lambda x: torch.nn.functional.linear(x, W, b), y, chunk_size=8, **transform)
    g_got = torch.autograd.grad(got, leaves)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=RTOL, atol=ATOL)


def test_core_bf16_error_within_twice_the_stock_bf16_error():
    torch.manual_seed(0)
    N, H, V = 300, 64, 500
    h64 = torch.randn(N, H, dtype=torch.float64)
    W64 = torch.randn(V, H, dtype=torch.float64) / 8
    y = torch.randint(0, V, (N,))
    y[::7] = -100

    def run(fn, dtype):
        h = h64.to(dtype).requires_grad_()
        W = W64.to(dtype).requires_grad_()
        loss = fn(h, W)
        return (loss.double(), *(g.double() for g in torch.autograd.grad(loss, (h, W))))

    ref = run(lambda h, W: reference_cross_entropy(h, W, None, y, dtype=torch.float64, softcap=5.0), torch.float64)
    stock = run(lambda h, W: torch.nn.functional.cross_entropy(
        torch.tanh((h @ W.t()).float() / 5.0) * 5.0, y, ignore_index=-100, reduction="sum"), torch.bfloat16)
    ours = run(lambda h, W: chunked_linear_cross_entropy(h, W, None, y, chunk_size=64, softcap=5.0), torch.bfloat16)
    for o, s, r in zip(ours, stock, ref):
        assert (o - r).abs().max() <= 2 * (s - r).abs().max() + 1e-6


# ---------------------------------------------------------------- the model: equal to the stock HF loss


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "gemma2", "gemma3", "cohere", "granite"])
def test_model_loss_and_every_gradient_equal_stock(family):
    _assert_chunked_equals_stock(_family(family))


def _assert_chunked_equals_stock(stock):
    """A deep copy of ``stock`` with the chunked loss (chunks of 5 tokens): loss, logits=None, every gradient."""
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss=True, loss_chunk_tokens=5)
    ids, labels, mask = _batch(vocab=stock.config.vocab_size)
    ref = stock(input_ids=ids, labels=labels, attention_mask=mask)
    ref.loss.backward()
    out = model(input_ids=ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    _assert_same_grads(stock, model)


def test_output_holds_no_logits_in_any_view():
    """``logits=None`` in the attribute, the mapping and the tuple: accelerate's mixed-precision wrapper
    (``convert_to_fp32``) and DeepSpeed rebuild a ModelOutput from its items, so a stale item would come back
    (the first call's one-position probe logits, shape (B, 1), reached the SP trainer that way)."""
    from accelerate.utils import convert_to_fp32

    model = ac.patch_model(_family("llama"), chunked_loss=True, loss_chunk_tokens=5)
    ids, labels, mask = _batch()
    for _ in range(2):  # the first call probes the head (keeps one position's logits), the second does not
        out = model(input_ids=ids, labels=labels, attention_mask=mask)
        assert out.logits is None and "logits" not in out  # the mapping's keys
        assert convert_to_fp32(out).logits is None
        assert out.to_tuple()[0] is out.loss
        assert not any(torch.is_tensor(t) and t.dim() == 3 for t in out.to_tuple())
        tup = model(input_ids=ids, labels=labels, attention_mask=mask, return_dict=False)
        assert not any(torch.is_tensor(t) and t.dim() == 3 for t in tup)


def test_transform_is_read_from_the_family():
    assert loss_hook._logit_transform(_family("cohere")) == (0.25, None)
    assert loss_hook._logit_transform(_family("granite")) == (pytest.approx(1 / 3), None)
    assert loss_hook._logit_transform(_family("gemma2")) == (None, 30.0)
    assert loss_hook._logit_transform(_family("llama")) == (None, None)


def test_gradient_accumulation_with_num_items_in_batch_equals_stock():
    stock = _family("llama")
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss=True, loss_chunk_tokens=4)
    micro = [_batch(seed=s) for s in (1, 2)]
    n = sum(int((lab[:, 1:] != -100).sum()) for _, lab, _ in micro)
    for m in (stock, model):
        for ids, lab, mask in micro:
            m(input_ids=ids, labels=lab, attention_mask=mask, num_items_in_batch=torch.tensor(n)).loss.backward()
    _assert_same_grads(stock, model)


def test_shift_labels_and_summed_loss_for_sequence_parallelism():
    stock = _family("llama")
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss=True, loss_chunk_tokens=4)
    ids, labels, mask = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    ref = stock(input_ids=ids, labels=labels, attention_mask=mask).loss  # stock needs labels to compute any loss
    torch.testing.assert_close(model(input_ids=ids, shift_labels=shift, attention_mask=mask).loss, ref)
    with loss_hook.summed_loss():
        total = model(input_ids=ids, shift_labels=shift, attention_mask=mask).loss
    torch.testing.assert_close(total, ref * (shift != -100).sum(), rtol=RTOL, atol=1e-4)


def test_gradient_checkpointing_and_anchor_batch_equal_stock():
    stock = _family("llama")
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss=True, loss_chunk_tokens=6)
    ac.patch_model(stock)  # same attention for both, stock loss
    for m in (stock, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = ac.anchor_inputs(torch.tensor([[0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, -1, -1]]))
    batch["input_ids"] = torch.randint(3, 101, batch["position_ids"].shape, generator=torch.Generator().manual_seed(0))
    batch["labels"] = batch["anchor_layout"].labels(batch["input_ids"])
    ref = stock(**batch)
    ref.loss.backward()
    out = model(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    _assert_same_grads(stock, model)


def test_lora_on_the_head_uses_the_module_path_and_equals_stock():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    stock = peft.get_peft_model(_family("llama"), cfg)
    model = copy.deepcopy(stock)
    ac.patch_model(model, chunked_loss=True, loss_chunk_tokens=5)
    assert loss_hook._head_path(model.get_output_embeddings()) == "module"
    ids, labels, mask = _batch()
    ref = stock(input_ids=ids, labels=labels, attention_mask=mask)
    ref.loss.backward()
    out = model(input_ids=ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    _assert_same_grads(stock, model)
    assert any("lm_head.lora_A" in n for n in _grads(model))


def test_without_labels_the_forward_is_stock_and_unpatch_restores_it():
    stock = _family("llama").eval()
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss=True)
    ids, _, _ = _batch(B=1)
    torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)
    gen = dict(max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(model.generate(ids[:, :5], **gen), stock.generate(ids[:, :5], **gen))
    assert "forward" in model.__dict__
    ac.unpatch_model(model)
    assert "forward" not in model.__dict__ and not model.model._forward_hooks
    assert model(input_ids=ids, labels=ids).logits is not None
    ac.patch_model(model, chunked_loss=True)
    ac.patch_model(model, chunked_loss=False)  # a second call turns it off again
    assert model(input_ids=ids, labels=ids).logits is not None
    assert not ac.patches.loss_hook.uses_chunked_loss(model)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_chunk_size_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=rf"loss_chunk_tokens must be an int >= 1.*{bad!r}"):
        ac.patch_model(_family("llama"), chunked_loss=True, loss_chunk_tokens=bad)


def test_bad_option_and_a_head_that_is_not_linear_are_refused():
    with pytest.raises(ValueError, match=r"chunked_loss must be one of .*'yes'"):
        ac.patch_model(_family("llama"), chunked_loss="yes")
    model = _family("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, 101))
    with pytest.raises(ValueError, match=r"linear output head.*Sequential"):
        ac.patch_model(model, chunked_loss=True)


def test_liger_asked_for_but_not_importable_is_refused(monkeypatch):
    monkeypatch.setattr(loss_hook, "liger_available", lambda: "liger-kernel is not importable (ImportError: x)")
    with pytest.raises(ValueError, match=r"chunked_loss='liger' but liger-kernel is not importable"):
        ac.patch_model(_family("llama"), chunked_loss="liger")


def test_auto_picks_ours_on_cpu_and_liger_on_cuda_when_importable(monkeypatch, caplog):
    monkeypatch.setattr(loss_hook, "liger_available", lambda: None)  # a stand-in: Liger never runs here
    assert loss_hook.resolve_chunked_loss("auto", torch.device("cuda")) == "liger"
    assert loss_hook.resolve_chunked_loss("liger", torch.device("cuda")) == "liger"
    with caplog.at_level("INFO", logger="anchorcontext"):
        assert loss_hook.resolve_chunked_loss("auto", torch.device("cpu")) == "chunked"
    assert "not CUDA" in caplog.text
    monkeypatch.setattr(loss_hook, "liger_available", lambda: "no liger")
    assert loss_hook.resolve_chunked_loss("auto", torch.device("cuda")) == "chunked"
    assert loss_hook.resolve_chunked_loss(False, torch.device("cuda")) is None


def test_liger_dispatch_calls_the_fused_kernel_with_the_head(monkeypatch):
    """The "liger" path with a stand-in for liger_fused_linear_cross_entropy (a CPU dense CE): plumbing only."""
    import sys
    import types

    calls = []

    def standin(h, w, y, b=None, ignore_index=-100, reduction="mean", softcap=None):
        calls.append((h.shape, w is model.lm_head.weight, softcap, reduction))
        return reference_cross_entropy(h, w, b, y, softcap=softcap)

    mod = types.ModuleType("liger_kernel.transformers.functional")
    mod.liger_fused_linear_cross_entropy = standin
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", mod)
    stock = _family("llama")
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss="liger")
    ids, labels, mask = _batch()
    out = model(input_ids=ids, labels=labels, attention_mask=mask)
    assert calls == [((2 * 23, 32), True, None, "sum")]
    torch.testing.assert_close(out.loss, stock(input_ids=ids, labels=labels, attention_mask=mask).loss)


def test_a_deep_copy_runs_its_own_weights_not_the_original_model():
    """TRL / users deep-copy models (reference models): the copy's chunked forward must use the copy."""
    model = ac.patch_model(_family("llama"), chunked_loss=True, loss_chunk_tokens=5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    ids, labels, mask = _batch()
    twin(input_ids=ids, labels=labels, attention_mask=mask).loss.backward()
    assert twin.lm_head.weight.grad is not None and model.lm_head.weight.grad is None
    ac.unpatch_model(twin)
    ref = twin(input_ids=ids, labels=labels, attention_mask=mask).loss
    ac.patch_model(twin, chunked_loss=True, loss_chunk_tokens=5)
    torch.testing.assert_close(twin(input_ids=ids, labels=labels, attention_mask=mask).loss, ref)
    assert not torch.allclose(model(input_ids=ids, labels=labels, attention_mask=mask).loss, ref)


def test_a_refused_option_leaves_the_model_unpatched():
    model = _family("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, 101))
    with pytest.raises(ValueError, match="linear output head"):
        ac.patch_model(model, chunked_loss=True)
    assert not ac.is_patched(model) and "forward" not in model.__dict__


def test_eval_under_no_grad_gives_the_stock_loss():
    stock = _family("llama").eval()
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss=True, loss_chunk_tokens=7)
    ids, labels, mask = _batch()
    with torch.no_grad():
        ref = stock(input_ids=ids, labels=labels, attention_mask=mask).loss
        out = model(input_ids=ids, labels=labels, attention_mask=mask)
    assert out.logits is None and not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref, rtol=RTOL, atol=ATOL)


class _DoubledLogits(transformers.LlamaForCausalLM):
    """A family with a logit post-processing anchorcontext does not know (logits * 2, as Muse Glimmer's
    output multiplier or MiniCPM's width scaling would be)."""

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        if out.logits is not None:
            out.logits = out.logits * 2
        return out


def test_an_unknown_logit_transform_is_refused_at_the_first_forward_never_silently_wrong(caplog):
    model = ac.patch_model(_DoubledLogits(_family("llama").config), chunked_loss=True, loss_chunk_tokens=5)
    ids, labels, mask = _batch()
    with pytest.raises(ValueError, match=r"does not reproduce the model's own logits.*chunked_loss=False"):
        model(input_ids=ids, labels=labels, attention_mask=mask)
    auto = ac.patch_model(_DoubledLogits(_family("llama").config), chunked_loss="auto")
    with caplog.at_level("WARNING", logger="anchorcontext"):
        out = auto(input_ids=ids, labels=labels, attention_mask=mask)
    assert "keeps the stock loss for _DoubledLogits" in caplog.text
    assert out.logits is not None and not loss_hook.uses_chunked_loss(auto)  # the stock loss, from now on


def test_moe_router_aux_loss_is_added_as_stock_adds_it():
    cfg = transformers.MixtralConfig(**config_kwargs(num_local_experts=4, num_experts_per_tok=2,
                                                     output_router_logits=True, router_aux_loss_coef=0.5))
    torch.manual_seed(0)
    stock = transformers.MixtralForCausalLM(cfg).train()
    model = ac.patch_model(copy.deepcopy(stock), chunked_loss=True, loss_chunk_tokens=5)
    ids, labels, mask = _batch()
    ref = stock(input_ids=ids, labels=labels, attention_mask=mask)
    assert ref.aux_loss is not None and float(ref.aux_loss) > 0
    ref.loss.backward()
    out = model(input_ids=ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=RTOL, atol=ATOL)
    _assert_same_grads(stock, model)


def _zoo_model(model_type):
    from anchorcontext import zoo

    cls = dict(zoo.causal_lm_classes())[model_type]
    torch.manual_seed(0)
    return zoo.build(model_type, cls).eval()  # dropout off (OPT's config has it); gradients still flow


def test_a_causal_lm_that_calls_its_decoder_directly_equals_stock():
    """OPTForCausalLM calls ``self.model.decoder``, not its base model: the hidden states are taken from the
    decoder (the zoo caught the first version raising here)."""
    _assert_chunked_equals_stock(_zoo_model("opt"))


def test_layers_between_the_decoder_and_the_head_are_refused_by_name(caplog):
    """ElectraForCausalLM runs a dense + LayerNorm between its decoder and its head (64 -> 128 features): a named
    ValueError for chunked_loss=True, the stock loss (with a warning) for "auto"; never a shape error."""
    model = ac.patch_model(_zoo_model("electra"), chunked_loss=True)
    ids, labels, mask = _batch(vocab=model.config.vocab_size)
    with pytest.raises(ValueError, match=r"has 64 features but the output head of ElectraForCausalLM takes 128"):
        model(input_ids=ids, labels=labels, attention_mask=mask)
    stock = _zoo_model("electra")
    auto = ac.patch_model(copy.deepcopy(stock), chunked_loss="auto")
    with caplog.at_level("WARNING", logger="anchorcontext"):
        out = auto(input_ids=ids, labels=labels, attention_mask=mask)
    assert "keeps the stock loss for ElectraForCausalLM" in caplog.text and out.logits is not None
    torch.testing.assert_close(out.loss, stock(input_ids=ids, labels=labels, attention_mask=mask).loss)
