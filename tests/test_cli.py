"""Conventions shared by every ``anchorcontext`` subcommand: flag spellings, ``--version``, default outputs, help."""

from __future__ import annotations

import pytest

from anchorcontext import __version__, bench, cli, demo
from anchorcontext.argparsing import ArgumentParser
from anchorcontext.diagnostics.cli import RopeDiagnoseArguments
from anchorcontext.evaluation import cli as eval_cli


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"anchorcontext {__version__}"


def test_argument_parser_takes_both_spellings():
    p = ArgumentParser()
    p.add_argument("--seq-len", type=int)
    p.add_argument("--max_steps", type=int)
    p.add_argument("--mask")
    for argv in (["--seq-len", "3", "--max_steps", "4"], ["--seq_len", "3", "--max-steps", "4"]):
        a = p.parse_args([*argv, "--mask", "anchor"])
        assert (a.seq_len, a.max_steps, a.mask) == (3, 4, "anchor")
    with pytest.raises(SystemExit):
        p.parse_args(["--seq.len", "3"])


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--max_new_tokens"])
def test_eval_flags_take_both_spellings(flag):
    a = eval_cli._parser().parse_args(["--model", "tiny", flag, "3", "--no_perplexity", "--ppl-samples", "2"])
    assert (a.max_new_tokens, a.no_perplexity, a.ppl_samples) == (3, True, 2)
    assert a.out == "runs/eval"


def test_demo_flags_take_both_spellings(capsys):
    assert demo.main(["--seq_len", "48"]) == 0
    assert demo.main(["--seq-len", "48"]) == 0
    out = capsys.readouterr().out
    assert out.count("rows of 48 tokens") == 2


def test_bench_and_diagnose_write_under_runs_by_default():
    assert bench.parse_args(["--preset", "tiny"]).out == "runs/bench/results.json"
    assert bench.parse_args(["--preset", "tiny"]).stock is True
    assert bench.parse_args(["--preset", "tiny", "--out", "x.json"]).out == "x.json"
    assert RopeDiagnoseArguments().out == "runs/diagnose"


def test_bench_no_stock_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no_stock, --no-stock turn off --stock (also run the unpatched model" in text
    cfg = bench.parse_args(["--preset", "tiny", "--no-stock", "--no_memory"])
    assert (cfg.stock, cfg.memory, cfg.matmul_rate) == (False, False, True)


def test_docs_name_only_files_that_exist():
    """Every ``docs/*.md`` the README and docs mention, and every relative Markdown link in them, exists."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    missing = []
    for md in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = md.read_text(encoding="utf-8")
        for name in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
            if not (root / name).is_file():
                missing.append(f"{md.name}: {name}")
        for link in re.findall(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)", text):
            if not (md.parent / link).is_file():
                missing.append(f"{md.name}: {link}")
    assert not missing, missing


@pytest.mark.parametrize("flag", ["--help-all", "--help_all"])
def test_train_help_all_takes_both_spellings_and_explains_negations(flag, capsys):
    assert cli.main(["train", flag]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: anchorcontext train")
    assert "--sp_size" in text and "--mask" in text and "--max_steps" in text  # run, anchor and Trainer options
    # HfArgumentParser's own help for --no_plots repeats --plots' help with "(default: False)": the opposite
    assert "--no_plots, --no-plots turn off --plots (write PNG plots (matplotlib))" in text
    assert "turn off --eval_before_after" in text


@pytest.mark.parametrize("flag", ["--no_plots", "--no-plots"])
def test_train_negated_flags_turn_the_option_off(flag, tmp_path):
    from anchorcontext.training import parse_args

    *_, run_args, _t = parse_args(["--quick", flag, "--no_eval_before_after"])
    assert (run_args.plots, run_args.eval_before_after) == (False, False)
    *_, run_args, _t = parse_args(["--quick"])
    assert (run_args.plots, run_args.eval_before_after) == (True, True)  # the default stands without the flag
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: tiny\nplots: false\n")
    *_, run_args, _t = parse_args(["--config", str(cfg)])
    assert (run_args.plots, run_args.eval_before_after) == (False, True)  # the file's value stands
    *_, run_args, _t = parse_args(["--config", str(cfg), "--plots", "true"])
    assert run_args.plots is True
