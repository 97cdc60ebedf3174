"""The chunked loss under HF Trainer (train + evaluate), TRL's AnchorSFTTrainer, and the CLI options: losses and
updates equal to the stock loss on the same rows; options parsed and refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from datasets import Dataset

import anchorcontext as ac
from anchorcontext.patches import loss_hook
from anchorcontext.training.args import AnchorArguments, parse_chunked_loss

VOCAB, ANCHOR, PAD = 97, 1, 0


def tiny_llama(vocab=VOCAB):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=ANCHOR, pad_token_id=PAD, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def packed_dataset(n_docs=24, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [{"input_ids": [ANCHOR] + torch.randint(3, VOCAB, (int(torch.randint(1, 20, (1,), generator=g)),),
                                                   generator=g).tolist()} for _ in range(n_docs)]
    ds = Dataset.from_list(docs)
    packer = ac.DocumentPacker(seq_len=seq_len, anchor_id=ANCHOR, pad_id=PAD, vocab_size=VOCAB)
    return ds.map(packer, batched=True, remove_columns=ds.column_names)


def _train(tmp_path, chunked, **kw):
    model = ac.patch_model(tiny_llama(), chunked_loss=chunked, loss_chunk_tokens=7)
    ds = packed_dataset()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", remove_unused_columns=False,
        use_cpu=True, disable_tqdm=True, seed=0, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2,
        **kw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds.select(range(4)),
                                   eval_dataset=ds.select(range(4, 7)),
                                   data_collator=ac.AnchorCollator(anchor_id=ANCHOR, pad_id=PAD))
    trainer.train()
    final_eval = trainer.evaluate()
    logs = trainer.state.log_history
    return ([h["loss"] for h in logs if "loss" in h], [h["eval_loss"] for h in logs if "eval_loss" in h],
            final_eval["eval_loss"], {n: p.detach().clone() for n, p in model.named_parameters()})


def test_trainer_train_and_evaluate_equal_the_stock_loss(tmp_path):
    """Gradient accumulation (num_items_in_batch), evaluation (logits=None in prediction_step), the update."""
    stock = _train(tmp_path / "stock", False, optim="sgd")  # SGD: the update is the gradient (Adam amplifies
    chunked = _train(tmp_path / "chunked", True, optim="sgd")  # float noise in near-zero gradients)
    assert len(stock[0]) == 2 and len(stock[1]) == 3
    torch.testing.assert_close(torch.tensor(chunked[0]), torch.tensor(stock[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(chunked[1]), torch.tensor(stock[1]), rtol=1e-5, atol=1e-6)
    assert chunked[2] == pytest.approx(stock[2], rel=1e-5)
    for n, p in stock[3].items():
        torch.testing.assert_close(chunked[3][n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_auto_keeps_the_stock_loss_for_a_model_it_cannot_serve_and_true_refuses_it(caplog):
    class NoKeep(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):  # no logits_to_keep
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)

    model = NoKeep(tiny_llama().config)
    with pytest.raises(ValueError, match="has no logits_to_keep argument"):
        ac.patch_model(copy.deepcopy(model), chunked_loss=True)
    with caplog.at_level("WARNING", logger="anchorcontext"):
        ac.patch_model(model, chunked_loss="auto")
    assert "keeps the stock loss for NoKeep" in caplog.text and not loss_hook.uses_chunked_loss(model)
    ids = torch.randint(3, VOCAB, (1, 9))
    assert model(input_ids=ids, labels=ids).logits is not None


def test_auto_resolves_on_the_device_of_the_batch_once():
    model = ac.patch_model(tiny_llama(), chunked_loss="auto")
    ids = torch.randint(3, VOCAB, (1, 9))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    assert ac.patches.hooks.patch_state(model)["chunked_loss"] == "auto"
    assert getattr(model, ac.patches.hooks._STATE_ATTR)["auto_impl"] == {"cpu": "chunked"}


def test_another_wrappers_instance_forward_is_kept_and_called():
    """TRL's add_fused_lm_head sets ``model.forward`` on the instance: patching after it keeps it for its own
    ``fused_lm_head=True`` calls and for plain forwards; unpatching restores it."""
    from trl.trainer.utils import add_fused_lm_head

    stock = tiny_llama()
    model = copy.deepcopy(stock)
    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    trl_forward = model.__dict__["forward"]
    ac.patch_model(model, chunked_loss=True, loss_chunk_tokens=4)
    ids = torch.randint(3, VOCAB, (2, 11))
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert fused.log_probs is not None and fused.is_top1 is not None
    ref = stock(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ref)
    torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)
    ac.unpatch_model(model)
    assert model.__dict__["forward"] is trl_forward


def test_anchor_sft_trainer_with_a_chunked_model_trains_and_logs_token_accuracy(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import SFTConfig

    from anchorcontext.trl import AnchorSFTTrainer

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(60)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(torch.randint(3, 14, (1,), generator=g)),),
                                                          generator=g)) for _ in range(12)]
    runs = {}
    for chunked in (False, True):
        model = ac.patch_model(tiny_llama(len(tok)), chunked_loss=chunked, loss_chunk_tokens=5)
        args = SFTConfig(output_dir=str(tmp_path / str(chunked)), max_length=24, per_device_train_batch_size=2,
                         max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                         use_cpu=True, disable_tqdm=True, seed=0, bf16=False)
        trainer = AnchorSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                   processing_class=tok)
        trainer.train()
        runs[chunked] = [(h["loss"], h["mean_token_accuracy"]) for h in trainer.state.log_history if "loss" in h]
    assert len(runs[True]) == 3
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("given", "want"), [("auto", "auto"), ("true", True), ("False", False), ("liger", "liger"),
                                             (True, True), (False, False), ("on", True), ("0", False)])
def test_cli_chunked_loss_values(given, want):
    assert parse_chunked_loss(given) == want
    assert AnchorArguments(chunked_loss=given).chunked_loss == want


def test_cli_flags_parse_and_bad_values_are_refused_by_name():
    p = transformers.HfArgumentParser(AnchorArguments)
    assert p.parse_args_into_dataclasses([])[0].chunked_loss == "auto"  # on by default
    assert p.parse_args_into_dataclasses(["--chunked_loss"])[0].chunked_loss is True
    got = p.parse_args_into_dataclasses(["--chunked_loss", "false", "--loss_chunk_tokens", "512"])[0]
    assert got.chunked_loss is False and got.loss_chunk_tokens == 512
    with pytest.raises(ValueError, match=r"chunked_loss must be auto, true, false or liger, got 'maybe'"):
        AnchorArguments(chunked_loss="maybe")
    with pytest.raises(ValueError, match=r"loss_chunk_tokens must be an int >= 1.*0"):
        AnchorArguments(loss_chunk_tokens=0)
