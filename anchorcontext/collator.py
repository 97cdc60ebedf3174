"""Model inputs for a patched model: ``anchor_inputs`` (from doc ids) and ``AnchorCollator`` (HF data collator).

Labels (HF shifts them inside the model): ``-100`` at the anchor, at the first token of every document after
the first in a row (its prediction would come from the previous document, which it cannot see), and at
padding, on top of the rows' own ``labels`` when they carry them. Trainer's ``num_items_in_batch`` then
normalises correctly across gradient accumulation. Boundaries come from :class:`~anchorcontext.layout.AnchorLayout`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .layout import (
    IGNORE_INDEX,
    PAD_ID,
    AnchorLayout,
    check_mask,
    check_positions,
    doc_ids_from_lens,
    labels_for_doc_ids,
    position_ids_for_doc_ids,
    validate_doc_ids,
)
from .packing import DocumentPacker, anchor_and_pad_ids, int_array

__all__ = ["IGNORE_INDEX", "AnchorCollator", "anchor_inputs", "labels_for", "position_ids_for"]

_OPTIONAL = ("labels", "position_ids", "attention_mask")  # per-row columns: all rows carry one, or none does


def position_ids_for(doc_ids: torch.Tensor, positions: str = "continuous") -> torch.Tensor:
    """``(B, L)`` int64 position ids. ``continuous``: 0..L-1; ``reset``: anchor 0, each document 1..n_i."""
    return position_ids_for_doc_ids(doc_ids, positions)


def labels_for(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` labels: input ids with ``-100`` at the anchor, the first token of documents 2..n, padding."""
    return labels_for_doc_ids(input_ids, doc_ids)


def anchor_inputs(doc_ids: torch.Tensor, *, mask: str = "anchor", positions: str = "continuous") -> dict:
    """Every extra keyword a patched model needs for a packed batch.

    ``model(input_ids=ids, **anchor_inputs(doc_ids))`` with ``doc_ids (B, L)``: anchor 0 at index 0, documents
    1..n, right padding -1. Returns ``{"position_ids": (B, L) int64, "anchor_layout": AnchorLayout}``.
    """
    check_mask(mask)
    check_positions(positions)
    validate_doc_ids(doc_ids)
    layout = AnchorLayout.from_doc_ids(doc_ids.to(torch.int64), mask, validate=False)
    return {"position_ids": layout.position_ids(positions), "anchor_layout": layout}


def _same_columns(features: Sequence[dict]) -> tuple[str, ...]:
    """The optional columns the rows carry; a column on some rows only is refused (it would be dropped)."""
    present = []
    for key in _OPTIONAL:
        has = [key in f for f in features]
        if any(has) and not all(has):
            raise ValueError(f"feature {has.index(False)} has no {key!r} but feature {has.index(True)} has: "
                             f"every row of a batch must carry {key!r}, or none")
        if all(has):
            present.append(key)
    return tuple(present)


def _check_padding(i: int, row: np.ndarray, doc_lens, attention_mask, pad_id: int) -> None:
    """Refuse a row whose ``doc_lens`` leave a real token uncovered (it would silently become padding).

    After the documents, a token is padding when it is ``pad_id`` or its ``attention_mask`` is 0; inside the
    documents the ``attention_mask`` (when given) must be 1 (an all-ones mask therefore always agrees)."""
    end = 1 + int(sum(doc_lens))
    pad = row[end:] == pad_id
    if attention_mask is not None:
        am = int_array(attention_mask, f"feature {i}: attention_mask")
        if am.size != row.size:
            raise ValueError(f"feature {i} has {am.size} attention_mask values for {row.size} input_ids")
        hole = np.nonzero(am[:end] == 0)[0]
        if hole.size:
            raise ValueError(f"feature {i}: attention_mask[{int(hole[0])}] = 0 but doc_lens {list(doc_lens)} cover "
                             f"position {int(hole[0])} (masked tokens inside documents are not supported)")
        real = np.nonzero(~pad & (am[end:] != 0))[0]
        if real.size:
            p = end + int(real[0])
            raise ValueError(f"feature {i}: attention_mask[{p}] = {int(am[p])} but doc_lens {list(doc_lens)} end at "
                             f"{end}: token {int(row[p])} at position {p} is attended and not padding (pad_id={pad_id})")
        return
    real = np.nonzero(~pad)[0]
    if real.size:
        p = end + int(real[0])
        tail = row[end:]
        hint = (f"; the row is padded with {int(tail[0])}: give AnchorCollator the packer's pad_id (or an "
                "attention_mask)" if (tail == tail[0]).all() else "")
        raise ValueError(
            f"feature {i}: doc_lens {list(doc_lens)} sum to {end - 1} but the row (length {row.size}) goes on after "
            f"them: token {int(row[p])} at position {p} is not padding (pad_id={pad_id}); doc_lens must cover every "
            f"token up to the padding{hint}"
        )


@dataclass
class AnchorCollator:
    """HF data collator: packed rows -> ``input_ids, labels, position_ids, anchor_layout``.

    Accepts packed rows (``input_ids`` + ``doc_lens``, as made by :class:`~anchorcontext.packing.DocumentPacker`)
    with batch size > 1 and different layouts per row. Given ``seq_len``, it also accepts plain tokenized
    documents (features with ``input_ids`` only) and packs them itself (the number of rows may then differ
    from the number of features).

    What a row may carry besides, and what happens to it (a column must be on every row or on none):

    * ``labels``: kept as given (e.g. TRL's completion-only or assistant-only masks); ``-100`` is added on top at
      the anchor, the first token of documents 2..n and padding. Plain documents carry theirs through packing
      and splitting. Without ``labels``, the targets are the ``input_ids``.
    * ``position_ids``: used as given on every row (else ``positions`` decides). Not accepted on plain documents.
    * ``attention_mask``: must be 1 on the anchor and the documents; after them a 0 marks padding (as ``pad_id``
      does). It is then implied by the layout and not returned. Plain documents must be unpadded (all ones).

    ``doc_lens`` must cover every real token: a token after the documents that is neither ``pad_id`` nor masked
    out by ``attention_mask`` is refused, never turned into padding. Token ids, labels and position
    ids must be integers (``5.7`` is refused, never cast).

    With HF Trainer set ``remove_unused_columns=False`` (``doc_lens`` is not a model argument, so the default
    would drop it before the collator; this collator then raises instead of guessing boundaries).

    Args:
        anchor_id / pad_id: token ids (or pass ``tokenizer``). mask: ``anchor | intra_doc | full``.
        positions: ``continuous | reset`` (used unless the rows carry ``position_ids``).
        seq_len: row length for packing plain documents. pad_to_multiple_of: pad ``L`` up (sequence
        parallelism needs ``L % sp_size == 0``); added tokens are padding, never targets.
    """

    tokenizer: object = None
    anchor_id: int | None = None
    pad_id: int | None = None
    mask: str = "anchor"
    positions: str = "continuous"
    seq_len: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self):
        check_mask(self.mask)
        check_positions(self.positions)
        self.anchor_id, self.pad_id = anchor_and_pad_ids(self.tokenizer, self.anchor_id, self.pad_id)
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, numbers.Integral)
                                         or self.seq_len < 2):
            raise ValueError(f"seq_len must be None or an int >= 2 (anchor + at least one token), got {self.seq_len!r}")
        if self.return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' (AnchorLayout holds torch tensors), got {self.return_tensors!r}")

    def _pack(self, features: Sequence[dict]) -> list[dict]:
        if self.anchor_id is None:
            raise ValueError("AnchorCollator needs anchor_id or a tokenizer to pack plain documents")
        columns = _same_columns(features)
        if "position_ids" in columns:
            raise ValueError("plain documents carry 'position_ids', which packing would replace: pack them with "
                             "DocumentPacker(positions=...) or drop the column")
        if "attention_mask" in columns:
            for i, f in enumerate(features):
                if (int_array(f["attention_mask"], f"feature {i}: attention_mask") == 0).any():
                    raise ValueError(f"feature {i} is a padded document (attention_mask has 0s): pass unpadded "
                                     "documents, the collator packs and pads them itself")
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        packer = DocumentPacker(seq_len=self.seq_len, anchor_id=self.anchor_id, pad_id=self.pad_id, vocab_size=vocab)
        labels = [f["labels"] for f in features] if "labels" in columns else None
        return list(packer.iter_rows((f["input_ids"] for f in features), labels))

    def __call__(self, features: Sequence[dict]) -> dict:
        if not features:
            raise ValueError("AnchorCollator got an empty list of features")
        if "doc_lens" not in features[0]:
            if self.seq_len is None:
                raise ValueError(
                    "features have no 'doc_lens' (packed document lengths). Pack with anchorcontext.DocumentPacker, "
                    "set AnchorCollator(seq_len=...) to pack plain documents here, and with HF Trainer use "
                    "remove_unused_columns=False (the default drops 'doc_lens' before the collator)"
                )
            n = len(features)
            features = self._pack(features)
            if not features:
                raise ValueError(f"the {n} documents pack into no rows (all empty after dropping a leading anchor "
                                 "token): nothing to train on")
        for i, f in enumerate(features):
            for key in ("input_ids", "doc_lens"):
                if key not in f:
                    raise ValueError(f"feature {i} has no {key!r} (columns: {sorted(f)}); every packed row needs input_ids and doc_lens")
        columns = _same_columns(features)
        L = len(features[0]["input_ids"])
        Lp = L
        if self.pad_to_multiple_of:
            Lp = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(features)
        ids = np.full((B, Lp), self.pad_id, dtype=np.int64)
        docs = np.full((B, Lp), PAD_ID, dtype=np.int64)
        extra = {key: np.full((B, Lp), IGNORE_INDEX, dtype=np.int64) for key in ("labels",) if key in columns}
        if "position_ids" in columns:
            extra["position_ids"] = np.arange(Lp, dtype=np.int64)[None].repeat(B, 0)
        for i, f in enumerate(features):
            row = int_array(f["input_ids"], f"feature {i}: input_ids")
            if row.size != L:
                raise ValueError(f"feature {i} has {row.size} input_ids; row 0 has {L} (packed rows share seq_len)")
            ids[i, :L] = row
            try:
                docs[i, :L] = doc_ids_from_lens(f["doc_lens"], L)
            except ValueError as e:
                raise ValueError(f"feature {i}: {e}") from None
            _check_padding(i, row, f["doc_lens"], f.get("attention_mask"), self.pad_id)
            for key, out in extra.items():
                vals = int_array(f[key], f"feature {i}: {key}")
                if vals.size != L:
                    raise ValueError(f"feature {i} has {vals.size} {key} for {L} input_ids")
                out[i, :L] = vals
        if self.anchor_id is not None and (ids[:, 0] != self.anchor_id).any():
            r = int(np.nonzero(ids[:, 0] != self.anchor_id)[0][0])
            raise ValueError(f"row {r} starts with token {int(ids[r, 0])}, not the anchor id {self.anchor_id}")
        input_ids = torch.from_numpy(ids)
        # doc ids built from checked doc_lens are valid by construction: skip the O(B*L) re-validation
        layout = AnchorLayout.from_doc_ids(torch.from_numpy(docs), self.mask, validate=False)
        user_pos = extra.get("position_ids")
        user_labels = extra.get("labels")
        return {
            "position_ids": layout.position_ids(self.positions) if user_pos is None else torch.from_numpy(user_pos),
            "anchor_layout": layout,
            "input_ids": input_ids,
            "labels": layout.labels(input_ids, None if user_labels is None else torch.from_numpy(user_labels)),
        }
