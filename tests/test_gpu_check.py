"""CPU-side logic of the GPU check: benchmarks/attention.py's masks and backend variants, scripts/merge_bench_json.py."""

from __future__ import annotations

import json
import subprocess

import pytest
from repo_scripts import ROOT, load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/attention.py")


def test_attention_benchmark_masks_and_flex_variants(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.BACKEND_FNS, "flex_contig", bench.sdpa_attention)  # the selection, without a compile
    monkeypatch.setattr(bench, "block_mask_for", lambda *a, **k: None)
    out = tmp_path / "att.json"
    rc = bench.main(["--lengths", "96", "--heads", "2", "--head-dim", "8", "--mean-doc", "20", "--repeats", "1",
                     "--warmup", "0", "--masks", "anchor,intra_doc,full", "--backends", "sdpa,flex_contig",
                     "--no-memory", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert rc == 0
    got = sorted((r["mask"], r["backend"]) for r in rows)
    # flex_contig (BLOCKS_ARE_CONTIGUOUS) is false for the anchor mask: never run there
    assert got == sorted([("anchor", "sdpa"), ("intra_doc", "sdpa"), ("full", "sdpa"), ("intra_doc", "flex_contig"),
                          ("full", "flex_contig")])
    limits = {(r["mask"], r["backend"]): r["flop_limit"] for r in rows}
    assert limits[("full", "sdpa")] == 1 and limits[("anchor", "sdpa")] > 1 and limits[("intra_doc", "sdpa")] > 1
    summary = json.loads(out.read_text())["summary"]
    assert sorted((s["mask"], s["backend"]) for s in summary) == got


def test_attention_benchmark_records_a_failing_variant(bench, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("kernel option not supported here")

    monkeypatch.setitem(bench.BACKEND_FNS, "flex_b64", broken)
    out = tmp_path / "att.json"
    rc = bench.main(["--lengths", "96", "--heads", "2", "--head-dim", "8", "--mean-doc", "20", "--repeats", "1",
                     "--warmup", "0", "--backends", "flex_b64,sdpa", "--no-memory", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert rc == 0 and sorted(r["backend"] for r in rows) == ["flex_b64", "sdpa"]
    err = next(r for r in rows if r["backend"] == "flex_b64")
    assert err["error"] == "RuntimeError: kernel option not supported here" and "full_ms" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--masks", "anchor,causal"], r"--masks must name some of anchor,intra_doc,full, got \['causal'\]"),
    (["--backends", "varlen,flash"], r"--backends: unknown \['flash'\]"),
])
def test_attention_benchmark_argument_errors(bench, argv, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_args(argv)


def test_merge_bench_json(tmp_path):
    merge = load_script("scripts/merge_bench_json.py")
    a, b, missing = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "none.json"
    a.write_text(json.dumps({"config": {"x": 1}, "results": [{"r": 1}], "summary": [{"s": 1}]}))
    b.write_text(json.dumps({"config": {"x": 2}, "results": [{"r": 2}, {"r": 3}], "summary": []}))
    assert merge.main([str(a), str(missing), str(b)]) == 0
    doc = json.loads(a.read_text())
    assert doc["results"] == [{"r": 1}, {"r": 2}, {"r": 3}] and doc["summary"] == [{"s": 1}]
    assert [r["config"] for r in doc["runs"]] == [{"x": 1}, {"x": 2}] and doc["config"] == {"x": 1}
    assert merge.main([str(a)]) == 0  # merging a merged file again keeps its runs, no nesting
    assert [r["config"] for r in json.loads(a.read_text())["runs"]] == [{"x": 1}, {"x": 2}]
    assert merge.main([str(missing)]) == 0 and not missing.exists()


def test_gpu_check_script_help_and_bad_argument():
    script = ROOT / "scripts" / "gpu_check.sh"
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "At most" in help_text and "8 files" in help_text and "GPU_FLEX_S" in help_text
    bad = subprocess.run(["bash", str(script), "--gpu"], check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --gpu" in bad.stderr


def test_flex_merge_variant_forward_matches_reference(bench, monkeypatch):
    """The experimental flex_merge variant (intra_doc BlockMask + the anchor merged through flex's LSE) computes the
    anchor mask: forward on CPU against the float64 reference, through eager flex_attention (compiled CPU flex has no
    LSE output); the compiled kernel and the backward are checked in tests/gpu."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(bench._flex, "_compiled_flex", lambda: flex_attention)

    from anchorcontext import AnchorLayout
    from anchorcontext.attention import reference_attention

    torch.manual_seed(0)
    ids = torch.tensor([[0] + [1] * 7 + [2] * 13 + [3] * 1 + [4] * 40 + [-1] * 2, [0] + [1] * 63])
    layout = AnchorLayout.from_doc_ids(ids)
    q = torch.randn(2, 64, 4, 16).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D), as the benchmark passes
    k, v = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    with torch.no_grad():
        out = bench.flex_merge(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), rtol=2e-5, atol=2e-5)
