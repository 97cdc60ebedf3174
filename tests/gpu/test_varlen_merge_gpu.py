"""GPU tier: the gather-free varlen merge path and the flash pin of torch's ``varlen_attn``, in bfloat16.

Skipped without CUDA. Tolerances and cases as in ``test_gpu_backends.py``. ``UNALIGNED`` has odd segment lengths,
none a multiple of 8, so every segment after the first starts at an odd token offset (pytorch #194818: cuDNN's
varlen kernel was silently wrong on unaligned inputs; we pin flash and check the result).
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_gpu_backends import CASES, DEV, VARIANTS, L, check_against_oracle, make_qkv, row

from anchorcontext import AnchorLayout
from anchorcontext.attention import varlen, varlen_attention, varlen_merge

pytestmark = pytest.mark.gpu

UNALIGNED = {
    "odd_unaligned": [row([3, 5, 7, 127, 129, 1, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27]), row([L - 2])],
}


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)


# the merge path has no softcap: VARIANTS without it, plus GQA with a window
MERGE_VARIANTS = {n: v for n, v in VARIANTS.items() if "softcap" not in v[2]}
MERGE_VARIANTS["anchor_gqa_window"] = ("anchor", (8, 2), dict(sliding_window=37))


@pytest.mark.parametrize("case", list(CASES) + list(UNALIGNED))
@pytest.mark.parametrize("variant", list(MERGE_VARIANTS))
def test_varlen_merge_gpu_matches_reference(variant, case):
    mode, (H, Hkv), kw = MERGE_VARIANTS[variant]
    ids = {**CASES, **UNALIGNED}[case]
    layout = AnchorLayout.from_doc_ids(torch.tensor(ids), mode)
    q, k, v = make_qkv(2, H, Hkv)
    check_against_oracle(varlen_merge.varlen_merge_attention, q, k, v, layout, **kw)


@pytest.mark.parametrize("impl", ["gather", "merge"])
@pytest.mark.parametrize("variant", ["anchor", "anchor_gqa_window"])
def test_varlen_unaligned_odd_segments(impl, variant):
    """backend='varlen' through either path on odd, unaligned segments; torch's kernel is pinned to flash."""
    if varlen.unavailable_reason(torch.device(DEV), dtype=torch.bfloat16) is not None:
        pytest.skip("no varlen kernel")
    (H, Hkv), kw = ((4, 4), {}) if variant == "anchor" else ((8, 2), dict(sliding_window=37))
    layout = AnchorLayout.from_doc_ids(torch.tensor(UNALIGNED["odd_unaligned"]))
    q, k, v = make_qkv(2, H, Hkv)
    with varlen_merge.use_impl(impl):
        check_against_oracle(varlen_attention, q, k, v, layout, **kw)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_torch_varlen_runs_flash_under_the_pin():
    """torch's varlen_attn logs the kernel it runs: under the pin, flash and never cuDNN (forward and backward).
    The handler sits on torch's own logger: the ``torch`` logger does not propagate to the root (caplog)."""
    fn, src = varlen.flash_varlen_kernel()
    if fn is not None or varlen.torch_varlen_func()[0] is None:
        pytest.skip(f"the gather path uses {src}, not torch's varlen_attn")
    print("torch varlen could pick cuDNN unpinned:", varlen.torch_varlen_cudnn_possible(torch.device(DEV)))
    layout = AnchorLayout.from_doc_ids(torch.tensor(UNALIGNED["odd_unaligned"]))
    q, k, v = (t.requires_grad_(True) for t in make_qkv(2, 4, 4))
    log = logging.getLogger("torch.nn.attention.varlen")
    rec, level = _Records(), log.level
    log.addHandler(rec)
    log.setLevel(logging.INFO)
    try:
        with varlen_merge.use_impl("gather"):
            varlen_attention(q, k, v, layout).float().sum().backward()
    finally:
        log.removeHandler(rec)
        log.setLevel(level)
    assert sum("Flash" in m for m in rec.messages) >= 2, rec.messages  # forward and backward
    assert not any("cudnn" in m.lower() for m in rec.messages), rec.messages


@pytest.mark.parametrize(("mode", "options"), [
    ("anchor", {"ROWS_GUARANTEED_SAFE": True}),
    ("intra_doc", {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}),
])
def test_flex_kernel_option_variants_match_reference(mode, options, monkeypatch):
    """The FlexAttention kernel_options the benchmark times are promises about the mask: they must keep the result
    (every query sees itself: rows are safe; intra_doc's kv blocks per query block are one contiguous run)."""
    from anchorcontext.attention import flex, flex_attention

    monkeypatch.setattr(flex, "KERNEL_OPTIONS", options)
    layout = AnchorLayout.from_doc_ids(torch.tensor(CASES["odd_lengths+single_doc"], device=DEV), mode)
    q, k, v = make_qkv(2, 4, 4)
    check_against_oracle(flex_attention, q, k, v, layout)


def test_flex_merge_variant_matches_reference():
    """benchmarks/attention.py's experimental flex_merge (intra_doc BlockMask, anchor merged through flex's LSE, plain
    autograd through the LSE) against the oracle, forward and backward, compiled on the GPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    layout = AnchorLayout.from_doc_ids(torch.tensor(CASES["many_docs+trailing_padding"], device=DEV))
    q, k, v = make_qkv(2, 8, 2)
    check_against_oracle(lambda q_, k_, v_, lay: bench.flex_merge(q_, k_, v_, lay), q, k, v, layout)
