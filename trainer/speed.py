"""Speed choices for training (padding, batching, kernels), kept apart from the recipes so the benchmark can
run the users' recipe and finesweep's defaults through the same code path.

What finesweep does, and why (measured in docs/benchmarks.md, checked in tests/test_speed.py):

- No compute on padding, by length grouping. TRL's collators already pad to the longest row of the batch,
  not to `max_length`; on top of that `prepare_trainer` installs transformers' length-grouped order (random
  megabatches of 50 batches, sorted by length inside), so a batch pads to almost nothing. Batches still hold
  `batch_size` rows, so the optimisation (steps, rows per step, loss normalisation) is the users' recipe;
  only which rows share a batch changes. The sampler is seeded per epoch (`SeededLengthGroupedSampler`):
  transformers' own `train_sampling_strategy="group_by_length"` draws from the global RNG, so a run resumed
  from a checkpoint would see other batches than the uninterrupted one (tests/test_preemption.py). SFT
  lengths are the tokenized rows; DPO rows have no `input_ids`, their length is prompt + longer answer.
- No packing and no padding-free by default. In TRL 1.16, SFT `padding_free` without packing requires
  `max_length=None` (no truncation), and packing changes what a batch is (rows per step); DPO's
  `padding_free` is disabled by TRL. Length grouping leaves about 1% padding on GSM8K at batch 2, so there
  is little left to win. (For the record, transformers 5.23 keeps padding-free samples apart on SDPA too:
  with `attention_mask=None` it builds a block-diagonal causal mask from the `position_ids` resets;
  tests/test_speed.py proves no cross-sample attention for TRL's padding-free collator on SDPA and eager.)
- Attention and precision come from `runtime.detect_hardware` (T4: fp16 + SDPA; Ampere+: bf16 and
  FlashAttention-2 when installed; CPU: fp32 + SDPA). TRL's fused, chunked LM head already avoids the
  `(batch, seq, vocab)` logits in both trainers.
- Liger kernels (RMSNorm, SwiGLU, RoPE) for SFT on Ampere+ only, and only when `liger_kernel` is importable
  (it is not a requirement). Not on a T4 (Triton targets sm80+), not for DPO (Liger patches the model when
  training starts, after the reference log-probs were precomputed without it, so step 1 would compare two
  slightly different models), and never its fused cross-entropy (TRL's fused LM head replaces it).
- DPO keeps `precompute_ref_log_probs=True` (set in dpo.py): the reference pass runs once, not every step;
  `order_rows` sorts the pairs by length first so that pass pads little too.
- Gradient checkpointing follows `runtime.use_gradient_checkpointing` (spec setting, "auto" = on below
  24 GB of GPU memory); it is not changed here.

Wiring (the recipes): `speed_kwargs` goes into SFTConfig / DPOConfig; DPO rows go through `order_rows`
before DPOTrainer is built; `prepare_trainer(trainer, ...)` runs after either trainer is built (without it,
batches are TRL's random ones padded to their longest row: correct, only slower); `describe` goes into
train.json.
"""

from __future__ import annotations

import importlib.util

from finesweep.spec import TrialSpec

from .runtime import Hardware

LIGER_CONFIG = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                "fused_linear_cross_entropy": False}


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_liger(hw: Hardware, stage: str) -> bool:
    """Liger's Triton kernels: SFT on Ampere or newer (bf16 is the marker: detect_hardware gives bf16 only to
    sm80+), when installed."""
    return stage == "sft" and hw.device == "cuda" and hw.precision == "bf16" and liger_available()


def speed_kwargs(spec: TrialSpec, hw: Hardware, stage: str) -> dict:
    """Extra SFTConfig / DPOConfig arguments for this trial on this hardware. (Length grouping is not here:
    see prepare_trainer.)"""
    kwargs: dict = {}
    if use_liger(hw, stage):
        kwargs["use_liger_kernel"] = True
        kwargs["liger_kernel_config"] = dict(LIGER_CONFIG)
    return kwargs


def order_rows(rows, stage: str):
    """Rows in the order the trainer should receive them. DPO: longest first (prompt + longer answer, in
    characters), so TRL's one-time reference pass, which walks the dataset in order without shuffling, batches
    rows of similar length instead of padding random ones (and a too-long batch fails at once). Training order
    is unaffected: the length-grouped sampler draws random megabatches. SFT: unchanged."""
    if stage != "dpo" or len(rows) == 0:
        return rows
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"])]
    return rows.select(sorted(range(len(rows)), key=lambda i: -lengths[i]))


def prepare_trainer(trainer, spec: TrialSpec, hw: Hardware, stage: str) -> None:
    """What a config field cannot express, applied to a built trainer before `train()`: batches of rows of
    similar length, in an order fixed by the seed and the epoch."""
    dataset = trainer.train_dataset
    if stage == "dpo":
        lengths = dpo_lengths(dataset, trainer.args.max_length)
    else:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    install_length_grouped_sampler(trainer, lengths)


def dpo_lengths(dataset, max_length: int | None) -> list[int]:
    """The length DPO's collator pads a pair to: prompt + the longer answer, capped at max_length."""
    cap = max_length or 10**9
    return [min(len(p) + max(len(c), len(r)), cap)
            for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


def seeded_length_grouped_sampler(batch_size: int, lengths: list[int], seed: int):
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        """transformers' LengthGroupedSampler with its permutation drawn from (seed, epoch) instead of the global
        RNG: the same batches after a resume from a checkpoint and on every DDP rank. The Trainer calls
        set_epoch through the dataloader at each epoch."""

        def __init__(self):
            super().__init__(batch_size, lengths=lengths)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    return SeededLengthGroupedSampler()


def install_length_grouped_sampler(trainer, lengths: list[int]) -> None:
    if len(lengths) != len(trainer.train_dataset):
        raise ValueError(f"{len(lengths)} lengths for {len(trainer.train_dataset)} training rows")
    args = trainer.args
    seed = args.data_seed if args.data_seed is not None else args.seed

    def length_grouped_sampler(train_dataset=None):
        # The sampler orders the rows for all processes at once: accelerate wraps the dataloader built on it in a
        # BatchSamplerShard that deals its per-process batches out in turn (rank r takes batches r, r + N, ...),
        # so N consecutive per-process batches are one global batch. Grouping by the global batch (per-process
        # batch x processes x accumulation) makes the sequence, and so every optimizer step's rows, the same at
        # any process count (tests/test_multiprocess.py), and the seed makes it the same on every rank.
        samplers.append(seeded_length_grouped_sampler(
            args.train_batch_size * args.world_size * args.gradient_accumulation_steps, lengths, seed))
        return samplers[-1]

    samplers: list = []
    # Trainer._get_dataloader calls self._get_train_sampler(dataset) when it builds the training dataloader.
    trainer._get_train_sampler = length_grouped_sampler
    trainer.add_callback(sampler_epoch_callback(samplers))
    trainer.finesweep_sampler = "length_grouped"


def sampler_epoch_callback(samplers: list):
    """Sets the epoch on the sampler at each epoch's start. The Trainer's own set_epoch does not reach it in one
    case: a run resumed mid-epoch under several processes, where accelerate's skip_first_batches wraps the
    BatchSamplerShard in a SkipBatchSampler and DataLoaderShard.set_epoch looks only two levels down, so the
    resumed epoch would be drawn with epoch 0's order (tests/test_multiprocess.py caught it). The epoch comes from
    the Trainer state: a whole number at an epoch's start, the checkpoint's fraction when resumed mid-epoch."""
    import math

    from transformers import TrainerCallback

    class SamplerEpoch(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            for sampler in samplers:
                sampler.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))

    return SamplerEpoch()


def describe(spec: TrialSpec, hw: Hardware, stage: str) -> dict:
    """What speed choices a trial ran with, for train.json."""
    kwargs = speed_kwargs(spec, hw, stage)
    record = {
        "sampler": "length-grouped, seeded per epoch (speed.prepare_trainer)",
        "sampler_lengths": "tokenized row" if stage == "sft" else "prompt + longer answer",
        "padding": "to the longest row of each batch (TRL collator), no pad_to_multiple_of",
        "packing": False,
        "padding_free": False,
        "attention": hw.attn_implementation,
        "precision": hw.precision,
        "liger_kernel": bool(kwargs.get("use_liger_kernel")),
        "fused_lm_head": "TRL chunked log-probs (no full logits)",
        "config_kwargs": kwargs,
    }
    if stage == "dpo":
        record["reference_log_probs"] = "precomputed once before training, pairs sorted by length (order_rows)"
    return record
