"""FlexAttention backend: a BlockMask built once per batch from the layout, shared by all layers.

The BlockMask is cached on the ``AnchorLayout`` (keyed by sliding window and device), so every layer
of a forward (and the backward) reuses it; a new layout at the same length does not recompile.
``softcap`` goes through a ``score_mod``. The softcap and the sliding window are captured as 0-dim tensors, so
the compiled kernel takes them as inputs: one compile serves every value (a Python float/int closure constant
would be specialised on, one recompile per value, and dynamo's cache limit of 8 would then fall back to the
O(L^2) eager path). CPU: forward only (torch has no FlexAttention backward on
CPU); a clear error is raised when gradients are needed there.
"""

from __future__ import annotations

import functools

import torch

from ._common import Backend, check_options, check_qkv, default_scaling

# FlexAttention ``kernel_options`` for every call (None: torch's defaults); benchmarks time variants side by side
KERNEL_OPTIONS: dict | None = None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A cached float32 0-dim tensor on ``device`` (captured by ``score_mod``: an input of the compiled kernel)."""
    return torch.full((), value, dtype=torch.float32, device=device)


def block_mask_for(layout, sliding_window=None, device=None):
    """The (cached) BlockMask for ``layout`` on ``device``."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device or layout.doc_ids.device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one cache entry
        device = torch.device("cuda", torch.cuda.current_device())
    B, L = layout.batch_size, layout.seq_len
    # the predicate is layout.mask_mod (the one dense_mask evaluates); its doc ids live on the kernel's device
    return layout.cached(("flex_block_mask", sliding_window, str(device)), lambda: create_block_mask(
        layout.to(device).mask_mod(sliding_window), B, None, L, L, device=device))


def flex_attention(query, key, value, layout, *, scaling=None, softcap=None, sliding_window=None, dropout=0.0):
    """``query (B,H,L,D)``, ``key/value (B,Hkv,L,D)`` -> ``(B,L,H,D)``."""
    _, H, Hkv, _, D = check_qkv(query, key, value, layout)
    check_options(softcap, sliding_window, dropout)
    if dropout:
        raise ValueError(f"dropout={dropout} is not supported by the 'flex' backend; use 'sdpa' or 'varlen'")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type == "cpu" and needs_grad:
        raise ValueError(
            "backend='flex' has no backward on CPU (torch FlexAttention is forward-only there); "
            "use backend='sdpa' for CPU training, or run under torch.no_grad()"
        )
    window = None if sliding_window is None else int(sliding_window)
    bm = block_mask_for(layout, window, query.device)
    score_mod = None
    if softcap is not None:
        cap = _scalar(float(softcap), query.device)  # a tensor: no recompile per softcap value

        def score_mod(score, b, h, q, k):
            return cap * torch.tanh(score / cap)

    out = _compiled_flex()(
        query, key, value, score_mod=score_mod, block_mask=bm, scale=default_scaling(scaling, D),
        enable_gqa=Hkv != H, kernel_options=KERNEL_OPTIONS,
    )
    return out.transpose(1, 2)


def _unavailable_reason(device: torch.device, dtype, options: dict) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception as e:
        return f"FlexAttention unavailable ({e})"
    if options.get("dropout"):
        return "flex has no dropout"
    if device.type == "cpu":
        return "flex is off on CPU (compiled CPU FlexAttention is slower than sdpa and has no backward)"
    if device.type != "cuda":
        return f"flex is untested on {device.type}"
    head_dim = options.get("head_dim")
    if head_dim is not None and head_dim < 16:
        return f"flex needs head_dim >= 16 (Inductor's kernel), got {head_dim}"
    return None


BACKEND = Backend(
    name="flex",
    fn=flex_attention,
    unavailable_reason=_unavailable_reason,
    train_reason=lambda device: {"cuda": None, "cpu": "no FlexAttention backward on CPU"}.get(
        device.type, f"flex is untested on {device.type}"
    ),
    help="compiled FlexAttention with a BlockMask cached per layout: GPU; CPU forward only",
)
