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
  `(batch, seq, vocab)` logits in both trainers; on CUDA it projects only the labelled positions.
- On CPU (`default_levers`), three more, each exact (tests/test_speed_levers.py; measured on SmolLM2-135M in
  docs/benchmarks.md "Real model"): TRL's head projects *every* position there (prompt, padding) in 0.5 GB tiles
  and computes entropy/top-1/mean-logit metrics on all of them, so `install_compact_lm_head` replaces it with one
  that projects the labelled positions only, 256 rows at a time, recomputing each chunk in the backward, without
  the logged head metrics; and `install_micro_batches` runs each step's batch as micro-batches (SFT 1 row, DPO 2
  pairs) with the losses weighted to the whole batch's, since without checkpointing the whole batch's activations
  put the peak above the users' checkpointed recipe.
- Liger kernels (RMSNorm, SwiGLU, RoPE) for SFT on Ampere+ only, and only when `liger_kernel` is importable
  (it is not a requirement). Not on a T4 (Triton targets sm80+), not for DPO (Liger patches the model when
  training starts, after the reference log-probs were precomputed without it, so step 1 would compare two
  slightly different models), and never its fused cross-entropy (TRL's fused LM head replaces it).
- DPO keeps `precompute_ref_log_probs=True` (set in dpo.py): the reference pass runs once, not every step;
  `order_rows` sorts the pairs by length first so that pass pads little too.
- Gradient checkpointing follows `runtime.use_gradient_checkpointing` (spec setting, "auto" = on below
  24 GB of GPU memory); it is not changed here.

Wiring (the recipes): `speed_kwargs` goes into SFTConfig / DPOConfig; DPO rows go through `order_rows`
before DPOTrainer is built; `prepare_trainer(trainer, ...)` runs after either trainer is built and applies
`default_levers` (without it, batches are TRL's random ones padded to their longest row and TRL's head runs:
correct, only slower); `describe` goes into train.json.
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


def prepare_trainer(trainer, spec: TrialSpec, hw: Hardware, stage: str, levers: dict | None = None) -> None:
    """What a config field cannot express, applied to a built trainer before `train()`: batches of rows of
    similar length, in an order fixed by the seed and the epoch; on CPU, the compact LM head (scored positions
    only, chunked) in place of TRL's, without the logged head metrics. `levers` (default: default_levers) lets
    the benchmark turn each one on separately."""
    levers = default_levers(hw, stage) if levers is None else levers
    if levers.get("length_grouping", True):
        dataset = trainer.train_dataset
        if stage == "dpo":
            lengths = dpo_lengths(dataset, trainer.args.max_length)
        else:
            lengths = [len(ids) for ids in dataset["input_ids"]]
        install_length_grouped_sampler(trainer, lengths)
    apply_lm_head_levers(trainer, levers)
    levers = dict(levers)
    if levers.get("micro_batch") and (getattr(trainer, "is_deepspeed_enabled", False)
                                      or getattr(trainer, "is_fsdp_enabled", False)):
        # DeepSpeed's engine counts backward calls as accumulation steps (and FSDP reshards per backward): several
        # backward passes per optimizer step are not the same step there (tests/test_multiprocess.py, ZeRO-2).
        levers["micro_batch"] = None
    if levers.get("micro_batch"):
        install_micro_batches(trainer, stage, levers["micro_batch"])
    trainer.finesweep_levers = levers


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
        "levers": default_levers(hw, stage),
    }
    if record["levers"]["lm_head"] == "compact":
        record["fused_lm_head"] = (f"finesweep compact head (speed.install_compact_lm_head): scored positions "
                                   f"only, {COMPACT_CHUNK_ROWS} rows a chunk, logits recomputed in the backward")
    if record["levers"].get("micro_batch"):
        record["micro_batches"] = (f"each batch run as micro-batches of {record['levers']['micro_batch']} "
                                   f"{'rows' if stage == 'sft' else 'pairs'}, losses weighted to the whole batch's, "
                                   "one optimizer step")
    if not record["levers"]["head_metrics"]:
        record["head_metrics"] = "not computed (entropy, mean_token_accuracy, logits/* left out of the logs)"
    if stage == "dpo":
        record["reference_log_probs"] = "precomputed once before training, pairs sorted by length (order_rows)"
    return record


# ------------------------------------------------------------------------------------------------ LM head (CPU)
# TRL 1.16 patches the model with a fused LM head (trl.trainer.utils.add_fused_lm_head) whose kernel scores only
# the labelled positions on Triton devices (CUDA, XPU); everywhere else (CPU) it projects *every* position
# (prompt and padding included) through the LM head in tiles of 4,096 tokens x 32,768 vocabulary columns
# (0.5 GB each in fp32) and computes entropy, top-1 and the mean logit of each of them for the logged metrics.
# On CPU, finesweep replaces that head with `compact_lm_head`: only the positions with a label are projected,
# in chunks of COMPACT_CHUNK_ROWS rows, and the backward recomputes each chunk's logits, so memory is
# O(chunk x vocabulary) and no (batch, seq, vocab) logits tensor ever exists. The per-token log-probs (and so
# the loss) are the same function of the same fp32 numbers (tests/test_speed_levers.py: per row within 1e-5,
# gradients too). The logged metrics (entropy, mean_token_accuracy, DPO's logits/*) are then either computed on
# the scored positions only, as the chunk passes (`metrics=True`), or left out (`metrics=False`; their keys are
# dropped from the logs rather than logged as zeros).
COMPACT_CHUNK_ROWS = 256
# Keys the trainers log from the head's extra outputs; dropped from the logs when the head does not compute them.
HEAD_METRIC_KEYS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")


def default_levers(hw: Hardware, stage: str) -> dict:
    """finesweep's speed levers on this hardware (docs/benchmarks.md; the bench turns them on one at a time):
    length_grouping: batches of rows of similar length (every device);
    lm_head: "compact" (speed.compact_lm_head: scored positions only, chunked, recomputed in the backward) on CPU
        in fp32, where TRL's head scores every position; "trl" elsewhere (TRL's Triton head is already compact);
    head_metrics: compute entropy / token accuracy / mean logits in the head (True keeps TRL's metrics);
    micro_batch: each batch run as micro-batches of this many rows (SFT) / pairs (DPO), on CPU (where
        checkpointing is off), or None."""
    cpu = hw.device == "cpu" and hw.precision == "fp32"
    levers = {"length_grouping": True, "lm_head": "compact" if cpu else "trl", "head_metrics": not cpu}
    levers["micro_batch"] = MICRO_BATCH[stage] if hw.device == "cpu" else None
    return levers


class _CompactLogProbs:
    """Namespace for the autograd function (torch is imported lazily)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            cls.fn = _build_compact_fn()
        return cls.fn


def _build_compact_fn():
    import torch

    class CompactLogProbs(torch.autograd.Function):
        """log p(target) of `hidden @ weight.T` for N scored rows, in chunks of `chunk` rows: forward keeps only
        the per-row log-sum-exp; backward recomputes each chunk's logits and turns them into the gradient
        (softmax - one-hot) in place. Optional no-grad metrics per row: entropy, mean logit, top-1."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk, metrics):
            n = hidden.shape[0]
            dev = hidden.device
            log_probs = torch.empty(n, device=dev, dtype=torch.float32)
            log_z = torch.empty(n, device=dev, dtype=torch.float32)
            entropy = torch.empty(n, device=dev, dtype=torch.float32) if metrics else None
            mean_logits = torch.empty(n, device=dev, dtype=torch.float32) if metrics else None
            is_top1 = torch.empty(n, device=dev, dtype=torch.bool) if metrics else None
            w = weight.float()
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                z = hidden[s:e].float() @ w.t()
                lz = torch.logsumexp(z, dim=-1)
                target = z.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1)
                log_z[s:e] = lz
                log_probs[s:e] = target - lz
                if metrics:
                    mean_logits[s:e] = z.mean(-1)
                    is_top1[s:e] = z.argmax(-1) == targets[s:e]
                    # entropy = log Z - sum_v p_v z_v
                    z.sub_(lz.unsqueeze(-1))
                    p = z.exp()
                    entropy[s:e] = -(p * z).sum(-1)
            ctx.save_for_backward(hidden, weight, targets, log_z)
            ctx.chunk = chunk
            extras = [x for x in (entropy, mean_logits, is_top1) if x is not None]
            if extras:
                ctx.mark_non_differentiable(*extras)
            return log_probs, entropy, mean_logits, is_top1

        @staticmethod
        def backward(ctx, grad_log_probs, *_):
            hidden, weight, targets, log_z = ctx.saved_tensors
            need_h, need_w = ctx.needs_input_grad[:2]
            if grad_log_probs is None:
                return None, None, None, None, None
            w = weight.float()
            grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
            rows = torch.arange(min(ctx.chunk, hidden.shape[0]), device=hidden.device)
            for s in range(0, hidden.shape[0], ctx.chunk):
                e = min(s + ctx.chunk, hidden.shape[0])
                h = hidden[s:e].float()
                g = grad_log_probs[s:e].float()
                # d log p_t / dz_v = 1[v = t] - p_v ; times the incoming gradient, in place on the logits
                z = h @ w.t()
                z.sub_(log_z[s:e].unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
                z[rows[: e - s], targets[s:e]] += g
                if need_h:
                    grad_hidden[s:e] = z @ w
                if need_w:
                    grad_weight.addmm_(z.t(), h)
            return (grad_hidden.to(hidden.dtype) if need_h else None,
                    grad_weight.to(weight.dtype) if need_w else None, None, None, None)

    return CompactLogProbs


def compact_log_probs(hidden, weight, targets, chunk: int = COMPACT_CHUNK_ROWS, metrics: bool = False):
    """(log_probs, entropy, mean_logits, is_top1) per row of `hidden` [N, H] against `weight` [V, H] (an LM head
    without bias); the last three are None without `metrics`."""
    return _CompactLogProbs.get().apply(hidden, weight, targets, chunk, metrics)


def install_compact_lm_head(model, metrics: bool, chunk: int = COMPACT_CHUNK_ROWS) -> None:
    """Replace TRL's fused LM head on `model` (the base model TRL patched with add_fused_lm_head) by one that
    projects only the labelled positions, in chunks (see COMPACT_CHUNK_ROWS above). Calls without
    `fused_lm_head=True` (generation, the evaluator) go to TRL's forward, which passes them to the model's own."""
    import functools
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    previous = model.forward
    config = model.config.get_text_config()
    for field in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling"):
        if getattr(config, field, None) not in (None, 1.0):
            raise ValueError(f"compact LM head: the model scales its logits ({field}); use lm_head='trl'")
    if getattr(config, "output_router_logits", False):
        raise ValueError("compact LM head: MoE router losses are not handled; use lm_head='trl'")

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            return previous(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                            **kwargs)
        kwargs["use_cache"] = False
        backbone = self.base_model(*args, **kwargs)
        if shift_labels is None:
            hidden = backbone.last_hidden_state[:, :-1]
            labels = labels[:, 1:]
        else:
            hidden, labels = backbone.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        if head.bias is not None:
            raise ValueError("compact LM head: an LM head with a bias is not handled; use lm_head='trl'")
        mask = labels != -100
        per_row = compact_log_probs(hidden[mask], head.weight, labels[mask], chunk, metrics)

        def scatter(x):
            if x is None:
                return torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs, entropy, mean_logits, is_top1 = (scatter(x) for x in per_row)
        if not metrics:
            is_top1 = torch.zeros(mask.shape, device=mask.device, dtype=torch.bool)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model.finesweep_lm_head = {"kind": "compact", "chunk_rows": chunk, "metrics": metrics}


def install_trl_head_without_metrics(model) -> None:
    """TRL's own kernel (every position on CPU) asked for log-probs only: what dropping the logged metrics alone
    is worth (a bench rung; the recipes use the compact head on CPU)."""
    import functools
    import types

    import torch
    from trl.trainer.utils import add_fused_lm_head

    # add_fused_lm_head wraps model.forward; its non-fused path goes to the current forward (TRL's), so the
    # model's own forward stays reachable.
    add_fused_lm_head(model, outputs=("log_probs",))
    fused = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        out = fused(*args, fused_lm_head=fused_lm_head, **kwargs)
        if fused_lm_head:
            zeros = torch.zeros_like(out.log_probs)
            out.entropy, out.mean_logits = zeros, zeros
            out.is_top1 = torch.zeros_like(out.label_mask)
        return out

    model.forward = types.MethodType(forward, model)
    model.finesweep_lm_head = {"kind": "trl", "metrics": False}


def drop_head_metrics(trainer) -> None:
    """The head no longer computes entropy / top-1 / mean logits: drop their (zero) keys from the logs."""
    log = trainer.log

    def log_without_head_metrics(logs, *args, **kwargs):
        logs = {k: v for k, v in logs.items()
                if not any(k == key or k == f"eval_{key}" for key in HEAD_METRIC_KEYS)}
        return log(logs, *args, **kwargs)

    trainer.log = log_without_head_metrics


def apply_lm_head_levers(trainer, levers: dict) -> None:
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    if levers.get("lm_head") == "compact":
        install_compact_lm_head(model, metrics=bool(levers.get("head_metrics", True)))
    elif not levers.get("head_metrics", True):
        install_trl_head_without_metrics(model)
    if not levers.get("head_metrics", True):
        drop_head_metrics(trainer)


# ------------------------------------------------------------------------------------------------ micro-batches
# Without gradient checkpointing (CPU, and GPUs of 24 GB or more) the activations of a whole step's batch are alive
# at once: on SmolLM2 on CPU, DPO's 4 pairs x 2 x 512 tokens held 8.3 GB and SFT's 2 rows x 512 up to 4.1 GB, more
# than the users' checkpointed recipe (7.7 / 3.2-3.6 GB). Each step's batch is then run as micro-batches (SFT:
# MICRO_BATCH["sft"] rows, DPO: MICRO_BATCH["dpo"] pairs), their gradients summed before the one optimizer step,
# each loss weighted so the sum is the whole batch's loss: DPO's sigmoid loss is a mean over pairs (weight = the
# part's share of the pairs); SFT's is a sum over label tokens divided by the batch's label-token count (the
# Trainer's num_items_in_batch: weight 1; without it, weight = the part's share of the label tokens). Same rows per
# optimizer step, same loss and gradient (tests/test_speed_levers.py), a fraction of the activations.
MICRO_BATCH = {"sft": 1, "dpo": 2}
PAIR_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def split_batch(inputs: dict, stage: str, size: int) -> list[tuple[dict, float | None]]:
    """[(micro-batch, weight)] of a training batch, each of at most `size` rows (SFT) or pairs (DPO: rows
    [chosen_0..chosen_n-1, rejected_0..rejected_n-1]), at the batch's padded width. DPO weight = pairs / n; SFT
    weight = label tokens / the batch's (used only when the Trainer passes no num_items_in_batch)."""
    import torch

    rows_total = inputs["input_ids"].shape[0]
    n = rows_total // 2 if stage == "dpo" else rows_total
    parts = []
    for start in range(0, n, size):
        end = min(start + size, n)
        index = list(range(start, end)) + (list(range(n + start, n + end)) if stage == "dpo" else [])
        rows = torch.tensor(index)
        part = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows_total:
                part[key] = value[rows.to(value.device)]
            elif stage == "dpo" and key in PAIR_KEYS:
                part[key] = value[start:end]
            else:
                part[key] = value
        if stage == "dpo":
            weight = (end - start) / n
        else:
            total = int((inputs["labels"][:, 1:] != -100).sum())
            weight = int((part["labels"][:, 1:] != -100).sum()) / total if total else 1.0 / len(range(0, n, size))
        parts.append((part, weight))
    return parts


def install_micro_batches(trainer, stage: str, size: int | None = None) -> None:
    """Run each training batch as micro-batches of `size` rows (SFT) or pairs (DPO); see MICRO_BATCH above."""
    size = size or MICRO_BATCH[stage]
    if stage == "dpo":
        losses = list(getattr(trainer, "loss_types", None) or [trainer.args.loss_type])
        if losses != ["sigmoid"] or getattr(trainer, "use_weighting", False) \
                or getattr(trainer.args, "ld_alpha", None) is not None:
            raise ValueError("DPO micro-batches: only the plain sigmoid loss is a mean over pairs; "
                             f"loss {losses!r} is left whole")
    elif getattr(trainer.args, "loss_type", "nll") != "nll" or trainer.compute_loss_func is not None \
            or getattr(trainer, "label_smoother", None) is not None:
        raise ValueError("SFT micro-batches: only the plain token-summed NLL splits exactly")
    step = trainer.training_step
    compute_loss = trainer.compute_loss

    def training_step(model, inputs, num_items_in_batch=None, *args, **kwargs):
        if "input_ids" not in inputs or "position_ids" in inputs and "attention_mask" not in inputs:
            return step(model, inputs, num_items_in_batch, *args, **kwargs)  # padding-free: one packed row
        parts = split_batch(inputs, stage, size)
        if len(parts) == 1:
            return step(model, inputs, num_items_in_batch, *args, **kwargs)
        total = None
        for part, weight in parts:
            if stage == "sft" and num_items_in_batch is not None:
                weight = 1.0  # each part's token sum is already divided by the whole batch's token count

            def weighted(model, inputs, *a, _w=weight, **kw):
                out = compute_loss(model, inputs, *a, **kw)
                return (out[0] * _w, out[1]) if isinstance(out, tuple) else out * _w

            trainer.compute_loss = weighted
            try:
                loss = step(model, part, num_items_in_batch, *args, **kwargs)
            finally:
                trainer.compute_loss = compute_loss
            total = loss if total is None else total + loss
        return total

    trainer.training_step = training_step
    trainer.finesweep_micro_batch = size
