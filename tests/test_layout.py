"""AnchorLayout: golden masks, varlen metadata, validation errors, and property tests of its invariants.

Golden masks are hand-written literals (``1`` = may attend, ``.`` = masked; rows are queries, columns
keys), checked here against :func:`dense_mask`; tests/test_backends.py checks every backend's effective mask
against them.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from golden_masks import GOLDEN, GOLDEN_DOC_IDS, GOLDEN_WINDOW3, golden_ids, parse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import doc_id_batches

from anchorcontext import AnchorLayout, dense_mask
from anchorcontext.layout import validate_doc_ids

MODES = ("anchor", "intra_doc", "full")


# --------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [None, 3])
def test_golden_dense_mask(mode, window):
    golden = parse((GOLDEN if window is None else GOLDEN_WINDOW3)[mode])
    assert torch.equal(dense_mask(golden_ids(), mode, window)[0], golden)
    layout = AnchorLayout.from_doc_ids(golden_ids(), mode)
    assert torch.equal(layout.dense_mask(window)[0], golden)


def test_golden_literals_relations():
    """Sanity of the hand-written literals themselves: anchor = intra_doc + the anchor column for
    document queries; both lie inside plain causal attention."""
    anchor, intra, full = (parse(GOLDEN[m]) for m in MODES)
    is_doc_query = torch.tensor(GOLDEN_DOC_IDS) > 0
    anchor_column = torch.zeros(12, 12, dtype=torch.bool)
    anchor_column[:, 0] = is_doc_query
    assert torch.equal(anchor, intra | anchor_column)
    assert torch.equal(full, torch.ones(12, 12, dtype=torch.bool).tril())
    assert not (anchor & ~full).any()


# ------------------------------------------------------------------------------------ varlen metadata


def test_metadata_anchor_two_rows():
    ids = torch.tensor([GOLDEN_DOC_IDS, [0] + [1] * 11])
    lay = AnchorLayout.from_doc_ids(ids)
    # row 0: [A] [1 1 1] [2] [3 3 3 3 3] [pad pad]; row 1: [A] [1 x 11]
    assert lay.cu_seqlens_q.tolist() == [0, 1, 4, 5, 10, 12, 13, 24]
    assert lay.cu_seqlens_k.tolist() == [0, 1, 5, 7, 13, 15, 16, 28]
    assert lay.kv_index.tolist() == (
        [0] + [0, 1, 2, 3] + [0, 4] + [0, 5, 6, 7, 8, 9] + [10, 11] + [12] + [12] + list(range(13, 24))
    )
    assert lay.cu_seqlens_q.dtype == torch.int32 and lay.cu_seqlens_k.dtype == torch.int32
    assert lay.kv_index.dtype == torch.int64
    assert (lay.max_seqlen_q, lay.max_seqlen_k) == (11, 12)
    assert type(lay.max_seqlen_q) is int and type(lay.max_seqlen_k) is int
    assert lay.seqlens_q == (1, 3, 1, 5, 2, 1, 11)
    assert lay.seqlens_k == (1, 4, 2, 6, 2, 1, 12)
    assert lay.seg_row == (0, 0, 0, 0, 0, 1, 1)
    assert lay.seg_anchor == (False, True, True, True, False, False, True)
    assert (lay.batch_size, lay.seq_len, lay.num_segments) == (2, 12, 7)


def test_metadata_intra_doc_and_full():
    ids = torch.tensor([GOLDEN_DOC_IDS, [0] + [1] * 11])
    intra = AnchorLayout.from_doc_ids(ids, "intra_doc")
    assert intra.cu_seqlens_q.tolist() == [0, 1, 4, 5, 10, 12, 13, 24]
    assert intra.cu_seqlens_k.tolist() == intra.cu_seqlens_q.tolist()
    assert intra.kv_index is None and intra.max_seqlen_q == intra.max_seqlen_k == 11
    assert not any(intra.seg_anchor)
    full = AnchorLayout.from_doc_ids(ids, "full")
    assert full.cu_seqlens_q.tolist() == full.cu_seqlens_k.tolist() == [0, 12, 24]
    assert full.kv_index is None and full.max_seqlen_q == full.max_seqlen_k == 12
    assert full.seg_row == (0, 1)


def test_metadata_edge_rows():
    lay = AnchorLayout.from_doc_ids(torch.tensor([[0]]))  # L = 1: the anchor alone
    assert lay.cu_seqlens_q.tolist() == lay.cu_seqlens_k.tolist() == [0, 1] and lay.kv_index.tolist() == [0]
    lay = AnchorLayout.from_doc_ids(torch.tensor([[0, -1, -1], [0, 1, -1]]))  # a row with no document
    assert lay.cu_seqlens_q.tolist() == [0, 1, 3, 4, 5, 6]
    assert lay.cu_seqlens_k.tolist() == [0, 1, 3, 4, 6, 7]
    assert lay.kv_index.tolist() == [0, 1, 2, 3, 3, 4, 5]


def test_layout_accepts_int32_and_moves():
    lay = AnchorLayout.from_doc_ids(torch.tensor([[0, 1, 1, 2]], dtype=torch.int32))
    assert lay.doc_ids.dtype == torch.int64 and lay.cu_seqlens_k.tolist() == [0, 1, 4, 6]
    assert lay.to("cpu") is lay


@pytest.mark.parametrize("mode", MODES)
def test_attention_flops_counts_allowed_pairs(mode):
    ids = torch.tensor([GOLDEN_DOC_IDS, [0] + [1] * 11])
    lay = AnchorLayout.from_doc_ids(ids, mode)
    assert lay.attention_flops(head_dim=8, num_heads=3) == 4 * 8 * 3 * int(lay.dense_mask().sum())


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "ids,pattern",
    [
        ([[1, 1, 2]], r"doc_ids\[0, 0\] must be the anchor id 0, got 1"),
        ([[0, 1, 1], [2, 1, 1]], r"doc_ids\[1, 0\] must be the anchor id 0, got 2"),
        ([[-1, 1, 1]], r"doc_ids\[0, 0\] must be the anchor id 0, got -1"),
        ([[0, 1, 0, 2]], r"doc_ids\[0, 2\] is the anchor id 0"),
        ([[0, 1, 3, 3]], r"doc_ids\[0, 2\] = 3 after 1: non-contiguous"),
        ([[0, 2, 2]], r"doc_ids\[0, 1\] = 2 after 0: non-contiguous"),
        ([[0, 1, 2, 1]], r"doc_ids\[0, 3\] = 1 after 2: decreasing"),
        ([[0, 1, 1], [0, 1, 2], [0, 2, 1]], r"doc_ids\[2, 1\] = 2 after 0: non-contiguous"),
        ([[0, 1, -1, 1]], r"doc_ids\[0, 3\] = 1 follows padding"),
        ([[0, -1, 1]], r"doc_ids\[0, 2\] = 1 follows padding"),
        ([[0, 1, -2]], r"doc_ids\[0, 2\] = -2 is invalid"),
    ],
)
def test_validation_values(ids, pattern):
    t = torch.tensor(ids)
    with pytest.raises(ValueError, match=pattern):
        validate_doc_ids(t)
    with pytest.raises(ValueError, match=pattern):
        AnchorLayout.from_doc_ids(t)


@pytest.mark.parametrize(
    "ids,pattern",
    [
        (torch.tensor([0, 1, 1]), r"doc_ids must have shape \(B, L\), got shape \(3,\)"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"got shape \(1, 2, 3\)"),
        (torch.tensor([[0.0, 1.0]]), r"doc_ids must be an integer tensor, got dtype torch.float32"),
        (torch.tensor([[True, False]]), r"got dtype torch.bool"),
        ([[0, 1, 1]], r"doc_ids must be a torch.Tensor of shape \(B, L\), got list"),
        (torch.zeros(0, 5, dtype=torch.long), r"doc_ids is an empty batch: shape \(0, 5\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"doc_ids is an empty batch: shape \(2, 0\)"),
    ],
)
def test_validation_shape_dtype_empty(ids, pattern):
    with pytest.raises(ValueError, match=pattern):
        AnchorLayout.from_doc_ids(ids)


def test_validation_mask_name():
    with pytest.raises(ValueError, match=r"mask must be one of .*got 'causal'"):
        AnchorLayout.from_doc_ids(golden_ids(), "causal")
    with pytest.raises(ValueError, match=r"mask must be one of .*got 'doc'"):
        dense_mask(golden_ids(), "doc")


# ------------------------------------------------------------------------- boundaries derived by the layout
def test_from_doc_lens_equals_from_doc_ids():
    lay = AnchorLayout.from_doc_lens([[3, 1, 5], [11]], 12, "intra_doc")
    assert lay.doc_ids.tolist() == [GOLDEN_DOC_IDS, [0] + [1] * 11] and lay.mask == "intra_doc"
    ref = AnchorLayout.from_doc_ids(torch.tensor([GOLDEN_DOC_IDS, [0] + [1] * 11]), "intra_doc")
    assert lay.cu_seqlens_q.tolist() == ref.cu_seqlens_q.tolist() and lay.seqlens_k == ref.seqlens_k
    with pytest.raises(ValueError, match=r"row 1: doc_lens \[6, 6\] do not fit a row of seq_len=12"):
        AnchorLayout.from_doc_lens([[3], [6, 6]], 12)
    with pytest.raises(ValueError, match="empty batch"):
        AnchorLayout.from_doc_lens([], 12)


def test_position_ids_labels_and_offsets_of_the_golden_row():
    lay = AnchorLayout.from_doc_ids(golden_ids())
    assert lay.local_offsets.tolist() == [[0, 0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1]]
    assert lay.position_ids("continuous").tolist() == [list(range(12))]
    assert lay.position_ids("reset").tolist() == [[0, 1, 2, 3, 1, 1, 2, 3, 4, 5, 10, 11]]
    ids = torch.arange(100, 112)[None]
    X = -100
    assert lay.labels(ids).tolist() == [[X, 101, 102, 103, X, X, 106, 107, 108, 109, X, X]]
    own = torch.tensor([[7, X, 8, 9, 10, 11, X, 13, 14, 15, 16, 17]])  # a user mask survives; boundaries added
    assert lay.labels(ids, own).tolist() == [[X, X, 8, 9, X, X, X, 13, 14, 15, X, X]]
    assert own[0, 0] == 7  # not modified in place
    with pytest.raises(ValueError, match="positions must be one of"):
        lay.position_ids("rope")


def test_segment_plan_and_table_are_cached_on_the_layout():
    lay = AnchorLayout.from_doc_ids(torch.tensor([GOLDEN_DOC_IDS, [0] + [1] * 11]))
    plan = lay.segment_plan()
    assert plan == (((0, 1, 0), (1, 3, 1), (4, 1, 1), (5, 5, 1), (10, 2, 0)), ((0, 1, 0), (1, 11, 1)))
    assert lay.segment_plan() is plan
    table = lay.segment_table()
    assert table.tolist() == [[b, s, n, a] for b, segs in enumerate(plan) for s, n, a in segs]
    assert lay.segment_table() is table
    calls = []
    assert lay.cached("k", lambda: calls.append(1) or "v") == "v" and lay.cached("k", lambda: calls.append(1)) == "v"
    assert calls == [1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [None, 3])
def test_mask_mod_is_the_dense_mask_pointwise(mode, window):
    """The predicate flex builds its BlockMask from, called one (q, k) at a time, equals dense_mask."""
    lay = AnchorLayout.from_doc_ids(golden_ids(), mode)
    mod = lay.mask_mod(window)
    assert mod.__name__ == f"{mode}_mask" + ("" if window is None else f"_window{window}")
    b, h = torch.tensor(0), torch.tensor(0)
    pointwise = torch.tensor([[bool(mod(b, h, torch.tensor(q), torch.tensor(k))) for k in range(12)] for q in range(12)])
    assert torch.equal(pointwise, parse((GOLDEN if window is None else GOLDEN_WINDOW3)[mode]))


# ------------------------------------------------------------------------------------ property tests


def mask_from_varlen(lay: AnchorLayout, window: int | None) -> torch.Tensor:
    """Rebuild the dense ``(B, L, L)`` mask from the varlen view alone, with flash-attn's rules:
    per segment, bottom-right causal alignment and ``window_size=(W-1, 0)``; keys through ``kv_index``."""
    B, L = lay.doc_ids.shape
    T = B * L
    m = torch.zeros(T, T, dtype=torch.bool)
    kv = torch.arange(T) if lay.kv_index is None else lay.kv_index
    cq, ck = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        lq, lk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        for i in range(lq):
            for j in range(lk):
                d = i + lk - lq - j
                if d >= 0 and (window is None or d <= window - 1):
                    m[cq[s] + i, kv[ck[s] + j]] = True
    blocks = [m[b * L:(b + 1) * L, b * L:(b + 1) * L] for b in range(B)]
    assert int(m.sum()) == sum(int(x.sum()) for x in blocks), "a query saw a key of another row"
    return torch.stack(blocks)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=doc_id_batches(), mode=st.sampled_from(MODES), window=st.sampled_from([None, 1, 2, 5]))
def test_property_varlen_view_equals_dense_mask(ids, mode, window):
    lay = AnchorLayout.from_doc_ids(ids, mode)
    assert torch.equal(mask_from_varlen(lay, window), dense_mask(ids, mode, window))


@settings(max_examples=60, deadline=None)
@given(ids=doc_id_batches(), mode=st.sampled_from(MODES))
def test_property_layout_invariants(ids, mode):
    lay = AnchorLayout.from_doc_ids(ids, mode)
    B, L = ids.shape
    cq, ck = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
    lq = [b - a for a, b in pairwise(cq)]
    lk = [b - a for a, b in pairwise(ck)]
    assert cq[0] == ck[0] == 0 and cq[-1] == B * L and all(n >= 1 for n in lq)
    assert tuple(lq) == lay.seqlens_q and tuple(lk) == lay.seqlens_k
    assert lay.max_seqlen_q == max(lq) and lay.max_seqlen_k == max(lk)
    n_docs = int(ids.max(dim=1).values.clamp(min=0).sum())
    if mode == "anchor":
        assert ck[-1] == B * L + n_docs and lay.kv_index.numel() == ck[-1]
        assert [k - q for q, k in zip(lq, lk)] == [int(a) for a in lay.seg_anchor]
        assert sum(lay.seg_anchor) == n_docs
        flat = ids.reshape(-1)
        for s, (a, r) in enumerate(zip(lay.seg_anchor, lay.seg_row)):
            keys = lay.kv_index[ck[s]:ck[s + 1]]
            own = torch.arange(cq[s], cq[s + 1])
            if a:  # [row's anchor] + the segment's own tokens
                assert int(keys[0]) == r * L and torch.equal(keys[1:], own)
                assert int(flat[keys[0]]) == 0
            else:
                assert torch.equal(keys, own)
    else:
        assert ck == cq and lay.kv_index is None and not any(lay.seg_anchor)
    # segments never straddle rows, and every token lies in exactly one segment of its own row
    seg_of_tok = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq))
    assert torch.equal(torch.tensor(lay.seg_row)[seg_of_tok], torch.arange(B * L) // L)
    if mode == "full":
        assert len(lq) == B
    else:  # one segment per (row, doc id) run
        flat = ids.reshape(-1)
        assert all(len(set(flat[a:b].tolist())) == 1 for a, b in pairwise(cq))


@settings(max_examples=60, deadline=None)
@given(ids=doc_id_batches(max_len=16), data=st.data())
def test_property_corrupted_ids_raise(ids, data):
    """Any single-token corruption that breaks the convention raises a ValueError naming doc_ids[r, c]."""
    B, L = ids.shape
    r = data.draw(st.integers(0, B - 1))
    c = data.draw(st.integers(0, L - 1))
    new = data.draw(st.integers(-3, 20))
    bad = ids.clone()
    bad[r, c] = new
    row = bad[r].tolist()

    def valid(row):
        if row[0] != 0:
            return False
        prev = 0
        for x in row[1:]:
            if x == -1:
                prev = -1
                continue
            if prev == -1 or x - prev not in (0, 1) or x < 1:
                return False
            prev = x
        return True

    if valid(row):
        AnchorLayout.from_doc_ids(bad)
    else:
        with pytest.raises(ValueError, match=r"doc_ids\[\d+, \d+\]"):
            AnchorLayout.from_doc_ids(bad)
