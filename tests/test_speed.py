"""Speed choices are correct, not only fast (trainer/speed.py, docs/benchmarks.md):

1. On the same rows, the fast path's loss equals the plain path's: SFT padded to 512 (the users' recipe) vs
   padded to the longest row (TRL) vs length-grouped batches (finesweep), and DPO with the reference computed
   every step on rows padded to 512 vs precomputed once. Tolerance: 1e-5 absolute on the loss in fp32
   (observed: 0 on one SFT batch, ~1e-6 on an SFT epoch and on DPO batches: only the float reduction order changes).
2. Padding-free / packed rows do not attend to each other (TRL's padding-free collator, SDPA and eager): changing
   sample A leaves sample B's logits unchanged and equal to B run alone. The same check on a forward that
   does leak (a KV cache disables transformers' packed-sequence detection) fails, so the check can see a leak.
3. Per-hardware defaults: a fake T4 gets fp16, SDPA, no FlashAttention-2 and no Liger; a fake H100 gets bf16
   (and Liger for SFT only when liger_kernel is importable); every returned key is a real config field.
4. The length-grouped order is a function of (seed, epoch) only, and the Trainer trains on exactly it: what a
   run resumed from a checkpoint needs to see the same batches.
5. Under several processes that order, dealt out by accelerate, gives every optimizer step the rows one process
   takes at the same global batch (tests/test_multiprocess.py trains both and compares the curves).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from finesweep.spec import DatasetSpec, EvalSpec, Hyper, TrialSpec
from trainer import speed
from trainer.runtime import Hardware

from .conftest import FIXTURES

DATA = FIXTURES / "datasets"
CPU = Hardware("cpu", "cpu", "fp32", "sdpa", 0.0, 0)
T4 = Hardware("cuda", "Tesla T4", "fp16", "sdpa", 14.6, 1)
H100 = Hardware("cuda", "NVIDIA H100 80GB HBM3", "bf16", "flash_attention_2", 79.2, 1)
LOSS_TOL = 1e-5


def spec(tiny_model, stage: str, batch_size: int = 4, **hyper) -> TrialSpec:
    path, fmt = ((DATA / "instructions-local" / "train.jsonl", "instruction") if stage == "sft"
                 else (DATA / "preferences-local" / "train.jsonl", "preference"))
    return TrialSpec(sweep="speed", stage=stage, name="t", model=str(tiny_model),
                     dataset=DatasetSpec(path=str(path), format=fmt), prompt_format="instruction", max_length=512,
                     hyper=Hyper(r=8, alpha=16, dropout=0.0, batch_size=batch_size, epochs=1, **hyper),
                     eval=EvalSpec(set="sft-open-questions"))


def rows(s: TrialSpec, tokenizer):
    from trainer.data import load_splits, render_dpo, render_sft

    train, _ = load_splits(s.dataset, s.hyper)
    return (render_sft if s.stage == "sft" else render_dpo)(train, tokenizer, s.prompt_format)


def nonzero_adapter(model, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); give every LoRA weight the same random values in every
    trainer so the policy differs from the reference and both paths run the same weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def sft_trainer(tiny_model, tmp_path, extra: dict, name: str, batch_size: int = 4, epochs: int = 1):
    from trl import SFTConfig, SFTTrainer

    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config, training_kwargs

    s = spec(tiny_model, "sft", batch_size=batch_size)
    s = dataclasses.replace(s, hyper=dataclasses.replace(s.hyper, epochs=epochs))
    tok = load_tokenizer(s.model)
    data = rows(s, tok)
    args = SFTConfig(**training_kwargs(s, CPU, tmp_path / name, len(data)), completion_only_loss=True,
                     dataset_num_proc=None, **extra)
    trainer = SFTTrainer(model=load_base_model(s.model, CPU), args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora_config(s.hyper))
    nonzero_adapter(trainer.model)
    trainer.model.eval()
    return trainer


def sft_loss(trainer, examples) -> tuple[float, int]:
    """(loss, scored tokens) of one batch collated by the trainer's own collator."""
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return float(loss), int((batch["labels"][:, 1:] != -100).sum())


# ------------------------------------------------------------------------------------------------ 1. losses
@pytest.fixture(scope="module")
def sft_pair(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    users = sft_trainer(tiny_model, tmp, {"pad_to_multiple_of": 512}, "users")
    fast = sft_trainer(tiny_model, tmp, speed.speed_kwargs(spec(tiny_model, "sft"), CPU, "sft"), "fast")
    speed.prepare_trainer(fast, spec(tiny_model, "sft"), CPU, "sft")
    return users, fast


def test_sft_same_batch_same_loss_padded_to_512_or_to_longest(sft_pair):
    users, fast = sft_pair
    examples = [users.train_dataset[i] for i in (0, 5, 11, 17)]
    padded = users.data_collator(examples)
    tight = fast.data_collator(examples)
    assert padded["input_ids"].shape[1] == 512 and tight["input_ids"].shape[1] < 100
    loss_512, n_512 = sft_loss(users, examples)
    loss_tight, n_tight = sft_loss(fast, examples)
    assert n_512 == n_tight > 0
    assert loss_512 == pytest.approx(loss_tight, abs=LOSS_TOL)
    assert loss_512 > 1.0  # a real loss on the response tokens, not a degenerate zero


def test_sft_length_grouped_epoch_has_the_same_per_token_loss(sft_pair):
    """A length-grouped epoch holds other batches than a random one; summed over the epoch, every token's loss
    is the same, so the per-token mean is too."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    users, fast = sft_pair
    sampler = fast._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and hasattr(sampler, "set_epoch")
    order = list(iter(sampler))
    assert sorted(order) == list(range(len(fast.train_dataset)))

    def epoch(trainer, order):
        total, tokens, padded = 0.0, 0, 0
        for i in range(0, len(order), 4):
            examples = [trainer.train_dataset[j] for j in order[i:i + 4]]
            loss, n = sft_loss(trainer, examples)
            total, tokens = total + loss * n, tokens + n
            padded += trainer.data_collator(examples)["input_ids"].numel()
        return total / tokens, padded

    plain, plain_padded = epoch(users, list(range(len(users.train_dataset))))
    grouped, grouped_padded = epoch(fast, order)
    assert grouped == pytest.approx(plain, abs=LOSS_TOL)
    assert grouped_padded < plain_padded / 3  # 512-padded rows vs length-grouped batches


def test_dpo_precomputed_reference_grouped_equals_every_step_reference_padded_to_512(tiny_model, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config, training_kwargs

    s = spec(tiny_model, "dpo", batch_size=2)
    tok = load_tokenizer(s.model)
    data = rows(s, tok)

    def build(name, precompute, extra):
        args = DPOConfig(**training_kwargs(s, CPU, tmp_path / name, len(data)), beta=0.1,
                         precompute_ref_log_probs=precompute, **extra)
        trainer = DPOTrainer(model=load_base_model(s.model, CPU), args=args, train_dataset=data,
                             processing_class=tok, peft_config=lora_config(s.hyper))
        nonzero_adapter(trainer.model)
        trainer.model.eval()
        return trainer

    users = build("users", False, {"pad_to_multiple_of": 512})
    fast = build("fast", True, speed.speed_kwargs(s, CPU, "dpo"))
    speed.prepare_trainer(fast, s, CPU, "dpo")
    assert "ref_chosen_logps" in fast.train_dataset.column_names
    order = list(iter(fast._get_train_sampler()))
    assert sorted(order) == list(range(len(data)))
    for batch_rows in (order[:2], [0, 13]):
        a = users.data_collator([users.train_dataset[i] for i in batch_rows])
        b = fast.data_collator([fast.train_dataset[i] for i in batch_rows])
        assert a["input_ids"].shape[1] == 512 and b["input_ids"].shape[1] < 512
        with torch.no_grad():
            loss_users = float(users.compute_loss(users.model, dict(a)))
            loss_fast = float(fast.compute_loss(fast.model, dict(b)))
        assert abs(loss_users - math.log(2)) > 1e-3  # the adapter moved the policy away from the reference
        assert loss_fast == pytest.approx(loss_users, abs=LOSS_TOL)


def test_order_rows_sorts_dpo_pairs_longest_first_and_keeps_every_pair(tiny_model):
    from trainer.modeling import load_tokenizer

    s = spec(tiny_model, "dpo")
    data = rows(s, load_tokenizer(s.model))
    ordered = speed.order_rows(data, "dpo")
    key = [len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) for r in ordered]
    assert key == sorted(key, reverse=True)
    assert sorted(map(json.dumps, ordered)) == sorted(map(json.dumps, data))
    assert speed.order_rows(data, "sft") is data


# ------------------------------------------------------------------------------------------------ 2. packing
def _packed_logits(model, first, second, use_cache=False):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=2, padding_free=True)(
        [{"input_ids": first}, {"input_ids": second}])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one packed row, no padding
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():  # TRL's SFT compute_loss passes use_cache=False
        return model(**inputs, use_cache=use_cache).logits[0].float()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_do_not_attend_to_each_other(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(3, 1000, (23,), generator=gen).tolist()
    b = torch.randint(3, 1000, (15,), generator=gen).tolist()
    a_changed = [(t * 7 + 11) % 997 + 3 for t in a]
    base = _packed_logits(model, a, b)
    perturbed = _packed_logits(model, a_changed, b)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0].float()
    assert (base[:23] - perturbed[:23]).abs().max() > 1e-2  # A's own logits did change
    assert (base[23:] - perturbed[23:]).abs().max() == pytest.approx(0.0, abs=1e-6)  # B's did not
    assert (base[23:] - alone).abs().max() == pytest.approx(0.0, abs=1e-4)  # B packed == B alone
    # The check sees a leak when there is one: with a KV cache, transformers does not look for packed
    # sequences and B attends to A.
    leaky, leaky_perturbed = _packed_logits(model, a, b, True), _packed_logits(model, a_changed, b, True)
    assert (leaky[23:] - leaky_perturbed[23:]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ 3. hardware
def config_fields():
    from trl import DPOConfig, SFTConfig

    return ({f.name for f in dataclasses.fields(SFTConfig)}, {f.name for f in dataclasses.fields(DPOConfig)})


@pytest.mark.parametrize("liger_installed", [False, True])
def test_t4_gets_fp16_sdpa_and_no_liger(tiny_model, tmp_path, monkeypatch, liger_installed):
    from trainer.recipe import training_kwargs

    monkeypatch.setattr(speed, "liger_available", lambda: liger_installed)
    sft_fields, dpo_fields = config_fields()
    for stage, fields in (("sft", sft_fields), ("dpo", dpo_fields)):
        s = spec(tiny_model, stage)
        extra = speed.speed_kwargs(s, T4, stage)
        merged = {**training_kwargs(s, T4, tmp_path, 100), **extra}
        assert merged["fp16"] is True and merged["bf16"] is False
        assert not merged.get("use_liger_kernel") and "liger_kernel_config" not in merged
        assert set(extra) <= fields
        described = speed.describe(s, T4, stage)
        assert described["attention"] == "sdpa" and described["precision"] == "fp16"
        assert described["liger_kernel"] is False and described["padding_free"] is False
        json.dumps(described)


def test_detect_hardware_on_a_t4_never_picks_flash_attention(monkeypatch):
    """Even with flash_attn installed, sm75 gets SDPA and fp16 (FlashAttention-2 and bf16 need sm80+)."""
    import sys
    import types

    from trainer import runtime

    props = types.SimpleNamespace(name="Tesla T4", total_memory=15.6 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    hw = runtime.detect_hardware()
    assert (hw.precision, hw.attn_implementation) == ("fp16", "sdpa")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    hw = runtime.detect_hardware()
    assert (hw.precision, hw.attn_implementation) == ("bf16", "flash_attention_2")


@pytest.mark.parametrize("liger_installed", [False, True])
def test_h100_gets_bf16_and_liger_only_for_sft_when_installed(tiny_model, tmp_path, monkeypatch, liger_installed):
    from trainer.recipe import training_kwargs

    monkeypatch.setattr(speed, "liger_available", lambda: liger_installed)
    sft_fields, dpo_fields = config_fields()
    sft_extra = speed.speed_kwargs(spec(tiny_model, "sft"), H100, "sft")
    dpo_extra = speed.speed_kwargs(spec(tiny_model, "dpo"), H100, "dpo")
    merged = {**training_kwargs(spec(tiny_model, "sft"), H100, tmp_path, 100), **sft_extra}
    assert merged["bf16"] is True and merged["fp16"] is False
    assert set(sft_extra) <= sft_fields
    assert bool(sft_extra.get("use_liger_kernel")) is liger_installed
    if liger_installed:  # TRL's fused LM head replaces Liger's fused cross-entropy; TRL rejects both together
        assert sft_extra["liger_kernel_config"]["fused_linear_cross_entropy"] is False
    # DPO: the reference log-probs are precomputed before Liger would patch the model, so never Liger there.
    assert "use_liger_kernel" not in dpo_extra and set(dpo_extra) <= dpo_fields
    assert speed.describe(spec(tiny_model, "dpo"), H100, "dpo")["reference_log_probs"].startswith("precomputed")


def test_cpu_speed_kwargs_build_a_real_sft_config(tiny_model, tmp_path):
    from trl import SFTConfig

    from trainer.recipe import training_kwargs

    s = spec(tiny_model, "sft")
    args = SFTConfig(**training_kwargs(s, CPU, tmp_path, 20), completion_only_loss=True,
                     **speed.speed_kwargs(s, CPU, "sft"))
    assert not args.padding_free and not args.packing
    assert args.pad_to_multiple_of is None  # pad to the longest row of the batch, not to max_length
    # transformers' own group_by_length draws from the global RNG, which a resumed run does not replay;
    # finesweep's sampler (prepare_trainer) is seeded per epoch instead.
    assert args.train_sampling_strategy == "random"


def test_trainer_trains_on_the_seeded_length_grouped_order(tiny_model, tmp_path):
    """What makes a resumed run see the same batches: the Trainer sets the epoch on finesweep's sampler and
    trains on exactly its order, which depends only on (seed, epoch), not on the global RNG."""
    trainer = sft_trainer(tiny_model, tmp_path, {}, "order", batch_size=4, epochs=2)
    speed.prepare_trainer(trainer, spec(tiny_model, "sft"), CPU, "sft")
    seen = []
    step = trainer.training_step

    def record(model, inputs, *a, **kw):
        seen.append(int(inputs["input_ids"].sum()))
        return step(model, inputs, *a, **kw)

    trainer.training_step = record
    trainer.model.train()
    trainer.train()
    expected = []
    for epoch in (0, 1):
        torch.manual_seed(1000 + epoch)  # the global RNG does not matter
        sampler = trainer._get_train_sampler()
        sampler.set_epoch(epoch)
        order = list(iter(sampler))
        assert sorted(order) == list(range(len(trainer.train_dataset)))
        expected += [int(trainer.data_collator([trainer.train_dataset[j] for j in order[i:i + 4]])["input_ids"].sum())
                     for i in range(0, len(order), 4)]
    assert seen == expected and expected[:5] != expected[5:]


@pytest.mark.parametrize("processes,grad_accum", [(2, 1), (4, 1), (2, 3)])
def test_length_grouped_order_shards_into_the_one_process_global_batches(processes, grad_accum):
    """Several processes: accelerate deals the per-process batches of finesweep's sampler out in turn
    (BatchSamplerShard), so the rows of every optimizer step must be the rows one process takes at the same global
    batch. 2000 rows of random lengths are enough for transformers' megabatches (50 batches) to depend on the
    batch size the sampler is built with, so a sampler grouped by the per-process batch would fail here."""
    import types

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    global_batch = 8
    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 400, (2000,), generator=gen)]

    def sampler_for(world: int):
        args = types.SimpleNamespace(train_batch_size=global_batch // world, world_size=world,
                                     gradient_accumulation_steps=grad_accum, data_seed=None, seed=42)
        trainer = types.SimpleNamespace(args=args, train_dataset=lengths, add_callback=lambda callback: None)
        speed.install_length_grouped_sampler(trainer, lengths)
        return trainer._get_train_sampler()

    for epoch in (0, 1):
        one = sampler_for(1)
        one.set_epoch(epoch)
        reference = [sorted(b) for b in BatchSampler(one, global_batch * grad_accum, drop_last=False)]
        shards = []
        for rank in range(processes):
            sampler = sampler_for(processes)
            sampler.set_epoch(epoch)
            per_rank = BatchSampler(sampler, global_batch // processes, drop_last=False)
            shards.append(list(BatchSamplerShard(per_rank, num_processes=processes, process_index=rank)))
        # one optimizer step = grad_accum consecutive batches of every rank
        steps = [sorted(i for rank in shards for b in rank[k:k + grad_accum] for i in b)
                 for k in range(0, len(shards[0]), grad_accum)]
        assert steps == reference, f"epoch {epoch}: the 2-process steps train other rows than 1 process"
        assert sorted(i for s in steps for i in s) == list(range(len(lengths)))
