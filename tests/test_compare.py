"""``anchorcontext compare``: the CPU preset end to end (plumbing invariants), statistics, resume, errors."""

from __future__ import annotations

import json
import pathlib
from collections import Counter

import pytest

from anchorcontext.compare import CompareOptions, aggregate, compare, main, parse_variant, spread, verdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "compare_cpu.yaml")
VARIANTS = ["full", "intra_doc", "anchor", "anchor_reset"]
# The preset, one seed and two eval lengths, to stay within seconds.
ARGV = ["--eval_lengths", "128", "256"]


def _opts(out, **kw):
    base = dict(variants=VARIANTS, seeds=[0], out=str(out), ppl_samples=1, drift_length=64, drift_offsets=[0, 17],
                progress=False)
    return CompareOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """Runs the CPU preset once, recording what the attention kernel itself is called with (the patched
    attention function calls `anchor_attention` from `anchorcontext.patches.registration`)."""
    from anchorcontext.patches import registration as patches

    out = tmp_path_factory.mktemp("cmp")
    seen: dict[str, list[str]] = {}
    current = {"run": None}
    real = patches.anchor_attention

    def spy(query, key, value, layout, **kw):
        seen.setdefault(current["run"], []).append(layout.mask)
        return real(query, key, value, layout, **kw)

    def callbacks(name):
        current["run"] = name
        return []

    mp = pytest.MonkeyPatch()
    mp.setattr(patches, "anchor_attention", spy)
    try:
        res = compare(ARGV, opts=_opts(out), config=PRESET, callbacks_for_run=callbacks)
    finally:
        mp.undo()
    return out, res, seen


def test_preset_same_weights_same_batches_right_mask(preset_run):
    _out, res, seen = preset_run
    runs = res["runs"]
    assert sorted(runs) == sorted(f"{v}-fp32-s0" for v in VARIANTS)
    rec = {r["variant"]: r["recorded"] for r in runs.values()}
    # identical initial weights and identical batches, in the same order, in every variant
    assert len({r["initial_weights"] for r in rec.values()}) == 1
    assert len({tuple(r["batches"]) for r in rec.values()}) == 1
    assert len(rec["anchor"]["batches"]) == 4 and len(set(rec["anchor"]["batches"])) == 4  # 4 steps, 4 batches
    assert len({r["rows_fingerprint"] for r in runs.values()}) == 1
    assert res["checks"]["ok"], res["checks"]["problems"]
    # the attention modules and the attention kernel saw exactly the variant's mask, in every layer of every step
    for r in runs.values():
        assert rec[r["variant"]]["attention_masks"] == {r["mask"]: 2 * 4}  # 2 layers x 4 forwards
        assert set(seen[r["run"]]) == {r["mask"]} and len(seen[r["run"]]) == 2 * 4
    assert rec["anchor_reset"]["attention_positions"].get("reset", 0) > 0
    assert "reset" not in rec["anchor"]["attention_positions"]
    # negative control: the masks change training (rows of the preset hold several documents)
    loss = {r["variant"]: [x["loss"] for x in r["losses"]] for r in runs.values()}
    assert loss["full"] != loss["anchor"] and loss["intra_doc"] != loss["anchor"]


def test_preset_writes_table_json_plots(preset_run):
    out, _res, _ = preset_run
    on_disk = json.loads((out / "compare.json").read_text())
    assert set(on_disk["aggregate"]) == {"base", *VARIANTS}
    assert on_disk["config"]["eval_lengths"] == [128, 256] and on_disk["config"]["train_seq_len"] == 128
    assert on_disk["reference"] == "full"
    table = (out / "table.txt").read_text()
    for row in ("base", *VARIANTS):
        assert any(line.startswith(row + " ") for line in table.splitlines()), row
    for col in ("ruler@128", "ruler@256", "ppl@256", "drift_bf16", "drift_fp32", "train_loss"):
        assert col in table
    # one seed: no spread, so no direction is claimed anywhere
    assert {m["vs_reference"] for r in VARIANTS[1:] for m in on_disk["aggregate"][r].values()} <= {"one seed", "n/a"}
    assert " + " not in table.split("\n\n")[0] and "?" in table
    agg = on_disk["aggregate"]["anchor"]
    assert agg["ppl@256"]["mean"] > 1 and agg["drift_bf16"]["mean"] > agg["drift_fp32"]["mean"] >= 0
    for p in ("accuracy_vs_length.png", "perplexity.png", "drift.png"):
        assert (out / p).stat().st_size > 1000
    phases = on_disk["phases"]
    assert {p["phase"] for p in phases} == {"train", "eval"} and all(p["wall_s"] > 0 for p in phases)
    assert all(p["device"].startswith("cpu") and p["dtype"] for p in phases)


def test_resume_skips_finished_runs_and_refuses_other_config(preset_run, monkeypatch):
    out, res, _ = preset_run
    from anchorcontext import training

    def no_training(*a, **k):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(training, "run", no_training)
    again = compare(ARGV, opts=_opts(out, plots=False), config=PRESET)
    assert all(r["resumed"] for r in again["runs"].values())
    assert again["aggregate"] == json.loads(json.dumps(res["aggregate"]))
    with pytest.raises(ValueError, match="another configuration"):
        compare([*ARGV, "--learning_rate", "1e-3"], opts=_opts(out, plots=False), config=PRESET)
    # options that do not change what trains (threads, eval settings) keep the finished runs
    again = compare([*ARGV, "--threads", "1", "--eval_samples", "3"], opts=_opts(out, plots=False), config=PRESET)
    assert all(r["resumed"] for r in again["runs"].values())

    class Called(Exception):
        pass

    def spy(m, d, a, r, t, **k):
        raise Called(r.overwrite_output_dir, t.resume_from_checkpoint)

    monkeypatch.setattr(training, "run", spy)
    with pytest.raises(Called) as e:  # --force retrains into the run's folder: it must be allowed to write over it
        compare(ARGV, opts=_opts(out, plots=False, force=True), config=PRESET)
    assert e.value.args == (True, None)


def test_spread_and_verdicts():
    a, b = spread([70.0, 74.0]), spread([60.0, 62.0])
    assert a["mean"] == 72.0 and a["range"] == 4.0 and a["sd"] == pytest.approx(2.8284271, rel=1e-6)
    assert verdict(a, b, higher_is_better=True) == "better"
    assert verdict(b, a, higher_is_better=True) == "worse"
    assert verdict(a, b, higher_is_better=False) == "worse"  # perplexity-like: lower is better
    # a 3-point difference inside a 4-point seed range is not a direction
    assert verdict(spread([70.0, 74.0]), spread([68.0, 70.0]), True) == "within spread"
    assert verdict(spread([80.0]), spread([10.0]), True) == "one seed"
    assert verdict(spread([]), spread([1.0, 2.0]), True) == "n/a"
    agg = aggregate({"full": [{"ruler@1": 60.0}, {"ruler@1": 62.0}], "anchor": [{"ruler@1": 70.0}, {"ruler@1": 74.0}]},
                    "full")
    assert agg["anchor"]["ruler@1"]["vs_reference"] == "better" and agg["full"]["ruler@1"]["vs_reference"] is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(variants="full,bogus"), "unknown variant 'bogus'"),
        (dict(variants="anchor,anchor"), "variants must be distinct"),
        (dict(precisions="bf16,fp8"), "precision must be among"),
        (dict(seeds="0,x"), "seeds must be integers"),
        (dict(reference="intra_doc", variants="full,anchor"), "reference must be one of"),
        (dict(drift_settings="bf16,nope"), "drift_settings entries"),
    ],
)
def test_bad_options_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CompareOptions(**kw)


def test_variant_names_and_cli_error(tmp_path, capsys):
    assert parse_variant("anchor_reset") == ("anchor", "reset")
    assert parse_variant("full") == ("full", "continuous")
    assert main(["--config", PRESET, "--variants", "full,anchr", "--out", str(tmp_path)]) == 2
    assert "unknown variant 'anchr'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: tiny\ncompare:\n  variant: [full]\n")
    assert main(["--config", str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown key 'variant'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("compare_*.yaml")))
def test_compare_presets_parse(name):
    from anchorcontext.compare import load_compare_config
    from anchorcontext.training import parse_args

    train, block = load_compare_config(ROOT / "configs" / name)
    opts = CompareOptions(**block)
    m, d, _a, r, _t = parse_args([], defaults=train)
    assert opts.variants and r.eval_tasks and d.seq_len >= 128
    if name == "compare_smollm2_gpu.yaml":  # the paper's RoPE-theta scaling at 16K, evaluated beyond it
        assert (m.model_name_or_path, m.dtype, m.rope_theta, d.seq_len) == ("smollm2", "bfloat16", 1e6, 16384)
        assert max(r.eval_lengths) > d.seq_len and opts.eval_dtype == "bfloat16"


def _tiny_patched_llama(layers=3):
    import torch
    import transformers

    import anchorcontext as ac

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return ac.patch_model(transformers.LlamaForCausalLM(cfg))


def test_recorder_counts_match_a_per_call_recomputation():
    """The recorder's device-side position counters give exactly what a host comparison on every attention call
    gives: each policy, a plain forward (no layout), a repeated forward on the same tensors, eval forwards."""
    import torch

    from anchorcontext import anchor_inputs
    from anchorcontext.collator import position_ids_for
    from anchorcontext.compare import RunRecorder

    model = _tiny_patched_llama()
    oracle = {"masks": Counter(), "positions": Counter(), "calls": 0}

    def per_call(module, args, kwargs):  # the straightforward version: two host syncs per call
        if not module.training:
            return
        oracle["calls"] += 1
        layout, pos = kwargs.get("anchor_layout"), kwargs.get("position_ids")
        oracle["masks"][getattr(layout, "mask", "none (no anchor_layout)")] += 1
        if pos is None or layout is None:
            oracle["positions"]["unknown"] += 1
            return
        cont = bool((pos == position_ids_for(layout.doc_ids, "continuous")).all())
        reset = bool((pos == position_ids_for(layout.doc_ids, "reset")).all())
        oracle["positions"]["either" if cont and reset else "continuous" if cont else "reset" if reset else "other"] += 1

    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            m.register_forward_pre_hook(per_call, with_kwargs=True)
    rec = RunRecorder()
    rec.on_train_begin(None, None, None, model=model)
    multi = torch.tensor([[0, 1, 1, 1, 2, 2, 3, 3, -1], [0, 1, 1, 2, 2, 2, 2, 2, 2]])
    single = torch.tensor([[0, 1, 1, 1, 1, 1, -1, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
    ids = torch.randint(3, 64, multi.shape, generator=torch.Generator().manual_seed(0))
    shifted = anchor_inputs(multi, mask="intra_doc")
    shifted["position_ids"] = shifted["position_ids"] + 1
    batches = [anchor_inputs(multi, mask="anchor"), anchor_inputs(multi, mask="intra_doc", positions="reset"),
               anchor_inputs(single, mask="full"), shifted, {}]
    model.train()
    with torch.no_grad():
        for kw in [*batches, batches[1]]:  # the last repeats the same tensor objects
            model(input_ids=ids, **kw)
        model.eval()
        model(input_ids=ids, **batches[0])  # not a training forward: not counted
    rec.on_train_end(None, None, None)
    got = rec.to_dict()
    assert oracle["positions"] == Counter(either=3, continuous=3, reset=6, other=3, unknown=3)  # 3 layers a forward
    assert got["attention_positions"] == dict(oracle["positions"])
    assert got["attention_masks"] == dict(oracle["masks"]) and got["attention_calls"] == oracle["calls"] == 18
    assert len(got["batches"]) == 6 and got["batches"][1] == got["batches"][5]


def test_eval_is_redone_when_the_run_model_changes(tmp_path, monkeypatch):
    """A stored evaluation belongs to the model it evaluated: after the run's saved model changes (an interrupted
    --force retrained it, a checkpoint was copied in), the next compare evaluates again instead of reusing it."""
    import torch
    from transformers import AutoModelForCausalLM

    from anchorcontext import compare as cmp

    evaluated = []

    def fake_suite(model, tokenizer, **kw):
        evaluated.append(cmp.weights_sha(model))
        return {"weights": evaluated[-1]}

    monkeypatch.setattr(cmp, "evaluate_suite", fake_suite)
    opts = _opts(tmp_path, variants=["full"], base=False, plots=False)
    first = compare(ARGV, opts=opts, config=PRESET)
    assert len(evaluated) == 1 and first["evals"]["full"][0]["weights"] == evaluated[0]
    compare(ARGV, opts=opts, config=PRESET)
    assert len(evaluated) == 1  # same model: the stored evaluation is reused
    mdir = tmp_path / "runs" / "full-fp32-s0" / "model"
    model = AutoModelForCausalLM.from_pretrained(mdir)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(mdir)
    again = compare(ARGV, opts=opts, config=PRESET)
    assert again["runs"]["full-fp32-s0"]["resumed"]
    assert len(evaluated) == 2 and evaluated[1] != evaluated[0], "the evaluation of the old model was reused"
    assert again["evals"]["full"][0]["weights"] == evaluated[1]
