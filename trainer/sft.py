"""SFT recipe: TRL SFTTrainer + PEFT LoRA on prompt/completion pairs, loss on the response tokens only.

    python -m trainer --spec spec.json --store artifacts     (stage: sft)
"""

from __future__ import annotations

import logging

from .data import load_splits, render_sft
from .modeling import build_model, load_tokenizer
from . import progress
from .recipe import Recipe, lora_config, sft_row_counts, training_kwargs
from .speed import prepare_trainer, speed_kwargs

log = logging.getLogger("finesweep")


class SFTRecipe(Recipe):
    stage = "sft"

    def setup(self) -> None:
        from trl import SFTConfig, SFTTrainer

        spec = self.spec
        tokenizer = load_tokenizer(spec.model)
        data_report: dict = {}
        train, test = load_splits(spec.dataset, spec.hyper, data_report)
        self.rows = {"train": len(train), "test": len(test) if test is not None else 0,
                     "dropped_in_loading": data_report.get("dropped", {})}
        train_text = render_sft(train, tokenizer, spec.prompt_format)
        model, _ = build_model(spec, self.store, self.hw, self.inputs, with_own_adapter=False)
        args = SFTConfig(
            **training_kwargs(spec, self.hw, self.workdir / "out", len(train_text)),
            # Prompt/completion rows: TRL masks the prompt, so the loss is on the response only.
            completion_only_loss=True,
            dataset_num_proc=None,
            **speed_kwargs(spec, self.hw, "sft"),
            **progress.eval_args(self),
        )
        self.trainer = SFTTrainer(model=model, args=args, train_dataset=train_text, processing_class=tokenizer,
                                  **progress.eval_data(self, test, lambda rows: render_sft(rows, tokenizer, spec.prompt_format)),
                                  peft_config=lora_config(spec.hyper))
        prepare_trainer(self.trainer, spec, self.hw, self.stage)
        self.rows.update(sft_row_counts(len(train_text), self.trainer.train_dataset, tokenizer.eos_token_id,
                                        spec.max_length))
        trainable, total = self.trainer.model.get_nb_trainable_parameters()
        log.info("%s: sft on %d rows (%d held out), LoRA r=%d alpha=%d on %s: %d trainable of %d params "
                 "(%.2f%%), %s, gradient checkpointing %s", self.label, len(train), self.rows["test"],
                 spec.hyper.r, spec.hyper.alpha, ",".join(spec.hyper.target_modules), trainable, total,
                 100 * trainable / total, self.hw.precision, "on" if args.gradient_checkpointing else "off")
