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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MASKS = ("anchor", "intra_doc", "full")
POSITIONS = ("continuous", "reset")
ANCHOR_ID = 0
PAD_ID = -1
IGNORE_INDEX = -100  # the label HF's (and our) cross-entropy ignores


def check_mask(mask: str) -> str:
    """The one validator of the ``mask`` option."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    return mask


def check_positions(positions: str) -> str:
    """The one validator of the ``positions`` option."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return positions


def int_array(values, name: str) -> np.ndarray:
    """``values`` (a list, array or tensor of integers) as a 1-D int64 array; a non-integral value (``5.7``), a
    bool, text (``"5"``) or a value outside int64 (``inf``, ``2**63``) raises ``ValueError`` naming ``name`` and
    the position, never a silent cast."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat list of integers, got shape {arr.shape}")
    if arr.dtype.kind == "b" or (isinstance(values, list | tuple) and bool in set(map(type, values))):
        raise ValueError(f"{name} must hold integers, got bool")
    if arr.dtype.kind not in "iuf":  # text, bytes, objects (None, ints beyond 64 bits)
        raise ValueError(f"{name} must hold integers, got {arr.dtype} values (e.g. {arr[0]!r})")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        i = int(np.argmax(arr > np.iinfo(np.int64).max))
        raise ValueError(f"{name}[{i}] = {int(arr[i])} is outside int64")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64, copy=False)
    num = arr.astype(np.float64)
    bad = np.nonzero(~np.isfinite(num) | (num != np.round(num)) | (np.abs(num) >= 2.0**63))[0]
    if bad.size:
        i = int(bad[0])
        what = "is not an integer" if np.isfinite(num[i]) and num[i] != np.round(num[i]) else "is not an int64 integer"
        raise ValueError(f"{name}[{i}] = {float(num[i]):g} {what}")
    return num.astype(np.int64)


def doc_ids_from_lens(doc_lens: Sequence[int], seq_len: int) -> np.ndarray:
    """``(seq_len,)`` int64 doc ids of one row: anchor 0, documents 1..n, padding -1."""
    lens = int_array(doc_lens, "doc_lens")
    used = int(lens.sum())
    if (lens <= 0).any() or used > seq_len - 1:
        raise ValueError(f"doc_lens {list(map(int, lens))} do not fit a row of seq_len={seq_len} (need > 0 and sum <= seq_len - 1)")
    out = np.full(seq_len, PAD_ID, dtype=np.int64)
    out[0] = ANCHOR_ID
    out[1 : 1 + used] = np.repeat(np.arange(1, lens.size + 1, dtype=np.int64), lens)
    return out


def local_offsets(doc_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` int64: each token's offset from the start of its run of equal doc ids (a document's first
    token 0, the anchor 0, the padding run counted from its start)."""
    B, L = doc_ids.shape
    pos = torch.arange(L, device=doc_ids.device).expand(B, L)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return pos - start


# ---- the mask predicate, written once as composable mask_mods (attention-gym style) ----------------------------
# A mask_mod is ``fn(b, h, q, kv) -> bool tensor``. FlexAttention calls it with 0-dim index tensors (vmapped);
# :func:`dense_mask` calls it with broadcastable index grids. Both see the same predicate.
MaskMod = Callable[..., torch.Tensor]


def and_masks(*mods: MaskMod) -> MaskMod:
    """The conjunction of ``mods`` (True where every one allows)."""

    def and_mask(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out & m(b, h, q, kv)
        return out

    and_mask.__name__ = "and_masks(" + ", ".join(m.__name__ for m in mods) + ")"
    return and_mask


def or_masks(*mods: MaskMod) -> MaskMod:
    """The disjunction of ``mods`` (True where any one allows)."""

    def or_mask(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out | m(b, h, q, kv)
        return out

    or_mask.__name__ = "or_masks(" + ", ".join(m.__name__ for m in mods) + ")"
    return or_mask


def causal(b, h, q, kv):
    return kv <= q


def document_mask_mods(doc_ids: torch.Tensor) -> dict[str, MaskMod]:
    """The building blocks over ``doc_ids (B, L)``: ``same_document`` (padding is one run of its own) and
    ``is_anchor`` (key 0, for every non-pad query)."""
    doc = doc_ids

    def same_document(b, h, q, kv):
        return doc[b, q] == doc[b, kv]

    def is_anchor(b, h, q, kv):
        return (kv == 0) & (doc[b, q] >= 0)

    return {"same_document": same_document, "is_anchor": is_anchor}


def sliding_window_mod(doc_ids: torch.Tensor, mask: str, window: int) -> MaskMod:
    """``q - kv < window`` (HF convention), measured for ``anchor`` in the frame of ``[anchor] + document``:
    a token at document offset ``j`` sees the anchor iff ``j + 1 < window``. The window is a 0-dim tensor, so
    a compiled kernel takes it as an input (one compile for every size)."""
    doc = doc_ids
    win = torch.full((), int(window), dtype=torch.int64, device=doc.device)
    local = local_offsets(doc) + 1 if mask == "anchor" else None

    def sliding_window(b, h, q, kv):
        near = (q - kv) < win
        if local is not None:
            near = torch.where((kv == 0) & (doc[b, q] > 0), local[b, q] < win, near)
        return near

    return sliding_window


def mask_mod_for(doc_ids: torch.Tensor, mask: str = "anchor", sliding_window: int | None = None) -> MaskMod:
    """The mask predicate of ``mask`` over ``doc_ids``: ``anchor = causal & (same_document | is_anchor)``,
    ``intra_doc = causal & same_document``, ``full = causal``; ``& sliding_window`` when a window is given."""
    check_mask(mask)
    parts = document_mask_mods(doc_ids)
    if mask == "full":
        mod = causal
    elif mask == "intra_doc":
        mod = and_masks(causal, parts["same_document"])
    else:
        mod = and_masks(causal, or_masks(parts["same_document"], parts["is_anchor"]))
    if sliding_window is not None:
        mod = and_masks(mod, sliding_window_mod(doc_ids, mask, sliding_window))
    name = f"{mask}_mask" + ("" if sliding_window is None else f"_window{int(sliding_window)}")
    named = mod if mod is not causal else and_masks(causal)
    named.__name__ = name
    return named


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
    """Varlen metadata for one packed batch and one mask mode. Build with :meth:`from_doc_ids` or
    :meth:`from_doc_lens`. The one place boundaries are derived: :meth:`position_ids`, :meth:`labels`,
    :attr:`local_offsets`, :meth:`mask_mod`, :meth:`segment_plan` / :meth:`segment_table`; derived data is
    cached per layout with :meth:`cached`.

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

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per layout and ``key``: derived data (a BlockMask, a segment table) shared by every
        layer of a forward and its backward."""
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = build()
        return hit

    @classmethod
    def from_doc_lens(cls, doc_lens: Sequence[Sequence[int]], seq_len: int, mask: str = "anchor") -> AnchorLayout:
        """The layout of rows of ``seq_len`` tokens holding documents of ``doc_lens[b]`` (anchor first, padding
        last); raises ``ValueError`` naming the row whose lengths do not fit."""
        rows = []
        for b, lens in enumerate(doc_lens):
            try:
                rows.append(doc_ids_from_lens(lens, seq_len))
            except ValueError as e:
                raise ValueError(f"row {b}: {e}") from None
        if not rows:
            raise ValueError("doc_lens is an empty batch: no rows")
        return cls.from_doc_ids(torch.from_numpy(np.stack(rows)), mask, validate=False)

    @property
    def local_offsets(self) -> torch.Tensor:
        """``(B, L)`` each token's offset in its document (0 at a document's first token; see :func:`local_offsets`)."""
        return self.cached(("local_offsets",), lambda: local_offsets(self.doc_ids))

    def position_ids(self, policy: str = "continuous") -> torch.Tensor:
        """``(B, L)`` int64 position ids. ``continuous``: 0..L-1; ``reset``: anchor 0, each document 1..n_i,
        padding its row index."""
        return position_ids_for_doc_ids(self.doc_ids, policy, self.local_offsets)

    def labels(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` labels: ``labels`` (default: ``input_ids``) with ``-100`` added at the anchor, at the first
        token of documents 2..n (its prediction would come from a document it cannot see) and at padding."""
        return labels_for_doc_ids(input_ids if labels is None else labels, self.doc_ids)

    def mask_mod(self, sliding_window: int | None = None) -> MaskMod:
        """The mask predicate of this layout (see :func:`mask_mod_for`)."""
        return mask_mod_for(self.doc_ids, self.mask, sliding_window)

    def segment_plan(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """Per row, its query segments ``(s, n, a)``: start in the row, length, 1 if the row's anchor is
        prepended to the keys. Cached."""

        def build():
            rows: list[list[tuple[int, int, int]]] = [[] for _ in range(self.batch_size)]
            pos = [0] * self.batch_size
            for n, r, a in zip(self.seqlens_q, self.seg_row, self.seg_anchor):
                rows[r].append((pos[r], n, int(a)))
                pos[r] += n
            return tuple(tuple(r) for r in rows)

        return self.cached(("segment_plan",), build)

    def segment_table(self) -> torch.Tensor:
        """``(S, 4)`` int64 CPU rows ``(b, s, n, a)`` of :meth:`segment_plan` (for a compiled kernel). Cached."""
        return self.cached(("segment_table",), lambda: torch.tensor(
            [(b, s, n, a) for b, segs in enumerate(self.segment_plan()) for s, n, a in segs], dtype=torch.int64
        ).reshape(-1, 4))

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
        return self.cached(("to", str(device)), lambda: AnchorLayout(
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
        ))

    def dense_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """``(B, L, L)`` bool mask, True = may attend. For the reference and tests only (O(L^2))."""
        return dense_mask(self.doc_ids, self.mask, sliding_window)

    def attention_flops(self, head_dim: int, num_heads: int) -> int:
        """Forward attention FLOPs (QK^T and PV, causal halves counted exactly) for this layout."""
        pairs = sum(q * (q + 1) // 2 + (1 if a else 0) * q for q, a in zip(self.seqlens_q, self.seg_anchor))
        return 4 * pairs * head_dim * num_heads


def dense_mask(doc_ids: torch.Tensor, mask: str = "anchor", sliding_window: int | None = None) -> torch.Tensor:
    """Dense ``(B, L, L)`` bool mask for ``doc_ids``; the specification every backend must match.

    It evaluates :func:`mask_mod_for` (the predicate flex's BlockMask is built from) on the full index grid.
    Sliding window (size ``W``, HF convention ``q - k < W``) is applied in the frame of the segment run
    alone: for ``anchor`` a token at document offset ``j`` sits at local index ``j + 1`` of
    ``[anchor] + document``, so the anchor is visible iff ``j + 1 < W``.
    """
    d = doc_ids.to(torch.int64)
    B, L = d.shape
    idx = torch.arange(L, device=d.device)
    mod = mask_mod_for(d, mask, sliding_window)
    allowed = mod(torch.arange(B, device=d.device)[:, None, None], None, idx[None, :, None], idx[None, None, :])
    return allowed.expand(B, L, L).contiguous()


def position_ids_for_doc_ids(doc_ids: torch.Tensor, positions: str = "continuous",
                             offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, L)`` int64 position ids for ``doc_ids`` (see :meth:`AnchorLayout.position_ids`)."""
    check_positions(positions)
    B, L = doc_ids.shape
    pos = torch.arange(L, device=doc_ids.device).expand(B, L)
    if positions == "continuous":
        return pos.clone()
    reset = (local_offsets(doc_ids) if offsets is None else offsets) + 1
    return torch.where(doc_ids > 0, reset, torch.where(doc_ids == 0, torch.zeros_like(pos), pos))


def labels_for_doc_ids(labels: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """A copy of ``labels`` with ``-100`` at the anchor, the first token of documents 2..n, and padding."""
    out = labels.clone()
    first = torch.zeros_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]) & (doc_ids[:, 1:] > 1)
    out[(doc_ids <= 0) | first] = IGNORE_INDEX
    return out
