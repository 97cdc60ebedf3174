"""Packing: DocumentPacker / pack_documents / doc_ids_from_lens / position_ids_from_lens.

Oracles are written independently of the packer: for ``overflow="split"`` the rows are the stream of all
(BOS-stripped) document tokens cut into pieces of ``seq_len - 1``, and each row's ``doc_lens`` are the run
lengths of the document tags inside its piece; for ``overflow="drop"`` the rows are characterised by
properties (whole documents, in order, greedy). Labels, boundaries and positions come from per-token loops
(tests/packing_oracles.py, shared with the collator's property tests in tests/test_collator.py).
"""

from __future__ import annotations

import itertools

import datasets
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packing_oracles import ANCHOR, IGNORE, PAD, VOCAB, corpus, expected_labels, stripped
from repo_scripts import load_script

from anchorcontext import AnchorCollator, DocumentPacker, pack_documents
from anchorcontext.packing import doc_ids_from_lens, position_ids_from_lens

datasets.disable_progress_bars()


# ------------------------------------------------------------------------------------------- oracles
def split_oracle(docs: list[list[int]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Rows of ``overflow="split", last="pad"``: ``(tokens without the anchor, doc_lens)`` per row."""
    room = seq_len - 1
    stream = [(k, t) for k, d in enumerate(docs) for t in stripped(d)]
    rows = []
    for s in range(0, len(stream), room):
        piece = stream[s : s + room]
        lens = [len(list(g)) for _, g in itertools.groupby(piece, key=lambda kt: kt[0])]
        rows.append(([t for _, t in piece], lens))
    return rows


def unpack(rows: list[dict], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Check the row format; return ``(tokens without the anchor, doc_lens)`` per row."""
    out = []
    for r in rows:
        ids, lens = r["input_ids"], r["doc_lens"]
        used = sum(lens)
        assert len(ids) == seq_len
        assert ids[0] == ANCHOR
        assert all(n > 0 for n in lens) and used <= seq_len - 1
        assert ids[1 + used :] == [PAD] * (seq_len - 1 - used)
        out.append((ids[1 : 1 + used], list(lens)))
    return out


# ---------------------------------------------------------------------------------- split (default)
@settings(max_examples=200, deadline=None)
@given(corpus())
def test_split_every_token_once_in_order(case):
    seq_len, docs = case
    rows, stats = pack_documents(docs, seq_len=seq_len, anchor_id=ANCHOR, pad_id=PAD, vocab_size=VOCAB)
    got = unpack(rows, seq_len)
    assert got == split_oracle(docs, seq_len)
    # only the last row may be partial
    assert all(sum(lens) == seq_len - 1 for _, lens in got[:-1])

    kept = [stripped(d) for d in docs]
    n_tokens = sum(map(len, kept))
    chunks = sum(len(lens) for _, lens in got)
    assert stats.documents == len(docs)
    assert stats.empty_documents == sum(1 for d in kept if not d)
    assert stats.tokens_in == stats.tokens_packed == n_tokens
    assert stats.rows == len(rows)
    assert stats.padding_tokens == len(rows) * (seq_len - 1) - n_tokens
    # a document is split iff its first and last tokens fall into different rows of the stream
    room, start, split = seq_len - 1, 0, 0
    for d in kept:
        if d:
            split += start // room != (start + len(d) - 1) // room
        start += len(d)
    assert stats.split_documents == split
    assert chunks >= sum(1 for d in kept if d) + split
    assert stats.dropped_documents == stats.dropped_tokens == stats.dropped_last_rows == 0


def test_split_continuation_chunks_literal():
    rows, stats = pack_documents(
        [[1, 2, 3], [1, 4, 5, 6, 7, 8, 9, 10, 11], [12]], seq_len=4, anchor_id=1, pad_id=0
    )
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [1, 5, 6, 7], [1, 8, 9, 10], [1, 11, 12, 0]]
    assert [r["doc_lens"] for r in rows] == [[2, 1], [3], [3], [1, 1]]
    assert stats.split_documents == 1 and stats.padding_tokens == 1


def test_strip_bos_only_the_leading_one_and_option_off():
    rows, _ = pack_documents([[1, 1, 5, 1]], seq_len=6, anchor_id=1, pad_id=0)
    assert rows[0]["input_ids"] == [1, 1, 5, 1, 0, 0] and rows[0]["doc_lens"] == [3]
    rows, _ = pack_documents([[1, 5]], seq_len=4, anchor_id=1, pad_id=0, strip_bos=False)
    assert rows[0]["input_ids"] == [1, 1, 5, 0] and rows[0]["doc_lens"] == [2]
    # a distinct document BOS (e.g. anchor = EOS): the document BOS is stripped, the anchor is EOS
    rows, _ = pack_documents([[7, 5, 7]], seq_len=5, anchor_id=2, bos_id=7, pad_id=0)
    assert rows[0]["input_ids"] == [2, 5, 7, 0, 0]


# ------------------------------------------------------------------------------------------- drop
@settings(max_examples=200, deadline=None)
@given(corpus())
def test_drop_whole_documents_in_order_greedy(case):
    seq_len, docs = case
    room = seq_len - 1
    rows, stats = pack_documents(docs, seq_len=seq_len, anchor_id=ANCHOR, pad_id=PAD, overflow="drop")
    got = unpack(rows, seq_len)
    kept = [stripped(d) for d in docs]
    fits = [d for d in kept if 0 < len(d) <= room]
    too_long = [d for d in kept if len(d) > room]
    # every fitting document appears whole, once, in order; the rest are counted as dropped
    pieces = []
    for toks, lens in got:
        for n in lens:
            pieces.append(toks[:n])
            toks = toks[n:]
    assert pieces == fits
    assert stats.dropped_documents == len(too_long)
    assert stats.dropped_tokens == sum(map(len, too_long))
    assert stats.split_documents == 0
    assert stats.tokens_in == stats.tokens_packed + stats.dropped_tokens
    # greedy: a row is closed only when the next document does not fit into it
    for (_, lens), (_, nxt) in itertools.pairwise(got):
        assert sum(lens) + nxt[0] > room


def test_drop_counts_and_reports(caplog):
    with caplog.at_level("WARNING", logger="anchorcontext"):
        rows, stats = pack_documents([[2, 3], [4, 5, 6, 7, 8], [9]], seq_len=4, anchor_id=1, overflow="drop")
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 9]]
    assert (stats.dropped_documents, stats.dropped_tokens) == (1, 5)
    assert "dropped 1 documents" in caplog.text


@settings(max_examples=100, deadline=None)
@given(corpus(), st.sampled_from(["split", "drop"]))
def test_last_drop_removes_only_a_partial_last_row(case, overflow):
    seq_len, docs = case
    kw = {"seq_len": seq_len, "anchor_id": ANCHOR, "pad_id": PAD, "overflow": overflow}
    padded, _ = pack_documents(docs, **kw)
    dropped, stats = pack_documents(docs, last="drop", **kw)
    partial = bool(padded) and sum(padded[-1]["doc_lens"]) < seq_len - 1
    assert dropped == (padded[:-1] if partial else padded)
    assert stats.dropped_last_rows == int(partial)
    assert stats.dropped_last_tokens == (sum(padded[-1]["doc_lens"]) if partial else 0)
    if overflow == "split":  # with "drop", earlier rows close early when the next document does not fit
        assert all(sum(r["doc_lens"]) == seq_len - 1 for r in dropped)
    assert stats.tokens_in == stats.tokens_packed + stats.dropped_tokens + stats.dropped_last_tokens


def test_drop_warning_reports_each_call_once(caplog):
    packer = DocumentPacker(seq_len=4, anchor_id=1, overflow="drop")
    with caplog.at_level("WARNING", logger="anchorcontext"):
        list(packer.iter_rows([[2, 3, 4, 5, 6], [7]]))
        assert len(caplog.records) == 1 and "dropped 1 documents (5 tokens)" in caplog.text
        list(packer.iter_rows([[7], [8]]))  # e.g. the next Dataset.map batch: nothing dropped, nothing logged
        assert len(caplog.records) == 1
        list(packer.iter_rows([[2, 3, 4, 5]]))
        assert len(caplog.records) == 2 and "2 documents in total so far" in caplog.records[-1].getMessage()
    assert packer.stats.dropped_documents == 2 and packer.stats.dropped_tokens == 9


def test_drop_full_final_row_is_kept_with_last_drop():
    rows, stats = pack_documents([[5, 6, 7]], seq_len=4, anchor_id=1, overflow="drop", last="drop")
    assert [r["input_ids"] for r in rows] == [[1, 5, 6, 7]] and stats.dropped_last_rows == 0


# -------------------------------------------------------------------------------------- positions
def test_position_literals():
    assert position_ids_from_lens([2, 3], 8, "continuous").tolist() == list(range(8))
    assert position_ids_from_lens([2, 3], 8, "reset").tolist() == [0, 1, 2, 1, 2, 3, 6, 7]
    assert position_ids_from_lens([7], 8, "reset").tolist() == list(range(8))
    assert position_ids_from_lens([], 4, "reset").tolist() == [0, 1, 2, 3]
    rows, _ = pack_documents([[5, 6], [7, 8, 9]], seq_len=8, anchor_id=1, positions="reset")
    assert rows[0]["position_ids"] == [0, 1, 2, 1, 2, 3, 6, 7]
    rows, _ = pack_documents([[5, 6]], seq_len=4, anchor_id=1)
    assert "position_ids" not in rows[0]


# ------------------------------------------------------------------------------ datasets / streaming
def _docs(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[ANCHOR] + rng.integers(2, VOCAB, size=int(k)).tolist() for k in rng.integers(0, 30, size=n)]


@pytest.mark.parametrize("batch_size", [7, 1000])
def test_dataset_map_batched(batch_size):
    docs = _docs(40)
    ds = datasets.Dataset.from_dict({"input_ids": docs, "text": [str(i) for i in range(len(docs))]})
    packer = DocumentPacker(seq_len=16, anchor_id=ANCHOR, pad_id=PAD, positions="reset")
    out = ds.map(packer, batched=True, batch_size=batch_size, remove_columns=ds.column_names)
    assert sorted(out.column_names) == ["doc_lens", "input_ids", "position_ids"]
    # each map batch is packed on its own (its last partial row is padded), in order
    want = []
    for s in range(0, len(docs), batch_size):
        want += pack_documents(docs[s : s + batch_size], seq_len=16, anchor_id=ANCHOR, pad_id=PAD, positions="reset")[0]
    assert out.to_list() == want
    assert packer.stats.documents == len(docs)
    assert packer.stats.tokens_packed == sum(len(stripped(d)) for d in docs)
    collated = AnchorCollator(anchor_id=ANCHOR, pad_id=PAD)(out.select(range(3)).to_list())
    assert collated["input_ids"].shape == (3, 16)


def test_dataset_map_column_option_and_missing_column():
    ds = datasets.Dataset.from_dict({"tokens": _docs(5)})
    with pytest.raises(ValueError, match="no column 'input_ids'"):
        ds.map(DocumentPacker(seq_len=8, anchor_id=ANCHOR), batched=True, remove_columns=["tokens"])
    out = ds.map(DocumentPacker(seq_len=8, anchor_id=ANCHOR, column="tokens"), batched=True, remove_columns=["tokens"])
    assert out.to_list() == pack_documents(ds["tokens"], seq_len=8, anchor_id=ANCHOR)[0]


def test_iterable_dataset_streaming():
    docs = _docs(30, seed=1)
    want, _ = pack_documents(docs, seq_len=16, anchor_id=ANCHOR, pad_id=PAD)
    stream = datasets.Dataset.from_dict({"input_ids": docs}).to_iterable_dataset(num_shards=3)
    packer = DocumentPacker(seq_len=16, anchor_id=ANCHOR, pad_id=PAD)
    assert list(packer.iter_rows(ex["input_ids"] for ex in stream)) == want
    # as a lazy IterableDataset.map: batches are packed independently, like Dataset.map
    mapped = stream.map(DocumentPacker(seq_len=16, anchor_id=ANCHOR, pad_id=PAD), batched=True, batch_size=1000,
                        remove_columns=["input_ids"])
    assert isinstance(mapped, datasets.IterableDataset)
    assert list(mapped) == want


def test_iterable_dataset_is_pulled_lazily():
    pulled = []

    def gen():
        for i in range(10_000):
            pulled.append(i)
            yield {"input_ids": [ANCHOR, 2, 3, 4]}

    stream = datasets.IterableDataset.from_generator(gen)
    first = next(DocumentPacker(seq_len=10, anchor_id=ANCHOR).iter_rows(ex["input_ids"] for ex in stream))
    assert first["doc_lens"] == [3, 3, 3]
    assert len(pulled) < 100  # datasets may buffer a little; it does not read the stream


@pytest.mark.parametrize("overflow", ["split", "drop"])
def test_generator_is_not_materialised(overflow):
    pulled = 0

    def infinite():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield [ANCHOR] + [2 + i % 40] * 3

    rows = DocumentPacker(seq_len=10, anchor_id=ANCHOR, overflow=overflow).iter_rows(infinite())
    first = next(rows)
    assert first["doc_lens"] == [3, 3, 3]
    assert pulled == 3  # no read-ahead: the row is emitted as soon as it is full
    assert len(list(itertools.islice(rows, 4))) == 4 and pulled == 15


# ---------------------------------------------------------------------------------------- bad input
def test_empty_document_list():
    with pytest.raises(ValueError, match="documents is empty"):
        pack_documents([], seq_len=8, anchor_id=1)
    with pytest.raises(ValueError, match="documents is empty"):
        list(DocumentPacker(seq_len=8, anchor_id=1).iter_rows(iter(())))


@pytest.mark.parametrize("seq_len", [1, 0, -4, 2.5, "8", None, True])
def test_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 2.*got " + repr(seq_len).replace(".", r"\.")):
        DocumentPacker(seq_len=seq_len, anchor_id=1)


def test_numpy_integer_arguments_are_accepted():
    rows, _ = pack_documents([np.array([5, 6], dtype=np.int32)], seq_len=np.int64(4), anchor_id=np.int64(1))
    assert rows[0]["input_ids"] == [1, 5, 6, 0]


@pytest.mark.parametrize(
    "doc, kw, match",
    [
        ([3, 50], {"vocab_size": 50}, r"document 1 has token id 50 outside the vocabulary \[0, 50\)"),
        ([3, -1], {}, r"document 1 has token id -1 outside the vocabulary"),
        ([3, 2.5], {}, r"document 1\[1\] = 2.5 is not an integer"),
        ([3, True], {}, r"document 1 must hold integers, got bool"),
        ([[3, 4], [5, 6]], {}, r"document 1 must be a flat list of integers, got shape \(2, 2\)"),
    ],
)
def test_bad_token_ids(doc, kw, match):
    with pytest.raises(ValueError, match=match):
        pack_documents([[2, 3], doc], seq_len=8, anchor_id=1, **kw)


def test_document_token_ids_follow_the_int_array_rule():
    """One rule for integral ids (layout.int_array): a document token 6.0 packs as 6, through iter_rows and
    Dataset.map alike, as the collator reads it in a row; 6.5 is refused with int_array's message naming the
    document and the position, as the collator refuses it naming the feature and the position."""
    from anchorcontext.layout import int_array

    ints, floats, fractional = [5, 6, 7], [5, 6.0, 7], [5, 6.5, 7]
    packer = DocumentPacker(seq_len=8, anchor_id=ANCHOR, pad_id=PAD)
    want = list(packer.iter_rows([[2, 3], ints]))
    assert list(packer.iter_rows([[2, 3], floats])) == want
    assert packer({"input_ids": [[2, 3], floats]}) == packer({"input_ids": [[2, 3], ints]})
    collator = AnchorCollator(anchor_id=ANCHOR, pad_id=PAD)
    row = want[0]["input_ids"]
    as_float = [float(t) for t in row]
    assert torch.equal(collator([{"input_ids": as_float, "doc_lens": [2, 3]}])["input_ids"],
                       collator([{"input_ids": row, "doc_lens": [2, 3]}])["input_ids"])

    with pytest.raises(ValueError) as int_rule:
        int_array(fractional, "document 1")
    assert str(int_rule.value) == "document 1[1] = 6.5 is not an integer"
    with pytest.raises(ValueError) as packing:
        list(packer.iter_rows([[2, 3], fractional]))
    assert str(packing.value) == str(int_rule.value)
    with pytest.raises(ValueError, match=r"^feature 0: input_ids\[4\] = 6.5 is not an integer$"):
        collator([{"input_ids": row[:4] + [6.5] + row[5:], "doc_lens": [2, 3]}])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"anchor_id": 50, "vocab_size": 50}, r"anchor_id must be a token id in \[0, vocab_size=50\), got 50"),
        ({"anchor_id": -1}, r"anchor_id must be a token id.*got -1"),
        ({"anchor_id": 1, "pad_id": 60, "vocab_size": 50}, r"pad_id must be a token id.*got 60"),
        ({"anchor_id": 1, "vocab_size": 0}, r"vocab_size must be a positive int or None, got 0"),
        ({"anchor_id": 1, "overflow": "truncate"}, r"overflow must be 'split' or 'drop', got 'truncate'"),
        ({"anchor_id": 1, "last": "keep"}, r"last must be 'pad' or 'drop', got 'keep'"),
        ({"anchor_id": 1, "positions": "absolute"}, r"positions must be one of \('continuous', 'reset'\), got 'absolute'"),
    ],
)
def test_bad_packer_options(kw, match):
    with pytest.raises(ValueError, match=match):
        DocumentPacker(seq_len=8, **kw)


def test_pack_documents_needs_an_anchor():
    with pytest.raises(ValueError, match="needs anchor_id or a tokenizer"):
        pack_documents([[2, 3]], seq_len=8)


@pytest.mark.parametrize(
    "lens, match",
    [([3, 5], r"doc_lens \[3, 5\] do not fit a row of seq_len=8"), ([2, 0], r"doc_lens \[2, 0\] do not fit"), ([-1], "do not fit")],
)
def test_doc_lens_mismatching_the_row(lens, match):
    with pytest.raises(ValueError, match=match):
        doc_ids_from_lens(lens, 8)


def test_bad_positions_value_for_helpers():
    with pytest.raises(ValueError, match="positions must be one of"):
        position_ids_from_lens([2], 4, "rope")


def test_packing_benchmark_smoke(tmp_path):
    """benchmarks/packing.py runs end to end on a tiny corpus and reports consistent figures."""
    bench = load_script("benchmarks/packing.py")
    out_file = tmp_path / "packing.json"
    out = bench.main(["--seq-len", "512", "--tokens", "20000", "--mean-doc", "100", "--batch-sizes", "1,4",
                      "--repeats", "1", "--out", str(out_file)])
    assert out_file.exists() and [r["batch_size"] for r in out["results"]] == [1, 4]
    n_rows = out["datasets_map"]["rows"]  # one map batch here: the same rows as iter_rows
    for r in out["results"]:
        assert r["rows"] == n_rows - n_rows % r["batch_size"]
        for clock in ("cpu", "wall"):
            assert r[clock]["end_to_end_tokens_per_s"] > 0
    assert out["corpus"]["tokens"] >= 20000


# ---------------------------------------------------------------------------- labels through packing
def test_packer_carries_labels_through_splitting_and_dataset_map():
    docs = [[ANCHOR, 11, 12, 13], [21, 22, 23, 24, 25, 26], [31, 32]]
    labels = [[IGNORE, IGNORE, 12, 13], [IGNORE, IGNORE, IGNORE, 24, 25, 26], [31, 32]]
    packer = DocumentPacker(seq_len=6, anchor_id=ANCHOR, pad_id=PAD)
    rows = list(packer.iter_rows(docs, labels))
    assert [r["input_ids"] for r in rows] == [[1, 11, 12, 13, 21, 22], [1, 23, 24, 25, 26, 31], [1, 32, 0, 0, 0, 0]]
    # each token keeps its own label; the anchor and padding get -100 (boundaries are the collator's job)
    assert [r["labels"] for r in rows] == [[IGNORE, IGNORE, 12, 13, IGNORE, IGNORE], [IGNORE, IGNORE, 24, 25, 26, 31],
                                           [IGNORE, 32, IGNORE, IGNORE, IGNORE, IGNORE]]
    ds = datasets.Dataset.from_dict({"input_ids": docs, "labels": labels})
    mapped = ds.map(DocumentPacker(seq_len=6, anchor_id=ANCHOR, pad_id=PAD), batched=True, remove_columns=ds.column_names)
    assert mapped["labels"] == [r["labels"] for r in rows]
    dropped = list(DocumentPacker(seq_len=4, anchor_id=ANCHOR, pad_id=PAD, overflow="drop").iter_rows(docs, labels))
    assert [r["labels"] for r in dropped] == [[IGNORE, IGNORE, 12, 13], [IGNORE, 31, 32, IGNORE]]


@pytest.mark.parametrize(
    "labels, match",
    [
        ([[1, 2, 3, 4], [1]], r"document 1 has 1 labels for 6 input_ids"),
        ([[1, 2, 3, 4]], r"labels ran out at document 1"),
        ([[1, 2, 3, 4], [1] * 6, [1]], r"labels has more lists than the 2 documents"),
        ([[1, 2.5, 3, 4], [1] * 6], r"document 0 labels\[1\] = 2.5 is not an integer"),
    ],
)
def test_packer_labels_must_match_documents(labels, match):
    docs = [[ANCHOR, 11, 12, 13], [21, 22, 23, 24, 25, 26]]
    with pytest.raises(ValueError, match=match):
        list(DocumentPacker(seq_len=6, anchor_id=ANCHOR, pad_id=PAD).iter_rows(docs, labels))


def test_non_integral_values_are_refused_not_cast():
    from anchorcontext.packing import int_array

    assert int_array([3, 4.0, np.int32(5)], "x").tolist() == [3, 4, 5]
    assert int_array(torch.tensor([1, 2]), "x").dtype == np.int64
    for bad, match in (([1, 5.7], r"x\[1\] = 5.7 is not an integer"), ([True, 2], "x must hold integers, got bool"),
                       (["a"], "x must hold integers"), ([[1]], "x must be a flat list")):
        with pytest.raises(ValueError, match=match):
            int_array(bad, "x")
    with pytest.raises(ValueError, match=r"doc_lens\[0\] = 2.5 is not an integer"):
        doc_ids_from_lens([2.5], 8)


@pytest.mark.parametrize("bad", [["5"], [b"5"], [3, "4"], [float("inf")], [1e30], [2**63]],
                         ids=["str", "bytes", "mixed_str", "inf", "1e30", "2**63"])
def test_int_array_refuses_text_and_values_outside_int64(bad):
    from anchorcontext.packing import int_array

    with pytest.raises(ValueError, match=r"^x\b"):
        int_array(bad, "x")


def test_packed_jsonl_with_a_fractional_token_id_is_refused(tmp_path):
    """Through the training CLI's data path: a packed row with 5.7 names the row and position (was cast to 5)."""
    import json

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from anchorcontext.training import DataArguments, build_datasets

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                              unk_token="t3")),
                                  bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3")
    rows = [{"input_ids": [1, 5, 6, 7], "doc_lens": [3]}, {"input_ids": [1, 5, 5.7, 7], "doc_lens": [3]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArguments(dataset=str(path), seq_len=4, eval_fraction=0.0, shuffle_documents=False, max_eval_rows=0)
    with pytest.raises(ValueError, match=r"packed row 1: input_ids\[2\] = 5.7 is not an integer"):
        build_datasets(args, tok)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus(), st.sampled_from(["split", "drop"]))
def test_labels_travel_with_their_tokens(case, overflow):
    """Each token's own label (here token + 1000) stays with it through stripping, splitting and dropping; the
    collator then adds only the boundary -100s."""
    seq_len, docs = case
    labels = [[t + 1000 for t in d] for d in docs]
    packer = DocumentPacker(seq_len=seq_len, anchor_id=ANCHOR, pad_id=PAD, overflow=overflow)
    rows = list(packer.iter_rows(docs, labels))
    for r in rows:
        used = sum(r["doc_lens"])
        assert r["labels"] == [IGNORE] + [t + 1000 for t in r["input_ids"][1 : 1 + used]] + [IGNORE] * (seq_len - 1 - used)
    if rows and overflow == "split":
        batch = AnchorCollator(anchor_id=ANCHOR, pad_id=PAD, seq_len=seq_len)(
            [{"input_ids": d, "labels": lab} for d, lab in zip(docs, labels)])
        want = [[x if x == IGNORE else x + 1000 for x in expected_labels(r["input_ids"], r["doc_lens"])] for r in rows]
        assert batch["labels"].tolist() == want
