"""Every backend against the float64 dense reference, forward and gradients (q, k, v).

Tolerances follow flash-attn's test suite (``tests/test_flash_attn.py``): a backend's error against the
float64 oracle may be at most a small multiple of the error of the plain torch reference computed in the
*same* dtype, plus a small eps (2x for the output, 3x for dq, dk, dv as flash-attn uses)::

    err(backend, ref64) <= m * err(ref_same_dtype, ref64) + eps

Parametrised from the backend registry (``anchorcontext.attention.registry``): every backend that runs on CPU
is checked forward and backward (varlen through ``tests/flash_standin.py``, flash-attn's documented semantics, so
its gather, cu_seqlens and bottom-right causal alignment are exercised); the others (flex: no CPU backward) are
checked forward-only under ``no_grad``, always at ``(B, L) = (2, FLEX_L)`` with the shapes of ``FLEX_VARIANTS``
so that compiles are shared (each new shape/option recompiles). Each backend's effective mask is also probed
against the golden masks.
"""

from __future__ import annotations

import importlib
import logging

import flash_standin
import pytest
import torch
from backend_oracle import CASES, L, check_against_oracle, doc_ids, err, make_qkv, row, run
from golden_masks import GOLDEN, GOLDEN_WINDOW3, golden_ids, parse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import doc_id_batches
from torch_varlen_fakes import (
    fake_cuda_torch_varlen,  # noqa: F401  (a fixture)
    torch_2_10_varlen,
    torch_2_11_varlen,
    torch_2_12_varlen,
)

from anchorcontext import AnchorLayout, anchor_attention
from anchorcontext.attention import (
    BACKENDS,
    backend_fn,
    block_mask_for,
    cpu_kernel,
    flex_attention,
    reference_attention,
    registry,
    resolve_backend,
    sdpa,
    sdpa_attention,
    varlen,
    varlen_attention,
)
from anchorcontext.attention.varlen import gather_rows

dispatch_module = importlib.import_module("anchorcontext.attention.dispatch")

MODES = ("anchor", "intra_doc", "full")


def reference32(q, k, v, layout, **kw):
    return reference_attention(q, k, v, layout, compute_dtype=torch.float32, **kw)


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", flash_standin.flash_attn_varlen_func)
    flash_standin.CALLS.clear()
    return flash_standin


def sdpa_stock(*args, **kw):
    """The sdpa backend's fallback path (torch's CPU flash kernel per document), as on machines where the
    compiled kernel cannot be built; ``sdpa`` itself runs the compiled kernel for fp32/fp64 when it builds."""
    with cpu_kernel.disabled():
        return sdpa_attention(*args, **kw)


def _runs_on_cpu(backend) -> bool:
    """The backend runs on CPU in float32 (with the flash stand-in installed, as the ``standin`` fixture does)."""
    saved, varlen._KERNEL_OVERRIDE = varlen._KERNEL_OVERRIDE, flash_standin.flash_attn_varlen_func
    try:
        return backend.unavailable_reason(torch.device("cpu"), torch.float32, {"needs_grad": True}) is None
    finally:
        varlen._KERNEL_OVERRIDE = saved


# Backends checked forward and backward on CPU, from the registry: the reference in float32 (its float64 self is the
# oracle), and sdpa also on its stock path; the rest run forward-only (flex: no CPU backward).
TRAINABLE = {b.name: b.fn for b in registry.REGISTRY if _runs_on_cpu(b)}
TRAINABLE.pop("reference")
TRAINABLE["reference32"] = reference32  # the float64 reference is the oracle: test its float32 self
TRAINABLE["sdpa_stock"] = sdpa_stock
FORWARD_ONLY = {b.name: b.fn for b in registry.REGISTRY if not _runs_on_cpu(b)}


def test_every_backend_is_tested_on_cpu_as_expected():
    """A backend whose ``unavailable_reason`` wrongly turned it off on CPU would drop out of the gradient tests."""
    assert set(TRAINABLE) == {"varlen", "sdpa", "reference32", "sdpa_stock"}
    assert set(FORWARD_ONLY) == {"flex"}
    assert set(TRAINABLE) - {"reference32", "sdpa_stock"} | set(FORWARD_ONLY) | {"reference"} == set(BACKENDS)


# ----------------------------------------------------------------------------- forward + gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", list(TRAINABLE))
def test_backend_matches_reference(backend, case, mode, dtype, standin):
    ids = doc_ids(case)
    layout = AnchorLayout.from_doc_ids(ids, mode)
    q, k, v = make_qkv(ids.shape[0], 4, 4, L, 16, dtype)
    check_against_oracle(TRAINABLE[backend], q, k, v, layout)
    if backend == "varlen":  # the stand-in really ran, with the layout's metadata
        (call,) = standin.CALLS
        assert call["causal"] and call["num_segments"] == layout.num_segments
        assert (call["max_seqlen_q"], call["max_seqlen_k"]) == (layout.max_seqlen_q, layout.max_seqlen_k)


OPTIONS = {
    "gqa": dict(heads=(4, 2)),
    "mqa": dict(heads=(4, 1)),
    "window3": dict(sliding_window=3),
    "window8": dict(sliding_window=8),
    "window1": dict(sliding_window=1),
    "scaling": dict(scaling=0.37),
    "softcap": dict(softcap=2.0),
    "gqa_window_softcap": dict(heads=(6, 2), sliding_window=5, softcap=1.5),
}


@pytest.mark.parametrize(
    "mode,dtype",
    [(m, torch.float32) for m in MODES] + [("anchor", torch.bfloat16)],
    ids=["anchor-fp32", "intra_doc-fp32", "full-fp32", "anchor-bf16"],
)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", list(TRAINABLE))
def test_backend_options_match_reference(backend, option, mode, dtype, standin):
    kw = dict(OPTIONS[option])
    H, Hkv = kw.pop("heads", (4, 4))
    ids = doc_ids("batch_mixed")
    layout = AnchorLayout.from_doc_ids(ids, mode)
    q, k, v = make_qkv(ids.shape[0], H, Hkv, L, 16, dtype)
    if backend.startswith("sdpa") and "softcap" in kw:
        with pytest.raises(ValueError, match="softcap is not supported by the 'sdpa' backend"):
            sdpa_attention(q, k, v, layout, **kw)
        return
    check_against_oracle(TRAINABLE[backend], q, k, v, layout, **kw)
    if backend == "varlen":
        (call,) = standin.CALLS
        W = kw.get("sliding_window")
        assert call["window_size"] == ((-1, -1) if W is None else (W - 1, 0))
        assert call["softcap"] == kw.get("softcap", 0.0)


def test_options_change_the_result():
    """The option tests above are meaningful: window, softcap and scaling each change the output."""
    ids = doc_ids("batch_mixed")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(ids.shape[0], 4, 4, L, 16, torch.float64)
    base = reference_attention(q, k, v, layout)
    for kw in (dict(sliding_window=3), dict(sliding_window=8), dict(softcap=2.0), dict(scaling=0.37)):
        assert err(reference_attention(q, k, v, layout, **kw), base) > 1e-2, kw


def test_anchor_gradient_sums_over_documents(standin):
    """The anchor's dk/dv collect every document's contribution (index_select / split backward)."""
    ids = doc_ids("many_docs")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(1, 2, 2, L, 8, torch.float64)
    dout = torch.randn(1, L, 2, 8, dtype=torch.float64)
    _, g_ref = run(reference_attention, q, k, v, layout, dout)
    for fn in (sdpa_attention, sdpa_stock, varlen_attention):
        _, g = run(fn, q, k, v, layout, dout)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a[:, :, 0], b[:, :, 0], rtol=1e-9, atol=1e-9)
    # the anchor's dv is the sum of every document's contribution: more than any single query gives
    p_anchor = torch.softmax(
        torch.einsum("bhqd,bhkd->bhqk", q, k) / 8**0.5 + torch.where(layout.dense_mask()[:, None], 0.0, float("-inf")),
        dim=-1,
    )[..., 0]  # (B, H, L): weight each query gives the anchor
    torch.testing.assert_close(g_ref[2][:, :, 0], torch.einsum("bhq,bqhd->bhd", p_anchor, dout))


def test_dropout_runs_and_zero_dropout_is_deterministic():
    ids = doc_ids("odd_lengths")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(1, 2, 2, L, 8, torch.float32)
    a = sdpa_attention(q, k, v, layout, dropout=0.5)
    b = sdpa_attention(q, k, v, layout, dropout=0.0)
    assert torch.isfinite(a).all() and err(a, b) > 1e-3
    torch.testing.assert_close(b, sdpa_attention(q, k, v, layout), rtol=0, atol=0)


# ------------------------------------------------------------------------- effective masks (golden)


def effective_mask(fn, layout: AnchorLayout, *, heads=(2, 1), dtype=torch.float32, **kw) -> torch.Tensor:
    """``(B, L, L)`` bool: where ``fn`` really lets queries see keys, observed by probing.

    Zero queries give every allowed key the same softmax weight, and one-hot values (``v[k] = e_k``) make output
    column ``k`` equal that weight, so ``out[q, k] > 0`` exactly where the kernel let query ``q`` see key ``k``.
    Also asserts the weights are uniform over the visible keys (each equals 1 / count), so a backend that gave a
    key a partial weight would be caught, and checks every query head (GQA included). Zero queries give zero
    scores, so a softcap (``c * tanh(0) = 0``) leaves the probe unchanged.
    """
    B, L = layout.doc_ids.shape
    H, Hkv = heads
    q = torch.zeros(B, H, L, L, dtype=dtype)
    k = torch.randn(B, Hkv, L, L).to(dtype)
    v = torch.eye(L, dtype=dtype).expand(B, Hkv, L, L).contiguous()
    with torch.no_grad():
        out = fn(q, k, v, layout, **kw).float()  # (B, L, H, L): out[b, q, h, k] = weight of key k
    seen = out > 0.5 / L
    for h in range(1, H):
        assert torch.equal(seen[:, :, h], seen[:, :, 0]), f"head {h} sees a different mask than head 0"
    count = seen[:, :, 0].sum(-1, keepdim=True).clamp(min=1)
    atol = 1e-5 if dtype == torch.float32 else 4e-3  # 1/count rounded to bf16
    torch.testing.assert_close(out[:, :, 0], seen[:, :, 0] / count, atol=atol, rtol=0)
    return seen[:, :, 0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["reference", *TRAINABLE])
def test_golden_effective_mask(backend, mode, window, standin):
    golden = parse((GOLDEN if window is None else GOLDEN_WINDOW3)[mode])
    fn = reference_attention if backend == "reference" else TRAINABLE[backend]
    layout = AnchorLayout.from_doc_ids(golden_ids(), mode)
    for heads in [(2, 2), (4, 2)]:
        seen = effective_mask(fn, layout, heads=heads, sliding_window=window)
        assert torch.equal(seen[0], golden), f"{backend} {mode} window={window} heads={heads}:\n{seen[0].int()}"
    if backend == "varlen":
        assert standin.CALLS and all(c["causal"] for c in standin.CALLS)


# The CPU forward-only variants (each compiles once, ~7 s cold; the flex tests below reuse them): mask mode, dtype,
# (H, Hkv) and options. GQA, softcap and the window share one bf16 variant to keep compiles few.
FLEX_L = 64  # the one sequence length every CPU flex test uses (each new length recompiles, ~6 s)
FLEX_VARIANTS = {
    "anchor": ("anchor", torch.float32, (2, 2), {}),
    "intra_doc": ("intra_doc", torch.float32, (2, 2), {}),
    "full": ("full", torch.float32, (2, 2), {}),
    "anchor_bf16_gqa_softcap_window3": ("anchor", torch.bfloat16, (4, 2), dict(softcap=2.0, sliding_window=3)),
}


@pytest.mark.parametrize("variant", list(FLEX_VARIANTS))
@pytest.mark.parametrize("backend", list(FORWARD_ONLY))
def test_golden_effective_mask_forward_only(backend, variant):
    """Backends without a CPU backward (compiled FlexAttention), forward. The golden row is right-padded to FLEX_L
    tokens, which leaves its first 12 x 12 block unchanged (padding keys lie in every golden query's future)."""
    mode, dtype, heads, kw = FLEX_VARIANTS[variant]
    window = kw.get("sliding_window")
    golden = parse((GOLDEN if window is None else GOLDEN_WINDOW3)[mode])
    ids = torch.full((2, FLEX_L), -1)
    ids[0, :12] = golden_ids()[0]
    ids[1] = torch.tensor([0] + [1] * 20 + [2] * 30 + [3] * 13)
    layout = AnchorLayout.from_doc_ids(ids, mode)
    seen = effective_mask(FORWARD_ONLY[backend], layout, heads=heads, dtype=dtype, **kw)
    assert torch.equal(seen[0, :12, :12], golden)
    assert torch.equal(seen, layout.dense_mask(window))


# --------------------------------------------------------------------------------- flex (CPU, forward)

FLEX_PAIRS = [("odd_lengths", "single_doc"), ("many_docs", "trailing_padding"), ("one_token_docs", None)]


def flex_ids(a: str, b: str | None) -> torch.Tensor:
    second = row([], FLEX_L) if b is None else row(CASES[b](FLEX_L)[0], FLEX_L)  # None: no document
    return torch.tensor([row(CASES[a](FLEX_L)[0], FLEX_L), second])


@pytest.mark.parametrize("pair", FLEX_PAIRS, ids=lambda p: f"{p[0]}+{p[1]}")
@pytest.mark.parametrize("variant", list(FLEX_VARIANTS))
@pytest.mark.parametrize("backend", list(FORWARD_ONLY))
def test_forward_only_backend_matches_reference(backend, variant, pair):
    mode, dtype, (H, Hkv), kw = FLEX_VARIANTS[variant]
    layout = AnchorLayout.from_doc_ids(flex_ids(*pair), mode)
    q, k, v = make_qkv(2, H, Hkv, FLEX_L, FLEX_L, dtype)  # the shapes of the golden probe: no recompile
    check_against_oracle(FORWARD_ONLY[backend], q, k, v, layout, grad=False, **kw)


def test_flex_block_mask_built_once_per_layout(block_mask_builds):
    """Layers share the layout's cached BlockMask; a new layout builds its own."""
    built = block_mask_builds
    layout = AnchorLayout.from_doc_ids(flex_ids(*FLEX_PAIRS[0]))
    q, k, v = make_qkv(2, 2, 2, FLEX_L, FLEX_L, torch.float32)
    with torch.no_grad():
        outs = [flex_attention(q, k, v, layout) for _ in range(3)]  # three "layers"
    assert built == ["anchor_mask"]
    assert block_mask_for(layout) is block_mask_for(layout)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
    with torch.no_grad():
        flex_attention(q, k, v, AnchorLayout.from_doc_ids(flex_ids(*FLEX_PAIRS[1])))
    assert built == ["anchor_mask", "anchor_mask"]


def test_flex_compiles_once_for_any_softcap_or_window_value():
    """softcap and the window reach the compiled kernel as captured tensors, not Python constants: new values
    (e.g. Gemma2's 50.0, per-layer windows) reuse the compiled graph and still give the right result."""
    from torch._dynamo.utils import counters

    layout = AnchorLayout.from_doc_ids(flex_ids(*FLEX_PAIRS[0]))
    q, k, v = make_qkv(2, 4, 2, FLEX_L, FLEX_L, torch.bfloat16)  # FLEX_VARIANTS' softcap+window variant shapes
    graphs = []
    for cap, window in [(2.0, 3), (7.5, 3), (7.5, 5), (0.5, 11)]:
        check_against_oracle(flex_attention, q, k, v, layout, grad=False, softcap=cap, sliding_window=window)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == graphs[:1] * 3, graphs


def test_flex_cpu_grad_raises_clear_error():
    layout = AnchorLayout.from_doc_ids(flex_ids(*FLEX_PAIRS[0]))
    q, k, v = make_qkv(2, 2, 2, FLEX_L, FLEX_L, torch.float32)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="backend='flex' has no backward on CPU"):
        flex_attention(q, k, v, layout)
    with pytest.raises(ValueError, match="backend='flex' has no backward on CPU"):
        anchor_attention(q, k, v, layout, backend="flex")
    with pytest.raises(ValueError, match="dropout=0.1 is not supported by the 'flex' backend"):
        flex_attention(q, k, v, layout, dropout=0.1)


# ---------------------------------------------------------------------------- dispatch and entry point


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(dispatch_module, "_logged", set())


def test_dispatch_choice_on_cpu(fresh_log, monkeypatch):
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", None)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("auto", cpu, needs_grad=False) == "sdpa"  # flex is off on CPU
    assert resolve_backend("auto", cpu, dropout=0.1) == "sdpa"
    assert resolve_backend("auto", cpu, softcap=30.0) == "reference"  # sdpa cannot softcap
    for name in BACKENDS:
        assert resolve_backend(name, cpu) == name
    assert backend_fn() is sdpa_attention and backend_fn("auto", softcap=5.0) is reference_attention
    assert backend_fn("flex") is flex_attention
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got 'flash'"):
        resolve_backend("flash", cpu)


def test_dispatch_prefers_flash_kernel_when_present(fresh_log, standin):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "varlen"
    assert resolve_backend("auto", cpu, softcap=30.0) == "varlen"  # flash-attn has softcap


def test_dispatch_logs_reason_once(fresh_log, monkeypatch, caplog):
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", None)
    with caplog.at_level(logging.INFO, logger="anchorcontext"):
        for _ in range(3):
            resolve_backend("auto", torch.device("cpu"))
    msgs = [r.getMessage() for r in caplog.records if r.name == "anchorcontext"]
    assert sum("varlen backend off" in m for m in msgs) == 1, msgs
    assert sum("flex is off on CPU" in m for m in msgs) == 1, msgs


def test_varlen_without_kernel_on_cpu_raises(monkeypatch):
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", None)
    layout = AnchorLayout.from_doc_ids(doc_ids("odd_lengths"))
    q, k, v = make_qkv(1, 2, 2, L, 8, torch.float32)
    with pytest.raises(ValueError, match="backend='varlen' cannot run: varlen needs CUDA tensors"):
        varlen_attention(q, k, v, layout)


@pytest.mark.parametrize("mode", MODES)
def test_anchor_attention_accepts_ids_or_layout(mode, fresh_log, monkeypatch):
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", None)
    ids = doc_ids("batch_mixed")
    layout = AnchorLayout.from_doc_ids(ids, mode)
    q, k, v = make_qkv(ids.shape[0], 4, 2, L, 16, torch.float64)
    expected = reference_attention(q, k, v, layout)
    by_ids = anchor_attention(q, k, v, ids, mask=mode)  # auto -> sdpa on CPU
    by_layout = anchor_attention(q, k, v, layout)
    by_layout_named = anchor_attention(q, k, v, layout, mask=mode)
    for out in (by_ids, by_layout, by_layout_named):
        assert out.shape == (ids.shape[0], L, 4, 16)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    capped = anchor_attention(q, k, v, ids, mask=mode, softcap=1.0)  # auto -> reference
    torch.testing.assert_close(capped, reference_attention(q, k, v, layout, softcap=1.0), rtol=0, atol=0)


def test_anchor_attention_default_mask_is_anchor():
    ids = doc_ids("odd_lengths")
    q, k, v = make_qkv(1, 2, 2, L, 8, torch.float64)
    out = anchor_attention(q, k, v, ids, backend="reference")
    torch.testing.assert_close(out, reference_attention(q, k, v, AnchorLayout.from_doc_ids(ids, "anchor")))


# ------------------------------------------------------------------------------------- argument errors


def test_argument_errors():
    ids = doc_ids("odd_lengths")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(1, 4, 2, L, 8, torch.float32)
    cases = [
        (dict(layout=AnchorLayout.from_doc_ids(ids, "full"), mask="anchor"),
         r"mask='anchor' disagrees with the layout's mask 'full'"),
        (dict(layout=ids.tolist()), r"layout must be an AnchorLayout or a \(B, L\) doc-id tensor, got list"),
        (dict(layout=ids, mask="causal"), r"mask must be one of .*got 'causal'"),
        (dict(query=q[0]), r"query/key/value must be 4-D \(B, H, L, D\); got \(4, 61, 8\)"),
        (dict(value=v[:, :1]), r"key shape \(1, 2, 61, 8\) != value shape \(1, 1, 61, 8\)"),
        (dict(key=k[..., :4], value=v[..., :4]),
         r"key shape \(1, 2, 61, 4\) does not match query shape \(1, 4, 61, 8\)"),
        (dict(key=torch.randn(1, 3, L, 8), value=torch.randn(1, 3, L, 8)),
         r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
        (dict(layout=torch.tensor([row([7, 13], 40)])),
         r"layout has shape \(1, 40\) but query has \(B, L\) = \(1, 61\)"),
        (dict(key=k.double()), r"key dtype torch.float64 != query dtype torch.float32"),
        (dict(value=v.bfloat16()), r"value dtype torch.bfloat16 != query dtype torch.float32"),
        (dict(softcap=0.0), r"softcap must be > 0 or None, got 0.0"),
        (dict(softcap=-1.0), r"softcap must be > 0 or None, got -1.0"),
        (dict(sliding_window=0), r"sliding_window must be >= 1 or None, got 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
        (dict(backend="triton"), r"backend must be 'auto' or one of .*got 'triton'"),
    ]
    for backend in [name for name in BACKENDS if name not in FORWARD_ONLY]:  # the CPU ones
        for over, pattern in cases:
            args = dict(query=q, key=k, value=v, layout=layout, backend=backend) | over
            with pytest.raises(ValueError, match=pattern):
                anchor_attention(
                    args.pop("query"), args.pop("key"), args.pop("value"), args.pop("layout"), **args
                )


# ------------------------------------------- torch's varlen_attn across versions (signature adaptation)


@pytest.mark.parametrize("option", ["plain", "scaling", "gqa", "window3"])
@pytest.mark.parametrize(
    "fake", [torch_2_10_varlen, torch_2_11_varlen, torch_2_12_varlen], ids=["2.10", "2.11", "2.12"]
)
def test_torch_varlen_signatures(fake, option, fake_cuda_torch_varlen):  # noqa: F811
    fake_cuda_torch_varlen(fake)
    kw = {"plain": {}, "scaling": dict(scaling=0.37), "gqa": {}, "window3": dict(sliding_window=3)}[option]
    H, Hkv = (4, 2) if option == "gqa" else (4, 4)
    ids = doc_ids("batch_mixed")
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(ids.shape[0], H, Hkv, L, 16, torch.bfloat16)
    if fake is torch_2_10_varlen and option == "window3":
        with pytest.raises(ValueError, match="varlen_attn has no window_size"):
            varlen_attention(q, k, v, layout, **kw)
        return
    check_against_oracle(varlen_attention, q, k, v, layout, **kw)


def test_auto_on_cuda_respects_kernel_limits(fresh_log, monkeypatch):
    """resolve_backend for a CUDA device (no CUDA needed: only the decision is exercised)."""
    monkeypatch.setattr(varlen, "_KERNEL_OVERRIDE", None)
    monkeypatch.setattr(varlen, "flash_varlen_kernel", lambda: (None, "flash-attn not importable (test)"))
    monkeypatch.setattr(varlen, "torch_varlen_func", lambda: (torch_2_11_varlen, "torch"))
    cuda = torch.device("cuda")
    bf16 = torch.bfloat16
    assert resolve_backend("auto", cuda, dtype=bf16) == "varlen"
    assert resolve_backend("auto", cuda, dtype=bf16, sliding_window=4) == "varlen"
    assert resolve_backend("auto", cuda, dtype=torch.float32) == "flex"  # kernels take half dtypes only
    assert resolve_backend("auto", cuda, dtype=bf16, softcap=30.0) == "flex"  # torch varlen has no softcap
    assert resolve_backend("auto", cuda, dtype=bf16, dropout=0.1) == "sdpa"  # neither has dropout
    monkeypatch.setattr(varlen, "torch_varlen_func", lambda: (torch_2_10_varlen, "torch"))
    assert resolve_backend("auto", cuda, dtype=bf16) == "varlen"
    assert resolve_backend("auto", cuda, dtype=bf16, sliding_window=4) == "flex"  # 2.10: no window_size
    monkeypatch.setattr(varlen, "flash_varlen_kernel", lambda: (flash_standin.flash_attn_varlen_func, "flash_attn"))
    assert resolve_backend("auto", cuda, dtype=bf16, softcap=30.0, sliding_window=4) == "varlen"
    assert resolve_backend("auto", cuda, dtype=torch.float32) == "flex"


# ------------------------------------------------------------------------ random layouts (hypothesis)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=doc_id_batches(max_rows=3, max_len=20), mode=st.sampled_from(MODES),
       window=st.sampled_from([None, 1, 2, 4]), gqa=st.booleans())
def test_property_random_layouts_match_reference(ids, mode, window, gqa, standin):
    """float64, so every backend must agree with the dense reference to rounding (forward and grads)."""
    layout = AnchorLayout.from_doc_ids(ids, mode)
    B, n = ids.shape
    q, k, v = make_qkv(B, 4, 2 if gqa else 4, n, 8, torch.float64)
    dout = torch.randn(B, n, 4, 8, dtype=torch.float64)
    expected = run(reference_attention, q, k, v, layout, dout, sliding_window=window)
    for fn in (sdpa_attention, varlen_attention):
        out, grads = run(fn, q, k, v, layout, dout, sliding_window=window)
        for a, b in zip((out, *grads), (expected[0], *expected[1])):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ non-finite values stay in their document

NAN_IDS = [0] + [1] * 9 + [2] * 12 + [3] * 7 + [-1] * 4  # anchor, three documents, padding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", list(TRAINABLE))
def test_nonfinite_value_reaches_only_the_queries_that_see_it(backend, bad, mode, standin):
    """One NaN/inf in document 2's values changes exactly the queries allowed to see that key: document 1, the
    anchor, document 3 and padding keep their clean output bit for bit (a masked value never enters the product),
    and the other documents keep their gradients."""
    ids = torch.tensor([NAN_IDS])
    layout = AnchorLayout.from_doc_ids(ids, mode)
    n = ids.shape[1]
    q, k, v = make_qkv(1, 2, 2, n, 8, torch.float32)
    pos = 14  # document 2's 5th token
    v_bad = v.clone()
    v_bad[0, 1, pos, 3] = bad
    dout = torch.randn(1, n, 2, 8)
    out, grads = run(TRAINABLE[backend], q, k, v, layout, dout)
    out_bad, grads_bad = run(TRAINABLE[backend], q, k, v_bad, layout, dout)
    sees = layout.dense_mask()[0, :, pos]  # queries allowed to see the poisoned key
    assert sees.any() and not sees.all()
    assert not torch.isfinite(out_bad[0, sees, 1, 3]).any()  # those that see it do get it
    assert torch.isfinite(out_bad[0, :, 0]).all()  # head 0 never reads the poisoned head-1 value
    iso = ids[0] != 2  # the anchor, documents 1 and 3, padding
    if backend.startswith("reference"):  # exact: every query that may not see the key, document 2's earlier ones too
        assert torch.equal(out_bad[0, ~sees], out[0, ~sees])
    if mode == "full":  # one causal segment: later documents see the key (kernels: 0 * NaN reaches earlier ones)
        return
    assert torch.equal(out_bad[0, iso], out[0, iso])
    iso[0] = mode != "anchor"  # the anchor's dk/dv collect document 2's (NaN) queries in anchor mode
    for g, g_bad in zip(grads, grads_bad):
        assert torch.equal(g_bad[0, :, iso], g[0, :, iso])


# ----------------------------------------------------------------------- sdpa: the sliding window is banded


@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("window", [1, 7, 40])
def test_sdpa_window_is_banded_and_exact(monkeypatch, mask, window):
    """The sdpa backend's sliding window never builds a segment-sized (n x n) mask, and stays exact."""
    shapes = []
    real = sdpa.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            shapes.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    n = 300
    ids = torch.tensor([[0] + [1] * 120 + [2] * 150 + [3] * 29, [0] + [1] * 299])
    layout = AnchorLayout.from_doc_ids(ids, mask)
    torch.manual_seed(0)
    q = torch.randn(2, 4, n, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, n, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = sdpa_attention(q, k, v, layout, sliding_window=window)
    ref = reference_attention(q, k, v, layout, sliding_window=window)
    g = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert shapes, "the window must bite in this layout"
    # every mask is a band of at most 2 * window rows/keys, never the 300-token segment squared
    assert max(max(s) for s in shapes) <= 2 * window, shapes


# ------------------------------------------------------------ varlen: the gather sums the anchor in float32


def test_gather_rows_sums_repeated_rows_in_float32():
    """The varlen backend's K/V gather sums the anchor's gradient (one row gathered per document) in float32."""
    torch.manual_seed(0)
    x = torch.randn(8, 2, 16).to(torch.bfloat16).requires_grad_(True)
    index = torch.cat([torch.zeros(600, dtype=torch.long), torch.arange(1, 8)])  # row 0 = the anchor, 600 documents
    y = gather_rows(x, index)
    assert torch.equal(y, x.detach().index_select(0, index))
    g = (torch.randn(y.shape) * 3).to(torch.bfloat16)
    y.backward(g)
    exact = torch.zeros(8, 2, 16, dtype=torch.float64).index_add_(0, index, g.double())
    err = (x.grad.double() - exact).abs()
    # one final bf16 rounding of the exact sum, not 600 accumulated ones
    assert (err <= exact.abs() * 2**-8 + 1e-6).all(), err.max()
    assert x.grad.dtype == torch.bfloat16


def test_flex_nonfinite_value_stays_in_its_block_row_and_head():
    """FlexAttention (CPU, forward) skips only fully masked blocks: inside a partially masked block a masked key's
    NaN value enters P @ V with weight 0 (documented in docs/architecture.md; tests/gpu checks CUDA). It still never
    leaves its batch row and head, and every query allowed to see it gets it."""
    ids = torch.tensor([[0] + [1] * 20 + [2] * 30 + [3] * 13] * 2)  # FLEX_VARIANTS["anchor"] shapes: no recompile
    layout = AnchorLayout.from_doc_ids(ids)
    q, k, v = make_qkv(2, 2, 2, FLEX_L, FLEX_L, torch.float32)
    pos = 30  # document 2
    v_bad = v.clone()
    v_bad[0, 1, pos, 3] = float("nan")
    with torch.no_grad():
        out, out_bad = flex_attention(q, k, v, layout), flex_attention(q, k, v_bad, layout)
    assert not torch.isfinite(out_bad[0, layout.dense_mask()[0, :, pos], 1, 3]).any()
    assert torch.equal(out_bad[1], out[1]) and torch.equal(out_bad[0, :, 0], out[0, :, 0])
    assert torch.equal(out_bad[0, :, 1, :3], out[0, :, 1, :3])  # other value columns of the same head
