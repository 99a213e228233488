"""Training benchmark: the users' recipe vs finesweep's defaults, same device, same rows, same model.

    python -m bench.bench_train [--size auto|full|cpu] [--out docs/benchmarks/<device>]
    python -m bench.bench_train --model-name real [--only sft-users sft-compact ...]   (one round of the ladder)

Real-model mode (`python -m bench --model real`, run_real): SmolLM2-135M-Instruct with its chat template, and
between users and finesweep every rung of LADDER (each speed lever on top of the previous one).

Two configurations per stage, each trained for a few steps in its own process (clean peak memory):
- users: report 2 as they ran it with TRL: every row padded to max_length 512 (pad_to_multiple_of=512),
  gradient checkpointing on, fp16 on a GPU (fp32 on CPU), SDPA attention, SFT batch 2, DPO batch 4 with the
  reference log-probs computed every step (TRL's default).
- finesweep: what trainer/sft.py and trainer/dpo.py run: runtime.detect_hardware() precision and attention,
  gradient checkpointing "auto", trainer.speed.speed_kwargs + prepare_trainer (length-grouped batches),
  DPO reference log-probs precomputed once.
Both build SFTConfig / DPOConfig from trainer.recipe.training_kwargs, the LoRA config from
trainer.recipe.lora_config (r=4, alpha 8 on q,v,gate,down), the model with trainer.modeling.load_base_model
and the rows with trainer.data (GSM8K train[:5000] `### Instruction:` prompts; HH-RLHF first 2,000 pairs
with answers > 10 characters), exactly as the recipes do.

Measured: time of the steps after the warm-up steps; per step, the real (non-padding) tokens, the tokens
including padding, and the scored (completion) tokens, from the batches the trainer actually trained on.
Extrapolated (stated as such in the results): the whole trial (SFT 5,000 rows x 3 epochs, DPO all pairs
x 3 epochs) = tokens-with-padding the trial's batches hold (computed from every row's token length and the
recipe's batching: padded to 512, or length-grouped with transformers' own sampler) / measured
tokens-with-padding per second, plus, for finesweep's DPO, the measured reference precompute scaled to all
pairs. MFU: model FLOPs on non-padding tokens only (formula in docs/benchmarks.md and `step_flops`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
GSM8K = SHARED / "gsm8k" / "train.jsonl"
HH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MAX_LENGTH = 512
TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")
# Report 2 (user-sweeps.md): SFT trial 1 (r=4, alpha 8, q,v,gate,down, lr 2e-4, batch 2, 3 epochs) on the first
# 5,000 rows; DPO on 2,000 HH-RLHF pairs, 3 epochs, batch size not reported: 4 (as jobs/hh-dpo.yaml).
TRIAL = {
    "sft": dict(rows=5000, epochs=3, batch_size=2, lr=2e-4),
    "dpo": dict(rows=2000, epochs=3, batch_size=4, lr=5e-7),
}
# CPU runs use one thread and time by the process's CPU time: on a shared machine, a second OpenMP thread that
# gets descheduled stalls every parallel region, and wall time then measures the neighbours (we saw 8x swings).
CPU_THREADS = 1
# Steps per configuration: (warm-up steps not timed, timed steps); CPU keeps the whole run to a few minutes.
STEPS = {
    "cpu": {("sft", "users"): (1, 4), ("sft", "finesweep"): (1, 10), ("dpo", "users"): (1, 3),
            ("dpo", "finesweep"): (1, 6)},
    "cuda": {("sft", "users"): (3, 30), ("sft", "finesweep"): (3, 60), ("dpo", "users"): (3, 20),
             ("dpo", "finesweep"): (3, 40)},
}
# Real-model mode (--model real, SmolLM2-135M-Instruct on CPU): every configuration of the lever ladder, each
# lever added on top of the previous one, ending at finesweep's defaults. (warm-up, timed) steps per stage.
LADDER = {
    "sft": ("users", "grouped", "no-ckpt", "no-metrics", "compact", "finesweep"),
    "dpo": ("users", "grouped", "precompute", "no-ckpt", "no-metrics", "compact", "finesweep"),
}
RUNG_LABELS = {
    "users": "users' recipe: pad to 512, gradient checkpointing on, TRL's LM head"
             " (every position on CPU, with entropy/top-1/mean-logit metrics)",
    "grouped": "+ length-grouped batches padded to their longest row",
    "precompute": "+ reference log-probs precomputed once (length-sorted pairs)",
    "no-ckpt": "+ gradient checkpointing off",
    "no-metrics": "+ TRL's head asked for log-probs only (no entropy/top-1/mean-logit metrics)",
    "compact": "+ compact chunked LM head: scored positions only, 256 rows a chunk, recomputed in the backward",
    "finesweep": "+ micro-batches (SFT 1 row, DPO 2 pairs a pass; same loss and gradient, a fraction of the "
                 "activations) = finesweep's defaults (speed.default_levers)",
}
REAL_STEPS = {"cpu": {"sft": {"users": (1, 3), "rung": (1, 4)}, "dpo": {"users": (1, 2), "rung": (1, 3)}},
              # A GPU step takes tens of milliseconds: more of them, and 3 warm-up steps (kernel selection).
              "cuda": {"sft": {"users": (3, 20), "rung": (3, 40)}, "dpo": {"users": (3, 10), "rung": (3, 20)}}}


def rung_settings(stage: str, name: str) -> dict:
    """What configuration `name` runs: the users' recipe, finesweep's defaults, or a ladder rung between them."""
    if name == "users":
        return {"pad_512": True, "checkpointing": "on", "precompute": False, "levers": None, "users": True}
    if name == "finesweep":
        return {"pad_512": False, "checkpointing": "auto", "precompute": stage == "dpo", "levers": None,
                "users": False}
    on = set(LADDER[stage][1:LADDER[stage].index(name) + 1])
    return {"pad_512": False, "checkpointing": "off" if "no-ckpt" in on else "on",
            "precompute": "precompute" in on, "users": False,
            "levers": {"length_grouping": True, "lm_head": "compact" if "compact" in on else "trl",
                       "head_metrics": "no-metrics" not in on, "micro_batch": None}}


# DPO pairs the child trains on (the reference precompute runs over all of them); the full trial's lengths are
# still computed from all pairs. None = all.
DPO_CHILD_PAIRS = {"cpu": 32, "cuda": None}
# Dense peak tensor-core TFLOPS for 16-bit training (fp16/bf16), by device-name substring, first match wins.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("V100", 125.0), ("T4", 65.0)]


# ------------------------------------------------------------------------------------------------ FLOPs
def step_flops(shape: dict, n_lora: int, seqs: list[tuple[int, int]], train: bool = True) -> float:
    """Model FLOPs of one pass over sequences given as (real tokens s, scored tokens c); padding excluded.

    train:   4*N_body*s + 4*N_head*c + 6*N_lora*s + 6*L*d_attn*s^2
    forward: 2*N_body*s + 2*N_head*c + 2*N_lora*s + 2*L*d_attn*s^2   (train=False)
    N_body: frozen linear weights of the blocks; N_head: lm_head (TRL's fused head projects scored positions
    only); N_lora: LoRA A and B; attention: QK^T and AV over the causal half, backward = 2 x forward."""
    body, head, L, d_attn = shape["n_body"], shape["n_head"], shape["layers"], shape["d_attn"]
    total = 0.0
    for s, c in seqs:
        if train:
            total += 4 * body * s + 4 * head * c + 6 * n_lora * s + 6 * L * d_attn * s * s
        else:
            total += 2 * body * s + 2 * head * c + 2 * n_lora * s + 2 * L * d_attn * s * s
    return total


def peak_flops(hw) -> tuple[float | None, str]:
    if hw.device == "cuda":
        for key, tflops in PEAK_TFLOPS:
            if key.lower() in hw.name.lower():
                return tflops * 1e12, f"{key} dense 16-bit tensor-core peak {tflops:g} TFLOPS (datasheet)"
        return None, f"unknown peak for {hw.name}"
    return measure_cpu_peak(), (f"measured fp32 matmul peak (torch.mm 2048^2, best of 5) on {CPU_THREADS} "
                                f"thread(s), by process CPU time")


def measure_cpu_peak() -> float:
    """fp32 matmul FLOP/s on this process's threads, by CPU time (see CPU_THREADS)."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = 0.0
    for _ in range(5):
        start, n = time.process_time(), 0
        while time.process_time() - start < 0.4:
            torch.mm(a, b)
            n += 1
        best = max(best, 2 * 2048**3 * n / (time.process_time() - start))
    return best


# ------------------------------------------------------------------------------------------------ padding
def batch_stats(lengths: list[int], batch_size: int, policy: str, seed: int = 0,
                rows_per_len: int = 1) -> tuple[int, int]:
    """(tokens incl. padding, sum over sequences of padded length^2) of one epoch's batches.
    lengths: per row, the length the collator pads to (SFT: the sequence; DPO: prompt + longer answer);
    rows_per_len: sequences per row (DPO: chosen and rejected). Policies: max_length (every row padded to 512,
    the users' recipe), longest (random batches padded to their longest row: TRL's default), grouped
    (transformers' LengthGroupedSampler, finesweep)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    n = len(lengths)
    if policy == "max_length":
        return n * MAX_LENGTH * rows_per_len, n * MAX_LENGTH**2 * rows_per_len
    if policy == "longest":
        order = list(range(n))
        random.Random(seed).shuffle(order)
    elif policy == "grouped":
        order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(policy)
    tokens = squares = 0
    for i in range(0, n, batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        tokens += len(batch) * max(batch) * rows_per_len
        squares += len(batch) * max(batch) ** 2 * rows_per_len
    return tokens, squares


# ------------------------------------------------------------------------------------------------ child
def make_spec(stage: str, recipe: str, model: str, rows: int | None, steps: int, prompt_format: str = "instruction",
              checkpointing: str | None = None):
    from finesweep.spec import DatasetSpec, EvalSpec, Hyper, TrialSpec

    t = TRIAL[stage]
    hyper = Hyper(r=4, alpha=8, dropout=0.05, target_modules=TARGETS, lr=t["lr"], batch_size=t["batch_size"],
                  epochs=t["epochs"], max_steps=steps, beta=0.1,
                  gradient_checkpointing=checkpointing or ("on" if recipe == "users" else "auto"))
    if stage == "sft":
        dataset = DatasetSpec(path=str(GSM8K), format="gsm8k", split=f"train[:{rows or t['rows']}]")
    else:
        dataset = DatasetSpec(path=str(HH), format="hh-rlhf", split=f"train[:{rows or t['rows']}]",
                              min_answer_chars=10)
    return TrialSpec(sweep="bench", stage=stage, name=f"{stage}-{recipe}", model=model, dataset=dataset,
                     prompt_format=prompt_format, max_length=MAX_LENGTH, hyper=hyper,
                     eval=EvalSpec(set="none"))


def load_rows(spec):
    """The trial's rows as the recipes load them (trainer.data.load_splits). HH-RLHF has a few malformed
    dialogues ("  Human:" without the blank line) whose history ends with an assistant turn, which
    finesweep.prompts.render_prompt refuses; they are dropped here (3 of the first 2,000 harmless-base rows)."""
    from trainer.data import load_splits

    train, _ = load_splits(spec.dataset, spec.hyper)
    if spec.stage == "dpo":
        train = train.filter(lambda r: r["messages"][-1]["role"] == "user", desc="drop malformed dialogues")
    return train


def users_hardware(hw):
    """The users' settings on this device: fp16 on any GPU (they ran a T4), SDPA attention."""
    if hw.device == "cuda":
        return replace(hw, precision="fp16", attn_implementation="sdpa")
    return hw


def run_child(stage: str, recipe: str, model_dir: str, device_kind: str, out: Path,
              prompt_format: str = "instruction") -> None:
    import torch
    from transformers import PrinterCallback, TrainerCallback

    from trainer import speed
    from trainer.data import render_dpo, render_sft
    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config, training_kwargs
    from trainer.runtime import detect_hardware, peak_memory_gb, setup_logging

    from .model import model_shape

    setup_logging()
    hw = detect_hardware()
    if hw.device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    # The step clock: wall time on a GPU; on CPU the process's CPU time (one thread: the time it would take
    # on an idle core), with wall time recorded next to it.
    clock_fn = time.perf_counter if hw.device == "cuda" else time.process_time
    run_hw = users_hardware(hw) if recipe == "users" else hw
    rung = rung_settings(stage, recipe)
    if prompt_format == "instruction":
        warmup, timed = STEPS[device_kind][(stage, recipe)]
    else:  # real-model mode: the ladder
        warmup, timed = REAL_STEPS[device_kind][stage]["users" if recipe == "users" else "rung"]
    child_rows = DPO_CHILD_PAIRS[device_kind] if stage == "dpo" else None
    spec = make_spec(stage, recipe, model_dir, child_rows, warmup + timed, prompt_format, rung["checkpointing"])
    tokenizer = load_tokenizer(model_dir)
    train = load_rows(spec)
    render = render_sft if stage == "sft" else render_dpo
    rows = render(train, tokenizer, spec.prompt_format)
    model = load_base_model(model_dir, run_hw)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{stage}-{recipe}-"))
    kwargs = training_kwargs(spec, run_hw, workdir / "out", len(rows))
    precompute = {"seconds": 0.0, "pairs": 0}
    start_setup = time.perf_counter()
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        extra = {"pad_to_multiple_of": MAX_LENGTH} if rung["pad_512"] else speed.speed_kwargs(spec, hw, "sft")
        args = SFTConfig(**kwargs, completion_only_loss=True, dataset_num_proc=None, **extra)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                             peft_config=lora_config(spec.hyper))
    else:
        from trl import DPOConfig, DPOTrainer

        original = DPOTrainer._precompute_ref_logps

        def timed_precompute(self, dataset, name, batch_size):
            if self.accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock_fn()
            result = original(self, dataset, name, batch_size)
            if self.accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            precompute["seconds"] += clock_fn() - t0
            precompute["pairs"] += len(dataset)
            return result

        DPOTrainer._precompute_ref_logps = timed_precompute
        if not rung["users"]:
            rows = speed.order_rows(rows, "dpo")
        extra = {"pad_to_multiple_of": MAX_LENGTH} if rung["pad_512"] else speed.speed_kwargs(spec, hw, "dpo")
        args = DPOConfig(**kwargs, beta=spec.hyper.beta, precompute_ref_log_probs=rung["precompute"], **extra)
        trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                             peft_config=lora_config(spec.hyper))
    if not rung["users"]:
        speed.prepare_trainer(trainer, spec, hw, stage, rung["levers"])
    setup_seconds = time.perf_counter() - start_setup
    trainer.remove_callback(PrinterCallback)

    # Every training step's batch: real tokens per sequence, scored tokens per sequence, tokens with padding.
    batches: list[dict] = []
    step_training = trainer.training_step

    def metered_training_step(model, inputs, *a, **kw):
        mask = inputs["attention_mask"]
        real = mask.sum(dim=1).tolist()
        if "completion_mask" in inputs:  # DPO: log-probs of the completion tokens (shifted)
            scored = inputs["completion_mask"][:, 1:].sum(dim=1).tolist()
        else:  # SFT: positions with a next-token label
            scored = (inputs["labels"][:, 1:] != -100).sum(dim=1).tolist()
        batches.append({"real": real, "scored": scored, "padded": int(mask.numel())})
        return step_training(model, inputs, *a, **kw)

    trainer.training_step = metered_training_step

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.wall = [], []

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(clock_fn())
            self.wall.append(time.perf_counter())

    clock = StepClock()
    trainer.add_callback(clock)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainer.train()
    train_peak = peak_memory_gb(hw)

    timed_batches = batches[warmup:]
    seconds = clock.ends[-1] - clock.ends[warmup - 1]
    wall_seconds = clock.wall[-1] - clock.wall[warmup - 1]
    real = sum(sum(b["real"]) for b in timed_batches)
    padded = sum(b["padded"] for b in timed_batches)
    shape = model_shape(trainer.model.get_base_model().config)
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    flops = 0.0
    for b in timed_batches:
        seqs = list(zip(b["real"], b["scored"]))
        flops += step_flops(shape, n_lora, seqs, train=True)
        if stage == "dpo" and not rung["precompute"]:  # the reference forward, every step (adapter disabled)
            flops += step_flops(shape, 0, seqs, train=False)
    peak, peak_source = peak_flops(hw)

    # The whole trial's batches, from every row's token length (the full row set, not the child's subset).
    t = TRIAL[stage]
    if stage == "sft":
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        useful_per_epoch = sum(lengths)
        scored_per_epoch = sum(sum(1 for x in labels[1:] if x != -100) for labels in trainer.train_dataset["labels"])
        rows_per_len = 1
    else:
        full = trainer.train_dataset
        if child_rows is not None:
            full_spec = make_spec(stage, recipe, model_dir, None, 1)
            full_rows = load_rows(full_spec)
            full = trainer._prepare_dataset(render_dpo(full_rows, tokenizer, prompt_format), tokenizer,
                                            trainer.args, "bench-full")
        lengths = speed.dpo_lengths(full, MAX_LENGTH)
        triples = list(zip(full["prompt_ids"], full["chosen_ids"], full["rejected_ids"]))
        useful_per_epoch = sum(min(len(p) + len(c), MAX_LENGTH) + min(len(p) + len(r), MAX_LENGTH)
                               for p, c, r in triples)
        scored_per_epoch = sum(min(len(p) + len(c), MAX_LENGTH) + min(len(p) + len(r), MAX_LENGTH) - 2 * len(p)
                               for p, c, r in triples)
        rows_per_len = 2
    policy = "max_length" if rung["pad_512"] else "grouped"
    per_epoch = {p: batch_stats(lengths, t["batch_size"], p, rows_per_len=rows_per_len)
                 for p in ("max_length", "longest", "grouped")}
    trial_stats = [batch_stats(lengths, t["batch_size"], policy, seed=e, rows_per_len=rows_per_len)
                   for e in range(t["epochs"])]
    trial_padded = sum(x[0] for x in trial_stats)
    padded_per_s = padded / seconds
    trial_seconds = trial_padded / padded_per_s
    trial_steps = t["epochs"] * math.ceil(len(lengths) / t["batch_size"])
    precompute_trial = 0.0
    if precompute["pairs"]:  # scaled by real tokens: the child's pairs -> every pair of the trial
        child = trainer.train_dataset
        child_useful = sum(min(len(p) + len(c), MAX_LENGTH) + min(len(p) + len(r), MAX_LENGTH)
                           for p, c, r in zip(child["prompt_ids"], child["chosen_ids"], child["rejected_ids"]))
        precompute_trial = precompute["seconds"] * useful_per_epoch / child_useful
        trial_seconds += precompute_trial

    result = {
        "stage": stage, "recipe": recipe,
        "device": hw.name, "device_kind": hw.device,
        "precision": run_hw.precision, "attention": run_hw.attn_implementation,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "batch_size": t["batch_size"], "padding": "to 512" if rung["pad_512"] else "longest in batch, grouped",
        "reference_log_probs": None if stage == "sft" else ("precomputed" if rung["precompute"] else "every step"),
        "speed": speed.describe(spec, hw, stage) if recipe == "finesweep" else None,
        "levers": getattr(trainer, "finesweep_levers", None), "rung": RUNG_LABELS.get(recipe),
        "lm_head": getattr(trainer.model.get_base_model(), "finesweep_lm_head", {"kind": "trl", "metrics": True}),
        "prompt_format": prompt_format,
        "lora_trainable_params": n_lora, "model_shape": shape,
        "warmup_steps": warmup, "timed_steps": len(timed_batches), "timed_seconds": round(seconds, 3),
        "clock": "wall" if hw.device == "cuda" else f"process CPU time, {CPU_THREADS} thread(s)",
        "timed_wall_seconds": round(wall_seconds, 3),
        "seconds_per_step": round(seconds / len(timed_batches), 4),
        "useful_tokens": real, "padded_tokens": padded,
        "scored_tokens": sum(sum(b["scored"]) for b in timed_batches),
        "padding_share": round(1 - real / padded, 4),
        "useful_tokens_per_s": round(real / seconds, 1),
        "padded_tokens_per_s": round(padded_per_s, 1),
        "model_flops": flops, "achieved_tflops": round(flops / seconds / 1e12, 4),
        "peak_flops": peak, "peak_source": peak_source,
        "mfu": round(flops / seconds / peak, 4) if peak else None,
        "peak_memory_gb": round(train_peak, 3),
        "peak_memory_kind": "cuda max_memory_allocated (training)" if hw.device == "cuda"
        else "process max RSS (whole child: load, tokenize, precompute, train)",
        "setup_seconds": round(setup_seconds, 2),
        "precompute": {"seconds": round(precompute["seconds"], 3), "pairs": precompute["pairs"],
                       "trial_seconds_extrapolated": round(precompute_trial, 1)},
        "trial": {"rows": len(lengths), "epochs": t["epochs"], "steps": trial_steps,
                  "useful_tokens": useful_per_epoch * t["epochs"], "scored_tokens": scored_per_epoch * t["epochs"],
                  "padded_tokens": trial_padded, "padded_length_sq": sum(x[1] for x in trial_stats),
                  "sequences": len(lengths) * rows_per_len * t["epochs"],
                  "padding_policy": policy, "seconds_extrapolated": round(trial_seconds, 1),
                  "useful_tokens_per_epoch": useful_per_epoch, "scored_tokens_per_epoch": scored_per_epoch,
                  "per_epoch_by_policy": {p: {"padded_tokens": v[0], "padded_length_sq": v[1],
                                              "padding_share": round(1 - useful_per_epoch / v[0], 4)}
                                          for p, v in per_epoch.items()}},
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "max_rss_before_train_gb": round(rss_before_train, 3),
        "load_average": os.getloadavg(),
    }
    out.write_text(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------------------ parent
def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


REAL_MODEL = ROOT / "build" / "smollm2-135m-instruct"


def run_all(size: str, out_dir: Path, only: list[str] | None = None, model: str = "tiny", repeats: int = 1,
            configs: list[str] | None = None) -> list[dict]:
    """Train every configuration in its own process, `repeats` rounds (each round runs every configuration once,
    so a change in the machine's load hits all of them alike). model "tiny": the TinyLlama-architecture model
    (bench/model.py), users vs finesweep; "real": SmolLM2-135M-Instruct (make real-model) with its own tokenizer
    and chat template, the whole lever ladder (LADDER)."""
    from .model import build_model

    kind = device_kind()
    if model == "real":
        if not (REAL_MODEL / "config.json").is_file():
            raise SystemExit(f"bench: {REAL_MODEL} is absent; run `make real-model` first")
        model_dir, size, prompt_format = REAL_MODEL, "smollm2-135m-instruct", "chat"
        plan = [(stage, name) for stage in ("sft", "dpo") for name in LADDER[stage]]
    else:
        if size == "auto":
            size = "full" if kind == "cuda" else "cpu"
        model_dir, prompt_format = build_model(size), "instruction"
        plan = [(stage, name) for stage in ("sft", "dpo") for name in ("users", "finesweep")]
    plan = [(st, n) for st, n in plan if (not only or f"{st}-{n}" in only) and (not configs or n in configs)]
    results = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for repeat in range(repeats):
        for stage, recipe in plan:
            with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
                out = Path(tmp) / "result.json"
                env = dict(os.environ, HF_DATASETS_CACHE=str(Path(tmp) / "hf-datasets"), TQDM_DISABLE="1",
                           **({"OMP_NUM_THREADS": str(CPU_THREADS)} if kind == "cpu" else {}),
                           # One device: TRL refuses nn.DataParallel over several visible GPUs.
                           CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
                           HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
                cmd = [sys.executable, "-m", "bench.bench_train", "--child", stage, recipe, "--model", str(model_dir),
                       "--kind", kind, "--result", str(out), "--prompt-format", prompt_format]
                rounds = f"round {repeat + 1}/{repeats}, " if repeats > 1 else ""
                print(f"bench: {stage} {recipe} ({rounds}load {os.getloadavg()[0]:.1f}) ...", flush=True)
                start = time.time()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                    raise SystemExit(f"bench: {stage} {recipe} failed (exit {proc.returncode})")
                result = json.loads(out.read_text())
                result["model_size"] = size
                result["repeat"] = repeat
                result["wall_seconds"] = round(time.time() - start, 1)
                results.append(result)
                print(f"bench: {stage} {recipe}: {result['useful_tokens_per_s']:.0f} useful tok/s, "
                      f"{result['padding_share']:.0%} padding, peak {result['peak_memory_gb']:.2f} GB, trial "
                      f"~{result['trial']['seconds_extrapolated'] / 3600:.2f} h ({result['wall_seconds']:.0f}s)",
                      flush=True)
                # Partial results survive an interrupted run.
                (out_dir / "train.json").write_text(json.dumps(results, indent=2))
    (out_dir / "train.json").write_text(json.dumps(results, indent=2))
    return results


def run_real(out_dir: Path, repeats: int, ladder_repeats: int) -> list[dict]:
    """Real-model mode: users and finesweep `repeats` rounds, the rungs between them `ladder_repeats` rounds,
    in rounds that each run every configuration once (so the machine's load hits all alike); one train.json."""
    rungs = sorted({n for names in LADDER.values() for n in names} - {"users", "finesweep"})
    results: list[dict] = []
    for round_ in range(max(repeats, ladder_repeats)):
        names = (["users", "finesweep"] if round_ < repeats else []) + (rungs if round_ < ladder_repeats else [])
        part = run_all("auto", out_dir / "partial", model="real", configs=names)
        for r in part:
            r["repeat"] = round_
        results += part
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train.json").write_text(json.dumps(results, indent=2))
    import shutil

    shutil.rmtree(out_dir / "partial", ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["auto", "full", "cpu"], default="auto")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", help="e.g. sft-users dpo-finesweep")
    parser.add_argument("--model-name", choices=["tiny", "real"], default="tiny", dest="model_name")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompt-format", default="instruction", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "RECIPE"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1], args.model, args.kind, args.result, args.prompt_format)
        return
    from .report import default_out_dir

    run_all(args.size, args.out or default_out_dir(args.model_name), args.only, args.model_name, args.repeats)


if __name__ == "__main__":
    main()
