"""HF Trainer under Ulysses SP with a token-weighted loss across DP x SP x gradient accumulation.

Stock Trainer (transformers 5.x) computes an SP micro-batch's loss with ``deepspeed_sp_compute_loss``: the
token-weighted mean over the SP group, but micro-batches of one optimizer step (gradient accumulation, DP
ranks) then count equally, whatever their number of targets; and ``num_items_in_batch`` is never counted
because DeepSpeed's adapter replaces ``labels`` by ``shift_labels``. :class:`SequenceParallelLossMixin`
counts the targets of the whole step from ``shift_labels`` (summed over every rank: SP shards are disjoint)
and normalises by that count, so the gradient, its norm and the logged loss equal single-process training on
the same rows. Without SP it changes nothing.
"""

from __future__ import annotations

import torch

from ..patches.loss_hook import summed_loss, uses_chunked_loss
from .loss import IGNORE_INDEX, sp_causal_lm_loss, sp_loss_from_sum


def _sp_config(trainer):
    pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    if pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled:
        return pc
    return None


class SequenceParallelLossMixin:
    """Mix into ``transformers.Trainer`` (before it): ``class T(SequenceParallelLossMixin, Trainer)``."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
        if _sp_config(self) is not None and batches and "shift_labels" in batches[0]:
            local = sum((b["shift_labels"] != IGNORE_INDEX).sum() for b in batches).to(device=device, dtype=torch.int64)
            n = self.accelerator.reduce(local, reduction="sum")  # every rank's shard of every micro-batch of the step
        return batches, n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pc = _sp_config(self)
        if pc is None or not model.training or "shift_labels" not in inputs:
            self.loss_is_scaled_for_ga = None
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        import torch.distributed as dist
        from deepspeed.utils import groups

        inputs = dict(inputs)
        shift_labels = inputs.pop("shift_labels")
        inputs.pop("labels", None)
        dp = dist.get_world_size() // pc.sp_size
        # Trainer passes scale_wrt_gas=False to DeepSpeed, so no accumulation factor here (grad_accum=1);
        # ZeRO-3 averages over dp x sp ranks and the SP all-reduce contributes the factor sp (see loss.py).
        opts = dict(sp_group=groups._get_sequence_parallel_group(), num_items_in_batch=num_items_in_batch,
                    dp_size=dp, grad_accum=1)
        if uses_chunked_loss(self.accelerator.unwrap_model(model)):
            with summed_loss():  # this rank's summed token loss, chunked: its shard's logits never exist
                outputs = model(**inputs, shift_labels=shift_labels)
            if outputs.logits is None:
                loss, _, _ = sp_loss_from_sum(outputs.loss, shift_labels, **opts)
            else:  # chunked_loss="auto" refused this model on its first call: the stock forward ran, with logits
                loss, _, _ = sp_causal_lm_loss(outputs.logits, shift_labels, **opts)
        else:
            outputs = model(**inputs)  # no labels: the model computes no loss of its own
            loss, _, _ = sp_causal_lm_loss(outputs.logits, shift_labels, **opts)
        # normalised over the whole step when the count is known; else a per-micro-batch mean (Trainer divides)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss


def sequence_parallel_trainer_class(base=None):
    """``type("SequenceParallelTrainer", (SequenceParallelLossMixin, base), {})`` with ``base`` = HF Trainer."""
    if base is None:
        from transformers import Trainer as base
    return type(f"SequenceParallel{base.__name__}", (SequenceParallelLossMixin, base), {})
