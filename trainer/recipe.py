"""The shape every training recipe shares: setup, train, save, cleanup (one file per recipe: sft.py, dpo.py)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

from finesweep.spec import Hyper, TrialSpec, to_dict
from finesweep.store import TRAINED, ArtifactStore, checksum, trial_prefix

from .checkpoint import Preempted, checkpoint_callback, clear_checkpoints, fetch_checkpoint
from .modeling import scratch_dir
from .speed import describe
from .runtime import Hardware, detect_hardware, library_versions, peak_memory_gb, use_gradient_checkpointing

log = logging.getLogger("finesweep")


def lora_config(h: Hyper):
    from peft import LoraConfig

    return LoraConfig(r=h.r, lora_alpha=h.alpha, lora_dropout=h.dropout, target_modules=list(h.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def training_kwargs(spec: TrialSpec, hw: Hardware, out_dir: Path, train_rows: int) -> dict:
    """TrainingArguments shared by SFTConfig and DPOConfig."""
    h = spec.hyper
    steps_per_epoch = math.ceil(train_rows / (h.batch_size * h.grad_accum * max(hw.num_gpus, 1)))
    total = h.max_steps if h.max_steps > 0 else math.ceil(steps_per_epoch * h.epochs)
    checkpointing = use_gradient_checkpointing(h.gradient_checkpointing, hw)
    return dict(
        output_dir=str(out_dir),
        learning_rate=h.lr,
        per_device_train_batch_size=h.batch_size,
        gradient_accumulation_steps=h.grad_accum,
        num_train_epochs=h.epochs,
        max_steps=h.max_steps,
        warmup_steps=h.warmup_ratio,
        lr_scheduler_type=h.scheduler,
        weight_decay=h.weight_decay,
        seed=h.seed,
        data_seed=h.seed,
        fp16=hw.precision == "fp16",
        bf16=hw.precision == "bf16",
        use_cpu=hw.device == "cpu",
        gradient_checkpointing=checkpointing,
        # Non-reentrant checkpointing trains PEFT adapters without enable_input_require_grads tricks.
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=max(1, total // 25),
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        max_length=spec.max_length,
    )


def sft_row_counts(rendered: int, prepared, eos_id: int, max_length: int | None) -> dict:
    """Rows TRL kept, cut (completion truncated by max_length, so its EOS is lost) and dropped (nothing of the
    completion left), read from the dataset SFTTrainer prepared."""
    cut = sum(1 for ids in prepared["input_ids"] if max_length is not None and len(ids) >= max_length
              and ids[-1] != eos_id)
    return {"kept": len(prepared), "cut": cut, "dropped_by_max_length": rendered - len(prepared)}


def dpo_row_counts(rendered: int, prepared, max_length: int | None) -> dict:
    """Pairs DPOTrainer kept, cut (prompt + an answer longer than max_length) and dropped (prompt alone fills
    max_length), read from the dataset it prepared."""
    cut = 0
    if max_length is not None:
        cut = sum(1 for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
                  if len(p) + max(len(c), len(r)) > max_length)
    return {"kept": len(prepared), "cut": cut, "dropped_by_max_length": rendered - len(prepared)}


def effective_lora_dropout(model) -> list[float]:
    """The dropout probabilities the LoRA layers actually apply (TRL may replace them after PEFT built them)."""
    import torch

    rates = set()
    for name, module in model.named_modules():
        if "lora_dropout" in name and isinstance(module, (torch.nn.Dropout, torch.nn.Identity)):
            rates.add(float(module.p) if isinstance(module, torch.nn.Dropout) else 0.0)
    return sorted(rates)


class Recipe:
    """Subclasses implement setup() (build self.trainer) and may extend save()."""

    stage = ""

    def __init__(self, spec: TrialSpec, store: ArtifactStore):
        self.spec, self.store = spec, store
        self.prefix = trial_prefix(spec.sweep, spec.trial_id)
        self.hw = detect_hardware()
        self.workdir = scratch_dir(spec.trial_id)
        self.label = f"[{spec.sweep}/{spec.name} {spec.trial_id}]"
        self.trainer = None
        self.rows = {"train": 0, "test": 0}
        self.wall_time = 0.0

    def setup(self) -> None:
        raise NotImplementedError

    def train(self) -> None:
        from transformers import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # our progress lines replace its raw dict prints
        checkpoints = checkpoint_callback(self.store, self.prefix, self.label)
        self.trainer.add_callback(checkpoints)
        resume = fetch_checkpoint(self.store, self.prefix, Path(self.trainer.args.output_dir))
        start = time.time()
        try:
            self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            checkpoints.restore_signal()
        self.wall_time = time.time() - start
        if checkpoints.preempted:
            raise Preempted(f"{self.label} stopped at step {self.trainer.state.global_step} on SIGTERM")

    def save(self) -> None:
        """Upload adapter and train.json, then the _TRAINED marker listing both with checksums."""
        adapter_dir = self.workdir / "adapter"
        self.trainer.model.save_pretrained(adapter_dir)
        files = self.store.upload_dir(adapter_dir, f"{self.prefix}/adapter")
        spec_json = json.dumps(to_dict(self.spec), indent=2).encode()
        self.store.write_bytes(f"{self.prefix}/spec.json", spec_json)
        files[f"{self.prefix}/spec.json"] = checksum(spec_json)
        state = self.trainer.state
        tokens = state.num_input_tokens_seen or 0
        trainable = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)
        record = {
            "trial_id": self.spec.trial_id,
            "name": self.spec.name,
            "stage": self.spec.stage,
            "spec": to_dict(self.spec),
            "log_history": state.log_history,
            "steps": state.global_step,
            "wall_time_s": round(self.wall_time, 3),
            "train_tokens": tokens,  # non-padding tokens (TrainingArguments include_num_input_tokens_seen)
            "tokens_per_s": round(tokens / self.wall_time, 2) if self.wall_time else None,
            "peak_memory_gb": round(peak_memory_gb(self.hw), 3),
            "peak_memory_kind": "cuda max_memory_allocated" if self.hw.device == "cuda" else "process max RSS",
            "hardware": self.hw.__dict__,
            "gradient_checkpointing": bool(self.trainer.args.gradient_checkpointing),
            "speed": describe(self.spec, self.hw, self.stage),
            "trainable_params": trainable,
            "rows": self.rows,
            "processes": self.trainer.args.world_size,
            "global_batch": self.spec.hyper.batch_size * self.spec.hyper.grad_accum * self.trainer.args.world_size,
            "lora_dropout_effective": effective_lora_dropout(self.trainer.model),
            "versions": library_versions(),
        }
        final_loss = [e["loss"] for e in state.log_history if "loss" in e]
        record["final_loss"] = final_loss[-1] if final_loss else None
        data = json.dumps(record, indent=2, default=str).encode()
        self.store.write_bytes(f"{self.prefix}/train.json", data)
        files[f"{self.prefix}/train.json"] = checksum(data)
        self.store.write_marker(f"{self.prefix}/{TRAINED}", files)
        clear_checkpoints(self.store, self.prefix)
        log.info("%s: saved adapter and train.json to %s/%s (%d steps, %.1fs, %.0f tok/s, peak %.2f GB)",
                 self.label, self.store.url, self.prefix, state.global_step, self.wall_time,
                 record["tokens_per_s"] or 0, record["peak_memory_gb"])

    def cleanup(self) -> None:
        self.trainer = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.hw.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def run(self) -> None:
        try:
            self.setup()
            self.train()
            self.save()
        finally:
            self.cleanup()
