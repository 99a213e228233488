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

from . import progress as search_progress
from . import tracking
from .checkpoint import Preempted, checkpoint_callback, clear_checkpoints, fetch_checkpoint
from .modeling import check_trial_model, scratch_dir
from .speed import describe
from .runtime import (Hardware, LaunchError, any_rank, barrier, broadcast_from_main, detect_hardware, gather_to_all,
                      init_distributed, library_versions, peak_memory_gb, processes, progress_callback,
                      share_cpu_threads, use_gradient_checkpointing)

log = logging.getLogger("finesweep")


def lora_config(h: Hyper):
    from peft import LoraConfig

    return LoraConfig(r=h.r, lora_alpha=h.alpha, lora_dropout=h.dropout, target_modules=list(h.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def per_process_batch(h: Hyper, world_size: int) -> int:
    """`batch_size` is the global batch of one forward/backward pass (before grad_accum), split evenly over the
    trial's processes, so a trial optimises the same way on 1, 2 or 4 GPUs (or CPU processes) and its id, which
    hashes batch_size, says what it optimised. A batch that does not split evenly is refused, not rounded."""
    if h.batch_size % world_size:
        raise LaunchError(
            f"batch_size {h.batch_size} is the global batch per optimizer step (before grad_accum) and must split "
            f"evenly over this trial's {world_size} training processes. Fix: set batch_size to a multiple of "
            f"{world_size} in the sweep file (that is a new trial), or run it on a process count that divides "
            f"{h.batch_size} (GPUs per trial, or FINESWEEP_PROCESSES without a GPU)")
    return h.batch_size // world_size


def training_kwargs(spec: TrialSpec, hw: Hardware, out_dir: Path, train_rows: int) -> dict:
    """TrainingArguments shared by SFTConfig and DPOConfig."""
    h = spec.hyper
    steps_per_epoch = math.ceil(train_rows / (h.batch_size * h.grad_accum))
    total = h.max_steps if h.max_steps > 0 else math.ceil(steps_per_epoch * h.epochs)
    checkpointing = use_gradient_checkpointing(h.gradient_checkpointing, hw)
    return dict(
        output_dir=str(out_dir),
        learning_rate=h.lr,
        per_device_train_batch_size=per_process_batch(h, processes().world_size),
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
        # DDP: every LoRA weight takes part in every forward pass, so skip the per-step search for unused ones.
        ddp_find_unused_parameters=False,
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
    """Subclasses implement setup() (build self.trainer) and may extend save().

    Several processes (torchrun / accelerate launch, one per GPU or FINESWEEP_PROCESSES on CPU): every rank
    trains; each writes only to the trial's scratch folder, which all ranks share (the checkpoint's per-rank RNG
    states, DeepSpeed's per-rank optimizer shards). Only the main process reads checkpoints from and writes
    anything to the store, and logs progress, each time after a barrier, so no marker is written before every rank
    has finished what the marker covers."""

    stage = ""

    def __init__(self, spec: TrialSpec, store: ArtifactStore):
        self.spec, self.store = spec, store
        # Before anything is started or downloaded: a model the trial cannot train right (max_length past its
        # positions, a chat template whose turns end with another token than the EOS TRL appends) is a
        # configuration error, not a trained adapter that never learnt to stop.
        self.model_check = check_trial_model(spec)
        self.prefix = trial_prefix(spec.sweep, spec.trial_id)
        self.hw = detect_hardware()
        self.procs = processes()
        init_distributed(self.hw)
        self.cpu_threads = share_cpu_threads(self.hw)
        # One scratch folder for all ranks (the main one makes it): Trainer checkpoints are written into it by
        # every rank and must land in one folder to be one checkpoint.
        self.workdir = Path(broadcast_from_main(str(scratch_dir(spec.trial_id)) if self.procs.main else None))
        # What each rank downloads for itself (a DPO trial's start adapter) goes to a folder of its own.
        self.inputs = self.workdir if self.procs.world_size == 1 else self.workdir / f"rank-{self.procs.rank}"
        self.label = f"[{spec.sweep}/{spec.name} {spec.trial_id}]"
        self.trainer = None
        self.rows = {"train": 0, "test": 0}
        self.wall_time = 0.0
        if self.procs.world_size > 1:
            log.info("%s: %d processes (%s), global batch %d = %d per process x %d, %d CPU threads each",
                     self.label, self.procs.world_size, self.hw.device, spec.hyper.batch_size,
                     spec.hyper.batch_size // self.procs.world_size, self.procs.world_size, self.cpu_threads)

    def setup(self) -> None:
        raise NotImplementedError

    def shared_rows(self, rows, name: str):
        """Several processes: the rows as one dataset on disk in the shared scratch folder, read by every rank.
        TRL's DPO reference pass (precompute_ref_log_probs) writes its results on the main process into a cache
        file next to the dataset's own files and has the other ranks read that file; an in-memory dataset has no
        such folder (datasets gives each process a random temporary file name), so the other ranks would fail
        with FileNotFoundError. One process: the rows as they are."""
        if self.procs.world_size == 1:
            return rows
        from datasets import load_from_disk

        folder = self.workdir / name
        if self.procs.main:
            rows.save_to_disk(str(folder))
        barrier()
        return load_from_disk(str(folder))

    def callbacks(self, checkpoints) -> list:
        """Every TrainerCallback the trial trains with, built in this one place. A callback whose class sets
        `main_process_only = True` (progress lines, and anything that writes records or talks to a tracker) is
        registered on the main process only; the others (checkpoints: every rank must agree on when to stop and
        save) run on every rank."""
        wanted = [checkpoints, progress_callback(self.label), *search_progress.callbacks(self),
                  *tracking.callbacks(self)]
        return [cb for cb in wanted if self.procs.main or not getattr(cb, "main_process_only", False)]

    def train(self) -> None:
        from transformers import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # our progress lines replace its raw dict prints
        checkpoints = checkpoint_callback(self.store, self.prefix, self.label)
        for callback in self.callbacks(checkpoints):
            self.trainer.add_callback(callback)
        # The main process downloads the checkpoint into the shared scratch folder; the others wait, then read it.
        out_dir = Path(self.trainer.args.output_dir)
        resume = fetch_checkpoint(self.store, self.prefix, out_dir) if self.procs.main else None
        resume = broadcast_from_main(str(resume) if resume else None)
        start = time.time()
        try:
            self.trainer.train(resume_from_checkpoint=resume)
        finally:
            checkpoints.restore_signal()
        self.wall_time = time.time() - start
        # A SIGTERM that came after the last step's stop vote on one rank only: every rank decides alike.
        if any_rank(checkpoints.preempted)[0]:
            raise Preempted(f"{self.label} stopped at step {self.trainer.state.global_step} on SIGTERM")

    def record(self) -> dict:
        """train.json (built on the main process; `peaks` comes from every rank)."""
        state = self.trainer.state
        tokens = state.num_input_tokens_seen or 0  # summed over ranks by the Trainer
        trainable = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)
        h = self.spec.hyper
        world = self.trainer.args.world_size
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
            "peak_memory_gb": round(max(self.peaks), 3),
            "peak_memory_kind": ("cuda max_memory_allocated" if self.hw.device == "cuda" else "process max RSS")
                                + (", the largest of the ranks" if world > 1 else ""),
            "hardware": self.hw.__dict__,
            "gradient_checkpointing": bool(self.trainer.args.gradient_checkpointing),
            "speed": describe(self.spec, self.hw, self.stage),
            "trainable_params": trainable,
            "rows": self.rows,
            # batch_size is global (recipe.per_process_batch): the same trial optimises alike at any count.
            "processes": world,
            "per_process_batch": self.trainer.args.per_device_train_batch_size,
            "global_batch": (self.trainer.args.per_device_train_batch_size * world
                             * self.trainer.args.gradient_accumulation_steps),
            "distributed": distributed_kind(self.trainer),
            "cpu_threads_per_process": self.cpu_threads if self.hw.device == "cpu" else None,
            "lora_dropout_effective": effective_lora_dropout(self.trainer.model),
            "versions": library_versions(),
            "model_check": self.model_check,  # max_length vs the model's positions, the chat template's turn end
        }
        if world > 1:
            record["peak_memory_gb_per_rank"] = [round(p, 3) for p in self.peaks]
        final_loss = [e["loss"] for e in state.log_history if "loss" in e]
        record["final_loss"] = final_loss[-1] if final_loss else None
        assert record["global_batch"] == h.batch_size * h.grad_accum, record  # what the trial id promised
        return record

    def save(self) -> None:
        """Upload adapter and train.json, then the _TRAINED marker listing both with checksums: on the main
        process, once every rank has finished training."""
        self.peaks = gather_to_all(peak_memory_gb(self.hw))
        barrier()
        if not self.procs.main:
            return
        adapter_dir = self.workdir / "adapter"
        # DDP and ZeRO-2 keep the full (LoRA) weights on every rank, so the main one's copy is the adapter.
        self.trainer.model.save_pretrained(adapter_dir)
        files = self.store.upload_dir(adapter_dir, f"{self.prefix}/adapter")
        spec_json = json.dumps(to_dict(self.spec), indent=2).encode()
        self.store.write_bytes(f"{self.prefix}/spec.json", spec_json)
        files[f"{self.prefix}/spec.json"] = checksum(spec_json)
        record = self.record()
        data = json.dumps(record, indent=2, default=str).encode()
        self.store.write_bytes(f"{self.prefix}/train.json", data)
        files[f"{self.prefix}/train.json"] = checksum(data)
        files.update(tracking.finish_training(self))  # TensorBoard event files (trainer/tracking.py)
        self.store.write_marker(f"{self.prefix}/{TRAINED}", files)
        clear_checkpoints(self.store, self.prefix)
        log.info("%s: saved adapter and train.json to %s/%s (%d steps, %.1fs, %.0f tok/s, peak %.2f GB)",
                 self.label, self.store.url, self.prefix, record["steps"], self.wall_time,
                 record["tokens_per_s"] or 0, record["peak_memory_gb"])

    def cleanup(self) -> None:
        self.trainer = None
        # The scratch folder is shared: the main process removes it, and only after the others are done with it
        # (when it gets here; a rank that failed never reaches a barrier, so none is waited for on the way out).
        if self.procs.main:
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


def distributed_kind(trainer) -> str:
    """How the processes shared the work: none (one process), ddp, or deepspeed-zero<stage>."""
    if trainer.args.world_size == 1:
        return "none"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        return f"deepspeed-zero{plugin.zero_stage}"
    return "ddp"
