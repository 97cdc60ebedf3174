"""TRL ``SFTTrainer`` with AnchorAttention (anchorcontext.trl) on a tiny random Llama and a word-level tokenizer (CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers
from datasets import Dataset

pytest.importorskip("trl")
from trl import SFTConfig

import anchorcontext as ac
from anchorcontext.trl import AnchorSFTTrainer

WORDS = [f"w{i}" for i in range(40)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", *WORDS])}
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


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here needs the Hub; without this, trainer set-up waits on network time-outs."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_trains_and_matches_plain_trainer_on_the_same_packed_rows(tmp_path):
    tok = tokenizer()
    ds = Dataset.from_dict({"text": texts()})
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path / "a"), train_dataset=ds,
                               processing_class=tok)
    assert ac.is_patched(trainer.model)
    rows = trainer.train_dataset
    assert set(rows.column_names) == {"input_ids", "doc_lens", "labels"} and all(len(r) == 24 for r in rows["input_ids"])
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


def test_num_tokens_counts_every_real_token_of_the_batch(tmp_path):
    tok = tokenizer()
    ds = Dataset.from_dict({"text": texts()})
    args = config(tmp_path, max_steps=1, per_device_train_batch_size=64)  # one batch: every row
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=args, train_dataset=ds, processing_class=tok)
    rows = trainer.train_dataset
    trainer.train()
    real = sum(1 + sum(r) for r in rows["doc_lens"])  # anchor + documents, padding excluded
    assert real > 24 and real < 24 * len(rows), "the count must differ from one row and from all padded rows"
    logged = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    assert logged == [real]


def test_prompt_tokens_carry_no_loss_for_prompt_completion_data(tmp_path):
    tok = tokenizer()
    prompts, completions = texts(8, seed=1, lo=2, hi=6), texts(8, seed=2, lo=2, hi=6)
    ds = Dataset.from_dict({"prompt": prompts, "completion": [" " + c for c in completions]})
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path, max_steps=1), train_dataset=ds,
                               processing_class=tok)
    rows = trainer.train_dataset
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])
    targets = batch["input_ids"][batch["labels"] != -100].tolist()
    expected = [t for c in completions for t in tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert targets == expected  # exactly the completions (+ EOS), in order; no prompt token
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


def test_lora_via_peft_config_trains_only_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tokenizer()
    ds = Dataset.from_dict({"text": texts()})
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    base = tiny_llama(len(tok))
    frozen = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer = AnchorSFTTrainer(model=base, args=config(tmp_path), train_dataset=ds, processing_class=tok,
                               peft_config=lora)
    assert type(trainer.model).__name__.startswith("Peft") and ac.is_patched(trainer.model)
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in lora_b.items())  # the adapters moved
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, frozen)  # the base did not


def test_eval_during_training_with_gradient_checkpointing(tmp_path):
    tok = tokenizer()
    ds = Dataset.from_dict({"text": texts()})
    ev = Dataset.from_dict({"text": texts(6, seed=3)})
    trainer = AnchorSFTTrainer(
        model=tiny_llama(len(tok)), train_dataset=ds, eval_dataset=ev, processing_class=tok,
        args=config(tmp_path, eval_strategy="steps", eval_steps=2, gradient_checkpointing=True),
    )
    assert set(trainer.eval_dataset.column_names) == {"input_ids", "doc_lens", "labels"}
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and all(torch.isfinite(torch.tensor(evals)))
    assert trainer.model.is_gradient_checkpointing


def test_long_documents_continue_on_the_next_row_never_cut(tmp_path):
    tok = tokenizer()
    long = " ".join(WORDS[i % len(WORDS)] for i in range(50))  # 50 words + EOS, rows of 16 tokens
    ds = Dataset.from_dict({"text": [long, "w1 w2 w3"]})
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path, max_length=16), train_dataset=ds,
                               processing_class=tok)
    assert trainer.args.max_length is None  # TRL's own truncation is off
    rows = trainer.train_dataset
    tokens = [t for r in rows for t in r["input_ids"][1: 1 + sum(r["doc_lens"])]]
    assert tokens == tok(long)["input_ids"][1:] + [tok.eos_token_id] + tok("w1 w2 w3")["input_ids"][1:] + [2]
    assert trainer.pack_stats["train"].split_documents >= 1


@pytest.mark.parametrize("field, value", [("max_length", None), ("packing", True), ("padding_free", True)])
def test_max_length_none_and_trl_packing_are_refused_naming_the_field(tmp_path, field, value):
    tok = tokenizer()
    ds = Dataset.from_dict({"text": texts(2)})
    with pytest.raises(ValueError, match=f"SFTConfig.{field}={value!r}"):
        AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path, **{field: value}), train_dataset=ds,
                         processing_class=tok)


def test_a_collator_without_anchor_layout_is_refused(tmp_path):
    tok = tokenizer()
    with pytest.raises(ValueError, match="data_collator must be an anchorcontext.AnchorCollator"):
        AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path), processing_class=tok,
                         train_dataset=Dataset.from_dict({"text": texts(2)}),
                         data_collator=transformers.DataCollatorWithPadding(tok))


EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def _example_inputs(tmp_path):
    import json

    tok = tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(n, seed=len(split))))
    return ["--config", str(EXAMPLES / "trl_sft.yaml"), "--model_name_or_path", str(tmp_path / "model"),
            "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--max_length", "24",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--bf16", "false",
            "--dtype", "float32", "--use_cpu", "true", "--logging_steps", "1", "--warmup_steps", "0"]


def _run(cmd, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, *cmd], check=False, env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_example_script_with_its_yaml_trains_at_tiny_size(tmp_path):
    log = _run([str(EXAMPLES / "trl_sft.py"), *_example_inputs(tmp_path)], tmp_path)
    assert "'rows':" in log and (tmp_path / "out" / "model.safetensors").exists()
    assert "'loss'" in log


def test_example_under_accelerate_launch_single_process(tmp_path):
    log = _run(["-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "accelerate_trl.yaml"),
                "--num_processes", "1", "--cpu", "--mixed_precision", "no",
                str(EXAMPLES / "trl_sft.py"), *_example_inputs(tmp_path)], tmp_path)
    assert "'rows':" in log and (tmp_path / "out" / "model.safetensors").exists()


def test_trl_defaults_bf16_and_gradient_checkpointing_train_on_cpu(tmp_path):
    tok = tokenizer()
    args = SFTConfig(output_dir=str(tmp_path), max_length=24, per_device_train_batch_size=2, max_steps=2,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    assert args.bf16 and args.gradient_checkpointing  # TRL's defaults, kept
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                               processing_class=tok)
    trainer.train()
    got = losses(trainer)
    assert len(got) == 2 and all(torch.isfinite(torch.tensor(got)))


def test_pad_to_multiple_of_reaches_the_collator(tmp_path):
    tok = tokenizer()
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path, pad_to_multiple_of=32),
                               train_dataset=Dataset.from_dict({"text": texts(4)}), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["input_ids"].shape == (1, 32) and (batch["labels"][0, 24:] == -100).all()


CHAT = ("{% for m in messages %}{{ m['role'] }} {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} "
        "</s> {% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}")


def conversations(n=8):
    q, a = texts(n, seed=4, lo=2, hi=6), texts(n, seed=5, lo=2, hi=6)
    return q, a, Dataset.from_dict({"messages": [[{"role": "user", "content": x}, {"role": "assistant", "content": y}]
                                                 for x, y in zip(q, a, strict=True)]})


def test_assistant_only_loss_keeps_only_the_assistant_tokens_as_targets(tmp_path):
    tok = tokenizer()
    tok.chat_template = CHAT
    _, answers, ds = conversations()
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path, max_steps=1, assistant_only_loss=True),
                               train_dataset=ds, processing_class=tok)
    rows = trainer.train_dataset
    batch = trainer.data_collator([rows[i] for i in range(len(rows))])
    targets = batch["input_ids"][batch["labels"] != -100].tolist()
    expected = [t for a in answers for t in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert targets == expected
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


def test_conversational_data_trains_on_every_token_without_assistant_only_loss(tmp_path):
    tok = tokenizer()
    tok.chat_template = CHAT
    _, _, ds = conversations()
    trainer = AnchorSFTTrainer(model=tiny_llama(len(tok)), args=config(tmp_path, max_steps=1), train_dataset=ds,
                               processing_class=tok)
    rows = trainer.train_dataset
    assert tok.convert_tokens_to_ids("assistant") in rows[0]["input_ids"]
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
