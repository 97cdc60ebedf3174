"""Model inputs for a patched model: ``anchor_inputs`` (from doc ids) and ``AnchorCollator`` (HF data collator).

Labels (HF shifts them inside the model): ``-100`` at the anchor, at the first token of every document after
the first in a row (its prediction would come from the previous document, which it cannot see), and at
padding. Trainer's ``num_items_in_batch`` then normalises correctly across gradient accumulation.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .layout import PAD_ID, AnchorLayout, check_mask, validate_doc_ids
from .packing import DocumentPacker, anchor_token_id, check_positions, doc_ids_from_lens

IGNORE_INDEX = -100


def position_ids_for(doc_ids: torch.Tensor, positions: str = "continuous") -> torch.Tensor:
    """``(B, L)`` int64 position ids. ``continuous``: 0..L-1; ``reset``: anchor 0, each document 1..n_i."""
    check_positions(positions)
    B, L = doc_ids.shape
    pos = torch.arange(L, device=doc_ids.device).expand(B, L)
    if positions == "continuous":
        return pos.clone()
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    reset = pos - start + 1
    reset[:, 0] = 0
    return torch.where(doc_ids > 0, reset, torch.where(doc_ids == 0, torch.zeros_like(pos), pos))


def labels_for(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` labels: input ids with ``-100`` at the anchor, the first token of documents 2..n, padding."""
    labels = input_ids.clone()
    first = torch.zeros_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]) & (doc_ids[:, 1:] > 1)
    labels[(doc_ids <= 0) | first] = IGNORE_INDEX
    return labels


def anchor_inputs(doc_ids: torch.Tensor, *, mask: str = "anchor", positions: str = "continuous") -> dict:
    """Every extra keyword a patched model needs for a packed batch.

    ``model(input_ids=ids, **anchor_inputs(doc_ids))`` with ``doc_ids (B, L)``: anchor 0 at index 0, documents
    1..n, right padding -1. Returns ``{"position_ids": (B, L) int64, "anchor_layout": AnchorLayout}``.
    """
    return _anchor_inputs(doc_ids, mask, positions, validate=True)


def _anchor_inputs(doc_ids: torch.Tensor, mask: str, positions: str, *, validate: bool) -> dict:
    check_mask(mask)
    check_positions(positions)
    if validate:
        validate_doc_ids(doc_ids)
    doc_ids = doc_ids.to(torch.int64)
    return {
        "position_ids": position_ids_for(doc_ids, positions),
        "anchor_layout": AnchorLayout.from_doc_ids(doc_ids, mask, validate=False),
    }


@dataclass
class AnchorCollator:
    """HF data collator: packed rows -> ``input_ids, labels, position_ids, anchor_layout``.

    Accepts packed rows (``input_ids`` + ``doc_lens``, as made by :class:`~anchorcontext.packing.DocumentPacker`)
    with batch size > 1 and different layouts per row. Given ``seq_len``, it also accepts plain tokenized
    documents (features with ``input_ids`` only) and packs them itself (the number of rows may then differ
    from the number of features).

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
        if self.anchor_id is None and self.tokenizer is not None:
            self.anchor_id = anchor_token_id(self.tokenizer)
        if self.pad_id is None:
            tok = self.tokenizer
            pad = getattr(tok, "pad_token_id", None) if tok is not None else None
            if pad is None and tok is not None:
                pad = getattr(tok, "eos_token_id", None)
            self.pad_id = 0 if pad is None else int(pad)
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
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        packer = DocumentPacker(seq_len=self.seq_len, anchor_id=self.anchor_id, pad_id=self.pad_id, vocab_size=vocab)
        return list(packer.iter_rows(f["input_ids"] for f in features))

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
            features = self._pack(features)
        for i, f in enumerate(features):
            for key in ("input_ids", "doc_lens"):
                if key not in f:
                    raise ValueError(f"feature {i} has no {key!r} (columns: {sorted(f)}); every packed row needs input_ids and doc_lens")
        L = len(features[0]["input_ids"])
        for i, f in enumerate(features):
            if len(f["input_ids"]) != L:
                raise ValueError(f"feature {i} has {len(f['input_ids'])} input_ids; row 0 has {L} (packed rows share seq_len)")
            if "position_ids" in features[0] and len(f.get("position_ids", ())) != L:
                n = len(f["position_ids"]) if "position_ids" in f else "no"
                raise ValueError(f"feature {i} has {n} position_ids for {L} input_ids")
        Lp = L
        if self.pad_to_multiple_of:
            Lp = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(features)
        ids = np.full((B, Lp), self.pad_id, dtype=np.int64)
        docs = np.full((B, Lp), PAD_ID, dtype=np.int64)
        for i, f in enumerate(features):
            ids[i, :L] = f["input_ids"]
            try:
                docs[i, :L] = doc_ids_from_lens(f["doc_lens"], L)
            except ValueError as e:
                raise ValueError(f"feature {i}: {e}") from None
        input_ids = torch.from_numpy(ids)
        doc_ids = torch.from_numpy(docs)
        if self.anchor_id is not None and (ids[:, 0] != self.anchor_id).any():
            r = int(np.nonzero(ids[:, 0] != self.anchor_id)[0][0])
            raise ValueError(f"row {r} starts with token {int(ids[r, 0])}, not the anchor id {self.anchor_id}")
        # doc ids built from checked doc_lens are valid by construction: skip the O(B*L) re-validation
        batch = _anchor_inputs(doc_ids, self.mask, self.positions, validate=False)
        if "position_ids" in features[0]:
            pos = np.arange(Lp, dtype=np.int64)[None].repeat(B, 0)
            for i, f in enumerate(features):
                pos[i, :L] = f["position_ids"]
            batch["position_ids"] = torch.from_numpy(pos)
        batch["input_ids"] = input_ids
        batch["labels"] = labels_for(input_ids, doc_ids)
        return batch
