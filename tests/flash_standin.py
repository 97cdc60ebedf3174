"""A pure-torch stand-in for ``flash_attn.flash_attn_varlen_func`` with flash-attn's documented semantics.

Installed in tests through ``anchorcontext.attention.varlen._KERNEL_OVERRIDE`` so that the varlen
backend's plumbing (K/V gather, ``cu_seqlens_q != cu_seqlens_k``, bottom-right causal alignment, window
and softcap mapping, GQA) runs on CPU. Semantics, from flash-attn's docstring (v2.1+):

* ``q: (total_q, H, D)``, ``k, v: (total_k, Hkv, D)``; segment ``s`` has queries
  ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` (``lq`` of them) and keys ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``
  (``lk``).
* ``causal=True`` aligns the mask to the bottom-right corner: query ``i`` keeps keys ``j <= i + lk - lq``.
* ``window_size=(left, right)`` (``-1`` = unbounded): query ``i`` keeps keys in
  ``[i + lk - lq - left, i + lk - lq + right]``; with ``causal=True`` the right edge is 0.
* ``softcap > 0``: ``s = softcap * tanh(s / softcap)`` after ``softmax_scale``.
* GQA: with ``Hkv < H``, query heads ``g*H/Hkv .. (g+1)*H/Hkv - 1`` use key head ``g``.
* A query whose mask row is all zero outputs zero.

Scores and the softmax run in float32 (float64 inputs stay float64); the output has ``q.dtype``.
The stand-in is differentiable through plain autograd. It also checks the argument contract the real
kernel enforces (int32 cumulative lengths starting at 0, ``max_seqlen`` bounds, matching totals).
"""

from __future__ import annotations

import math

import torch

CALLS: list[dict] = []  # every call's scalar arguments (tests inspect what the backend passed)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table=None,
) -> torch.Tensor:
    """``q (total_q, H, D)``, ``k/v (total_k, Hkv, D)`` -> ``(total_q, H, D)``; see the module docstring."""
    if alibi_slopes is not None or block_table is not None or return_attn_probs:
        raise NotImplementedError("stand-in: alibi_slopes, block_table and return_attn_probs are not modelled")
    if dropout_p:
        raise NotImplementedError("stand-in: dropout is not modelled (tests use dropout_p=0)")
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, (q.shape, k.shape, v.shape)
    assert k.shape == v.shape and q.shape[2] == k.shape[2], (q.shape, k.shape, v.shape)
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32, (cu_seqlens_q.dtype, cu_seqlens_k.dtype)
    assert cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.dim() == 1
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), "max_seqlen must be Python ints"
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    assert cq[0] == 0 and ck[0] == 0 and cq[-1] == q.shape[0] and ck[-1] == k.shape[0], (cq, ck, q.shape, k.shape)
    H, Hkv = q.shape[1], k.shape[1]
    assert H % Hkv == 0, (H, Hkv)
    CALLS.append(dict(causal=causal, window_size=tuple(window_size), softcap=softcap, softmax_scale=softmax_scale,
                      max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_segments=len(cq) - 1))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:
        right = 0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs = []
    for s in range(len(cq) - 1):
        lq, lk = cq[s + 1] - cq[s], ck[s + 1] - ck[s]
        assert 0 <= lq <= max_seqlen_q and 0 <= lk <= max_seqlen_k, (s, lq, lk, max_seqlen_q, max_seqlen_k)
        qs = q[cq[s]:cq[s + 1]].to(acc).transpose(0, 1)  # (H, lq, D)
        ks = k[ck[s]:ck[s + 1]].to(acc).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)  # (H, lk, D)
        vs = v[ck[s]:ck[s + 1]].to(acc).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
        scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        diag = i + lk - lq  # bottom-right alignment
        keep = torch.ones(lq, lk, dtype=torch.bool)
        if left >= 0:
            keep &= j >= diag - left
        if right >= 0:
            keep &= j <= diag + right
        keep = keep.to(q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zero output
        outs.append(torch.matmul(p, vs).transpose(0, 1))  # (lq, H, D)
    return torch.cat(outs, dim=0).to(q.dtype)
