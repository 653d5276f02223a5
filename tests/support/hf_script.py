"""A Hugging Face Trainer script written the way the transformers examples write one (run_clm.py's shape,
made tiny): HfArgumentParser over its own arguments and TrainingArguments, a tokenizer as processing_class,
default_data_collator over packed blocks, `trainer.train(resume_from_checkpoint=...)`, then what run_clm does
after training: save_model, the train metrics, save_state and a model card. TrainingArguments keep HF's
defaults (logging_steps=500, save_strategy="steps") unless the command line sets them. `--tui` adds
TuiTrainerCallback, as a user's three-line wrapper would.

Run as a process (`python hf_script.py ARGS`) or in the test's own process (`main(argv, callbacks)`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

TINY = {
    "gpt2": "n_layer=1,n_head=2,n_embd=32,n_positions=32",
    "llama": "num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=2,hidden_size=32,"
    "intermediate_size=64,max_position_embeddings=32",
}


@dataclass
class ScriptArguments:
    tokenizer_name: str = field(metadata={"help": "a saved tokenizer dir"})
    train_file: str = field(metadata={"help": "a text file"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from these weights"})
    model_type: str = field(default="gpt2", metadata={"help": "a new model of this family (tiny)"})
    block_size: int = field(default=16)
    tui: bool = field(default=False, metadata={"help": "add TuiTrainerCallback"})


def main(argv: list[str] | None = None, callbacks: list[Any] | None = None) -> Trainer:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script, args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(script.tokenizer_name)
    if script.model_name_or_path:
        config = AutoConfig.from_pretrained(script.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, config=config)
    else:
        config = CONFIG_MAPPING[script.model_type]()
        config.update_from_string(TINY[script.model_type])
        config.vocab_size = len(tokenizer)
        model = AutoModelForCausalLM.from_config(config)

    ids = tokenizer(Path(script.train_file).read_text(encoding="utf-8"))["input_ids"]
    size = script.block_size
    train_dataset = [
        {"input_ids": ids[i : i + size], "labels": ids[i : i + size]} for i in range(0, len(ids) - size, size)
    ]

    callbacks = list(callbacks or [])
    if script.tui:
        from tui_trainer.integrations.hf import TuiTrainerCallback

        callbacks.append(TuiTrainerCallback())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()  # run_clm: "Saves the tokenizer too for easy upload"
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    trainer.create_model_card(tasks="text-generation")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
