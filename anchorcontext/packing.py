"""Packing: tokenized documents -> rows of exactly ``seq_len`` tokens with one shared anchor.

Each row is ``[anchor] + doc_a + doc_b + ... (+ padding)``. The anchor is the tokenizer's BOS (EOS for
tokenizers without one, as the paper does for Qwen). A document's own leading BOS is dropped (the
row's anchor replaces it). Documents are concatenated greedily in order; a document longer than the
remaining room is split into continuation chunks (``overflow="split"``, default) or, with
``overflow="drop"``, moved to a new row and dropped only when it cannot fit an empty row — every drop is
counted in :attr:`PackStats` and logged, never silent. The last partial row is padded (``last="pad"``)
or dropped (``last="drop"``, counted).

Row format (a dict of plain lists, Arrow friendly): ``input_ids`` (``seq_len`` ints), ``doc_lens`` (lengths
of the row's documents/chunks, anchor and padding excluded; padding = ``seq_len - 1 - sum(doc_lens)``),
when ``positions`` is given, ``position_ids``, and when the documents come with labels (a ``labels`` column,
or ``iter_rows(docs, labels=...)``), ``labels``: each token's own label carried through packing and splitting,
``-100`` at the anchor and padding.

Usage::

    packer = DocumentPacker(seq_len=4096, anchor_id=tok.bos_token_id, pad_id=tok.pad_token_id)
    packed = tokenized.map(packer, batched=True, remove_columns=tokenized.column_names)   # datasets
    rows = packer.iter_rows(iterable_of_token_lists)                                       # streaming

With ``Dataset.map`` (and ``IterableDataset.map``) each map batch is packed on its own, so every batch ends
with its own partial row (padded, or dropped with ``last="drop"``): a larger ``batch_size`` wastes less.
``iter_rows`` over a whole stream (e.g. ``(ex["input_ids"] for ex in iterable_dataset)``) has one last row.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .layout import IGNORE_INDEX, POSITIONS, check_positions, doc_ids_from_lens, int_array, position_ids_for_doc_ids

logger = logging.getLogger("anchorcontext")

__all__ = ["POSITIONS", "DocumentPacker", "PackStats", "anchor_and_pad_ids", "anchor_token_id", "check_positions",
           "doc_ids_from_lens", "int_array", "pack_documents", "position_ids_from_lens"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def anchor_token_id(tokenizer) -> int:
    """The anchor for ``tokenizer``: BOS, or EOS when it has no BOS (e.g. Qwen)."""
    tid = getattr(tokenizer, "bos_token_id", None)
    if tid is None:
        tid = getattr(tokenizer, "eos_token_id", None)
    if tid is None:
        raise ValueError("tokenizer has neither bos_token_id nor eos_token_id: pass anchor_id explicitly")
    return int(tid)


def anchor_and_pad_ids(tokenizer, anchor_id: int | None = None, pad_id: int | None = None) -> tuple[int | None, int]:
    """``(anchor_id, pad_id)``: explicit ids win; else from ``tokenizer`` the anchor is :func:`anchor_token_id`
    and the pad its pad token, else EOS, else 0 (padding is never a target, so any id is safe)."""
    if anchor_id is None and tokenizer is not None:
        anchor_id = anchor_token_id(tokenizer)
    if pad_id is None:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None and tokenizer is not None:
            pad = getattr(tokenizer, "eos_token_id", None)
        pad_id = 0 if pad is None else int(pad)
    return anchor_id, pad_id


@dataclass
class PackStats:
    documents: int = 0
    tokens_in: int = 0
    tokens_packed: int = 0
    rows: int = 0
    split_documents: int = 0
    empty_documents: int = 0
    dropped_documents: int = 0
    dropped_tokens: int = 0
    dropped_last_rows: int = 0
    dropped_last_tokens: int = 0
    padding_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DocumentPacker:
    """Greedy in-order packer. Callable on a ``datasets`` batch (``map(batched=True)``).

    Token ids are read by :func:`int_array`, as the collator reads them: an integral float (``6.0``) is the id
    ``6``; a fraction, a bool, text or a value outside int64 raises a ValueError naming the document and the
    position.

    Args:
        seq_len: row length including the anchor (>= 2).
        anchor_id: token id of the anchor (use :func:`anchor_token_id`).
        pad_id: token id written into padding (never a target).
        vocab_size: if given, token ids outside ``[0, vocab_size)`` raise a ValueError.
        strip_bos: drop each document's own leading ``bos_id`` (default: ``anchor_id``).
        overflow: ``"split"`` (continuation chunks) or ``"drop"``.
        last: ``"pad"`` or ``"drop"`` the final partial row.
        positions: ``None`` (no ``position_ids`` column), ``"continuous"`` or ``"reset"``.
        column: input column of token-id lists.
    """

    seq_len: int
    anchor_id: int
    pad_id: int = 0
    vocab_size: int | None = None
    strip_bos: bool = True
    bos_id: int | None = None
    overflow: str = "split"
    last: str = "pad"
    positions: str | None = None
    column: str = "input_ids"
    stats: PackStats = field(default_factory=PackStats)

    def __post_init__(self):
        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2 (anchor + at least one token), got {self.seq_len!r}")
        self.seq_len = int(self.seq_len)
        if self.vocab_size is not None and (not _is_int(self.vocab_size) or self.vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if self.overflow not in ("split", "drop"):
            raise ValueError(f"overflow must be 'split' or 'drop', got {self.overflow!r}")
        if self.last not in ("pad", "drop"):
            raise ValueError(f"last must be 'pad' or 'drop', got {self.last!r}")
        if self.positions is not None:
            check_positions(self.positions)
        for name in ("anchor_id", "pad_id"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0 or (self.vocab_size is not None and v >= self.vocab_size):
                raise ValueError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {v!r}")
        if self.bos_id is None:
            self.bos_id = self.anchor_id

    # -- core ---------------------------------------------------------------------------------
    def _check_doc(self, doc, i: int) -> np.ndarray:
        arr = int_array(doc, f"document {i}")  # the collator's rule: 6.0 is 6; 6.5, bools, text are refused
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or (self.vocab_size is not None and hi >= self.vocab_size):
                bad = lo if lo < 0 else hi
                raise ValueError(f"document {i} has token id {bad} outside the vocabulary [0, {self.vocab_size})")
        if self.strip_bos and arr.size and arr[0] == self.bos_id:
            arr = arr[1:]
        return arr

    def iter_rows(self, documents: Iterable[Sequence[int]], labels: Iterable[Sequence[int]] | None = None) -> Iterator[dict]:
        """Yield packed rows from any iterable of token-id lists (streaming; O(seq_len) memory). ``labels``, one
        list per document and as long as it, are carried token by token into each row's ``labels``."""
        room = self.seq_len - 1
        label_iter = None if labels is None else iter(labels)
        lab = None
        buf: list[np.ndarray] = []
        lbuf: list[np.ndarray] = []
        lens: list[int] = []
        used = 0
        st = self.stats
        drops0, dropped_tok0 = st.dropped_documents, st.dropped_tokens  # stats accumulate across calls
        any_doc = False
        for i, doc in enumerate(documents):
            any_doc = True
            arr = self._check_doc(doc, i)
            if label_iter is not None:
                lab = self._check_labels(next(label_iter, None), doc, arr, i)
            st.documents += 1
            st.tokens_in += int(arr.size)
            if arr.size == 0:
                st.empty_documents += 1
                continue
            if self.overflow == "drop":
                if arr.size > room:
                    st.dropped_documents += 1
                    st.dropped_tokens += int(arr.size)
                    continue
                if used + arr.size > room:
                    yield self._emit(buf, lens, used, lbuf)
                    buf, lbuf, lens, used = [], [], [], 0
                buf.append(arr)
                if lab is not None:
                    lbuf.append(lab)
                lens.append(int(arr.size))
                used += int(arr.size)
                if used == room:  # a full row is complete now, never "the last partial row"
                    yield self._emit(buf, lens, used, lbuf)
                    buf, lbuf, lens, used = [], [], [], 0
                continue
            start = 0
            if used + arr.size > room:
                st.split_documents += 1
            while start < arr.size:
                take = min(room - used, arr.size - start)
                buf.append(arr[start : start + take])
                if lab is not None:
                    lbuf.append(lab[start : start + take])
                lens.append(take)
                used += take
                start += take
                if used == room:
                    yield self._emit(buf, lens, used, lbuf)
                    buf, lbuf, lens, used = [], [], [], 0
        if not any_doc:
            raise ValueError("documents is empty: nothing to pack")
        if label_iter is not None and next(label_iter, None) is not None:
            raise ValueError(f"labels has more lists than the {i + 1} documents")
        if used:
            if self.last == "pad":
                yield self._emit(buf, lens, used, lbuf)
            else:
                st.dropped_last_rows += 1
                st.dropped_last_tokens += used
                logger.info("anchorcontext.pack: dropped the last partial row (%d tokens; last='drop')", used)
        if st.dropped_documents > drops0:  # report this call's drops (once per map batch, not cumulatively)
            logger.warning(
                "anchorcontext.pack: dropped %d documents (%d tokens) longer than a row (overflow='drop'; "
                "%d documents in total so far)",
                st.dropped_documents - drops0, st.dropped_tokens - dropped_tok0, st.dropped_documents,
            )

    @staticmethod
    def _check_labels(lab, doc, arr: np.ndarray, i: int) -> np.ndarray:
        if lab is None:
            raise ValueError(f"labels ran out at document {i}: pass one label list per document")
        lab = int_array(lab, f"document {i} labels")
        if lab.size != len(doc):
            raise ValueError(f"document {i} has {lab.size} labels for {len(doc)} input_ids")
        return lab[lab.size - arr.size :]  # a stripped leading BOS takes its label with it

    def _emit(self, buf, lens, used, lbuf=()) -> dict:
        L = self.seq_len
        ids = np.full(L, self.pad_id, dtype=np.int64)
        ids[0] = self.anchor_id
        if buf:
            ids[1 : 1 + used] = np.concatenate(buf)
        self.stats.rows += 1
        self.stats.tokens_packed += used
        self.stats.padding_tokens += L - 1 - used
        row = {"input_ids": ids.tolist(), "doc_lens": list(lens)}
        if lbuf:
            labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
            labels[1 : 1 + used] = np.concatenate(lbuf)
            row["labels"] = labels.tolist()
        if self.positions is not None:
            row["position_ids"] = position_ids_from_lens(lens, L, self.positions).tolist()
        return row

    # -- datasets.map(batched=True) -------------------------------------------------------------
    def __call__(self, batch: dict) -> dict:
        if self.column not in batch:
            raise ValueError(f"batch has no column {self.column!r} (columns: {sorted(batch)})")
        out: dict[str, list] = {"input_ids": [], "doc_lens": []}
        if self.positions is not None:
            out["position_ids"] = []
        labels = batch.get("labels")
        if labels is not None:
            out["labels"] = []
        for row in self.iter_rows(batch[self.column], labels):
            for k, col in out.items():
                col.append(row[k])
        return out


def pack_documents(
    documents: Iterable[Sequence[int]],
    *,
    seq_len: int,
    anchor_id: int | None = None,
    tokenizer=None,
    pad_id: int | None = None,
    **kwargs,
) -> tuple[list[dict], PackStats]:
    """Pack token-id lists into rows; returns ``(rows, stats)``. See :class:`DocumentPacker`.

    ``anchor_id`` defaults to the tokenizer's BOS (EOS without BOS); ``pad_id`` to its pad (else EOS, else 0).
    """
    if anchor_id is None and tokenizer is None:
        raise ValueError("pack_documents needs anchor_id or a tokenizer")
    anchor_id, pad_id = anchor_and_pad_ids(tokenizer, anchor_id, pad_id)
    if tokenizer is not None and "vocab_size" not in kwargs:
        kwargs["vocab_size"] = len(tokenizer)
    packer = DocumentPacker(seq_len=seq_len, anchor_id=anchor_id, pad_id=pad_id, **kwargs)
    rows = list(packer.iter_rows(documents))
    return rows, packer.stats


def position_ids_from_lens(doc_lens: Sequence[int], seq_len: int, positions: str = "continuous") -> np.ndarray:
    """Position ids: ``continuous`` = 0..L-1 (the paper); ``reset`` = anchor 0, each document 1..n_i.

    Padding keeps its row index under both policies (as :meth:`AnchorLayout.position_ids`, which derives these,
    and the collator's ``pad_to_multiple_of`` do); it is never a target.
    """
    check_positions(positions)
    doc_ids = torch.from_numpy(doc_ids_from_lens(doc_lens, seq_len))[None]
    return position_ids_for_doc_ids(doc_ids, positions)[0].numpy()
