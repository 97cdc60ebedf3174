"""TRL ``SFTTrainer`` with AnchorAttention (anchorcontext.trl) on a tiny random Llama and a word-level tokenizer (CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers
from datasets import Dataset

pytest.importorskip("trl")
from trl import SFTConfig  # noqa: E402

import anchorcontext as ac  # noqa: E402
from anchorcontext.trl import AnchorSFTTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(vocab):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, pad_token_id=0, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def texts(n=12, seed=0, lo=3, hi=14):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=24, bf16=False,
        gradient_checkpointing=False,
    )
    base.update(kw)
    return SFTConfig(**base)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_trains_and_matches_plain_trainer_on_the_same_packed_rows(tmp_path):
    tok = tokenizer()
    ds = Dataset.from_dict({"text": texts()})
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path / "a"), train_dataset=ds,
                               processing_class=tok)
    assert ac.is_patched(trainer.model)
    rows = trainer.train_dataset
    assert set(rows.column_names) == {"input_ids", "doc_lens"} and all(len(r) == 24 for r in rows["input_ids"])
    assert all(r[0] == tok.bos_token_id for r in rows["input_ids"])
    trainer.train()
    got = losses(trainer)
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(got)))

    model = ac.patch_model(tiny_llama(len(tok)))
    plain = transformers.Trainer(
        model=model, train_dataset=rows, data_collator=ac.AnchorCollator(anchor_id=1, pad_id=0),
        args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "b"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
            remove_unused_columns=False,
        ),
    )
    plain.train()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(losses(plain)), rtol=1e-5, atol=1e-6)
