"""BF16 RoPE drift diagnostics: oracles, shift invariance in fp32/fp64, bf16 drift, mitigations, errors, CLI.

Tiny Llama models are built from ``LlamaConfig`` (2 layers, 4 query heads sharing 2 KV heads). Oracles:
hand-computed |ΔA| terms on constructed matrices; a dense float64 recomputation of the probe's per-layer
terms from synthetic q/k/v; transformers' own eager ``output_attentions`` for Eq. 4 end to end; separate
short runs for the prefix-length shortcut; the model's stock forward for the probe's attention output.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from anchorcontext.diagnostics import (
    PrecisionSetting,
    ShiftDeviation,
    compare_settings,
    deviation_terms,
    first_token_logit_difference,
    model_for_setting,
    probe_model,
    probe_shift_deviation,
    row_weights,
    sample_sequences,
    shifted_position_ids,
)
from anchorcontext.diagnostics import cli as diag_cli
from anchorcontext.diagnostics import probe as P

OFFSETS = [0, 4, 15, 17, 100, 1000]
REF = 16
N_LAYERS, N_HEADS = 2, 4
# fp64 with HF's own rotary path (angles in fp32, cast to fp64): bit-for-bit what eager/SDPA compute in fp64.
FP64_HF = PrecisionSetting(name="fp64_hf_angles", dtype="float64")
FP64_HF_ANCHOR = PrecisionSetting(name="fp64_hf_angles_anchor", dtype="float64", layout="anchor")


def tiny_llama(seed: int = 0, max_positions: int = 2048) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=max_positions, use_cache=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 128, (2, 96), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def report(model, ids):
    settings = [
        "bf16",
        "bf16_rope_fp32",
        "bf16_anchor",
        "fp32_anchor",
        "fp32",
        "fp64",
        "fp64_anchor",
        "bf16_angles_bf16",
    ]
    return compare_settings(model, ids, settings=settings, offsets=OFFSETS, lengths=[32, 64, 96], progress=False)


def _noncontrol(r: ShiftDeviation, length=None) -> torch.Tensor:
    keep = [k for k, o in enumerate(r.offsets) if o != r.reference_offset]
    return r.attention_difference(length)[keep]


# ------------------------------------------------------------------------------------- pure helpers


def test_position_ids_golden():
    assert shifted_position_ids(4, [0, 5]).tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert shifted_position_ids(4, [0, 5], "anchor").tolist() == [[0, 1, 2, 3], [0, 6, 7, 8]]
    with pytest.raises(ValueError, match="layout"):
        shifted_position_ids(4, [0], "reset")


def test_row_weights():
    assert row_weights(3, "mean").tolist() == pytest.approx([1, 1 / 2, 1 / 3])
    assert row_weights(3, "paper").tolist() == pytest.approx([1 / 3, 1 / 2, 1])
    assert row_weights(3, "sum").tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="row_weight"):
        row_weights(3, "median")


def test_first_token_share_constructed_case():
    """Hand-computed |ΔA| terms: only two rows change, one of them on key 0."""
    a_ref = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    a = torch.tensor([[1.0, 0, 0], [0.3, 0.7, 0], [0.2, 0.1, 0.7]])
    n = row_weights(3, "mean")
    row, first, key = deviation_terms(a_ref[None], a[None], n)  # one head
    assert row.tolist() == pytest.approx([0, 0.4, 0.4])
    assert first.tolist() == pytest.approx([0, 0.2, 0])
    assert key.tolist() == pytest.approx([0.2 / 2, 0.2 / 2 + 0.2 / 3, 0.2 / 3])
    d = float(n @ row)
    assert d == pytest.approx(1 / 3) and float(key.sum()) == pytest.approx(d)
    # The same case through ShiftDeviation: one layer, offsets [0, 16] (16 = the control, all zeros).
    z = torch.zeros(3)

    def acc(v):  # (layers, offsets, L)
        return torch.stack([v, z])[None].double()

    r = ShiftDeviation(setting=P.get_setting("bf16"), offsets=[0, 16], reference_offset=16, length=3,
                       num_sequences=1, row_weight="mean", row=acc(row), first=acc(first), key=acc(key),
                       logit0=acc(torch.tensor([0.0, 2.0, 4.0])))  # fmt: skip
    assert r.attention_difference()[0] == pytest.approx(1 / 3)
    assert r.first_token_contribution()[0] == pytest.approx(0.1)
    assert r.first_token_share()[0] == pytest.approx(0.3)
    assert math.isnan(r.first_token_share()[1])  # the control: D = 0
    assert r.excluding_first_token()[0] == pytest.approx(1 / 3 - 0.1)
    assert r.attention_difference(length=2)[0] == pytest.approx(0.2)  # prefix of two rows
    assert r.logit_difference(length=3)[0] == pytest.approx(2.0)
    assert r.logit_difference(length=2)[0] == pytest.approx(1.0)
    r.row_weight = "paper"  # n = (1/3, 1/2, 1)
    assert r.attention_difference()[0] == pytest.approx(0.4 / 2 + 0.4)


def test_probe_terms_match_dense_float64_oracle():
    """The probe's per-layer terms and output against a direct float64 computation (GQA, scaling, softcap, window)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 3, 4, 2, 10, 8
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    n = row_weights(L, "mean")
    module = types.SimpleNamespace(layer_idx=0, is_causal=True)
    for softcap, window in ((None, None), (3.0, 4)):
        state = P.ProbeState(n_rows=B, length=L, weights=n, qk_upcast=False)
        out = state.attend(module, q, k, v, 0.3, window, softcap)
        ke, ve = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        s = q @ ke.transpose(-1, -2) * 0.3
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(L)
        allowed = (i[None] <= i[:, None]) & ((i[None] > i[:, None] - window) if window else True)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        torch.testing.assert_close(out, (p @ ve).transpose(1, 2), rtol=1e-12, atol=1e-12)
        rec = state.layers[0]
        dA = (p[1:] - p[:1]).abs().sum(1)  # (B-1, L, L), heads summed
        torch.testing.assert_close(rec["row"][1:], dA.sum(-1))
        torch.testing.assert_close(rec["first"][1:], dA[:, :, 0])
        torch.testing.assert_close(rec["key"][1:], n @ dA)
        torch.testing.assert_close(rec["logit0"][1:], (s[1:, :, :, 0] - s[:1, :, :, 0]).abs().sum(1))
        assert rec["row"][0].abs().sum() == 0  # row 0 is the reference itself


# --------------------------------------------------------------------------------- the measurement


def test_fp32_and_fp64_shift_invariance_at_rounding_level(report, ids):
    """Exact RoPE is shift invariant: fp32/fp64 D is at the dtype's rounding level, bf16's is not."""
    L = ids.shape[1]
    # D normalised by its largest possible scale (Σ_j A_ij = 1 per row): the mean relative change of A.
    scale = N_LAYERS * N_HEADS * float(row_weights(L).sum())
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        rel = _noncontrol(report.results[name]) / scale
        assert (rel < 10 * torch.finfo(dtype).eps).all(), (name, rel)
        assert (rel > 0).any() or name == "fp64"  # fp32 rounding does show
    bf16, fp32 = _noncontrol(report.results["bf16"]), _noncontrol(report.results["fp32"])
    assert (bf16 > 100 * fp32).all(), (bf16, fp32)
    assert (bf16 / scale > torch.finfo(torch.float32).eps * 100).all()


def test_control_row_is_exactly_zero(report):
    for name, r in report.results.items():
        assert r.control_max == 0.0, name
        assert r.attention_difference()[r.control_index] == 0.0


def test_per_key_contributions_sum_to_d(report):
    for name, r in report.results.items():
        torch.testing.assert_close(r.per_key_contribution().sum(-1), r.attention_difference(), rtol=1e-6, atol=1e-18)
        share = r.first_token_share()
        ok = ~share.isnan()
        assert ((share[ok] >= 0) & (share[ok] <= 1)).all(), name


def test_eq4_matches_eager_output_attentions(model, ids):
    """Eq. 4 from the probe equals Eq. 4 computed from transformers' eager attention probabilities."""
    # The anchor layout changes true relative distances, so D is O(0.1) here, far above any rounding; in the
    # shift layout D is rounding noise and eager's float32 softmax (hard-coded, even for float64) would dominate.
    offsets = [0, 100]
    for setting in (FP64_HF_ANCHOR,):
        r = probe_shift_deviation(model, ids[:1], offsets=offsets, reference_offset=REF, setting=setting)
        eager = model_for_setting(model, setting)
        eager = copy.deepcopy(eager) if eager is model else eager
        eager.set_attn_implementation("eager")
        L = ids.shape[1]
        pos = shifted_position_ids(L, [REF, *offsets], setting.layout)
        with torch.no_grad():  # all-ones mask: jumps in position ids must not be read as packed documents
            att = eager.model(input_ids=ids[:1].expand(3, L), position_ids=pos, attention_mask=torch.ones(3, L),
                              output_attentions=True).attentions  # fmt: skip
        a = torch.stack(att)  # (layers, B, H, L, L)
        dA = (a[:, 1:] - a[:, :1]).abs().sum((0, 2))  # (offsets, L, L)
        expected = dA.sum(-1) @ row_weights(L)
        got = r.attention_difference()[[r.offsets.index(o) for o in offsets]]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_probe_forward_returns_stock_attention_output(model, ids):
    """The probe returns normal attention output: hidden states equal the stock SDPA forward (float64)."""
    m = model_for_setting(model, FP64_HF)
    L = ids.shape[1]
    pos = shifted_position_ids(L, [REF, 0, 300], "shift")
    batch = ids[:1].expand(3, L)
    with torch.no_grad():
        stock = m.model(input_ids=batch, position_ids=pos, attention_mask=torch.ones(3, L)).last_hidden_state
        with probe_model(m, FP64_HF) as net:
            state = P.ProbeState(n_rows=3, length=L, weights=row_weights(L), qk_upcast=False)
            probed = net(input_ids=batch, position_ids=pos, **{P.PROBE_KWARG: state}).last_hidden_state
    assert state.calls == N_LAYERS
    torch.testing.assert_close(probed, stock, rtol=1e-10, atol=1e-10)


def test_prefix_lengths_equal_separate_runs(model, ids):
    """One run at L gives every prefix T: equal to running the first T tokens alone."""
    long = probe_shift_deviation(model, ids, offsets=[0, 500], setting="fp64_anchor")
    short = probe_shift_deviation(model, ids[:, :40], offsets=[0, 500], setting="fp64_anchor")
    torch.testing.assert_close(long.attention_difference(40), short.attention_difference(), rtol=1e-9, atol=0)
    torch.testing.assert_close(long.logit_difference(40), short.logit_difference(), rtol=1e-9, atol=0)
    torch.testing.assert_close(long.first_token_share(40), short.first_token_share(), rtol=1e-9, atol=0, equal_nan=True)
    d = first_token_logit_difference(model, ids, [40, 96], setting="fp64_anchor")
    assert d[40] == pytest.approx(float(short.logit_difference()[0]), rel=1e-9)


# ----------------------------------------------------------------------------------- mitigations


def test_rope_fp32_mitigation_takes_effect(report):
    a, b = report.results["bf16"], report.results["bf16_rope_fp32"]
    assert (a.rotated_dtype, a.score_dtype) == ("bfloat16", "bfloat16")
    assert (b.rotated_dtype, b.score_dtype) == ("float32", "float32")  # the rotation ran in fp32 (promotion)
    assert (_noncontrol(b) < _noncontrol(a) / 100).all()
    row = next(x for x in report.rows() if x["setting"] == "bf16_rope_fp32")
    assert row["removed_vs_bf16"] > 0.99


def test_anchor_layout_reports_precision_part_against_fp32(report):
    assert report.control_for("bf16_anchor") == "fp32_anchor"
    a32, a64 = report.results["fp32_anchor"], report.results["fp64_anchor"]
    # True relative distances change in this layout: D is large even in exact arithmetic ...
    assert (_noncontrol(a64) > 10 * _noncontrol(report.results["bf16"])).all()
    torch.testing.assert_close(_noncontrol(a32), _noncontrol(a64), rtol=1e-4, atol=0)
    # ... and only the excess over the same layout in fp32 is attributed to precision.
    excess = report.precision_excess("bf16_anchor")
    assert excess == pytest.approx(report.results["bf16_anchor"].summary() - a32.summary())
    assert 0 < excess < report.results["bf16_anchor"].summary()


def test_low_precision_angles_drift_grows_with_position(report):
    """Angles m·θ computed in bf16 (older code path) are far worse at large positions than HF's fp32 angles."""
    low, hf = report.results["bf16_angles_bf16"], report.results["bf16"]
    ratio = {o: float(low.attention_difference()[k] / hf.attention_difference()[k]) for k, o in enumerate(low.offsets)}
    assert ratio[1000] > 10 and ratio[1000] > 5 * ratio[0], ratio


# ------------------------------------------------------------------------------ determinism, model care


def test_results_identical_across_runs_with_same_seed(model, ids):
    kw = {"settings": ["bf16", "bf16_random"], "offsets": [0, 200], "lengths": [48, 96], "seed": 3, "progress": False}
    one = compare_settings(model, ids, **kw).to_dict()
    two = compare_settings(model, ids, **kw).to_dict()
    for d in (one, two):
        for r in d["settings"].values():
            r.pop("seconds")
        for rows in d["summary"].values():
            for row in rows:
                row.pop("seconds")
    assert json.dumps(one) == json.dumps(two)
    other_seed = compare_settings(model, ids, **{**kw, "seed": 4})
    assert other_seed.results["bf16_random"].summary() != one["settings"]["bf16_random"]["by_length"]["96"][
        "mean_attention_difference"]  # fmt: skip


def test_sample_sequences_deterministic():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    docs = [{"name": f"d{i}", "text": f"document {i} " * (50 + 7 * i)} for i in range(6)]
    a = sample_sequences(tok, 64, 3, seed=0, docs=docs)
    assert a.shape == (3, 64) and (a[:, 0] == tok.eos_token_id).all()  # ByT5 has no BOS: EOS is the anchor
    assert torch.equal(a, sample_sequences(tok, 64, 3, seed=0, docs=docs))
    assert not torch.equal(a, sample_sequences(tok, 64, 3, seed=1, docs=docs))
    assert (sample_sequences(tok, 64, 1, docs=docs, first_token="none")[:, 0] != tok.eos_token_id).all()
    with pytest.raises(ValueError, match="documents"):
        sample_sequences(tok, 10_000, 1, docs=docs)


def test_model_untouched_and_probe_restored(model, ids):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    bf = model_for_setting(model, "bf16")
    assert bf is not model and next(bf.parameters()).dtype == torch.bfloat16
    assert bf.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained(dtype=bf16) keeps it
    probe_shift_deviation(model, ids[:1, :16], offsets=[0], setting="bf16_rope_fp32")
    assert model.config._attn_implementation == impl
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rot = model.model.rotary_emb
    with pytest.raises(RuntimeError, match="boom"), probe_model(model, "bf16_angles_bf16"):
        assert model.config._attn_implementation == P.PROBE_NAME and rot._forward_hooks
        raise RuntimeError("boom")
    assert model.config._attn_implementation == impl
    assert not rot._forward_hooks and not rot._forward_pre_hooks
    with probe_model(model, "fp32") as net, pytest.raises(RuntimeError, match="probe state"):
        net(input_ids=ids[:1, :8])  # the probing attention outside a probe run


# ------------------------------------------------------------------------------------- bad arguments


def test_bad_arguments(model, ids):
    with pytest.raises(ValueError, match="offsets must be a non-empty"):
        probe_shift_deviation(model, ids, offsets=[])
    with pytest.raises(ValueError, match="offsets"):
        probe_shift_deviation(model, ids, offsets=[-3])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        probe_shift_deviation(model, torch.ones(1, 2100, dtype=torch.long), offsets=[0])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        compare_settings(model, ids, offsets=[0, 2000], progress=False)  # 2000 + 96 > 2048
    with pytest.raises(ValueError, match="setting must be one of"):
        probe_shift_deviation(model, ids, offsets=[0], setting="bf8")
    with pytest.raises(ValueError, match="row_weight"):
        probe_shift_deviation(model, ids, offsets=[0], row_weight="median")
    with pytest.raises(ValueError, match="input_ids"):
        probe_shift_deviation(model, torch.zeros(1, 8), offsets=[0])
    with pytest.raises(ValueError, match="lengths"):
        compare_settings(model, ids, offsets=[0], lengths=[200], progress=False)
    with pytest.raises(ValueError, match="angles"):
        PrecisionSetting(name="x", rope="fp32", angles="model_dtype")


def test_non_causal_and_non_rope_models_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel, ModernBertConfig, ModernBertModel

    bert = ModernBertModel(ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                            cls_token_id=2, sep_token_id=1)).eval()  # fmt: skip
    with pytest.raises(ValueError, match="not causal"):
        probe_shift_deviation(bert, torch.ones(1, 8, dtype=torch.long), offsets=[0])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="RotaryEmbedding"):
        probe_shift_deviation(gpt2, torch.ones(1, 8, dtype=torch.long), offsets=[0])


def test_cli_rejects_bad_arguments(capsys):
    assert diag_cli.main(["rope", "--row-weight", "median"]) == 2
    assert "row_weight" in capsys.readouterr().err
    assert diag_cli.main(["rope", "--settings", "bf8"]) == 2
    assert diag_cli.main(["rope", "--offsets"]) == 2  # argparse: expected at least one argument
    assert diag_cli.main(["bogus"]) == 2
    assert diag_cli.main([]) == 0


# -------------------------------------------------------------------------------------------- CLI


def test_cli_tiny_end_to_end(tmp_path):
    out = tmp_path / "rope"
    argv = ["rope", "--model", "tiny", "--lengths", "32", "64", "--offsets", "17", "300", "--out", str(out),
            "--settings", "bf16", "fp32", "--no-progress", "--threads", "0"]  # fmt: skip
    assert diag_cli.main(argv) == 0
    data = json.loads((out / "rope_drift.json").read_text())
    assert data["lengths"] == [32, 64]
    s = data["settings"]
    assert s["bf16"]["offsets"] == [0, REF, 17, 300]  # logit offset 0 added, control inserted in order
    assert s["bf16"]["control_max_abs"] == 0.0
    bf16 = s["bf16"]["by_length"]["64"]["mean_attention_difference"]
    assert bf16 > 100 * s["fp32"]["by_length"]["64"]["mean_attention_difference"]
    assert len(s["bf16"]["per_key_contribution"][0]) == 64
    assert data["meta"]["weights"].startswith("random")
    assert "RoPE shift deviation" in (out / "table.txt").read_text()
    for name in ("attention_difference", "logit_difference", "per_key_contribution", "per_layer"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cached_smollm2() -> pathlib.Path | None:
    from anchorcontext import assets

    p = assets._cache_root() / "smollm2" / assets.SMOLLM2_GGUF_NAME
    return p if p.is_file() else None


@pytest.mark.slow
def test_smollm2_bf16_drift_real_weights():
    """Real pretrained weights (dequantised 4-bit GGUF): bf16 drifts, fp32 is shift invariant, control exact."""
    if _cached_smollm2() is None:
        pytest.skip("SmolLM2 GGUF not in the local cache (tests never download)")
    from anchorcontext.assets import load_smollm2

    model, tok = load_smollm2()
    ids = sample_sequences(tok, 128, 1, seed=0)
    rep = compare_settings(model, ids, settings=["bf16", "fp32"], offsets=[0, 1000], progress=False)
    bf16, fp32 = _noncontrol(rep.results["bf16"]), _noncontrol(rep.results["fp32"])
    assert (bf16 > 1000 * fp32).all(), (bf16, fp32)
    assert rep.results["bf16"].control_max == 0.0
