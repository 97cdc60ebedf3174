"""Token-weighted causal-LM loss over sequence-parallel shards, and the gradient-scale rule.

Under Ulysses each SP rank holds logits for its ``L/P`` tokens and the matching pre-shifted labels
(``shift_labels``, made by DeepSpeed's dataloader adapter before sharding, so no target is lost at a shard
boundary). The loss of a row is the sum over all ranks' tokens divided by the number of targets.

Gradient scale (DeepSpeed issues #5248, #6841). The loss is summed over the SP group with a differentiable
collective (all-gather or all-reduce), so every SP rank backpropagates the SAME total and each rank's
parameter gradients come out ``P`` times its shard's share. ZeRO-3 with ``reduce_scatter: true`` (the
default) averages gradients over all ``DP x P`` ranks, which cancels the ``P``; ZeRO-0/1/2 and ZeRO-3 with
``reduce_scatter: false`` average over the ``DP`` ranks only and leave gradients exactly ``P`` times too large.
:func:`check_deepspeed_config_for_sp` refuses those combinations.

DP x SP x gradient accumulation. With ``num_items_in_batch = N`` (targets of the whole optimizer step: all
micro-batches, all DP ranks), :func:`sp_causal_lm_loss` returns ``S_i * DP * GA / N`` for micro-batch ``i``
(``S_i``: its summed token losses over the SP group). DeepSpeed divides by ``GA`` in ``backward`` and ZeRO-3
averages over ``DP x P`` ranks, so the step's gradient is ``d(sum_i S_i)/N``: exactly the token-weighted
single-process gradient. The logged value ``sum_i S_i / N`` (all-reduced over DP) is the token-weighted loss.
"""

from __future__ import annotations

import json
import os

import torch

from ..layout import IGNORE_INDEX


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum); the backward all-reduces the gradient, as
    ``torch.distributed.nn.functional.all_gather`` followed by ``sum`` does."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def count_targets(shift_labels: torch.Tensor, group=None) -> torch.Tensor:
    """Number of targets (labels != -100) in ``shift_labels``, summed over ``group`` when given (int64 scalar)."""
    n = (shift_labels != IGNORE_INDEX).sum().to(torch.int64)
    if group is not None:
        import torch.distributed as dist

        n = n.clone()
        dist.all_reduce(n, group=group)
    return n


def sp_causal_lm_loss(
    logits: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    sp_group=None,
    num_items_in_batch: int | torch.Tensor | None = None,
    dp_size: int = 1,
    grad_accum: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-weighted loss of one micro-batch whose tokens are sharded over ``sp_group``.

    Args:
        logits: ``(B, L/P, V)`` this rank's logits (any float dtype; the loss is computed in float32 or wider).
        shift_labels: ``(B, L/P)`` int, already shifted (target of token t at index t), ``-100`` = no target.
        sp_group: the SP process group (``None``: no SP, a plain single-rank loss).
        num_items_in_batch: targets in the whole optimizer step over all micro-batches and DP ranks;
            ``None`` = this micro-batch's own count over the SP group (a per-micro-batch mean).
        dp_size / grad_accum: the DP degree and accumulation steps ``num_items_in_batch`` spans.

    Returns:
        ``(loss, loss_sum, n_items)``: ``loss`` to backpropagate (see the module docstring for the scale),
        ``loss_sum`` the detached summed token losses of the micro-batch over the SP group, ``n_items`` its
        target count over the SP group.
    """
    if logits.shape[:2] != shift_labels.shape:
        raise ValueError(f"logits (B, L) = {tuple(logits.shape[:2])} do not match shift_labels {tuple(shift_labels.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    local = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(dtype), shift_labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return sp_loss_from_sum(local, shift_labels, sp_group=sp_group, num_items_in_batch=num_items_in_batch,
                            dp_size=dp_size, grad_accum=grad_accum)


def sp_loss_from_sum(
    local: torch.Tensor,
    shift_labels: torch.Tensor,
    *,
    sp_group=None,
    num_items_in_batch: int | torch.Tensor | None = None,
    dp_size: int = 1,
    grad_accum: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sp_causal_lm_loss` from this rank's *summed* token loss ``local`` (a scalar), e.g. the chunked
    loss's (``patch_model(chunked_loss=True)`` under :func:`anchorcontext.patches.loss_hook.summed_loss`), which
    never builds the shard's ``(B, L/P, V)`` logits. Same arguments and returns otherwise."""
    if local.dim() != 0:
        raise ValueError(f"local must be a scalar summed loss, got shape {tuple(local.shape)}")
    total = local if sp_group is None else _AllReduceSum.apply(local, sp_group)
    n_items = count_targets(shift_labels, sp_group)
    if num_items_in_batch is None:
        loss = total / n_items.clamp(min=1).to(total)
    else:
        n = torch.as_tensor(num_items_in_batch, device=total.device).to(total.dtype).clamp(min=1)
        loss = total * (dp_size * grad_accum) / n
    return loss, total.detach(), n_items


def load_deepspeed_config(ds_config) -> dict:
    """A DeepSpeed config as a dict, from a dict, a JSON path, or an ``HfDeepSpeedConfig``-like object."""
    if ds_config is None:
        return {}
    if isinstance(ds_config, dict):
        return ds_config
    if isinstance(ds_config, (str, os.PathLike)):
        with open(ds_config) as f:
            return json.load(f)
    cfg = getattr(ds_config, "config", None) or getattr(ds_config, "deepspeed_config", None)
    if isinstance(cfg, dict):
        return cfg
    raise ValueError(f"deepspeed config must be a dict or a JSON path, got {type(ds_config).__name__}")


def check_deepspeed_config_for_sp(ds_config, sp_size: int) -> dict:
    """Refuse DeepSpeed settings whose gradient averaging is wrong under SP (``sp_size`` times too large).

    Needs ``zero_optimization.stage == 3`` with ``reduce_scatter`` true (DeepSpeed's default). Returns the dict.
    """
    cfg = load_deepspeed_config(ds_config)
    if sp_size <= 1:
        return cfg
    zero = cfg.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage != 3:
        raise ValueError(
            f"zero_optimization.stage={stage!r} with sp_size={sp_size}: DeepSpeed averages gradients over the data-"
            f"parallel ranks only, leaving them exactly sp_size={sp_size} times too large under Ulysses (DeepSpeed "
            "issues #5248, #6841). Use ZeRO stage 3 (configs/accelerate/deepspeed_zero3_sp*.yaml)"
        )
    if zero.get("reduce_scatter", True) is False:
        raise ValueError(
            f"zero_optimization.reduce_scatter=false with sp_size={sp_size}: gradients come out sp_size={sp_size} "
            "times too large under Ulysses (DeepSpeed issues #5248, #6841); remove the key or set it to true"
        )
    return cfg
