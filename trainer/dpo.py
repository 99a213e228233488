"""DPO recipe: TRL DPOTrainer + a fresh LoRA adapter on the SFT start model (its adapter merged in).

With `peft_config`, TRL's reference model is the policy with adapters disabled; since the SFT adapter is
merged into the weights, that reference is the SFT model, not the raw base (tests/test_training.py checks).

    python -m trainer --spec spec.json --store artifacts     (stage: dpo)
"""

from __future__ import annotations

import logging

from .data import load_splits, render_dpo
from .modeling import build_model, load_tokenizer
from . import progress
from .recipe import Recipe, dpo_row_counts, lora_config, training_kwargs
from .speed import order_rows, prepare_trainer, speed_kwargs

log = logging.getLogger("finesweep")


class DPORecipe(Recipe):
    stage = "dpo"

    def setup(self) -> None:
        from trl import DPOConfig, DPOTrainer

        spec = self.spec
        tokenizer = load_tokenizer(spec.model)
        data_report: dict = {}
        train, test = load_splits(spec.dataset, spec.hyper, data_report)
        self.rows = {"train": len(train), "test": len(test) if test is not None else 0,
                     "dropped_in_loading": data_report.get("dropped", {})}
        pairs = self.shared_rows(order_rows(render_dpo(train, tokenizer, spec.prompt_format), self.stage), "pairs")
        model, loaded = build_model(spec, self.store, self.hw, self.inputs, with_own_adapter=False)
        args = DPOConfig(
            **training_kwargs(spec, self.hw, self.workdir / "out", len(pairs)),
            beta=spec.hyper.beta,
            # The reference never changes, so its log-probs are computed once instead of every step.
            precompute_ref_log_probs=True,
            # TRL defaults to disable_dropout=True, which zeroes the LoRA dropout the sweep asked for (after the
            # PEFT model is built, so the trial id would change and the training would not). The base model's
            # own dropout is 0 for Llama either way; train.json records the dropout that actually ran.
            disable_dropout=False,
            **speed_kwargs(spec, self.hw, "dpo"),
            **progress.eval_args(self),
        )
        self.trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                  **progress.eval_data(self, test, lambda rows: render_dpo(rows, tokenizer, spec.prompt_format)),
                                  peft_config=lora_config(spec.hyper))
        prepare_trainer(self.trainer, spec, self.hw, self.stage)
        self.rows.update(dpo_row_counts(len(pairs), self.trainer.train_dataset, spec.max_length))
        trainable, total = self.trainer.model.get_nb_trainable_parameters()
        log.info("%s: dpo on %d pairs (%d held out) from %s, beta=%g, LoRA r=%d on %s: %d trainable of %d "
                 "params, %s", self.label, len(train), self.rows["test"],
                 ", ".join(c["trial"] for c in loaded["chain"]) or spec.model, spec.hyper.beta, spec.hyper.r,
                 ",".join(spec.hyper.target_modules), trainable, total, self.hw.precision)
