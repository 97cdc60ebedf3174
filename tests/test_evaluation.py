"""Evaluation suite: exact-length RULER-style prompts, needle placement, scoring, oracle/random models,
perplexity against a full-logits reference, the evaluate() pipeline and the CLI."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from anchorcontext import assets
from anchorcontext.evaluation import (
    DEFAULT_TASKS,
    TASKS,
    RulerGenerator,
    cli,
    evaluate,
    format_table,
    heldout_windows,
    parse_lengths,
    parse_tasks,
    perplexity_by_length,
    score_prediction,
    string_match_all,
    string_match_part,
    token_nll,
)
from anchorcontext.evaluation.ruler import _count_subsequence


@pytest.fixture(scope="module")
def tok():
    return assets.train_bpe_tokenizer()  # cached under ~/.cache/anchorcontext after the first run


@pytest.fixture(scope="module")
def gen(tok):
    return RulerGenerator(tok, seed=0)


# ----------------------------------------------------------------------------------------- oracle


def _context(text: str) -> str:
    return text.split("\n", 1)[1].rsplit("\nQuestion:", 1)[0].rsplit("\nWhat are all", 1)[0]


def oracle_answer(text: str) -> str:
    """Solve a prompt by reading it (regexes and counting): what a perfect long-context model would say."""
    if m := re.search(r"What are all the special magic \w+ for (.+) mentioned in the provided text\?", text):
        keys = m.group(1).replace(", and ", ", ").split(", ")
        vals = [v for k in keys for v in re.findall(rf"special magic \w+ for {re.escape(k)} is: (\S+)\.", text)]
        return " " + ", ".join(vals)
    if m := re.search(r"assigned the value (\d+) in the text above", text):
        edges = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", text)
        found, frontier = [], {m.group(1)}
        while frontier:
            new = {a for a, b in edges if b in frontier and a not in found}
            found += sorted(new)
            frontier = new
        return " " + " ".join(found)
    if m := re.search(r"The pass key is (\d+)\. Remember it", text):
        return " " + m.group(1)
    k = 10 if "most common words" in text else 3
    words = re.findall(r"[A-Za-z]+", _context(text))
    return " " + " ".join(w for w, _ in Counter(words).most_common(k))


def make_oracle(tokenizer):
    def generate(batch, max_new_tokens):
        return [oracle_answer(tokenizer.decode(ids)) for ids in batch]

    return generate


def make_random(seed=0):
    rng = random.Random(seed)

    def generate(batch, max_new_tokens):
        return [" ".join(str(rng.randint(1_000_000, 9_999_999)) for _ in range(3)) for _ in batch]

    return generate


# --------------------------------------------------------------------------------------- generator


@pytest.mark.parametrize("length", [400, 777, 2048])
def test_every_task_has_exact_length_and_answer_in_prompt(gen, tok, length):
    for task in DEFAULT_TASKS:
        s = gen.sample(task, length, index=1)
        assert len(s.input_ids) == length, task
        assert all(isinstance(t, int) and 0 <= t < len(tok) for t in s.input_ids)
        a, b = s.context_span
        assert 0 < a < b < length
        text = tok.decode(s.input_ids)
        # Every reference is in the prompt, and the oracle (reading the prompt) finds exactly the references.
        for ref in s.references:
            assert ref in text, (task, ref)
        assert score_prediction(task, oracle_answer(text), s.references) == 1.0, task


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_2", "passkey"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_once_at_requested_depth(gen, tok, task, depth):
    length = 1024
    s = gen.sample(task, length, index=0, depth=depth)
    (start, end), (c0, c1) = s.needle_spans[0], s.context_span
    needle_ids = s.input_ids[start:end]
    needle_text = tok.decode(needle_ids)
    assert s.references[0] in needle_text
    assert s.query in needle_text  # the queried key ("" for passkey)
    assert _count_subsequence(s.input_ids, needle_ids) == 1
    assert tok.decode(s.input_ids).count(needle_text.strip()) == 1
    assert c0 <= start < end <= c1
    # Depth: the needle starts at the sentence boundary nearest depth * filler, within one sentence.
    filler = (c1 - c0) - (end - start)
    pos = start - c0
    unit = {"noise": 6, "needle": 25, "essay": 64}[TASKS[task].haystack]  # longest haystack sentence
    assert abs(pos - depth * filler) <= unit, (pos, depth * filler)
    before = tok.decode(s.input_ids[c0:start]).rstrip()
    assert pos in (0, filler) or before.endswith((".", "!", "?", ":", ";", ")")), before[-40:]


def test_multi_needle_tasks_place_all_needles(gen, tok):
    s = gen.sample("niah_multivalue", 1500, depth=0.25)
    assert len(s.references) == len(s.needle_spans) == 4 and len(set(s.references)) == 4
    for (a, b), ref in zip(s.needle_spans, s.references):
        assert ref in tok.decode(s.input_ids[a:b])
    q = gen.sample("niah_multiquery", 1500)
    assert len(q.references) == 4 and q.query.count(", ") == 3
    vt = gen.sample("vt", 1500)
    starts = [a for a, _ in vt.needle_spans]
    assert starts == sorted(starts) and len(vt.references) == 5  # the chain appears in assignment order


def test_same_seed_same_prompts_other_seed_differs(tok):
    a = RulerGenerator(tok, seed=7).generate("all", [512, 1000], samples=2)
    b = RulerGenerator(tok, seed=7).generate(list(reversed(DEFAULT_TASKS)), [1000, 512], samples=2)
    key = {(s.task, s.length, s.index): s for s in b}
    assert len(a) == len(b) == len(DEFAULT_TASKS) * 4
    for s in a:  # a sample never depends on which other tasks/lengths are generated with it
        t = key[(s.task, s.length, s.index)]
        assert s.input_ids == t.input_ids and s.references == t.references
    c = RulerGenerator(tok, seed=8).generate("all", [512], samples=1)
    assert all(x.input_ids != y.input_ids for x, y in zip(c, [s for s in a if s.length == 512 and s.index == 0]))


def test_depth_grid_and_bos_modes(tok):
    samples = RulerGenerator(tok).generate("passkey", [300], samples=5)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    never = RulerGenerator(tok, bos="never").sample("passkey", 300)
    always = RulerGenerator(tok, bos="always").sample("passkey", 300)
    assert never.input_ids[0] != tok.bos_token_id and always.input_ids[0] == tok.bos_token_id
    assert len(always.input_ids) == len(never.input_ids) == 300
    assert tok.bos_token_id not in always.input_ids[1:]


def test_bad_arguments(gen):
    with pytest.raises(ValueError, match=r"length 40 is too small for task 'niah_single_1'"):
        gen.sample("niah_single_1", 40)
    with pytest.raises(ValueError, match=r"too small for task 'cwe'"):
        gen.sample("cwe", 90)
    with pytest.raises(ValueError, match="unknown task 'niah_single_9'"):
        gen.sample("niah_single_9", 512)
    with pytest.raises(ValueError, match="unknown task 'bogus'"):
        parse_tasks("niah_single_1,bogus")
    with pytest.raises(ValueError, match="depth"):
        gen.sample("passkey", 512, depth=1.5)
    with pytest.raises(ValueError, match="samples"):
        gen.generate("passkey", [512], samples=0)
    with pytest.raises(ValueError, match="lengths: cannot parse 'four'"):
        parse_lengths("1k,four")
    with pytest.raises(ValueError, match="bos"):
        RulerGenerator(gen.tokenizer, bos="sometimes")
    assert parse_lengths("512, 1k,2K,1.5k") == [512, 1024, 2048, 1536]
    assert parse_tasks("niah,vt")[-1] == "vt" and len(parse_tasks("niah")) == 8


# ----------------------------------------------------------------------------------------- scoring


def test_string_match_scoring():
    refs = ["1234567", "7654321"]
    assert string_match_all(" The numbers are 1234567 and 7654321.", refs) == 1.0
    assert string_match_all(" 1234567, then 1111111", refs) == 0.5
    assert string_match_all(" none here", refs) == 0.0
    assert string_match_all(" ABCDE and fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
    assert string_match_part(" only 7654321", refs) == 1.0
    assert string_match_part(" 123456", refs) == 0.0  # a prefix is not a match
    assert score_prediction("vt", "XQZ ABC", ["XQZ", "ABC", "DEF", "GHI"]) == 0.5
    with pytest.raises(ValueError, match="references"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="unknown task"):
        score_prediction("nope", "x", ["x"])


def test_oracle_scores_100_and_random_scores_0(tok):
    kw = {"tasks": "all", "lengths": [512, 900], "samples": 3, "seed": 3, "perplexity": False, "progress": False}
    good = evaluate(make_oracle(tok), tok, name="oracle", **kw)
    assert all(v == 100.0 for by_len in good["scores"].values() for v in by_len.values()), good["scores"]
    assert good["average"] == {"512": 100.0, "900": 100.0}
    bad = evaluate(make_random(), tok, name="random", **kw)
    assert max(v for by_len in bad["scores"].values() for v in by_len.values()) < 5.0
    assert len(good["records"]) == len(DEFAULT_TASKS) * 2 * 3
    rec = good["records"][0]
    assert {"task", "length", "prompt_tokens", "prediction", "score", "references", "depth"} <= set(rec)
    assert all(r["prompt_tokens"] == r["length"] for r in good["records"])
    # The depth x length grid covers NIAH + passkey samples.
    assert set(good["niah_depth"]) == {"512", "900"} and set(good["niah_depth"]["512"]) == {"0", "0.5", "1"}
    table = format_table([good, bad])
    assert "oracle" in table and "random" in table and "niah_multiquery" in table


# -------------------------------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def tiny(tok):
    return assets.tiny_llama(tok, seed=0)


def test_token_nll_matches_full_logits(tiny, tok):
    ids = torch.randint(3, len(tok), (2, 50))
    ref = F.cross_entropy(tiny(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    got = token_nll(tiny, ids, chunk=7)  # several chunks of the vocabulary projection
    assert got.shape == (2, 49)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_ids"):
        token_nll(tiny, ids[:, :1])


def test_heldout_windows_are_contiguous_document_slices(tok):
    docs = assets.heldout_split(assets.stdlib_documents())[1]
    wins, names = heldout_windows(tok, 300, 5, docs=docs, bos="always")
    assert len(wins) == 5 and all(len(w) == 300 and w[0] == tok.bos_token_id for w in wins)
    by_name = {d["name"]: tok(d["text"])["input_ids"] for d in docs}
    for w, n in zip(wins, names):
        doc, body = by_name[n], w[1:]
        assert any(doc[i : i + len(body)] == body for i in range(0, len(doc) - len(body) + 1, len(body)))
    assert heldout_windows(tok, 300, 5, docs=docs, bos="always") == (wins, names)
    none, _ = heldout_windows(tok, 10**7, 2, docs=docs)
    assert none == []


def test_perplexity_by_length(tiny, tok):
    docs = assets.heldout_split(assets.stdlib_documents())[1]
    # Nested (default): every length scores prefixes of the same longest windows.
    res = perplexity_by_length(tiny, tok, [128, 64], samples=2, docs=docs, progress=False)
    assert res["nested"] is True
    wins, names = heldout_windows(tok, 128, 2, docs=docs)
    ref = token_nll(tiny, torch.tensor(wins)).double()
    for L in (64, 128):
        r = res["by_length"][str(L)]
        assert r["windows"] == 2 and r["tokens"] == 2 * (L - 1) and r["documents"] == sorted(set(names))
        assert r["nll"] == pytest.approx(ref[:, : L - 1].mean().item(), rel=1e-6)
        assert r["ppl"] == pytest.approx(torch.tensor(r["nll"]).exp().item())
        bins = r["by_position"]
        assert bins[0]["start"] == 1 and bins[-1]["end"] == L
        # The bins partition positions 1..L-1: their token-weighted mean is the overall mean.
        weighted = sum(b["nll"] * (b["end"] - b["start"]) for b in bins) / (L - 1)
        assert weighted == pytest.approx(r["nll"], rel=1e-9)
    # Independent windows per length, and a length no document reaches.
    ind = perplexity_by_length(tiny, tok, [64, 10**7], samples=2, docs=docs, nested=False, progress=False)
    assert ind["nested"] is False and ind["by_length"][str(10**7)]["windows"] == 0
    w64, _ = heldout_windows(tok, 64, 2, docs=docs)
    assert ind["by_length"]["64"]["nll"] == pytest.approx(token_nll(tiny, torch.tensor(w64)).double().mean().item())
    # A random model is near-uniform over the vocabulary.
    assert abs(res["by_length"]["128"]["nll"] - torch.log(torch.tensor(float(len(tok)))).item()) < 0.5


# --------------------------------------------------------------------------------- pipeline and CLI


def test_evaluate_hf_model_writes_outputs(tiny, tok, tmp_path):
    tiny.train()
    res = evaluate(
        tiny, tok, tasks="passkey,vt", lengths="256", samples=2, out_dir=tmp_path, name="tiny",
        max_new_tokens=3, batch_size=2, progress=False,
    )  # fmt: skip
    assert tiny.training  # mode restored
    assert res["model_info"]["attn_implementation"] == "sdpa"
    assert len(res["records"]) == 4 and all(r["prompt_tokens"] == 256 for r in res["records"])
    assert all(isinstance(r["prediction"], str) and r["seconds"] > 0 for r in res["records"])
    assert res["timing"]["ruler_s_by_length"]["256"] == pytest.approx(sum(r["seconds"] for r in res["records"]))
    assert res["perplexity"]["by_length"]["256"]["windows"] == 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"][0]["records"] == res["records"]
    for png in ("accuracy_vs_length.png", "niah_depth.png", "perplexity.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_run_compare_export_and_errors(tmp_path, capsys):
    common = ["--tasks", "passkey", "--lengths", "256", "--samples", "1", "--max-new-tokens", "2", "--no-progress"]
    assert cli.main(["--model", "a=tiny", *common, "--no-perplexity", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["--model", "b=tiny", *common, "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "passkey" in out and "perplexity" in out
    assert cli.main(["--compare", str(tmp_path / "a/results.json"), str(tmp_path / "b/results.json"),
                     "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    table = (tmp_path / "c" / "table.txt").read_text()
    assert re.search(r"^a\s+passkey", table, re.MULTILINE) and re.search(r"^b\s+passkey", table, re.MULTILINE)
    assert [m["name"] for m in json.loads((tmp_path / "c/results.json").read_text())["models"]] == ["a", "b"]

    assert cli.main(["--model", "tiny", *common, "--export-jsonl", str(tmp_path / "p.jsonl")]) == 0
    line = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert line["task"] == "passkey" and line["references"][0] in line["input"]

    capsys.readouterr()
    assert cli.main(["--model", "tiny", "--tasks", "bogus", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'bogus'" in capsys.readouterr().err
    assert cli.main(["--model", "tiny", "--tasks", "vt", "--lengths", "20", "--no-progress",
                     "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "too small for task 'vt'" in capsys.readouterr().err
