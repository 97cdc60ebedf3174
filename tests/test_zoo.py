"""Every causal LM of the installed transformers: exact or refused by name, never accepted and wrong.

The whole zoo (~200 model types, ~35 s on 2 cores) runs in the default suite; docs/models.md is checked to be the
table of this run. The rules patch_model refuses by each have a test here on the family that showed them (each
family was accepted and silently wrong before its rule: max |packed - standalone| 0.1-1.0).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import transformers

import anchorcontext as ac
from anchorcontext import zoo
from anchorcontext.patches.support import check_call, unsupported_reason

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "models.md"


@pytest.fixture(scope="module")
def results():
    return {r.model_type: r for r in zoo.run_all()}


def test_every_causal_lm_is_exact_or_refused(results):
    assert len(results) == len(zoo.causal_lm_classes()) > 0
    wrong = {t: r.reason for t, r in results.items() if r.status == zoo.STATUS_WRONG}
    assert not wrong, f"accepted and not exact: {wrong}"
    for t, r in results.items():
        if r.status == zoo.STATUS_EXACT:
            assert r.worst is not None and r.worst <= zoo.TOL, (t, r.worst)
        elif r.status == zoo.STATUS_REFUSED:
            assert r.reason.startswith(("ValueError", "at the first anchor forward: ValueError")), (t, r.reason)
    # the chunked loss on every exact family: equal to the stock loss, or refused by name; never accepted and wrong
    loss_wrong = {t: r.loss for t, r in results.items() if r.status == zoo.STATUS_EXACT
                  and not r.loss.startswith(("exact ", "refused: ValueError", zoo.LOSS_UNCHECKED + ": the stock loss"))}
    assert not loss_wrong, f"chunked loss accepted and not equal to stock: {loss_wrong}"
    assert all(not r.loss for r in results.values() if r.status != zoo.STATUS_EXACT)
    for t in ("llama", "qwen2", "gemma2", "gemma3_text", "cohere", "granite", "mixtral", "qwen3_moe"):
        assert results[t].loss.startswith("exact "), (t, results[t].loss)
    # the families the rest of the suite tests in depth are among the exact ones, and the zoo is mostly built
    for t in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"):
        assert results[t].status == zoo.STATUS_EXACT, (t, results[t].reason)
    built = sum(r.status != zoo.STATUS_NOT_BUILT for r in results.values())
    assert built >= 0.85 * len(results), f"only {built} of {len(results)} families built tiny"


def test_support_table_is_current(results):
    # docs/models.md for the newest transformers; a table per older release kept (make test-oldest checks 5.0's)
    path = ROOT / "docs" / f"models-transformers-{transformers.__version__}.md"
    path = path if path.exists() else TABLE
    version, rows = zoo.read_table(path.read_text())
    if version != transformers.__version__:
        pytest.skip(f"docs/models.md was made with transformers {version}, this is {transformers.__version__}: "
                    "regenerate it with `python -m anchorcontext.zoo --write docs/models.md`")
    def key(status, loss, reason):  # the figures may differ between CPUs; the verdicts may not
        return status, loss.split(" ")[0] if loss.startswith("exact ") else loss, reason

    fresh = {t: key(r.status, zoo._cell(r.loss), zoo._cell(r.reason)) for t, r in results.items()}
    rows = {t: key(*row) for t, row in rows.items()}
    stale = {t: (rows.get(t), now) for t, now in fresh.items() if rows.get(t) != now}
    stale.update({t: (row, None) for t, row in rows.items() if t not in fresh})
    assert not stale, (f"{path.name} is out of date for {sorted(stale)} (table, fresh): {stale}; regenerate it "
                       f"with `python -m anchorcontext.zoo --write docs/{path.name}`")


def test_table_round_trips():
    r = [zoo.ZooResult("a", "A", zoo.STATUS_EXACT, 1e-7, loss="exact 3e-07"),
         zoo.ZooResult("b", "B", zoo.STATUS_REFUSED, None, "x | y")]
    version, rows = zoo.read_table(zoo.table(r))
    assert version == transformers.__version__
    assert rows == {"a": ("exact", "exact 3e-07", ""), "b": ("refused", "", "x \\| y")}


def _tiny(model_type):
    classes = dict(zoo.causal_lm_classes())
    if model_type not in classes:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    return zoo.build(model_type, classes[model_type])


@pytest.mark.parametrize("model_type,match", [
    ("gpt_oss", r"attention sinks \(model\.layers\.0\.self_attn\.sinks\)"),
    ("lfm3", r"layers of kind \['conv'\]"),
    ("minimax", r"layers of kind \['linear_attention'\]"),
    ("llama4_text", r"layers of kind \['chunked_attention'\]"),
    ("bloom", "AttentionInterface"),
])
def test_patch_refuses_by_name(model_type, match):
    model = _tiny(model_type)
    with pytest.raises(ValueError, match=match):
        ac.patch_model(model)
    assert not ac.is_patched(model)


def test_conv_and_mixer_modules_refused_even_without_layer_kinds():
    model = _tiny("llama")
    model.model.layers[0].mlp.conv = torch.nn.Conv1d(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match=r"Conv1d over the sequence \(model\.layers\.0\.mlp\.conv\)"):
        ac.patch_model(model)

    class FakeMambaMixer(torch.nn.Module):
        pass

    model = _tiny("llama")
    model.model.layers[1].mixer = FakeMambaMixer()
    assert "FakeMambaMixer (model.layers.1.mixer)" in unsupported_reason(model)
    # a class name that merely contains the letters is not a mixer (SeedOss: "ssm" inside "SeedOssModel")
    assert unsupported_reason(_tiny("seed_oss")) is None


def test_encoder_without_is_decoder_refused():
    cfg = zoo.tiny_config("bert")
    cfg.is_decoder = False  # what BertLMHeadModel warns about: bidirectional, not a causal LM
    model = transformers.BertLMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match=r"non-causal attention .*is_causal=False.*is_decoder=True"):
        ac.patch_model(model)


def test_family_that_drops_kwargs_refused_at_first_anchor_forward():
    # Nemotron's decoder does not pass **kwargs to its layers: the layout never reaches the attention, which ran
    # as full attention over the row (max |packed - standalone| 0.97) before this check
    model = _tiny("nemotron")
    if unsupported_reason(model) is not None:
        pytest.skip(f"nemotron is refused at patch time on transformers {transformers.__version__}")
    ac.patch_model(model)
    batch = zoo.packed_batch("anchor", "continuous")
    with pytest.raises(ValueError, match="NemotronAttention was called during an anchor forward without the anchor"):
        model(**batch)
    ids = batch["input_ids"]
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # plain forwards still run


def test_unknown_attention_keyword_refused_at_call():
    class Attn(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match=r"Attn passes \['s_aux'\]"):
        check_call(Attn(), {"scaling": 0.1, "s_aux": torch.zeros(4)})
    check_call(Attn(), {"scaling": 0.1, "encoder_hidden_states": None})  # None: not used


@pytest.mark.parametrize("model_type", ["bloom", "nemotron", "llama"])
def test_never_patched_model_refuses_anchor_inputs(model_type):
    # Bloom never reaches the AttentionInterface and Nemotron drops the kwargs before its layers: a never-patched
    # model ran the anchor batch as full attention without a word; now its forward refuses the anchor_* keys
    model = _tiny(model_type)
    batch = zoo.packed_batch("anchor", "continuous")
    with pytest.raises(ValueError, match=r"carries \['anchor_layout'\] but \w+ is not patched by anchorcontext"):
        model(**batch)
    with pytest.raises(ValueError, match="not patched by anchorcontext"):
        model(input_ids=batch["input_ids"], **ac.anchor_inputs(batch["anchor_layout"].doc_ids))


def test_family_that_builds_its_own_mask_refused_at_first_anchor_forward():
    # Doge adds a learned dynamic bias to the mask it builds itself: the anchor backends would drop it
    model = _tiny("doge")
    ac.patch_model(model)
    with pytest.raises(ValueError, match="DogeAttention builds its own attention mask or bias"):
        model(**zoo.packed_batch("anchor", "continuous"))


def test_outer_forward_that_drops_the_anchor_keys_refused():
    # GPT2LMHeadModel on transformers 5.0 called its decoder without **kwargs: the layout never reached it and the
    # patched model ran the batch as full attention (max |packed - standalone| 0.47) before this check
    from anchorcontext.patches.registration import _guard_forward

    class DropsKwargs(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, position_ids=None, **kwargs):
            return super().forward.__wrapped_stock__(self, input_ids=input_ids, position_ids=position_ids)

    _guard_forward(DropsKwargs)
    model = DropsKwargs(zoo.tiny_config("llama")).eval()
    ac.patch_model(model)
    batch = zoo.packed_batch("anchor", "continuous")
    with pytest.raises(ValueError, match=r"DropsKwargs.forward does not pass \['anchor_layout'\] on to its decoder"):
        model(**batch)
    model(input_ids=batch["input_ids"])  # plain forwards run
