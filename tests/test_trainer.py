"""HF Trainer + AnchorCollator end to end on a tiny random Llama (CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers
from datasets import Dataset

import anchorcontext as ac

VOCAB, ANCHOR, PAD = 64, 1, 0


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=ANCHOR, pad_token_id=PAD, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def packed_dataset(n_docs=24, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(1, 20, (1,), generator=g))
        docs.append({"input_ids": [ANCHOR] + torch.randint(3, VOCAB, (n,), generator=g).tolist()})
    ds = Dataset.from_list(docs)
    packer = ac.DocumentPacker(seq_len=seq_len, anchor_id=ANCHOR, pad_id=PAD, vocab_size=VOCAB)
    return ds.map(packer, batched=True, remove_columns=ds.column_names)


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True, seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_trains_and_loss_decreases_on_repeated_batch(tmp_path):
    ds = packed_dataset()
    one = Dataset.from_list([ds[0]] * 16)  # every batch is the same
    model = ac.patch_model(tiny_llama())
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, max_steps=8, learning_rate=3e-2),
        train_dataset=one, data_collator=ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.8, losses


def _one_step_params(tmp_path, bs, ga, **kw):
    ds = packed_dataset()
    model = ac.patch_model(tiny_llama())
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1, optim="sgd",
                  learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", **kw),
        train_dataset=ds.select(range(2)), data_collator=ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_gradient_accumulation_normalises_over_num_items(tmp_path):
    ds = packed_dataset()
    n0 = sum(1 for x in ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD)([ds[0]])["labels"][0, 1:] if x != -100)
    n1 = sum(1 for x in ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD)([ds[1]])["labels"][0, 1:] if x != -100)
    assert n0 != n1, "rows must carry different numbers of targets, else a mean of means would also pass"
    full = _one_step_params(tmp_path / "a", bs=2, ga=1)
    accum = _one_step_params(tmp_path / "b", bs=1, ga=2)
    for n in full:
        torch.testing.assert_close(accum[n], full[n], atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_gradient_checkpointing_under_trainer_matches(tmp_path):
    plain = _one_step_params(tmp_path / "a", bs=2, ga=1)
    import dataclasses

    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    ckpt = _one_step_params(tmp_path / "b", bs=2, ga=1, **{name: True, f"{name}_kwargs": {"use_reentrant": False}})
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-4)


def test_remove_unused_columns_default_gives_clear_error(tmp_path):
    ds = packed_dataset()
    model = ac.patch_model(tiny_llama())
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, remove_unused_columns=True), train_dataset=ds,
        data_collator=ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD),
    )
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()
