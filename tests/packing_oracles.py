"""Packing oracles shared by tests/test_packing.py and tests/test_collator.py, written independently of the packer
and the collator: a hypothesis strategy for corpora biased to the edge lengths, and per-token loops giving each
packed row's labels, document ids and positions from its ``doc_lens``."""

from __future__ import annotations

from hypothesis import strategies as st

ANCHOR = 1  # the BOS of the fake vocabulary, also the row anchor
PAD = 0
VOCAB = 50
IGNORE = -100


@st.composite
def corpus(draw, max_docs: int = 12):
    """``(seq_len, docs)``: lengths biased to the edge cases 0, 1, seq_len-1, seq_len, > seq_len."""
    seq_len = draw(st.integers(2, 12))
    edge = st.sampled_from([0, 1, seq_len - 1, seq_len, seq_len + 1, 2 * seq_len + 3])
    lens = draw(st.lists(st.one_of(edge, st.integers(0, 3 * seq_len)), min_size=1, max_size=max_docs))
    docs = []
    for n in lens:
        # token values include the pad id and the BOS inside documents: nothing may be inferred from values
        doc = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
        if n and draw(st.booleans()):
            doc[0] = ANCHOR  # the document's own leading BOS, to be dropped
        docs.append(doc)
    return seq_len, docs


def stripped(doc: list[int]) -> list[int]:
    return doc[1:] if doc and doc[0] == ANCHOR else list(doc)


# ------------------------------------------------------------------------------------------- oracles
def expected_doc_ids(doc_lens: list[int], L: int) -> list[int]:
    out = [0]
    for k, n in enumerate(doc_lens):
        out += [k + 1] * n
    return out + [-1] * (L - len(out))


def expected_labels(ids: list[int], doc_lens: list[int]) -> list[int]:
    labels = [IGNORE] * len(ids)
    i = 1
    for k, n in enumerate(doc_lens):
        for j in range(n):
            labels[i] = IGNORE if (j == 0 and k > 0) else ids[i]
            i += 1
    return labels


def expected_positions(doc_lens: list[int], L: int, positions: str) -> list[int]:
    if positions == "continuous":
        return list(range(L))
    out = [0]
    for n in doc_lens:
        out += list(range(1, n + 1))
    return out + list(range(len(out), L))  # padding keeps its row index
