"""AnchorLayout: the one boundary convention every backend derives from.

A packed row of length L carries per-token document ids::

    index:     0      1 .. a       a+1 .. b      ...      pad
    token:   [BOS]  [doc 1 ....]  [doc 2 ....]  ...  [pad pad]
    doc id:    0      1 1 1 1       2 2 2 2     ...    -1 -1

``allowed(q, k)`` for the three masks (``k <= q`` always):

* ``"anchor"`` (default, the paper): ``doc[q] == doc[k]`` or ``k == 0`` (the row's anchor).
  The anchor itself attends only to itself.
* ``"intra_doc"``: ``doc[q] == doc[k]`` (the anchor is a one-token document of its own).
* ``"full"``: plain causal attention over the whole row.

Padding (``-1``) is one trailing segment per row that attends causally to itself only; its outputs
are finite and never a target. Anchor mask for a row ``[A a a b b b]``::

        k: A a a b b b
    q A    1 . . . . .
    q a    1 1 . . . .
    q a    1 1 1 . . .
    q b    1 . . 1 . .
    q b    1 . . 1 1 .
    q b    1 . . 1 1 1

Varlen view (flash-attn grammar). Tokens are flattened to ``(B*L,)``. Query segments tile the
flattened rows: ``cu_seqlens_q: (S+1,) int32``. In anchor mode, each document's key range is
``[anchor] + document``, so ``cu_seqlens_k`` counts one more key per document and ``kv_index:
(total_k,) int64`` gathers K/V rows from the flattened ``(B*L, Hkv, D)`` keys. Causal masks are
aligned bottom-right (flash-attn >= 2.1), so query ``i`` of a document sees the anchor plus the
document's tokens ``0..i``. For ``intra_doc`` and ``full``, ``kv_index`` is ``None`` (identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MASKS = ("anchor", "intra_doc", "full")
ANCHOR_ID = 0
PAD_ID = -1


def check_mask(mask: str) -> str:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    return mask


def validate_doc_ids(doc_ids: Any) -> torch.Tensor:
    """Check a ``(B, L)`` integer document-id tensor; raise ``ValueError`` naming the problem."""
    if not isinstance(doc_ids, torch.Tensor):
        raise ValueError(f"doc_ids must be a torch.Tensor of shape (B, L), got {type(doc_ids).__name__}")
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must have shape (B, L), got shape {tuple(doc_ids.shape)}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor, got dtype {doc_ids.dtype}")
    B, L = doc_ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"doc_ids is an empty batch: shape {tuple(doc_ids.shape)}")
    d = doc_ids.detach().to("cpu", torch.int64)
    bad = (d[:, 0] != ANCHOR_ID).nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        raise ValueError(
            f"doc_ids[{r}, 0] must be the anchor id {ANCHOR_ID}, got {int(d[r, 0])} (the anchor sits at index 0 of every row)"
        )
    if L > 1:
        later_anchor = (d[:, 1:] == ANCHOR_ID).nonzero()
        if later_anchor.numel():
            r, c = (int(x) for x in later_anchor[0])
            raise ValueError(f"doc_ids[{r}, {c + 1}] is the anchor id {ANCHOR_ID}; only index 0 may hold the anchor")
        low = (d < PAD_ID).nonzero()
        if low.numel():
            r, c = (int(x) for x in low[0])
            raise ValueError(f"doc_ids[{r}, {c}] = {int(d[r, c])} is invalid: use 0 (anchor), 1..n (documents), -1 (padding)")
        prev, cur = d[:, :-1], d[:, 1:]
        pad_inside = (prev == PAD_ID) & (cur != PAD_ID)
        if pad_inside.any():
            r, c = (int(x) for x in pad_inside.nonzero()[0])
            raise ValueError(
                f"doc_ids[{r}, {c + 1}] = {int(d[r, c + 1])} follows padding: padding (-1) is allowed only at the right end of a row"
            )
        real = cur != PAD_ID
        step = cur - prev
        bad_step = real & (step != 0) & (step != 1)
        if bad_step.any():
            r, c = (int(x) for x in bad_step.nonzero()[0])
            kind = "decreasing" if int(step[r, c]) < 0 else "non-contiguous"
            raise ValueError(
                f"doc_ids[{r}, {c + 1}] = {int(d[r, c + 1])} after {int(d[r, c])}: {kind} document ids "
                "(documents must be numbered 1, 2, ... in order, each a contiguous run)"
            )
    return doc_ids


@dataclass(frozen=True, eq=False)
class AnchorLayout:
    """Varlen metadata for one packed batch and one mask mode. Build with :meth:`from_doc_ids`.

    Attributes (``S`` query segments, ``T = B*L`` tokens):
        doc_ids: ``(B, L)`` int64, the input.
        mask: ``"anchor" | "intra_doc" | "full"``.
        cu_seqlens_q: ``(S+1,)`` int32, query segment boundaries in the flattened ``(T,)`` tokens.
        cu_seqlens_k: ``(S+1,)`` int32, key segment boundaries in the gathered keys.
        kv_index: ``(total_k,)`` int64 gather index into the flattened keys, or ``None`` (identity).
        max_seqlen_q / max_seqlen_k: Python ints (no device sync in the hot path).
        seqlens_q / seqlens_k / seg_row / seg_anchor: host-side per-segment lists for blockwise backends.
    """

    doc_ids: torch.Tensor
    mask: str
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    kv_index: torch.Tensor | None
    max_seqlen_q: int
    max_seqlen_k: int
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    seg_row: tuple[int, ...]
    seg_anchor: tuple[bool, ...]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    @property
    def num_segments(self) -> int:
        return len(self.seqlens_q)

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor, mask: str = "anchor", *, validate: bool = True) -> AnchorLayout:
        """Derive the layout, vectorised over tokens (one host transfer of per-segment lengths)."""
        check_mask(mask)
        if validate:
            validate_doc_ids(doc_ids)
        device = doc_ids.device
        d = doc_ids.to(torch.int64)
        B, L = d.shape
        T = B * L
        flat = d.reshape(T)
        if mask == "full":
            starts = torch.zeros(T, dtype=torch.bool, device=device)
            starts[::L] = True
        else:
            starts = torch.ones(T, dtype=torch.bool, device=device)
            starts[1:] = flat[1:] != flat[:-1]
            starts[::L] = True
        start_idx = starts.nonzero().squeeze(1)  # (S,)
        S = start_idx.numel()
        ends = torch.cat([start_idx[1:], torch.tensor([T], device=device)])
        len_q = ends - start_idx
        seg_doc = flat[start_idx]
        row_start = (start_idx // L) * L
        has_anchor = (seg_doc > 0) if mask == "anchor" else torch.zeros(S, dtype=torch.bool, device=device)
        len_k = len_q + has_anchor.to(torch.int64)
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        cu_q = torch.cat([zero, len_q.cumsum(0)])
        cu_k = torch.cat([zero, len_k.cumsum(0)])
        if mask == "anchor":
            total_k = int(cu_k[-1])
            # key j of segment s reads token start_s + (j - cu_k[s]) - has_anchor[s]; its first key (if any) the anchor
            shift = start_idx - cu_k[:-1] - has_anchor.to(torch.int64)
            kv_index = torch.arange(total_k, device=device) + torch.repeat_interleave(shift, len_k, output_size=total_k)
            kv_index[cu_k[:-1][has_anchor]] = row_start[has_anchor]
        else:
            kv_index = None
        host = torch.stack([len_q, len_k, start_idx // L, has_anchor.to(torch.int64)]).cpu()
        seqlens_q, seqlens_k, seg_row, seg_anchor = host.tolist()
        return cls(
            doc_ids=d,
            mask=mask,
            cu_seqlens_q=cu_q.to(torch.int32),
            cu_seqlens_k=cu_k.to(torch.int32),
            kv_index=kv_index,
            max_seqlen_q=max(seqlens_q),
            max_seqlen_k=max(seqlens_k),
            seqlens_q=tuple(seqlens_q),
            seqlens_k=tuple(seqlens_k),
            seg_row=tuple(seg_row),
            seg_anchor=tuple(bool(x) for x in seg_anchor),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AnchorLayout:
        """The same layout with its tensors on ``device`` (host lists are shared; the copy is cached, so
        per-layer calls after the first are free). Accelerate's ``send_to_device`` calls this."""
        device = torch.device(device)
        if self.doc_ids.device == device or (device.index is None and self.doc_ids.device.type == device.type):
            return self
        cached = self._cache.get(("to", str(device)))
        if cached is not None:
            return cached
        moved = AnchorLayout(
            doc_ids=self.doc_ids.to(device, non_blocking=non_blocking),
            mask=self.mask,
            cu_seqlens_q=self.cu_seqlens_q.to(device, non_blocking=non_blocking),
            cu_seqlens_k=self.cu_seqlens_k.to(device, non_blocking=non_blocking),
            kv_index=None if self.kv_index is None else self.kv_index.to(device, non_blocking=non_blocking),
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_k=self.max_seqlen_k,
            seqlens_q=self.seqlens_q,
            seqlens_k=self.seqlens_k,
            seg_row=self.seg_row,
            seg_anchor=self.seg_anchor,
        )
        self._cache[("to", str(device))] = moved
        return moved

    def dense_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """``(B, L, L)`` bool mask, True = may attend. For the reference and tests only (O(L^2))."""
        return dense_mask(self.doc_ids, self.mask, sliding_window)

    def attention_flops(self, head_dim: int, num_heads: int) -> int:
        """Forward attention FLOPs (QK^T and PV, causal halves counted exactly) for this layout."""
        pairs = sum(q * (q + 1) // 2 + (1 if a else 0) * q for q, a in zip(self.seqlens_q, self.seg_anchor))
        return 4 * pairs * head_dim * num_heads


def dense_mask(doc_ids: torch.Tensor, mask: str = "anchor", sliding_window: int | None = None) -> torch.Tensor:
    """Dense ``(B, L, L)`` bool mask for ``doc_ids``; the specification every backend must match.

    Sliding window (size ``W``, HF convention ``q - k < W``) is applied in the frame of the segment run
    alone: for ``anchor`` a token at document offset ``j`` sits at local index ``j + 1`` of
    ``[anchor] + document``, so the anchor is visible iff ``j + 1 < W``.
    """
    check_mask(mask)
    d = doc_ids.to(torch.int64)
    B, L = d.shape
    idx = torch.arange(L, device=d.device)
    causal = idx[None, :] <= idx[:, None]  # (Lq, Lk)
    if mask == "full":
        allowed = causal.expand(B, L, L).clone()
        same = None
    else:
        same = d[:, :, None] == d[:, None, :]
        allowed = causal & same
        if mask == "anchor":
            allowed = allowed | ((idx[None, None, :] == 0) & (d[:, :, None] >= 0))
    if sliding_window is not None:
        W = int(sliding_window)
        dist = idx[:, None] - idx[None, :]
        in_win = (dist < W)[None].expand(B, L, L)
        if mask == "anchor":
            # offset of each query within its document (doc start = first index with that doc id)
            start = torch.zeros_like(d)
            new = torch.ones_like(d, dtype=torch.bool)
            new[:, 1:] = d[:, 1:] != d[:, :-1]
            pos = idx.expand(B, L)
            start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
            local = pos - start + 1  # local index in [anchor] + document
            anchor_vis = (local < W) & (d > 0)
            is_anchor_key = (idx == 0)[None, None, :] & (d[:, :, None] > 0)
            in_win = torch.where(is_anchor_key, anchor_vis[:, :, None].expand(B, L, L), in_win)
        allowed = allowed & in_win
    return allowed
