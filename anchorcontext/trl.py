"""TRL's ``SFTTrainer`` with AnchorAttention: swap the class, keep the script (docs/trl.md).

``AnchorSFTTrainer`` is ``trl.SFTTrainer`` that patches the model, lets TRL tokenize the dataset and build its
labels (completion-only / assistant-only masks included), then packs the tokenized documents into rows of
``SFTConfig.max_length`` tokens with one shared anchor (:class:`~anchorcontext.packing.DocumentPacker`) and
batches them with :class:`~anchorcontext.collator.AnchorCollator`. ``max_length`` is the packed row length:
longer documents are split into continuation chunks, never cut (TRL's own truncation is switched off).
TRL's ``packing`` / ``padding_free`` (BFD, positions reset per document, no anchor) are refused.
"""

from __future__ import annotations

import copy
import logging

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("anchorcontext.trl needs TRL: pip install 'anchorcontext[trl]'") from e

from .collator import AnchorCollator
from .packing import DocumentPacker, PackStats, anchor_and_pad_ids
from .patches import is_patched, patch_model

__all__ = ["AnchorSFTTrainer", "anchor_sft_config"]

logger = logging.getLogger("anchorcontext")


def anchor_sft_config(args: SFTConfig) -> tuple[SFTConfig, int]:
    """A copy of ``args`` that TRL can run with AnchorAttention packing, and the packed row length.

    Refuses TRL's own packing (``packing``, ``eval_packing``, ``padding_free``): it resets positions per document
    and has no anchor. ``max_length`` becomes the row length and TRL's truncation is switched off (``None`` in the
    copy), so no document is cut. ``remove_unused_columns=False`` keeps the rows' ``doc_lens``.
    """
    if not isinstance(args, SFTConfig):
        raise ValueError(f"args must be a trl.SFTConfig, got {type(args).__name__}")
    for name in ("packing", "padding_free", "eval_packing"):
        if getattr(args, name, None):
            raise ValueError(
                f"SFTConfig.{name}={getattr(args, name)!r}: TRL's packing resets positions per document and has no "
                f"anchor; AnchorSFTTrainer packs with AnchorAttention itself, set {name}=False"
            )
    seq_len = args.max_length
    if seq_len is None or isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(
            f"SFTConfig.max_length={seq_len!r}: AnchorSFTTrainer packs documents into rows of max_length tokens "
            "(anchor included; longer documents continue on the next row, never cut); set an int >= 2, e.g. 4096"
        )
    out = copy.copy(args)
    out.max_length = None  # TRL would truncate every document to max_length before our packing
    out.remove_unused_columns = False
    return out, seq_len


class AnchorSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` packing with AnchorAttention; the same arguments, plus the ones below.

    The model is patched (:func:`~anchorcontext.patch_model`) unless it already is. ``per_device_*_batch_size``
    counts packed rows of ``max_length`` tokens. ``pack_stats`` holds each dataset's
    :class:`~anchorcontext.packing.PackStats`. The ``num_tokens`` metric counts every non-padding token of the
    batch (TRL's own count takes the row length once per batch when there is no ``attention_mask``).

    Args (keyword only): mask (``anchor | intra_doc | full``), positions (``continuous | reset``), backend
    (``patch_model``'s), overflow (``split``: long documents continue on the next row; ``drop``: counted and
    logged), pack_batch_size (documents per ``Dataset.map`` batch; each ends with one padded row).
    """

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, *args_rest, mask: str = "anchor",
                 positions: str = "continuous", backend: str = "auto", overflow: str = "split",
                 pack_batch_size: int = 1000, **kwargs):
        if args is None:  # TRL's own default: SFTConfig("<model name>-SFT"), max_length=1024 = the row length
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = SFTConfig(f"{name.rstrip('/').split('/')[-1]}-SFT")
        args, self.seq_len = anchor_sft_config(args)
        if data_collator is not None and not isinstance(data_collator, AnchorCollator):
            raise ValueError(f"data_collator must be an anchorcontext.AnchorCollator (or None), got "
                             f"{type(data_collator).__name__}: other collators build no anchor layout")
        if overflow not in ("split", "drop"):
            raise ValueError(f"overflow must be 'split' or 'drop', got {overflow!r}")
        if isinstance(pack_batch_size, bool) or not isinstance(pack_batch_size, int) or pack_batch_size < 1:
            raise ValueError(f"pack_batch_size must be an int >= 1, got {pack_batch_size!r}")
        self._anchor_opts = dict(mask=mask, positions=positions, overflow=overflow, batch_size=pack_batch_size)
        self.pack_stats: dict[str, PackStats] = {}
        if not isinstance(model, str) and not is_patched(model):
            patch_model(model, backend=backend)
        # SFTTrainer resolves processing_class (and its pad token) first; the collator is built from it below
        super().__init__(model, args, data_collator, *args_rest, **kwargs)
        if not is_patched(self.model):  # a model id: SFTTrainer loaded it (and may have wrapped it with PEFT)
            patch_model(self.model, backend=backend)
        if data_collator is None:
            anchor, pad = self._anchor_ids()
            self.data_collator = AnchorCollator(anchor_id=anchor, pad_id=pad, mask=mask, positions=positions,
                                                pad_to_multiple_of=args.pad_to_multiple_of)

    def _anchor_ids(self) -> tuple[int, int]:
        return anchor_and_pad_ids(self._tokenizer)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        anchor, pad = self._anchor_ids()
        packer = DocumentPacker(seq_len=self.seq_len, anchor_id=anchor, pad_id=pad, vocab_size=len(self._tokenizer),
                                overflow=self._anchor_opts["overflow"])
        self.pack_stats[dataset_name] = packer.stats
        packed = dataset.map(packer, batched=True, batch_size=self._anchor_opts["batch_size"],
                             remove_columns=list(dataset.column_names or []))
        if hasattr(packed, "__len__"):
            logger.info("anchorcontext.trl: %s dataset packed into %d rows of %d tokens: %s", dataset_name,
                        len(packed), self.seq_len, packer.stats.as_dict())
        return packed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        before = self._total_train_tokens
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        layout = inputs.get("anchor_layout")
        if self.model.training and layout is not None and "attention_mask" not in inputs:
            real = (layout.doc_ids >= 0).sum().to(self.accelerator.device)
            self._total_train_tokens = before + int(self.accelerator.gather_for_metrics(real).sum().item()) // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return out

