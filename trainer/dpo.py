"""DPO recipe: TRL DPOTrainer + a fresh LoRA adapter on the SFT start model (its adapter merged in).

With `peft_config`, TRL's reference model is the policy with adapters disabled; since the SFT adapter is
merged into the weights, that reference is the SFT model, not the raw base (tests/test_training.py checks).

The reference log-probs of the training pairs are precomputed once (TRL `precompute_ref_log_probs`) and shared
between the sweep's trials through the store: trials with the same start weights, pairs and settings reuse the
first one's (trainer/reference_logps.py; tests/test_reference_share.py). train.json `reference_logps` says whether
this trial computed or reused them and the seconds it took or saved.

    python -m trainer --spec spec.json --store artifacts     (stage: dpo)
"""

from __future__ import annotations

import logging

from .data import load_splits, render_dpo
from .modeling import build_model, load_tokenizer
from . import progress
from .recipe import Recipe, dpo_row_counts, lora_config, training_kwargs
from .reference_logps import ReferenceShare, shared_reference_trainer
from .speed import order_rows, prepare_trainer, speed_kwargs

log = logging.getLogger("finesweep")


class DPORecipe(Recipe):
    stage = "dpo"

    def setup(self) -> None:
        from trl import DPOConfig

        spec = self.spec
        tokenizer = load_tokenizer(spec.model)
        data_report: dict = {}
        train, test = load_splits(spec.dataset, spec.hyper, data_report)
        self.rows = {"train": len(train), "test": len(test) if test is not None else 0,
                     "dropped_in_loading": data_report.get("dropped", {})}
        pairs = self.shared_rows(order_rows(render_dpo(train, tokenizer, spec.prompt_format), self.stage), "pairs")
        model, loaded = build_model(spec, self.store, self.hw, self.inputs, with_own_adapter=False)
        # The reference is `model` as it is now (adapters disabled later gives it back): its digest keys the shared
        # reference log-probs, taken before PEFT wraps it.
        self.reference = ReferenceShare(self.store, model, self.hw, {
            "sweep": spec.sweep, "trial": spec.name, "trial_id": spec.trial_id, "model": spec.model,
            "start": [c["trial"] for c in loaded["chain"]], "dataset": spec.dataset.path,
            "split": spec.dataset.split, "prompt_format": spec.prompt_format, "max_length": spec.max_length},
            settings={"speed": speed_kwargs(spec, self.hw, "dpo")})
        args = DPOConfig(
            **training_kwargs(spec, self.hw, self.workdir / "out", len(pairs)),
            beta=spec.hyper.beta,
            # The reference never changes, so its log-probs are computed once instead of every step (and once per
            # sweep: SharedReferenceDPOTrainer reuses another trial's when they are the same numbers).
            precompute_ref_log_probs=True,
            # TRL defaults to disable_dropout=True, which zeroes the LoRA dropout the sweep asked for (after the
            # PEFT model is built, so the trial id would change and the training would not). The base model's
            # own dropout is 0 for Llama either way; train.json records the dropout that actually ran.
            disable_dropout=False,
            **speed_kwargs(spec, self.hw, "dpo"),
            **progress.eval_args(self),
        )
        self.trainer = shared_reference_trainer()(
            model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
            **progress.eval_data(self, test, lambda rows: render_dpo(rows, tokenizer, spec.prompt_format)),
            peft_config=lora_config(spec.hyper), reference_share=self.reference)
        prepare_trainer(self.trainer, spec, self.hw, self.stage)
        self.rows.update(dpo_row_counts(len(pairs), self.trainer.train_dataset, spec.max_length))
        trainable, total = self.trainer.model.get_nb_trainable_parameters()
        log.info("%s: dpo on %d pairs (%d held out) from %s, beta=%g, LoRA r=%d on %s: %d trainable of %d "
                 "params, %s", self.label, len(train), self.rows["test"],
                 ", ".join(c["trial"] for c in loaded["chain"]) or spec.model, spec.hyper.beta, spec.hyper.r,
                 ",".join(spec.hyper.target_modules), trainable, total, self.hw.precision)

    def record(self) -> dict:
        """train.json, with `reference_logps`: computed | reused | recomputed, the seconds taken or saved."""
        record = super().record()
        record["reference_logps"] = dict(self.reference.info)
        return record
