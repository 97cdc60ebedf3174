"""Model-level oracle for the Hugging Face integration.

For tiny random models of each supported family (float32, from configs): on a packed batch of 2 rows with
different layouts, every document's logits equal those of running ``[anchor] + document`` alone (or the
document alone for ``intra_doc``) with the same position ids; the packed loss's gradient equals the sum of
the per-document losses' gradients; the unpatched model on the same batch differs (negative control).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import ANCHOR, FAMILIES, PAD, VOCAB, make_model
from tiny_models import config_kwargs as _common

import anchorcontext as ac
from anchorcontext.patches import ATTN_NAME, ATTN_NAME_EAGER, patch_state

LENS = [[5, 3, 7], [1, 10, 2, 2]]  # row 0 is padded by 1 token (L = 17)
L = 17


def packed_batch(mask="anchor", positions="continuous", seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lens in LENS:
        ids = [ANCHOR] + torch.randint(3, VOCAB, (sum(lens),), generator=g).tolist()
        ids += [PAD] * (L - len(ids))
        rows.append({"input_ids": ids, "doc_lens": lens})
    return ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD, mask=mask, positions=positions)(rows)


def doc_pieces(batch):
    """(row, doc, packed indices, standalone indices) for every document."""
    d = batch["anchor_layout"].doc_ids
    mask = batch["anchor_layout"].mask
    for r in range(d.shape[0]):
        for doc in range(1, int(d[r].max()) + 1):
            idx = (d[r] == doc).nonzero().squeeze(1)
            alone = torch.cat([torch.tensor([0]), idx]) if mask == "anchor" else idx
            yield r, doc, idx, alone


def standalone_logits(model, batch, r, alone):
    ids = batch["input_ids"][r, alone][None]
    pos = batch["position_ids"][r, alone][None]
    # an all-ones mask stops stock attention from inferring packing from the position ids (ARCHITECTURE §3)
    return model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits[0]


def stock_attn(family):
    # Gemma2 needs eager for its softcap; the others use SDPA
    return "eager" if family == "gemma2" else "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mask,positions", [("anchor", "continuous"), ("anchor", "reset"), ("intra_doc", "continuous"), ("intra_doc", "reset")])
def test_packed_logits_equal_standalone(family, mask, positions):
    model = make_model(family, stock_attn(family))
    batch = packed_batch(mask, positions)
    with torch.no_grad():
        stock_packed = model(**{k: v for k, v in batch.items() if k != "anchor_layout"}).logits
        ac.patch_model(model)
        packed = model(**batch).logits
        worst = 0.0
        control = 0.0
        for r, doc, idx, alone in doc_pieces(batch):
            ref = standalone_logits(model, batch, r, alone)
            ref = ref[1:] if mask == "anchor" else ref
            worst = max(worst, (packed[r, idx] - ref).abs().max().item())
            control = max(control, (stock_packed[r, idx] - ref).abs().max().item())
    assert worst <= 1e-5, f"{family} {mask}/{positions}: max |packed - standalone| = {worst}"
    # negative control: the unpatched model lets documents see each other
    assert control > 1e-3, f"{family}: the unpatched model agrees with the oracle ({control}); the test cannot fail"


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_packed_gradient_equals_sum_of_document_gradients(family):
    model = make_model(family, stock_attn(family)).double()
    batch = packed_batch("anchor")
    # sdpa cannot softcap (Gemma2): "auto" then falls back to the dense reference on CPU
    ac.patch_model(model, backend="auto" if family == "gemma2" else "sdpa")
    labels = batch["labels"]
    logits = model(**batch).logits
    # summed token losses (shifted as HF does)
    lf = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    packed_grads = torch.autograd.grad(lf, [p for p in model.parameters()], allow_unused=True)
    total = None
    for r, doc, idx, alone in doc_pieces(batch):
        lab = labels[r, alone]
        out = standalone_logits(model, batch, r, alone)
        loss = torch.nn.functional.cross_entropy(out[:-1], lab[1:], ignore_index=-100, reduction="sum")
        if loss.grad_fn is None:
            continue
        g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        total = g if total is None else [a if b is None else (b if a is None else a + b) for a, b in zip(total, g)]
    worst = 0.0
    for a, b in zip(packed_grads, total):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        worst = max(worst, ((a - b).abs().max() / (b.abs().max() + 1e-12)).item())
    # HF's RMSNorm computes in float32 even in a float64 model, so agreement is at float32 rounding (~1e-8),
    # far below the ~1e-1 a leaked document or a lost anchor gradient produces
    assert worst < 1e-6, f"{family}: packed vs summed per-document gradient rel err {worst}"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_full_mode_equals_stock_causal(family):
    model = make_model(family)
    batch = packed_batch("full")
    with torch.no_grad():
        stock = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"])).logits
        ac.patch_model(model)
        ours = model(**batch).logits
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


def test_anchor_forward_builds_no_mask(monkeypatch):
    model = make_model("llama")
    ac.patch_model(model)
    seen = []
    fn = transformers.AttentionInterface._global_mapping[ATTN_NAME]

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append(attention_mask)
        return fn(module, q, k, v, attention_mask, **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, ATTN_NAME, spy)
    batch = packed_batch("anchor")
    with torch.no_grad():
        model(**batch)
        assert len(seen) == model.config.num_hidden_layers
        assert all(m is None for m in seen), "an anchor forward must not build the (B,1,L,L) mask"
        seen.clear()
        ids = batch["input_ids"]
        ids_mask = torch.ones_like(ids)
        ids_mask[0, -3:] = 0  # padding: stock transformers builds a real mask
        model(input_ids=ids, attention_mask=ids_mask)
        assert len(seen) == model.config.num_hidden_layers
        assert all(m is not None and m.shape[-2:] == (L, L) for m in seen)


def _generate(model, ids, mask):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
        return_dict_in_generate=True, use_cache=True, pad_token_id=PAD,
    )


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_identical_after_patch_with_left_padding(family):
    model = make_model(family, stock_attn(family))
    model.config.use_cache = True
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3] = PAD
    mask[1, :3] = 0  # left padding
    stock = _generate(model, ids, mask)
    ac.patch_model(model)
    ours = _generate(model, ids, mask)
    assert torch.equal(stock.sequences, ours.sequences)
    for a, b in zip(stock.scores, ours.scores):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_patch_roundtrip_idempotent_and_register():
    model = make_model("llama")
    assert model.config._attn_implementation == "sdpa"
    ac.patch_model(model)
    ac.patch_model(model, backend="sdpa")  # idempotent: updates the backend only
    assert model.config._attn_implementation == ATTN_NAME
    assert patch_state(model) == {"prev": "sdpa", "name": ATTN_NAME, "backend": "sdpa", "hf_packing": "intra_doc",
                                  "chunked_loss": False, "loss_chunk_tokens": 2048}
    assert len(model.model._forward_pre_hooks) == 1
    ac.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert not ac.is_patched(model) and len(model.model._forward_pre_hooks) == 0
    ac.unpatch_model(model)  # no-op

    eager = make_model("gemma2", "eager")
    ac.patch_model(eager)
    assert eager.config._attn_implementation == ATTN_NAME_EAGER
    ac.unpatch_model(eager)
    assert eager.config._attn_implementation == "eager"

    ac.register()
    cfg = make_model("llama").config
    m2 = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="anchor")
    assert m2.config._attn_implementation == ATTN_NAME
    ac.patch_model(m2)
    ac.unpatch_model(m2)
    assert m2.config._attn_implementation == "sdpa"


def test_registered_names_are_neutral():
    for name in (ATTN_NAME, ATTN_NAME_EAGER):
        assert not any(bad in name for bad in ("flash", "sdpa", "flex_attention", "/"))


def test_errors():
    model = make_model("llama")
    ac.patch_model(model)
    batch = packed_batch()
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=batch["input_ids"], anchor_layout=batch["anchor_layout"])
    with pytest.raises(ValueError, match="does not match"):
        model(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1], anchor_layout=batch["anchor_layout"])
    with pytest.raises(ValueError, match="generate"):
        model.generate(input_ids=batch["input_ids"], max_new_tokens=2, anchor_layout=batch["anchor_layout"],
                       position_ids=batch["position_ids"], use_cache=True, pad_token_id=PAD)
    with pytest.raises(ValueError, match="backend"):
        ac.patch_model(make_model("llama"), backend="nope")
    with pytest.raises(ValueError, match="anchor_mask"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], anchor_layout=batch["anchor_layout"],
              anchor_mask="full")


def test_doc_ids_kwarg_path():
    model = make_model("llama")
    ac.patch_model(model)
    batch = packed_batch()
    d = batch["anchor_layout"].doc_ids
    with torch.no_grad():
        a = model(**batch).logits
        b = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], anchor_doc_ids=d).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_transformers_version_gate():
    from anchorcontext import patches

    with pytest.raises(ImportError, match=r"transformers >= 5\.0\.0.*4\.57\.0"):
        patches.check_transformers_version("4.57.0")
    assert patches.check_transformers_version() == transformers.__version__


def test_non_attention_interface_model_refused():
    class Legacy(transformers.PreTrainedModel):
        config_class = transformers.LlamaConfig
        _supports_attention_backend = False

        def __init__(self, config):
            super().__init__(config)
            self.lin = torch.nn.Linear(2, 2)

    m = Legacy(transformers.LlamaConfig(**_common()))
    with pytest.raises(ValueError, match="AttentionInterface"):
        ac.patch_model(m)


def test_peft_prompt_learning_refused_and_lora_works():
    peft = pytest.importorskip("peft")
    base = make_model("llama")
    pt = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="virtual tokens"):
        ac.patch_model(pt)

    base = make_model("llama")
    lora = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    ac.patch_model(lora)
    batch = packed_batch()
    lora.train()
    if hasattr(lora, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        lora.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = lora(**batch)
    out.loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # the LoRA-wrapped model still computes the anchor layout (documents isolated)
    lora.eval()
    with torch.no_grad():
        packed = lora(**batch).logits
        for r, doc, idx, alone in doc_pieces(batch):
            ids = batch["input_ids"][r, alone][None]
            ref = lora(input_ids=ids, position_ids=batch["position_ids"][r, alone][None],
                       attention_mask=torch.ones_like(ids)).logits[0, 1:]
            assert (packed[r, idx] - ref).abs().max() < 1e-5


def test_autocast_mixed_qkv_dtypes():
    """Under autocast RoPE returns fp32 q/k beside a bf16 v; the anchor path must run in the autocast dtype. Every
    document (not only the first, where all masks agree) is within twice the stock model's own autocast error of
    its float32 standalone run, plus 1e-3."""
    model = make_model("llama")
    batch = packed_batch()
    pieces = list(doc_pieces(batch))
    assert len({(r, doc) for r, doc, *_ in pieces}) >= 2
    with torch.no_grad():
        ref32 = [standalone_logits(model, batch, r, alone) for r, _, _, alone in pieces]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stock16 = [standalone_logits(model, batch, r, alone) for r, _, _, alone in pieces]
    ac.patch_model(model, backend="sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    ac.unpatch_model(model)
    assert torch.isfinite(out.loss)
    for (r, doc, idx, _), x32, x16 in zip(pieces, ref32, stock16):
        e_anchor = (out.logits[r, idx].float() - x32[1:]).abs().max().item()
        e_stock = (x16[1:].float() - x32[1:]).abs().max().item()
        assert e_anchor <= 2 * e_stock + 1e-3, (r, doc, e_anchor, e_stock)


def test_auto_skips_flex_for_small_head_dim():
    from anchorcontext.attention import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, dtype=torch.float32, head_dim=8) == "sdpa"
    assert resolve_backend("auto", cuda, dtype=torch.float32, head_dim=64) == "flex"


# ---- refusals: anchor inputs on a model whose attention is not ours (issue 14 item 4) ----------------------------
def _anchor_call(model, batch):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], anchor_layout=batch["anchor_layout"])


def test_anchor_inputs_refused_on_never_patched_unpatched_and_reloaded_models(tmp_path):
    batch = packed_batch()
    model = make_model("llama")
    with torch.no_grad(), pytest.raises(ValueError, match=r"patch_model"):
        _anchor_call(model, batch)  # never patched
    ac.patch_model(model)
    ac.unpatch_model(model)
    with torch.no_grad(), pytest.raises(ValueError, match=r"patch_model"):
        _anchor_call(model, batch)  # unpatched
    ac.patch_model(model)
    model.save_pretrained(tmp_path / "m")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config._attn_implementation == "sdpa"
    with torch.no_grad(), pytest.raises(ValueError, match=r"patch_model"):
        model_out = _anchor_call(reloaded, batch)  # reloaded: the saved config names the stock implementation
    with torch.no_grad():
        model_out = _anchor_call(ac.patch_model(reloaded), batch).logits
        torch.testing.assert_close(model_out, _anchor_call(model, batch).logits, atol=0, rtol=0)


def test_anchor_inputs_refused_when_anchorcontext_is_imported_before_transformers():
    import subprocess
    import sys

    code = (
        "import torch, anchorcontext as ac, transformers\n"
        "cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, head_dim=8)\n"
        "m = transformers.LlamaForCausalLM(cfg).eval()\n"
        "b = ac.anchor_inputs(torch.tensor([[0, 1, 1, 2, 2]]))\n"
        "try:\n    m(input_ids=torch.tensor([[1, 5, 6, 7, 8]]), **b)\nexcept ValueError as e:\n    print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert "REFUSED" in out.stdout and "patch_model" in out.stdout, out.stdout + out.stderr[-3000:]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_anchor_collator_under_trainer_refused_on_unpatched_model(tmp_path, attn):
    model = make_model("llama", attn)
    model.train()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": [ANCHOR] + torch.randint(3, VOCAB, (sum(lens),), generator=g).tolist(), "doc_lens": lens}
            for lens in LENS]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        remove_unused_columns=False, save_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD))
    with pytest.raises(ValueError, match=r"patch_model"):
        trainer.train()


# ---- KV cache (issue 14 item 5) ---------------------------------------------------------------------------------
def test_anchor_forward_never_returns_a_cache_and_refuses_one():
    model = make_model("llama")
    model.config.use_cache = True  # the config default of most checkpoints
    ac.patch_model(model)
    batch = packed_batch()
    with torch.no_grad():
        out = model(**batch)
        assert out.past_key_values is None, "an anchor forward handed back a cache built under the anchor mask"
        cache = model(input_ids=batch["input_ids"][:, :4], use_cache=True).past_key_values
        assert cache is not None and cache.get_seq_length() == 4
        from anchorcontext.patches.hooks import cache_arg_names

        name = cache_arg_names(model.model)[0]  # "cache" on transformers 5.24, "past_key_values" on 5.0
        with pytest.raises(ValueError, match=rf"{name}=DynamicCache holding 4 tokens"):
            model(**batch, past_key_values=cache)


def test_cache_argument_name_read_from_the_decoder():
    from anchorcontext.patches.hooks import cache_arg_names

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return input_ids

    assert cache_arg_names(Old()) == ("past_key_values",)
    decoder = make_model("llama").model
    names = cache_arg_names(decoder)
    import inspect

    assert names[0] in inspect.signature(decoder.forward).parameters and "past_key_values" in names


# ---- per-call state (issue 14 item 6) ---------------------------------------------------------------------------
def test_concurrent_anchor_and_plain_forwards_in_two_threads():
    import threading

    model = make_model("llama")
    ac.patch_model(model)
    batch = packed_batch()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0  # left padding: the plain forward needs its real mask
    with torch.no_grad():
        want_anchor = model(**batch).logits
        want_plain = model(input_ids=ids, attention_mask=mask).logits
    # the anchor forward waits inside its first layer until the plain forward has finished, so both are in flight
    plain_done = threading.Event()
    layer = model.model.layers[0]

    def hold(module, args, output):
        if threading.current_thread().name == "anchor":
            assert plain_done.wait(60)

    h = layer.register_forward_hook(hold)
    got, errors = {}, []

    def run(name, fn):
        try:
            with torch.no_grad():
                got[name] = fn()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            if name == "plain":
                plain_done.set()

    threads = [threading.Thread(target=run, name="anchor", args=("anchor", lambda: model(**batch).logits)),
               threading.Thread(target=run, name="plain",
                                args=("plain", lambda: model(input_ids=ids, attention_mask=mask).logits))]
    threads[0].start()
    threads[1].start()
    for t in threads:
        t.join(120)
    h.remove()
    assert not errors, errors
    torch.testing.assert_close(got["anchor"], want_anchor, atol=0, rtol=0)
    torch.testing.assert_close(got["plain"], want_plain, atol=0, rtol=0)
    # afterwards, the main thread's plain forward still builds its mask (no flag left set)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want_plain, atol=0, rtol=0)


def test_dataparallel_style_replicas_in_threads():
    """What nn.DataParallel does: the same module called from a pool of threads, anchor and plain calls mixed."""
    from concurrent.futures import ThreadPoolExecutor

    model = make_model("llama")
    ac.patch_model(model)
    batch = packed_batch()
    ids = batch["input_ids"].clone()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    calls = [lambda: model(**batch).logits, lambda: model(input_ids=ids, attention_mask=mask).logits] * 4
    with torch.no_grad():
        want = [c() for c in calls]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda c: c(), calls))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- the model's own implementation stays for plain forwards (issue 15 item 3) ------------------------------------
@pytest.mark.parametrize("stock", ["flash_attention_2", "flash_attention_3", "flex_attention", "kernels-community/fake-attn"])
def test_patch_keeps_the_loaded_implementation_for_plain_forwards(stock, monkeypatch):
    """A stand-in registered under the stock name (the real kernels need CUDA) records its calls."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def stand_in(module, q, k, v, attention_mask, **kw):
        assert not any(key.startswith("anchor") for key in kw), kw
        calls.append(attention_mask)
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, stock, stand_in)
    model = make_model("llama")
    ref = make_model("llama")
    model.config._attn_implementation = stock  # as from_pretrained(attn_implementation=stock) leaves it
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stock_out = model(input_ids=ids).logits
        n = len(calls)
        assert n == model.config.num_hidden_layers
        ac.patch_model(model)
        assert patch_state(model)["prev"] == stock
        torch.testing.assert_close(model(input_ids=ids).logits, stock_out, atol=0, rtol=0)
        assert len(calls) == 2 * n, "the plain forward of the patched model did not run the loaded implementation"
        batch = packed_batch()
        ac.patch_model(ref)
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=0, rtol=0)
        assert len(calls) == 2 * n, "the anchor forward reached the stock implementation"
    # gradient checkpointing re-runs the attention in backward, after the forward's hooks: same gradients
    model.train().gradient_checkpointing_enable()
    ref.train().gradient_checkpointing_enable()
    for m in (model, ref):
        m(**batch).loss.backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0, msg=n)
    ac.unpatch_model(model)
    assert model.config._attn_implementation == stock


@pytest.mark.parametrize("stock", ["flash_attention_2", "flex_attention"])
def test_anchor_forward_of_a_kept_implementation_builds_no_stock_mask(stock, monkeypatch, caplog):
    """A model patched on FlashAttention / flex keeps its name, so transformers looks its mask function up under that
    name: an anchor forward must not build it (flex's BlockMask is O(L^2) work) nor warn to call patch_model."""
    import logging

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from anchorcontext.patches import registration

    masks = []

    def stand_in(module, q, k, v, attention_mask, **kw):
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kw)

    def mask_stand_in(*args, **kwargs):
        masks.append(1)
        return torch.ones(1, dtype=torch.bool)  # what a real mask function hands on: something non-None

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, stock, stand_in)
    monkeypatch.setitem(transformers.AttentionMaskInterface._global_mapping, stock, mask_stand_in)
    monkeypatch.setattr(registration, "_warned", set())
    model = make_model("llama")
    model.config._attn_implementation = stock
    ac.patch_model(model)
    batch = packed_batch()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="anchorcontext"):
        model(input_ids=batch["input_ids"])
        assert masks, "the plain forward did not build the stock mask"
        masks.clear()
        model(**batch)
    assert not masks, "the anchor forward of a patched model built the stock mask"
    assert "patch_model" not in caplog.text


# ---- parallel/ulysses.py entries (issue 13 item 7) ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_plain_forward_without_a_mask_under_sp_stays_causal(family):
    """The Ulysses wrapper drops masks: a maskless plain forward under ``anchor_sp`` on an eager model must still be
    causal (eager without a mask attends both ways)."""
    from anchorcontext.parallel.ulysses import prepare_model_for_sp, unprepare_model_for_sp

    model = make_model(family, "eager")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids).logits  # stock eager, causal (gemma2: window 4)
        ac.patch_model(model)
        prepare_model_for_sp(model, sp_size=1, group_fn=lambda: None)
        got = model(input_ids=ids).logits
        unprepare_model_for_sp(model)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # gemma2: its sliding window (4) too


def test_sp_entry_keeps_the_eager_fallback_and_unprepare_restores_it(monkeypatch):
    import transformers.models.llama.modeling_llama as ml

    from anchorcontext.parallel.ulysses import SP_ATTN_NAME, prepare_model_for_sp, unprepare_model_for_sp

    eager = ml.eager_attention_forward
    used = []

    def counting(*a, **kw):
        used.append(1)
        return eager(*a, **kw)

    monkeypatch.setattr(ml, "eager_attention_forward", counting)
    model = make_model("llama", "eager")
    ac.patch_model(model)
    assert model.config._attn_implementation == ATTN_NAME_EAGER
    prepare_model_for_sp(model, sp_size=1, group_fn=lambda: None)
    assert model.config._attn_implementation == SP_ATTN_NAME
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids)
    assert used, "a plain forward under anchor_sp ran SDPA instead of the model's eager attention"
    unprepare_model_for_sp(model)
    assert model.config._attn_implementation == ATTN_NAME_EAGER


# ---- refusals on eager models: the family's own eager function is guarded (issue 14 item 4) ------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_anchor_inputs_refused_on_eager_models_never_patched_unpatched_and_reloaded(family, tmp_path):
    batch = packed_batch()
    model = make_model(family, "eager")
    with torch.no_grad(), pytest.raises(ValueError, match=r"not patched by anchorcontext.*patch_model"):
        _anchor_call(model, batch)  # never patched
    with torch.no_grad():
        patched = _anchor_call(ac.patch_model(model), batch).logits
    ac.unpatch_model(model)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad(), pytest.raises(ValueError, match=r"patch_model"):
        _anchor_call(model, batch)  # unpatched
    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"patch_model"):
        _anchor_call(reloaded, batch)  # reloaded
    with torch.no_grad():
        torch.testing.assert_close(_anchor_call(ac.patch_model(reloaded), batch).logits, patched, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_guarded_eager_function_leaves_plain_forwards_bitwise_unchanged(family, monkeypatch):
    import sys

    model = make_model(family, "eager")
    module = sys.modules[type(model).__module__]
    guarded = module.eager_attention_forward
    assert guarded.__wrapped_stock__ is not None
    ids = packed_batch()["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        monkeypatch.setattr(module, "eager_attention_forward", guarded.__wrapped_stock__)
        want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_every_eager_function_of_a_loaded_modeling_module_is_guarded():
    """The families whose call sites pass another eager function (vision_/simple_/text_) are guarded too, and a
    call of one with anchor keys is refused while a plain call runs the function unchanged."""
    import importlib
    import sys

    mods = [importlib.import_module(f"transformers.models.{m}") for m in (
        "llama4.modeling_llama4", "phi4_multimodal.modeling_phi4_multimodal", "timesfm.modeling_timesfm")]
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers.models.") and name.rsplit(".", 1)[-1].startswith("modeling_"):
            for attr, fn in vars(mod).items():
                if attr.endswith("eager_attention_forward") and callable(fn):
                    assert hasattr(fn, "__wrapped_stock__"), f"{name}.{attr} is not guarded"
    fn = mods[1].simple_eager_attention_forward
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    module = torch.nn.Module()
    module.training, module.num_key_value_groups = False, 1
    out, _ = fn(module, q, k, v, None, scaling=0.5)
    want, _ = fn.__wrapped_stock__(module, q, k, v, None, scaling=0.5)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"simple_eager_attention_forward.*patch_model"):
        fn(module, q, k, v, None, scaling=0.5, anchor_layout=ac.AnchorLayout.from_doc_lens([[2, 2]], 5))


def test_eager_model_refused_when_anchorcontext_is_imported_before_transformers():
    import subprocess
    import sys

    code = (
        "import torch, anchorcontext as ac, transformers\n"
        "cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1)\n"
        "cfg._attn_implementation = 'eager'\n"
        "m = transformers.Qwen2ForCausalLM(cfg).eval()\n"
        "b = ac.anchor_inputs(torch.tensor([[0, 1, 1, 2, 2]]))\n"
        "try:\n"
        "    m(input_ids=torch.tensor([[1, 5, 6, 7, 8]]), **b)\n"
        "except ValueError as e:\n"
        "    print('REFUSED', 'patch_model' in str(e))\n"
        "else:\n"
        "    print('RAN')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.stdout.strip() == "REFUSED True", out.stdout + out.stderr


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_guarded_attention_traces_with_torch_compile_fullgraph(attn):
    """The guards sit in every layer call of every model once anchorcontext is imported: torch.compile must trace
    them without a graph break on a model that is not patched. A patched model compiles too (its decoder hooks,
    which validate the batch on the host, are graph breaks) and gives the same plain and anchor outputs."""
    model = make_model("llama", attn)
    batch = packed_batch()
    ids = batch["input_ids"]
    anchor = {k: batch[k] for k in ("position_ids", "anchor_layout")}
    with torch.no_grad():
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids).logits
        torch.testing.assert_close(got, model(input_ids=ids).logits, atol=0, rtol=0)
        ac.patch_model(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(compiled(input_ids=ids, **anchor).logits, model(input_ids=ids, **anchor).logits,
                                   atol=0, rtol=0)
        torch._dynamo.reset()
