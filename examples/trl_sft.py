"""TRL's own SFT script (trl/scripts/sft.py) with AnchorAttention: the two changed lines are marked ``# anchor``.

    python examples/trl_sft.py --config examples/trl_sft.yaml
    accelerate launch --config_file examples/accelerate_trl.yaml examples/trl_sft.py --config examples/trl_sft.yaml

Every ``SFTConfig`` / ``ModelConfig`` / ``ScriptArguments`` flag works as in TRL (command-line flags override the
YAML). ``max_length`` is the packed row length (anchor included); see docs/trl.md for what each option does.
"""

from __future__ import annotations

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config

from anchorcontext.trl import AnchorSFTTrainer as SFTTrainer  # anchor: the only import that changes


def main(script_args, training_args, model_args):
    training_args.model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    trainer = SFTTrainer(  # anchor: patches the model, packs rows of max_length tokens with one shared anchor
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"saved to {training_args.output_dir}; packing: {trainer.pack_stats['train'].as_dict()}")


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
