"""AnchorCollator and anchor_inputs: hand-written literals for a small batch, options, errors, tokenizers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packing_oracles import ANCHOR, PAD, corpus, expected_doc_ids, expected_labels, expected_positions
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from anchorcontext import AnchorCollator, AnchorLayout, DocumentPacker, anchor_inputs, anchor_token_id, pack_documents
from anchorcontext.packing import doc_ids_from_lens, position_ids_from_lens

X = -100  # ignored label

# Three packed rows of seq_len 8 (anchor 1, pad 0) with different layouts:
#   row 0: three documents [11 12 13] [21 22] [31] + 1 pad
#   row 1: one document filling the row
#   row 2: [51] [61 62] + 4 pad
ROWS = [
    {"input_ids": [1, 11, 12, 13, 21, 22, 31, 0], "doc_lens": [3, 2, 1]},
    {"input_ids": [1, 41, 42, 43, 44, 45, 46, 47], "doc_lens": [7]},
    {"input_ids": [1, 51, 61, 62, 0, 0, 0, 0], "doc_lens": [1, 2]},
]
DOC_IDS = [
    [0, 1, 1, 1, 2, 2, 3, -1],
    [0, 1, 1, 1, 1, 1, 1, 1],
    [0, 1, 2, 2, -1, -1, -1, -1],
]
LABELS = [
    [X, 11, 12, 13, X, 22, X, X],
    [X, 41, 42, 43, 44, 45, 46, 47],
    [X, 51, X, 62, X, X, X, X],
]
RESET = [
    [0, 1, 2, 3, 1, 2, 1, 7],
    [0, 1, 2, 3, 4, 5, 6, 7],
    [0, 1, 1, 2, 4, 5, 6, 7],
]


def test_packed_rows_literal_batch():
    batch = AnchorCollator(anchor_id=1, pad_id=0)(ROWS)
    assert set(batch) == {"input_ids", "labels", "position_ids", "anchor_layout"}
    assert batch["input_ids"].tolist() == [r["input_ids"] for r in ROWS]
    assert batch["labels"].tolist() == LABELS
    assert batch["position_ids"].tolist() == [list(range(8))] * 3
    assert all(batch[k].dtype == torch.int64 for k in ("input_ids", "labels", "position_ids"))
    layout = batch["anchor_layout"]
    assert isinstance(layout, AnchorLayout) and layout.mask == "anchor"
    assert layout.doc_ids.tolist() == DOC_IDS
    # segments per row: anchor, each document, the padding run; documents see one extra key (the anchor)
    assert layout.cu_seqlens_q.tolist() == [0, 1, 4, 6, 7, 8, 9, 16, 17, 18, 20, 24]
    assert layout.cu_seqlens_k.tolist() == [0, 1, 5, 8, 10, 11, 12, 20, 21, 23, 26, 30]
    assert layout.cu_seqlens_q.dtype == torch.int32


@pytest.mark.parametrize("mask", ["anchor", "intra_doc", "full"])
def test_reset_positions_and_mask_are_batch_properties(mask):
    batch = AnchorCollator(anchor_id=1, pad_id=0, mask=mask, positions="reset")(ROWS)
    assert batch["position_ids"].tolist() == RESET
    assert batch["labels"].tolist() == LABELS  # labels do not depend on the mask
    assert batch["anchor_layout"].mask == mask
    assert batch["anchor_layout"].doc_ids.tolist() == DOC_IDS


def test_rows_carrying_position_ids_are_used():
    rows = [dict(r, position_ids=p) for r, p in zip(ROWS, RESET)]
    batch = AnchorCollator(anchor_id=1, pad_id=0, positions="continuous")(rows)
    assert batch["position_ids"].tolist() == RESET
    rows[1] = dict(rows[1], position_ids=RESET[1][:5])
    with pytest.raises(ValueError, match="feature 1 has 5 position_ids for 8 input_ids"):
        AnchorCollator(anchor_id=1)(rows)


def test_batch_of_one_and_tensor_rows():
    row = {k: torch.tensor(v) for k, v in ROWS[2].items()}  # a dataset with set_format("torch")
    batch = AnchorCollator(anchor_id=1, pad_id=0)([row])
    assert batch["labels"].tolist() == [LABELS[2]]
    assert batch["anchor_layout"].doc_ids.tolist() == [DOC_IDS[2]]


def test_pad_to_multiple_of():
    rows = [dict(r, position_ids=p) for r, p in zip(ROWS, RESET)]
    for feats, pos in ((ROWS, [list(range(12))] * 3), (rows, [p + [8, 9, 10, 11] for p in RESET])):
        batch = AnchorCollator(anchor_id=1, pad_id=0, pad_to_multiple_of=6)(feats)
        assert batch["input_ids"].tolist() == [r["input_ids"] + [0] * 4 for r in ROWS]
        assert batch["labels"].tolist() == [lab + [X] * 4 for lab in LABELS]
        assert batch["anchor_layout"].doc_ids.tolist() == [d + [-1] * 4 for d in DOC_IDS]
        assert batch["position_ids"].tolist() == pos
    # row 1 had no padding: its new padding is a segment of its own
    assert batch["anchor_layout"].cu_seqlens_q.tolist()[5:9] == [12, 13, 20, 24]
    same = AnchorCollator(anchor_id=1, pad_id=0, pad_to_multiple_of=4)(ROWS)
    assert same["input_ids"].shape == (3, 8)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1, got 0"):
        AnchorCollator(anchor_id=1, pad_to_multiple_of=0)


def test_packs_plain_documents_when_seq_len_given():
    docs = [{"input_ids": [1, 11, 12, 13]}, {"input_ids": [21, 22, 23, 24, 25, 26]}, {"input_ids": [1, 31]}]
    batch = AnchorCollator(anchor_id=1, pad_id=0, seq_len=6)(docs)
    assert batch["input_ids"].tolist() == [[1, 11, 12, 13, 21, 22], [1, 23, 24, 25, 26, 31]]
    assert batch["labels"].tolist() == [[X, 11, 12, 13, X, 22], [X, 23, 24, 25, 26, X]]
    assert batch["anchor_layout"].doc_ids.tolist() == [[0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 2]]
    with pytest.raises(ValueError, match="needs anchor_id or a tokenizer to pack plain documents"):
        AnchorCollator(seq_len=6)(docs)


def test_missing_doc_lens_names_remove_unused_columns():
    with pytest.raises(ValueError, match=r"no 'doc_lens'.*remove_unused_columns=False"):
        AnchorCollator(anchor_id=1)([{"input_ids": r["input_ids"]} for r in ROWS])
    with pytest.raises(ValueError, match=r"feature 2 has no 'doc_lens'"):
        AnchorCollator(anchor_id=1)([ROWS[0], ROWS[1], {"input_ids": ROWS[2]["input_ids"]}])


def test_trainer_column_removal():
    # what Trainer(remove_unused_columns=True) does to each feature before the collator (LlamaForCausalLM.forward)
    from transformers.trainer_utils import RemoveColumnsCollator

    signature = ["input_ids", "attention_mask", "position_ids", "labels", "label", "label_ids"]
    wrapped = RemoveColumnsCollator(AnchorCollator(anchor_id=1, pad_id=0), signature)
    with pytest.raises(ValueError, match=r"no 'doc_lens'.*remove_unused_columns=False"):
        wrapped(ROWS)
    # plain documents keep their input_ids under the default: the collator packs them itself
    packing = RemoveColumnsCollator(AnchorCollator(anchor_id=1, pad_id=0, seq_len=8), signature)
    batch = packing([{"input_ids": [1] + r["input_ids"][1 : 1 + sum(r["doc_lens"])], "text": "x"} for r in ROWS])
    assert batch["input_ids"].tolist() == [[1, 11, 12, 13, 21, 22, 31, 41], [1, 42, 43, 44, 45, 46, 47, 51],
                                           [1, 61, 62, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    "features, match",
    [
        ([], "empty list of features"),
        ([ROWS[0], {"input_ids": [1, 2, 3], "doc_lens": [2]}], "feature 1 has 3 input_ids; row 0 has 8"),
        ([ROWS[0], {"input_ids": ROWS[1]["input_ids"], "doc_lens": [4, 4]}], r"feature 1: doc_lens \[4, 4\] do not fit"),
        ([ROWS[0], {"input_ids": [2] + ROWS[1]["input_ids"][1:], "doc_lens": [7]}], "row 1 starts with token 2, not the anchor id 1"),
    ],
)
def test_collator_bad_features(features, match):
    with pytest.raises(ValueError, match=match):
        AnchorCollator(anchor_id=1, pad_id=0)(features)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mask": "causal"}, "mask must be one of"),
        ({"positions": "absolute"}, "positions must be one of"),
        ({"seq_len": 1}, r"seq_len must be None or an int >= 2 .*got 1"),
        ({"seq_len": 8.0}, r"seq_len must be None or an int >= 2 .*got 8.0"),
        ({"return_tensors": "np"}, "return_tensors must be 'pt'.*got 'np'"),
    ],
)
def test_collator_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        AnchorCollator(anchor_id=1, **kw)


# ----------------------------------------------------------------------------------------- anchor_inputs
def test_anchor_inputs_for_own_packing():
    doc_ids = torch.tensor(DOC_IDS, dtype=torch.int32)
    out = anchor_inputs(doc_ids, positions="reset")
    assert set(out) == {"position_ids", "anchor_layout"}
    assert out["position_ids"].tolist() == RESET and out["position_ids"].dtype == torch.int64
    assert out["anchor_layout"].doc_ids.tolist() == DOC_IDS and out["anchor_layout"].mask == "anchor"
    assert anchor_inputs(doc_ids, mask="intra_doc")["position_ids"].tolist() == [list(range(8))] * 3


@pytest.mark.parametrize(
    "doc_ids, kw, match",
    [
        ([[0, 1, 1]], {}, "doc_ids must be a torch.Tensor"),
        (torch.tensor([0, 1, 1]), {}, r"doc_ids must have shape \(B, L\), got shape \(3,\)"),
        (torch.tensor([[0.0, 1.0]]), {}, "doc_ids must be an integer tensor, got dtype torch.float32"),
        (torch.zeros(0, 4, dtype=torch.long), {}, "empty batch"),
        (torch.tensor([[0, 1], [1, 1]]), {}, r"doc_ids\[1, 0\] must be the anchor id 0, got 1"),
        (torch.tensor([[0, 1, 0]]), {}, r"doc_ids\[0, 2\] is the anchor id 0"),
        (torch.tensor([[0, 1, -2]]), {}, r"doc_ids\[0, 2\] = -2 is invalid"),
        (torch.tensor([[0, -1, 1]]), {}, r"doc_ids\[0, 2\] = 1 follows padding"),
        (torch.tensor([[0, 1, 3]]), {}, r"non-contiguous document ids"),
        (torch.tensor([[0, 1, 2, 1]]), {}, r"doc_ids\[0, 3\] = 1 after 2: decreasing document ids"),
        (torch.tensor([[0, 1]]), {"mask": "none"}, "mask must be one of"),
        (torch.tensor([[0, 1]]), {"positions": "rope"}, "positions must be one of"),
    ],
)
def test_anchor_inputs_validation(doc_ids, kw, match):
    with pytest.raises(ValueError, match=match):
        anchor_inputs(doc_ids, **kw)


# -------------------------------------------------------------------------------------------- tokenizers
VOCAB = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "a": 4, "b": 5, "c": 6}


def make_tokenizer(**special) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", **special)


def test_tokenizer_with_bos_anchors_on_bos():
    tok = make_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="[PAD]")
    assert anchor_token_id(tok) == 1
    coll = AnchorCollator(tokenizer=tok, seq_len=6)
    assert (coll.anchor_id, coll.pad_id) == (1, 0)
    docs = [{"input_ids": [1] + tok("a b")["input_ids"]}, {"input_ids": tok("c c c c")["input_ids"]}]
    batch = coll(docs)
    assert batch["input_ids"].tolist() == [[1, 4, 5, 6, 6, 6], [1, 6, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, 4, 5, X, 6, 6], [X, 6, X, X, X, X]]
    rows, _ = pack_documents([tok("a b")["input_ids"]], seq_len=4, tokenizer=tok)
    assert rows[0]["input_ids"] == [1, 4, 5, 0]


def test_tokenizer_without_bos_anchors_on_eos():
    tok = make_tokenizer(eos_token="</s>")  # Qwen-like: no BOS, no pad
    assert tok.bos_token_id is None
    assert anchor_token_id(tok) == 2
    coll = AnchorCollator(tokenizer=tok)
    assert (coll.anchor_id, coll.pad_id) == (2, 2)  # pad falls back to EOS
    rows, _ = pack_documents([[4, 5, 2], [6]], seq_len=7, tokenizer=tok)
    assert rows[0]["input_ids"] == [2, 4, 5, 2, 6, 2, 2] and rows[0]["doc_lens"] == [3, 1]
    batch = coll(rows)
    assert batch["labels"].tolist() == [[X, 4, 5, 2, X, X, X]]


def test_tokenizer_vocabulary_bounds_and_missing_specials():
    tok = make_tokenizer(bos_token="<s>")
    with pytest.raises(ValueError, match=r"token id 7 outside the vocabulary \[0, 7\)"):
        pack_documents([[4, 7]], seq_len=4, tokenizer=tok)
    with pytest.raises(ValueError, match=r"token id 9 outside the vocabulary \[0, 7\)"):
        AnchorCollator(tokenizer=tok, seq_len=4)([{"input_ids": [4, 9]}])
    with pytest.raises(ValueError, match="neither bos_token_id nor eos_token_id"):
        AnchorCollator(tokenizer=make_tokenizer())


def test_packer_rows_through_collator_with_dataset_map():
    datasets = pytest.importorskip("datasets")
    tok = make_tokenizer(bos_token="<s>", eos_token="</s>", pad_token="[PAD]")
    texts = ["a b c", "c", "b b b b b b b b", "a"]
    ds = datasets.Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    packer = DocumentPacker(seq_len=5, anchor_id=anchor_token_id(tok), pad_id=tok.pad_token_id, vocab_size=len(tok))
    packed = ds.map(packer, batched=True, remove_columns=ds.column_names)
    batch = AnchorCollator(tokenizer=tok)(packed.to_list())
    assert batch["input_ids"].tolist() == [[1, 4, 5, 6, 6], [1, 5, 5, 5, 5], [1, 5, 5, 5, 5], [1, 4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, 4, 5, 6, X], [X, 5, 5, 5, 5], [X, 5, 5, 5, 5], [X, 4, X, X, X]]


# ------------------------------------------------------------------- fail loudly (issue 14 items 1-3)
def test_incoming_labels_are_kept_and_masked_on_top():
    # a completion-only mask: the prompt's -100s survive, the anchor is masked on top
    row = {"input_ids": [1, 5, 6, 7], "doc_lens": [3], "labels": [-100, -100, -100, 7]}
    assert AnchorCollator(anchor_id=1, pad_id=0)([row])["labels"].tolist() == [[X, X, X, 7]]
    # custom targets are kept as given; anchor, the first token of documents 2..n and padding become -100
    rows = [dict(r, labels=[t + 100 for t in r["input_ids"]]) for r in ROWS]
    expected = [[X if lab == X else lab + 100 for lab in row] for row in LABELS]
    assert AnchorCollator(anchor_id=1, pad_id=0, pad_to_multiple_of=5)(rows)["labels"].tolist() == [
        e + [X, X] for e in expected
    ]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([dict(ROWS[0], labels=[1] * 8), ROWS[1]], r"feature 1 has no 'labels' but feature 0 has"),
        ([ROWS[0], dict(ROWS[1], labels=[1] * 8)], r"feature 0 has no 'labels' but feature 1 has"),
        ([dict(ROWS[0], labels=[1] * 7)], r"feature 0 has 7 labels for 8 input_ids"),
        ([ROWS[0], dict(ROWS[1], position_ids=list(range(8)))], r"feature 0 has no 'position_ids' but feature 1 has"),
        ([dict(ROWS[0], labels=[1, 2, 3.5, 4, 5, 6, 7, 8])], r"feature 0: labels\[2\] = 3.5 is not an integer"),
        # 3-D (mRoPE-style) position ids per row are refused, never misread as packed positions
        ([dict(ROWS[0], position_ids=[list(range(8))] * 3)], r"feature 0: position_ids must be a flat list .*\(3, 8\)"),
    ],
)
def test_partial_or_bad_user_columns_are_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        AnchorCollator(anchor_id=1, pad_id=0)(rows)


def test_attention_mask_must_agree_with_doc_lens():
    rows = [dict(r, attention_mask=[1] * (1 + sum(r["doc_lens"])) + [0] * (7 - sum(r["doc_lens"]))) for r in ROWS]
    batch = AnchorCollator(anchor_id=1, pad_id=0)(rows)
    assert batch["labels"].tolist() == LABELS and "attention_mask" not in batch
    hole = dict(ROWS[1], attention_mask=[1, 1, 1, 0, 1, 1, 1, 1])  # a masked token inside a document
    with pytest.raises(ValueError, match=r"feature 0: attention_mask\[3\] = 0 but doc_lens \[7\] cover position 3"):
        AnchorCollator(anchor_id=1, pad_id=0)([hole])
    ones = [dict(r, attention_mask=[1] * 8) for r in ROWS]  # an all-ones mask carries no padding: pad ids decide
    assert AnchorCollator(anchor_id=1, pad_id=0)(ones)["labels"].tolist() == LABELS
    other_pad = dict(ROWS[2], input_ids=[1, 51, 61, 62, 9, 9, 9, 9], attention_mask=[1] * 4 + [0] * 4)
    assert AnchorCollator(anchor_id=1, pad_id=0)([other_pad])["labels"].tolist() == [LABELS[2]]
    covered = dict(other_pad, attention_mask=[1] * 5 + [0] * 3)  # attends a real token doc_lens leave out
    with pytest.raises(ValueError, match=r"feature 0: attention_mask\[4\] = 1 but doc_lens \[1, 2\] end at 4: "
                                         r"token 9 at position 4 is attended and not padding"):
        AnchorCollator(anchor_id=1, pad_id=0)([covered])


def test_doc_lens_must_cover_every_non_pad_token():
    with pytest.raises(ValueError, match=r"feature 0: doc_lens \[2\] sum to 2 but the row \(length 6\) goes on after "
                                         r"them: token 7 at position 3 is not padding \(pad_id=0\); doc_lens must "
                                         r"cover every token up to the padding$"):
        AnchorCollator(anchor_id=1, pad_id=0)([{"input_ids": [1, 5, 6, 7, 8, 9], "doc_lens": [2]}])
    # rows padded by a packer with another pad id: refused, and the message says how to fix it
    with pytest.raises(ValueError, match=r"token 0 at position 3 is not padding \(pad_id=2\).*padded with 0: give "
                                         r"AnchorCollator the packer's pad_id"):
        AnchorCollator(anchor_id=1, pad_id=2)([{"input_ids": [1, 5, 6, 0, 0, 0], "doc_lens": [2]}])
    with pytest.raises(ValueError, match=r"feature 1: doc_lens \[1\] sum to 1 .* token 61 at position 2"):
        AnchorCollator(anchor_id=1, pad_id=0)([ROWS[0], dict(ROWS[2], doc_lens=[1])])


@pytest.mark.parametrize("key", ["input_ids", "position_ids"])
def test_non_integral_ids_are_refused(key):
    row = dict(ROWS[0], position_ids=list(range(8)))
    row[key] = list(row[key])
    row[key][5] = 5.7
    with pytest.raises(ValueError, match=rf"feature 1: {key}\[5\] = 5.7 is not an integer"):
        AnchorCollator(anchor_id=1, pad_id=0)([dict(ROWS[0], position_ids=list(range(8))), row])
    row[key] = torch.tensor(row[key], dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"feature 1: {key}\[5\] = 5.7\d* is not an integer"):
        AnchorCollator(anchor_id=1, pad_id=0)([dict(ROWS[0], position_ids=list(range(8))), row])
    row[key] = [True] * 8
    with pytest.raises(ValueError, match=rf"feature 1: {key} must hold integers, got bool"):
        AnchorCollator(anchor_id=1, pad_id=0)([dict(ROWS[0], position_ids=list(range(8))), row])


def test_plain_documents_carry_their_labels_through_packing_and_splitting():
    docs = [
        {"input_ids": [1, 11, 12, 13], "labels": [X, X, 12, 13]},  # its BOS (the anchor) is dropped with its label
        {"input_ids": [21, 22, 23, 24, 25, 26], "labels": [X, X, X, 24, 25, 26]},  # split across two rows
        {"input_ids": [31, 32], "labels": [31, 32]},
    ]
    batch = AnchorCollator(anchor_id=1, pad_id=0, seq_len=6)(docs)
    assert batch["input_ids"].tolist() == [[1, 11, 12, 13, 21, 22], [1, 23, 24, 25, 26, 31], [1, 32, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, 12, 13, X, X], [X, X, 24, 25, 26, X], [X, 32, X, X, X, X]]
    with pytest.raises(ValueError, match=r"document 1 has 5 labels for 6 input_ids"):
        AnchorCollator(anchor_id=1, pad_id=0, seq_len=6)([docs[0], dict(docs[1], labels=[X] * 5)])
    with pytest.raises(ValueError, match=r"feature 1 has no 'labels' but feature 0 has"):
        AnchorCollator(anchor_id=1, pad_id=0, seq_len=6)([docs[0], {"input_ids": [5, 6]}])


def test_plain_documents_that_pack_to_no_rows_are_refused():
    with pytest.raises(ValueError, match=r"the 2 documents pack into no rows \(all empty after dropping a leading anchor"):
        AnchorCollator(anchor_id=1, pad_id=0, seq_len=4)([{"input_ids": []}, {"input_ids": [1]}])


# ----------------------------------------------------------- properties against the packing oracles
@settings(max_examples=100, deadline=None)
@given(corpus(), st.sampled_from(["continuous", "reset"]))
def test_collated_labels_boundaries_positions(case, positions):
    seq_len, docs = case
    rows, _ = pack_documents(docs, seq_len=seq_len, anchor_id=ANCHOR, pad_id=PAD, positions=positions)
    if not rows:
        return
    for r in rows:
        assert r["position_ids"] == expected_positions(r["doc_lens"], seq_len, positions)
        assert doc_ids_from_lens(r["doc_lens"], seq_len).tolist() == expected_doc_ids(r["doc_lens"], seq_len)
        assert position_ids_from_lens(r["doc_lens"], seq_len, positions).tolist() == r["position_ids"]
    plain = [{"input_ids": r["input_ids"], "doc_lens": r["doc_lens"]} for r in rows]
    for feats in (rows, plain):  # rows carrying position_ids, and the collator computing them
        batch = AnchorCollator(anchor_id=ANCHOR, pad_id=PAD, positions=positions)(feats)
        for b, r in enumerate(rows):
            assert batch["input_ids"][b].tolist() == r["input_ids"]
            assert batch["labels"][b].tolist() == expected_labels(r["input_ids"], r["doc_lens"])
            assert batch["anchor_layout"].doc_ids[b].tolist() == expected_doc_ids(r["doc_lens"], seq_len)
            assert batch["position_ids"][b].tolist() == expected_positions(r["doc_lens"], seq_len, positions)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus())
def test_collator_packs_plain_documents_like_the_packer(case):
    seq_len, docs = case
    want, _ = pack_documents(docs, seq_len=seq_len, anchor_id=ANCHOR, pad_id=PAD)
    if not want:
        return
    batch = AnchorCollator(anchor_id=ANCHOR, pad_id=PAD, seq_len=seq_len)([{"input_ids": d} for d in docs])
    assert batch["input_ids"].tolist() == [r["input_ids"] for r in want]
    assert batch["labels"].tolist() == [expected_labels(r["input_ids"], r["doc_lens"]) for r in want]
    assert torch.equal(batch["position_ids"], torch.arange(seq_len).expand(len(want), seq_len))
