"""A pure-torch stand-in for the flash varlen kernel's raw forward/backward, as the merge path calls them.

Installed as ``anchorcontext.attention.varlen_merge.KERNEL`` (monkeypatched). Semantics of
``aten._flash_attention_forward/_backward`` (and flash-attn's ``_flash_attn_varlen_forward/_backward``) with
``cu_seqlens_q == cu_seqlens_k``:

* forward ``(q (T,H,D), k/v (T,Hkv,D))`` -> ``out (T,H,D)`` in ``q.dtype`` and ``lse (H, T)`` float32: causal within
  each segment, a window ``W`` keeps keys ``i - (W - 1) <= j <= i``; GQA: query head ``h`` uses key head ``h // (H/Hkv)``.
* backward does NOT recompute the softmax normaliser: it takes ``out`` and ``lse`` as given and forms
  ``P = exp(scale * q k^T - lse)``, ``D = rowsum(dO * out)``, ``dS = P (dO v^T - D)``,
  ``dq = scale dS k``, ``dk = scale dS^T q``, ``dv = P^T dO`` (summed over each key head's query group). A caller
  passing a wrong LSE or output gets wrong gradients, as with the real kernel.

Math in float32 (float64 inputs stay float64), on any device and dtype. Every call's arguments are recorded in
``CALLS``.
"""

from __future__ import annotations

import torch

CALLS: list[dict] = []


def _mask(cu, T, window, device):
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu.cpu().to(torch.int64)), output_size=T)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    keep = (seg[:, None] == seg[None, :]) & (j <= i)
    if window is not None:
        keep &= j >= i - (window - 1)
    return keep.to(device)


class StandinKernel:
    name = "standin"

    @staticmethod
    def unavailable_reason(device, dtype=None):
        return None  # pure torch: runs anywhere

    def _prep(self, q, k, v, cu, max_len):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and int(cu[0]) == 0 and int(cu[-1]) == q.shape[0], cu
        lens = torch.diff(cu.to(torch.int64))
        assert int(lens.min()) >= 1 and int(lens.max()) == max_len, (lens.tolist(), max_len)
        assert isinstance(max_len, int)
        H, Hkv = q.shape[1], k.shape[1]
        assert H % Hkv == 0 and k.shape == v.shape
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        rep = H // Hkv
        qa = q.to(acc).transpose(0, 1)  # (H, T, D)
        ka = k.to(acc).transpose(0, 1).repeat_interleave(rep, dim=0)
        va = v.to(acc).transpose(0, 1).repeat_interleave(rep, dim=0)
        return acc, rep, qa, ka, va

    def forward(self, q, k, v, cu, max_len, scale, window):
        CALLS.append(dict(op="forward", segments=len(cu) - 1, max_len=max_len, scale=scale, window=window))
        acc, _rep, qa, ka, va = self._prep(q, k, v, cu, max_len)
        keep = _mask(cu, q.shape[0], window, q.device)
        s = (qa @ ka.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (H, T)
        out = torch.softmax(s, dim=-1) @ va
        return out.transpose(0, 1).to(q.dtype), lse.to(torch.float32 if acc == torch.float32 else acc)

    def backward(self, dout, q, k, v, out, lse, cu, max_len, scale, window):
        CALLS.append(dict(op="backward", segments=len(cu) - 1, max_len=max_len, scale=scale, window=window))
        assert lse.shape == (q.shape[1], q.shape[0]), lse.shape
        acc, rep, qa, ka, va = self._prep(q, k, v, cu, max_len)
        keep = _mask(cu, q.shape[0], window, q.device)
        s = (qa @ ka.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
        p = torch.exp(s - lse.to(acc)[..., None])  # the given LSE, not recomputed
        do = dout.to(acc).transpose(0, 1)
        delta = (do * out.to(acc).transpose(0, 1)).sum(-1, keepdim=True)  # the given output
        ds = p * (do @ va.transpose(-1, -2) - delta)
        dq = scale * ds @ ka
        dk = scale * ds.transpose(-1, -2) @ qa
        dv = p.transpose(-1, -2) @ do
        H, T, D = dk.shape
        dk = dk.view(H // rep, rep, T, D).sum(1)
        dv = dv.view(H // rep, rep, T, D).sum(1)
        return (dq.transpose(0, 1).to(q.dtype), dk.transpose(0, 1).to(k.dtype), dv.transpose(0, 1).to(v.dtype))
