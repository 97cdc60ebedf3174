"""Hugging Face's own packing conventions on a patched model: honoured as intra-document attention, or refused.

Batches come from transformers' ``DataCollatorWithFlattening`` and TRL's collator (``padding_free=True``, and
``pack_dataset`` rows as ``SFTConfig(packing=True)`` builds them). Every document's logits must equal its
standalone run (max diff <= 1e-5, float32); the unpatched model given the same batch with an all-ones 2D mask
(transformers #46634) attends across documents (negative control).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, make_model

import anchorcontext as ac

DOCS = [7, 3, 9, 5, 4]  # document lengths (one flattened row of 28 tokens)


def _docs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in DOCS]


def _standalone(model, docs):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([d])).logits[0] for d in docs]


def _worst(logits, ranges, alone):
    """max |packed - standalone| over every document; ranges: (row, start, end) of each document."""
    return max((logits[r, a:b] - ref).abs().max().item() for (r, a, b), ref in zip(ranges, alone))


def _flat_ranges(docs):
    out, a = [], 0
    for d in docs:
        out.append((0, a, a + len(d)))
        a += len(d)
    return out


def _forward(model, batch, **extra):
    keep = ("input_ids", "position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
            "max_length_k", "seq_idx")
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k in keep}, **extra).logits


FAMILIES = ["llama", "mistral", "gemma2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_data_collator_with_flattening_equals_standalone(family, flash_kwargs):
    model = make_model(family, "eager" if family == "gemma2" else "sdpa")
    docs = _docs()
    alone = _standalone(model, docs)
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": d} for d in docs])
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    ones = torch.ones_like(batch["input_ids"])
    control = _worst(_forward(model, batch, attention_mask=ones), _flat_ranges(docs), alone)
    assert control > 1e-3, f"the unpatched model with an all-ones mask matches standalone runs ({control})"
    ac.patch_model(model)
    assert _worst(_forward(model, batch), _flat_ranges(docs), alone) <= 1e-5
    # transformers #46634: an all-ones 2D mask must not turn packing detection off
    assert _worst(_forward(model, batch, attention_mask=ones), _flat_ranges(docs), alone) <= 1e-5


def test_trl_padding_free_collator_equals_standalone():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = make_model("llama")
    docs = _docs(1)
    alone = _standalone(model, docs)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": d} for d in docs])
    assert {"position_ids", "cu_seq_lens_q", "seq_idx"} <= set(batch)
    ones = torch.ones_like(batch["input_ids"])
    assert _worst(_forward(model, batch, attention_mask=ones), _flat_ranges(docs), alone) > 1e-3  # negative control
    ac.patch_model(model)
    assert _worst(_forward(model, batch), _flat_ranges(docs), alone) <= 1e-5
    assert _worst(_forward(model, batch, attention_mask=ones), _flat_ranges(docs), alone) <= 1e-5


@pytest.mark.parametrize("padding_free", [False, True])
def test_trl_packing_rows_equal_standalone(padding_free):
    """``SFTConfig(packing=True)``: BFD-packed rows with ``seq_lengths``; collated with per-row position ids and a
    right-padding mask, or flattened (``padding_free``)."""
    import datasets
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = make_model("llama")
    docs = _docs(2)
    alone = {tuple(d): a for d, a in zip(docs, _standalone(model, docs))}
    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": docs}), seq_length=16, strategy="bfd")
    rows = [packed[i] for i in range(len(packed))]
    assert sorted(n for r in rows for n in r["seq_lengths"]) == sorted(DOCS) and len(rows) > 1
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free, return_position_ids=True)(rows)
    ranges, refs, offset = [], [], 0
    for i, r in enumerate(rows):
        a = 0
        for n in r["seq_lengths"]:
            refs.append(alone[tuple(r["input_ids"][a:a + n])])
            ranges.append((0, offset + a, offset + a + n) if padding_free else (i, a, a + n))
            a += n
        offset += len(r["input_ids"])
    if not padding_free:
        assert not bool(batch["attention_mask"].all()), "expected right padding in the per-row batch"
    # negative control: stock attention given this batch (its padding mask, or an all-ones one) mixes documents
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    assert _worst(_forward(model, batch, **({} if "attention_mask" in batch else {"attention_mask": mask})),
                  ranges, refs) > 1e-3
    ac.patch_model(model)
    assert _worst(_forward(model, batch), ranges, refs) <= 1e-5


def test_refusals_and_pass_through():
    model = make_model("llama")
    docs = _docs(3)
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    ac.patch_model(model, hf_packing="refuse")
    with pytest.raises(ValueError, match="hf_packing"):
        _forward(model, batch)
    ac.patch_model(model)  # back to the default "intra_doc"
    anchor = ac.anchor_inputs(torch.tensor([[0] + [1] * (batch["input_ids"].shape[1] - 1)]))
    with pytest.raises(ValueError, match=r"both anchor_\* keys and Hugging Face packing kwargs"):
        model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
              cu_seq_lens_k=batch["cu_seq_lens_k"], **anchor)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"])  # k missing
    with pytest.raises(ValueError, match="rise strictly"):
        model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"][:-1],
              cu_seq_lens_k=batch["cu_seq_lens_q"][:-1])
    # left padding before a restart is not a layout we can read
    ids = torch.randint(3, VOCAB, (1, 8))
    pos = torch.tensor([[1, 1, 0, 1, 2, 0, 1, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=ids, position_ids=pos, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1]]))
    left = torch.tensor([[1, 1, 0, 1, 2, 3, 4, 5]])  # generate()'s positions for a left-padded row: not packing
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=left, attention_mask=mask).logits
        ac.unpatch_model(model)
        ref = model(input_ids=ids, position_ids=left, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_3d_position_ids_pass_through_unchanged():
    from anchorcontext.patches.hooks import _packing_layout

    ref = torch.zeros(1, 6, dtype=torch.long)
    pos = torch.tensor([0, 1, 2, 0, 1, 2]).expand(3, 1, 6)  # mRoPE (3, B, L)
    kwargs = {"position_ids": pos}
    assert _packing_layout(kwargs, ref, ()) is None and kwargs["position_ids"] is pos
    # with explicit boundaries the 3D ids still pass through; the boundaries come from cu_seq_lens
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    layout = _packing_layout({"position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, ref, ())
    assert layout.mask == "intra_doc" and layout.doc_ids.tolist() == [[1, 1, 1, 2, 2, 2]]


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_trainer_packing_batches_run_as_intra_document(tmp_path, padding_free):
    """``SFTTrainer(packing=True)`` end to end on a patched model: the batches its own collator builds run with
    every document equal to its standalone run (recorded batches replayed after one step at learning rate 0)."""
    import datasets
    import trl

    from anchorcontext.assets import train_bpe_tokenizer

    tok = train_bpe_tokenizer()
    model = make_model("llama")
    model.resize_token_embeddings(len(tok))
    model = ac.patch_model(model.train())
    docs = [[t % len(tok) for t in d] for d in _docs(4)]
    cfg = trl.SFTConfig(output_dir=str(tmp_path), packing=True, padding_free=padding_free, max_length=16,
                        max_steps=1, per_device_train_batch_size=2, learning_rate=0.0, report_to=[], use_cpu=True,
                        bf16=False, save_strategy="no", dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=model, args=cfg, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"input_ids": docs}))
    seen = []
    collate = trainer.data_collator

    def recording(rows):
        seen.append((rows, collate(rows)))
        return seen[-1][1]

    trainer.data_collator = recording
    trainer.train()
    assert seen
    model.eval()
    alone = {tuple(d): a for d, a in zip(docs, _standalone(model, docs))}
    for rows, batch in seen:
        ranges, refs, offset = [], [], 0
        for i, r in enumerate(rows):
            a = 0
            for n in r["seq_lengths"]:
                refs.append(alone[tuple(r["input_ids"][a:a + n])])
                ranges.append((0, offset + a, offset + a + n) if "cu_seq_lens_q" in batch else (i, a, a + n))
                a += n
            offset += len(r["input_ids"])
        assert _worst(_forward(model, batch), ranges, refs) <= 1e-5


def test_cached_multi_token_forward_with_full_mask_runs_like_stock():
    """A patched model continuing a KV cache with several new tokens, their position_ids and the full 2-D mask
    (chunked prefill, a new chat turn) runs like the stock model: the mask covers cached + new tokens."""
    stock = make_model("llama")
    model = ac.patch_model(make_model("llama"))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, 9), generator=g)
    outs = []
    for m in (stock, model):
        with torch.no_grad():
            first = m(input_ids=ids[:, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), use_cache=True)
            nxt = m(input_ids=ids[:, 6:], attention_mask=torch.ones(1, 9, dtype=torch.long),
                    position_ids=torch.arange(6, 9)[None], past_key_values=first.past_key_values, use_cache=True)
        outs.append(nxt.logits)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
