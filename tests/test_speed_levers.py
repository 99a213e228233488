"""The speed levers finesweep keeps on CPU (trainer/speed.py, docs/benchmarks.md "Real model") change nothing the
training computes:

1. The compact LM head (scored positions only, chunks of rows, logits recomputed in the backward) gives the same
   per-token log-probs as full log-softmax, and the same gradients for the hidden states and the head weight,
   with chunks that do not divide the row count.
2. Installed on TRL's SFTTrainer and DPOTrainer (both tiny families: a Llama-2 tokenizer, and SmolLM2's ChatML
   with tied embeddings), per-row loss (SFT) and per-pair loss (DPO) equal TRL's own fused head within 1e-5 and
   the LoRA gradients equal within 1e-5 relative; with metrics on, entropy / top-1 / mean logits equal TRL's on
   the scored positions.
3. Without head metrics the trainers log no entropy / token accuracy / logits keys (rather than zeros), and
   the recipes' default on CPU is the compact head without metrics (speed.default_levers, describe).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer import speed

from .test_speed import CPU, H100, LOSS_TOL, nonzero_adapter, rows, spec

GRAD_RTOL = 1e-5


# ------------------------------------------------------------------------------------------------ 1. the function
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_compact_log_probs_equal_full_log_softmax_values_and_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(101, 16, generator=gen) * 0.5).requires_grad_()
    targets = torch.randint(0, 101, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen)

    full = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    (full * upstream).sum().backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    lp, entropy, mean_logits, top1 = speed.compact_log_probs(hidden, weight, targets, chunk=chunk, metrics=True)
    (lp * upstream).sum().backward()
    assert torch.allclose(lp, full, atol=1e-5)
    assert torch.allclose(hidden.grad, ref_h, atol=1e-5)
    assert torch.allclose(weight.grad, ref_w, atol=1e-5)
    logits = (hidden @ weight.t()).detach()
    p = torch.softmax(logits, -1)
    assert torch.allclose(entropy, -(p * torch.log_softmax(logits, -1)).sum(-1), atol=1e-5)
    assert torch.allclose(mean_logits, logits.mean(-1), atol=1e-5)
    assert torch.equal(top1, logits.argmax(-1) == targets)


# ------------------------------------------------------------------------------------------------ 2. in TRL
def _sft(model_dir, tmp_path, name, levers=None):
    from trl import SFTConfig, SFTTrainer

    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config, training_kwargs

    s = spec(model_dir, "sft", batch_size=4)
    tok = load_tokenizer(s.model)
    data = rows(s, tok)
    args = SFTConfig(**training_kwargs(s, CPU, tmp_path / name, len(data)), completion_only_loss=True,
                     dataset_num_proc=None)
    trainer = SFTTrainer(model=load_base_model(s.model, CPU), args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora_config(s.hyper))
    if levers is not None:
        speed.prepare_trainer(trainer, s, CPU, "sft", levers)
    nonzero_adapter(trainer.model)
    trainer.model.eval()
    return trainer


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        scale = max(a[name].abs().max().item(), 1e-8)
        assert (a[name] - b[name]).abs().max().item() <= GRAD_RTOL * scale + 1e-8, name


def _micro_batches_match_the_whole(trainer, stage: str, sizes, run) -> float:
    """`run(step)` -> (loss, LoRA grads) with the trainer's own step, then with each micro-batch size installed:
    the same loss and gradients every time. Returns the whole batch's loss."""
    whole_step = trainer.training_step
    whole, whole_grads = run(whole_step)
    for size in sizes:
        trainer.training_step = whole_step
        speed.install_micro_batches(trainer, stage, size)
        loss, grads = run(trainer.training_step)
        assert loss == pytest.approx(whole, abs=LOSS_TOL)
        _same_grads(whole_grads, grads)
    return whole


@pytest.mark.parametrize("metrics", [False, True])
def test_sft_compact_head_same_per_row_loss_and_gradients(tiny_family, tmp_path, metrics):
    trl_head = _sft(tiny_family, tmp_path, "trl")
    compact = _sft(tiny_family, tmp_path, "compact", {"length_grouping": False, "lm_head": "compact",
                                                     "head_metrics": metrics})
    assert speed.compact_log_probs and compact.model.get_base_model().finesweep_lm_head["kind"] == "compact"
    examples = [trl_head.train_dataset[i] for i in (0, 3, 7, 11)]
    batch = trl_head.data_collator(examples)
    outs, grads = [], []
    for trainer in (trl_head, compact):
        trainer.model.zero_grad()
        out = trainer.model(**{k: v for k, v in batch.items()}, fused_lm_head=True)
        out.loss.backward()
        outs.append(out)
        grads.append(_lora_grads(trainer.model))
    mask = outs[0].label_mask
    assert torch.equal(mask, outs[1].label_mask) and mask.sum() > 0
    per_row = [(-o.log_probs).sum(1) / mask.sum(1) for o in outs]
    assert torch.allclose(per_row[0], per_row[1], atol=LOSS_TOL, rtol=0)
    assert per_row[0].min() > 1.0  # a real loss
    _same_grads(grads[0], grads[1])
    if metrics:
        assert torch.allclose(outs[0].entropy[mask], outs[1].entropy[mask], atol=1e-4)
        assert torch.equal(outs[0].is_top1[mask], outs[1].is_top1[mask])
    # the trainer's own loss (what it logs and backpropagates) agrees too
    with torch.no_grad():
        assert float(trl_head.compute_loss(trl_head.model, dict(batch))) == pytest.approx(
            float(compact.compute_loss(compact.model, dict(batch))), abs=LOSS_TOL)


def test_dpo_compact_head_same_loss_and_gradients(tiny_family, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config, training_kwargs

    s = spec(tiny_family, "dpo", batch_size=2)
    tok = load_tokenizer(s.model)
    data = rows(s, tok)

    def build(name, levers):
        args = DPOConfig(**training_kwargs(s, CPU, tmp_path / name, len(data)), beta=0.1,
                         precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=load_base_model(s.model, CPU), args=args, train_dataset=data,
                             processing_class=tok, peft_config=lora_config(s.hyper))
        if levers is not None:
            speed.prepare_trainer(trainer, s, CPU, "dpo", levers)
        nonzero_adapter(trainer.model)
        trainer.model.eval()
        return trainer

    trl_head = build("trl", None)
    compact = build("compact", {"length_grouping": False, "lm_head": "compact", "head_metrics": False})
    for pair_rows in ([0, 1], [2, 5]):
        batch = trl_head.data_collator([trl_head.train_dataset[i] for i in pair_rows])
        losses, grads = [], []
        for trainer in (trl_head, compact):
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
            losses.append(float(loss))
            grads.append(_lora_grads(trainer.model))
        assert abs(losses[0] - 0.6931471805599453) > 1e-3  # policy differs from the reference
        assert losses[1] == pytest.approx(losses[0], abs=LOSS_TOL)
        _same_grads(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------ 3. wiring
def test_head_metrics_are_left_out_of_the_logs_not_logged_as_zeros(tiny_model, tmp_path):
    trainer = _sft(tiny_model, tmp_path, "nolog", {"length_grouping": True, "lm_head": "compact",
                                                   "head_metrics": False})
    seen = []
    trainer.callback_handler.on_log = lambda args, state, control, logs=None, **kw: seen.append(dict(logs))
    trainer.log({"loss": 1.0, "entropy": 0.0, "mean_token_accuracy": 0.0, "eval_entropy": 0.0})
    assert seen and "loss" in seen[-1]
    assert not {"entropy", "mean_token_accuracy", "eval_entropy"} & seen[-1].keys()


def test_defaults_compact_head_on_cpu_only_and_described(tiny_model):
    assert speed.default_levers(CPU, "sft") == {"length_grouping": True, "lm_head": "compact", "head_metrics": False,
                                                "micro_batch": speed.MICRO_BATCH["sft"]}
    assert speed.default_levers(CPU, "dpo") == {"length_grouping": True, "lm_head": "compact", "head_metrics": False,
                                                "micro_batch": speed.MICRO_BATCH["dpo"]}
    assert speed.default_levers(H100, "sft") == {"length_grouping": True, "lm_head": "trl", "head_metrics": True,
                                                 "micro_batch": None}
    bf16_cpu = dataclasses.replace(CPU, precision="bf16")
    assert speed.default_levers(bf16_cpu, "sft")["lm_head"] == "trl"
    described = speed.describe(spec(tiny_model, "sft"), CPU, "sft")
    assert described["levers"]["lm_head"] == "compact" and "compact" in described["fused_lm_head"]
    assert "not computed" in described["head_metrics"]


def test_dpo_micro_batches_same_loss_and_gradients_as_the_whole_batch(tiny_family, tmp_path):
    """A DPO step run as micro-batches of 1 and of 2 pairs (an uneven split of 3) gives the whole batch's loss and
    LoRA gradients: the sigmoid loss is a mean over pairs."""
    from trl import DPOConfig, DPOTrainer

    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config, training_kwargs

    s = spec(tiny_family, "dpo", batch_size=3)
    tok = load_tokenizer(s.model)
    data = rows(s, tok)
    args = DPOConfig(**training_kwargs(s, CPU, tmp_path / "micro", len(data)), beta=0.1,
                     precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=load_base_model(s.model, CPU), args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora_config(s.hyper))
    levers = {"length_grouping": False, "lm_head": "compact", "head_metrics": False}
    speed.prepare_trainer(trainer, s, CPU, "dpo", levers)
    nonzero_adapter(trainer.model)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 4, 9)])

    def run(step):
        trainer.model.zero_grad()
        loss = float(step(trainer.model, dict(batch)))
        return loss, _lora_grads(trainer.model)

    whole = _micro_batches_match_the_whole(trainer, "dpo", (1, 2), run)
    assert abs(whole - 0.6931471805599453) > 1e-3
    parts = speed.split_batch(dict(batch), "dpo", 2)
    assert [w for _, w in parts] == pytest.approx([2 / 3, 1 / 3])
    assert parts[1][0]["ref_chosen_logps"].shape[0] == 1 and parts[1][0]["input_ids"].shape[0] == 2


@pytest.mark.parametrize("counted", [True, False])
def test_sft_micro_batches_same_loss_and_gradients_as_the_whole_batch(tiny_family, tmp_path, counted):
    """An SFT step of 3 rows run one row at a time gives the whole batch's loss and LoRA gradients, with the
    Trainer's num_items_in_batch (label tokens of the whole batch) and without it (weights = token shares)."""
    trainer = _sft(tiny_family, tmp_path, "micro", {"length_grouping": False, "lm_head": "compact",
                                                    "head_metrics": False})
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 3, 8)])
    n_items = (batch["labels"][:, 1:] != -100).sum() if counted else None

    def run(step):
        trainer.model.zero_grad()
        loss = float(step(trainer.model, dict(batch), n_items))
        return loss, _lora_grads(trainer.model)

    whole = _micro_batches_match_the_whole(trainer, "sft", (1, 2), run)
    assert whole > 1.0
