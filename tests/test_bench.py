"""Training-step benchmark: document lengths, FLOP accounting against dense-mask counts, and a tiny end-to-end run."""

import json

import numpy as np
import pytest
import torch
from repo_scripts import load_script

from anchorcontext import bench
from anchorcontext.layout import MASKS, AnchorLayout, dense_mask


def test_lognormal_doc_lens_fill_row_and_are_seeded():
    a = bench.lognormal_doc_lens(4097, 256.0, 1.0, np.random.default_rng(3))
    b = bench.lognormal_doc_lens(4097, 256.0, 1.0, np.random.default_rng(3))
    assert a == b
    assert sum(a) == 4096 and min(a) >= 1
    # long-tailed with the requested mean: over many rows the mean of complete documents is near 256
    rng = np.random.default_rng(0)
    lens = [n for _ in range(200) for n in bench.lognormal_doc_lens(8193, 256.0, 1.0, rng)[:-1]]
    assert 0.85 * 256 < np.mean(lens) < 1.15 * 256
    assert np.max(lens) > 4 * np.median(lens)
    with pytest.raises(ValueError, match="length"):
        bench.lognormal_doc_lens(1, 256.0, 1.0, rng)


def test_doc_stream_keeps_every_token():
    lengths = [5, 300, 17, 1, 64]
    s = bench.DocStream(lengths, np.random.default_rng(0))
    rows = [s.row(100) for _ in range(12)]
    assert all(sum(r) == 99 for r in rows)
    flat = [n for r in rows for n in r]
    # the 300-token document is split across rows, never dropped: 12 rows * 99 tokens consumed in order
    assert sum(flat) == 12 * 99 and max(flat) == 99


@pytest.mark.parametrize("mask", MASKS)
def test_attention_flops_match_dense_mask_count(mask):
    rng = np.random.default_rng(1)
    rows = [bench.doc_ids_from_lens(bench.lognormal_doc_lens(96, 12.0, 1.0, rng), 96) for _ in range(2)]
    doc_ids = torch.from_numpy(np.stack(rows))
    D, H = 16, 3
    pairs = int(dense_mask(doc_ids, mask).sum())
    assert AnchorLayout.from_doc_ids(doc_ids, mask).attention_flops(D, H) == 4 * pairs * D * H


def test_linear_params_and_step_flops_against_hand_count():
    cfg = bench.BenchConfig(preset="tiny", lengths=[64])
    model = bench.build_model(cfg, torch.device("cpu"))
    hid, H, Hkv, D, inter, V = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.hidden // cfg.heads, cfg.intermediate, cfg.vocab
    per_layer = 2 * hid * H * D + 2 * hid * Hkv * D + 3 * hid * inter
    p_mm, p_layers = bench.linear_params(model)
    assert p_layers == cfg.layers * per_layer
    assert p_mm == p_layers + V * hid  # + LM head; the embedding is a lookup, not a matmul
    assert bench.step_flops(10, p_mm, p_layers, 7, False) == 6 * p_mm * 7 + 30
    assert bench.step_flops(10, p_mm, p_layers, 7, True) == 6 * p_mm * 7 + 30 + 2 * p_layers * 7 + 10


@pytest.mark.parametrize(
    "kw, field",
    [({"masks": ["causal"]}, "masks"), ({"backends": ["flash"]}, "backends"), ({"lengths": [1]}, "lengths"),
     ({"heads": 3}, "hidden"), ({"repeats": 0}, "repeats"), ({"dtype": "fp8"}, "dtype")],
)
def test_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        bench.BenchConfig(preset="tiny", **kw)


def test_cli_parses_into_config():
    cfg = bench.parse_args(["--preset", "tiny", "--lengths", "64", "32", "--masks", "anchor", "--no_stock"])
    assert cfg.lengths == [64, 32] and cfg.masks == ["anchor"] and cfg.stock is False
    assert cfg.layers == bench.PRESETS["tiny"]["layers"] and cfg.threads == 1 and cfg.dtype == "float32"


def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    rc = bench.main(["--preset", "tiny", "--lengths", "96", "--repeats", "2", "--warmup", "1", "--mean_doc", "16",
                     "--matmul_rate", "false", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    by = {(r["backend"], r["mode"]): r for r in res["results"]}
    assert set(by) == {("stock", "full"), ("sdpa", "full"), ("sdpa", "intra_doc"), ("sdpa", "anchor")}
    assert res["config"]["threads"] == torch.get_num_threads() == 1
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["torch"] == torch.__version__
    for r in by.values():
        assert r["error"] is None and len(r["times_s"]) == 2 and r["tokens_per_s"] > 0
        assert r["step_s"] == pytest.approx(float(np.median(r["times_s"])))
        assert r["tokens_per_s"] == pytest.approx(96 / r["step_s"])
    assert by[("sdpa", "full")]["step_flop_ratio"] == 1.0 and by[("stock", "full")]["speedup_vs_stock"] == 1.0
    # anchor attends to one more key per token than intra_doc, so its limits are strictly between 1 and intra_doc's
    a, i = by[("sdpa", "anchor")], by[("sdpa", "intra_doc")]
    assert 1.0 < a["attn_flop_ratio"] < i["attn_flop_ratio"] and 1.0 < a["step_flop_ratio"] < i["step_flop_ratio"]
    assert a["fraction_of_limit_vs_full"] == pytest.approx(a["speedup_vs_full"] / a["step_flop_ratio"])
    full_t = by[("sdpa", "full")]["times_s"]
    assert a["speedup_vs_full_paired"] == pytest.approx(float(np.median([f / t for f, t in zip(full_t, a["times_s"])])))
    if res["memory_method"] and "VmHWM" in res["memory_method"]:
        assert all(r["peak_mem_bytes"] > 0 for r in by.values())
    assert "stock" in bench.format_table(res) and "anchor" in bench.format_table(res)
    md = bench.markdown_table(res).splitlines()
    assert len(md) == 2 + 4 and md[2].startswith("| 96 | stock / full |")


def test_paired_speedup_cancels_load_that_changes_between_rounds():
    # round 2 ran 3x slower for everyone: the ratio of medians is off, the paired ratio is exact
    assert bench.paired_speedup([10.0, 30.0, 30.0], [5.0, 15.0, 15.0]) == 2.0
    assert bench.paired_speedup([10.0, 10.0, 30.0], [5.0, 15.0, 15.0]) == 2.0
    assert bench.paired_speedup([], []) is None


def test_flex_check_reports_build_time_and_fractions():
    cfg = bench.BenchConfig(preset="tiny", lengths=[128], masks=["anchor"])
    recs = {("anchor", "flex"): {"step_s": 0.5, "first_step_s": 3.0}}
    out = bench._flex_check(cfg, recs, 128, np.random.default_rng(0), None, torch.device("cpu"), 0, log=lambda s, verbose=False: None)
    assert out["block_mask_build_s"] > 0
    assert out["anchor_compile_s_est"] == pytest.approx(2.5)
    assert out["anchor_build_fraction_of_step"] == pytest.approx(out["block_mask_build_s"] / 0.5)


def test_attention_benchmark_smoke(tmp_path):
    """benchmarks/attention.py runs end to end (tiny sizes, both q/k/v layouts) and its per-length summary is
    the mean / min / max of the rows' own fractions."""
    bench = load_script("benchmarks/attention.py")
    for layout in ("blhd", "bhld"):
        out_file = tmp_path / f"att_{layout}.json"
        rc = bench.main(["--lengths", "96,128", "--seeds", "0,1,2", "--heads", "2", "--head-dim", "8", "--mean-doc", "20",
                         "--repeats", "1", "--warmup", "0", "--backends", "sdpa", "--no-memory", "--layout", layout,
                         "--out", str(out_file)])
        data = json.loads(out_file.read_text())
        assert rc == 0 and data["config"]["qkv_layout"] == layout
        assert len(data["results"]) == 6 and [(s["L"], s["seeds"]) for s in data["summary"]] == [(96, [0, 1, 2]), (128, [0, 1, 2])]
        for s in data["summary"]:
            fr = [r["fraction_of_limit"] for r in data["results"] if r["L"] == s["L"]]
            assert s["mean_fraction"] == pytest.approx(sum(fr) / 3) and (s["min_fraction"], s["max_fraction"]) == (min(fr), max(fr))
            assert all(r["flop_limit"] > 1 and r["full_ms"] > 0 for r in data["results"])
