"""Chunked causal-LM cross-entropy that never holds the ``(N, vocab)`` logits. Pure torch.

The loss of ``N`` tokens with hidden states ``h: (N, H)`` and a linear output head ``W: (V, H)`` (+ bias ``(V,)``)::

    z_i   = transform(h_i @ W.T + b)          float32, per chunk of ``chunk_size`` tokens
    loss  = sum_i [ logsumexp(z_i) - z_i[y_i] ]   over targets y_i != -100

``transform`` is the family's logit post-processing, in this order: ``z * scale`` (Cohere ``logit_scale``;
Granite ``1 / logits_scaling``), then ``softcap * tanh(z / softcap)`` (Gemma2/3 ``final_logit_softcapping``).

Two paths, one result (both compared with the dense float32/float64 reference in tests/test_chunked_loss.py):

- :func:`chunked_linear_cross_entropy` (a plain ``nn.Linear`` head): one ``autograd.Function`` whose forward
  computes, chunk by chunk, the loss *and* the gradients of ``h``, ``W`` and ``b`` (the gradient of a scalar loss
  is known once its forward is done; Liger-Kernel's fused linear cross-entropy does the same). Backward only
  scales them by the incoming gradient. Three matmuls per chunk, as the stock path has; no recompute. Extra
  memory: one chunk's float32 logits and softmax (``~3 * chunk * V * 4`` bytes), plus ``grad_h`` (N, H) and a
  float32 ``grad_W`` (V, H), which backward would allocate anyway.
- :func:`chunked_module_cross_entropy` (any head module, e.g. a PEFT LoRA ``Linear``): each chunk's
  ``head(h_chunk) -> transform -> float32 CE sum`` runs under ``torch.utils.checkpoint`` (non-reentrant), so its
  logits are freed after the forward and recomputed in the backward (one extra head forward per chunk).

Chunks whose targets are all -100 are skipped (their loss and gradients are zero). Hidden states are cut with
``split`` (one backward node for all chunks), never with per-chunk slicing of a leaf (which builds a full-size
zero gradient per chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 2048


def check_chunk_size(chunk_size, name: str = "chunk_size") -> int:
    """``chunk_size`` as an int >= 1, else a ValueError naming ``name`` and the value."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name} must be an int >= 1 (tokens per loss chunk), got {chunk_size!r}")
    return chunk_size


def shift_causal_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal shift: ``(B, L)`` labels -> ``(B, L)`` targets, token t predicts ``labels[t + 1]``,
    the last token of each row has no target (-100). Same as ``ForCausalLMLoss``."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _transform(z: torch.Tensor, scale: float | None, softcap: float | None):
    """float32 logits -> (transformed logits, tanh term or None) for the backward of the softcap."""
    if scale is not None:
        z = z * scale
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    return z, t


def _check(hidden, labels, scale, softcap):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) = ({hidden.shape[0]},), matching hidden")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, scale, softcap):
        need = any(ctx.needs_input_grad[:3])  # forward runs under no_grad; this says whether backward will come
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_h = torch.zeros_like(hidden) if need_h else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk_size):
            y = labels[start:start + chunk_size]
            valid = y != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            h = hidden[start:start + chunk_size]
            z = torch.nn.functional.linear(h, weight, bias).float()
            z, t = _transform(z, scale, softcap)
            yc = y.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(z, dim=1)
            total += ((lse - z.gather(1, yc).squeeze(1)) * valid).sum()
            if not need:
                continue
            # d loss / d z = softmax(z) - onehot(y), zero for non-targets; then back through the transform
            g = torch.exp_(z.sub_(lse.unsqueeze(1)))
            g.scatter_add_(1, yc, torch.full_like(lse, -1.0).unsqueeze(1))
            g.mul_(valid.unsqueeze(1))
            if t is not None:
                g.mul_(1 - t * t)
            if scale is not None:
                g.mul_(scale)
            g = g.to(weight.dtype)
            if need_h:
                g_h[start:start + chunk_size] = g @ weight
            if need_w:
                g_w.add_((g.t() @ h).float())
            if need_b:
                g_b.add_(g.float().sum(0))
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad):
        g_h, g_w, g_b = ctx.saved_tensors
        gh = None if g_h is None else g_h * grad.to(g_h.dtype)
        gw = None if g_w is None else (g_w * grad).to(ctx.dtypes[0])
        gb = None if g_b is None else (g_b * grad).to(ctx.dtypes[1])
        return gh, gw, gb, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of a linear head over chunks of tokens (float32 scalar).

    Args:
        hidden: ``(N, H)`` final hidden states, any float dtype (the head matmul runs in it, as stock does).
        weight: ``(V, H)`` head weight (tied or not), same dtype as ``hidden``. bias: ``(V,)`` or ``None``.
        labels: ``(N,)`` int targets, already shifted; ``-100`` = no target.
        chunk_size: tokens per chunk (peak extra memory ``~3 * chunk_size * V * 4`` bytes).
        scale / softcap: the logit transform (module docstring).
    """
    check_chunk_size(chunk_size)
    _check(hidden, labels, scale, softcap)
    return _LinearCE.apply(hidden, weight, bias, labels, chunk_size, scale, softcap)


def _chunk_ce_sum(head, scale, softcap, h, y):
    z, _ = _transform(head(h).float(), scale, softcap)
    return torch.nn.functional.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_module_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of any head module (``(n, H) -> (n, V)``), per-chunk checkpointed (float32 scalar).

    Same arguments as :func:`chunked_linear_cross_entropy`, with ``head`` called on each ``(chunk, H)`` piece, so
    PEFT LoRA layers, biases and hooks of the head run as they do in the stock forward.
    """
    from torch.utils.checkpoint import checkpoint

    check_chunk_size(chunk_size)
    _check(hidden, labels, scale, softcap)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
        if not bool((y != IGNORE_INDEX).any()):
            continue
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, head, scale, softcap, h, y, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(head, scale, softcap, h, y)
    return total


def reference_cross_entropy(hidden, weight, bias, labels, *, scale=None, softcap=None, dtype=torch.float32):
    """The dense oracle: all ``(N, V)`` logits at once in ``dtype``, summed cross-entropy (tests, benchmarks)."""
    z = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    z, _ = _transform(z, scale, softcap)
    return torch.nn.functional.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="sum")
