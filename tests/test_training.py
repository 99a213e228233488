"""Training really trains: LoRA sizes match the TinyLlama report, loss is on response tokens only, SFT
memorises a small set (with and without gradient checkpointing), DPO's reference is the SFT model, and DPO
raises preference accuracy on its training pairs.

The training tests run on both tiny families (`tiny_family`: [llama] is TinyLlama-like, [chatml] SmolLM2-like
with ChatML, no BOS on plain text and tied embeddings); tests of the store and of TRL's settings run on [llama]
only."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from finesweep.spec import StartRef, parse_sweep
from finesweep.store import TRAINED, LocalStore
from trainer.dpo import DPORecipe
from trainer.sft import SFTRecipe

from .conftest import FIXTURES, model_family

DATA = FIXTURES / "datasets"


def test_lora_parameter_count_on_tinyllama_architecture():
    """user-sweeps.md: r=4 on q,v,gate,down of TinyLlama-1.1B trains 1,914,880 parameters (0.17%)."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from finesweep.spec import Hyper
    from trainer.recipe import lora_config
    from trainer.tiny_model import TINYLLAMA_1B, llama_config

    with torch.device("meta"):  # the architecture without allocating 1.1B parameters
        model = LlamaForCausalLM(llama_config(32000, TINYLLAMA_1B))
    peft_model = get_peft_model(model, lora_config(Hyper(r=4, alpha=8, target_modules=(
        "q_proj", "v_proj", "gate_proj", "down_proj"))))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == 1_914_880
    assert round(100 * trainable / total, 2) == 0.17


def sweep_spec(tiny_model, stage: str, trial: dict, dataset: str, fmt: str, start=None, **extra):
    raw = {"name": f"t-{stage}", "stage": stage, "model": str(tiny_model), "max_length": 96,
           "dataset": {"path": dataset, "format": fmt, "split": "train[:8]"},
           "eval": {"set": "sft-open-questions"}, "trials": [trial], **extra}
    if stage == "dpo":
        raw["from"] = "t-sft:best"
    return parse_sweep(yaml.safe_load(yaml.safe_dump(raw)), "test", "", None).trial_specs(start)[0]


MEMORISE = {"name": "m", "r": 16, "alpha": 32, "dropout": 0.0, "lr": 1.0e-2, "batch_size": 8, "epochs": 20,
            "warmup_ratio": 0.0, "scheduler": "constant", "target_modules": ["q_proj", "v_proj", "gate_proj",
                                                                              "down_proj"]}


def train(recipe_cls, spec, store):
    recipe = recipe_cls(spec, store)
    recipe.setup()
    recipe.train()
    history = list(recipe.trainer.state.log_history)
    peft_model, trainer = recipe.trainer.model, recipe.trainer
    recipe.save()
    return recipe, trainer, peft_model, history


def losses(history):
    return [e["loss"] for e in history if "loss" in e]


# Tests that are about the store or TRL's settings, not about the model's tokenizer or weights: one family is enough.
LLAMA_ONLY = pytest.mark.parametrize("tiny_family", ["llama"], indirect=True)


@pytest.fixture(scope="module")
def sft_trained(tiny_family, tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("store"))
    spec = sweep_spec(tiny_family, "sft", MEMORISE, str(DATA / "instructions-local" / "train.jsonl"), "instruction",
                      prompt_format="instruction")
    recipe, trainer, model, history = train(SFTRecipe, spec, store)
    yield spec, store, trainer, model, history
    recipe.cleanup()


def test_sft_loss_is_on_response_tokens_only(sft_trained):
    spec, _, trainer, _, _ = sft_trained
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        # Instruction prompts are plain text: BOS first where the tokenizer adds one (TinyLlama), none where it
        # adds none (SmolLM2: <|im_start|> is only ever written by its chat template).
        assert (ids[0].item() == tok.bos_token_id) == (model_family(spec.model) == "llama")
        scored = ids[labels != -100]
        text = tok.decode(scored)
        assert "### Instruction" not in text and "### Response" not in text
        assert scored[-1].item() == tok.eos_token_id, "the answer must end with EOS so generation stops"
        first_scored = int((labels != -100).nonzero().min())
        assert tok.decode(ids[:first_scored]).rstrip().endswith("### Response:")


def test_sft_memorises_and_changes_the_adapter(sft_trained):
    spec, store, trainer, model, history = sft_trained
    curve = losses(history)
    vocab = len(trainer.processing_class)
    # A random model starts near ln(vocab): ln(32000) = 10.4 (llama), ln(2048) = 7.6 (chatml).
    assert curve[0] > math.log(vocab) - 1.4, f"first loss {curve[0]} vs ln({vocab}) = {math.log(vocab):.2f}"
    assert curve[-1] < 0.5 * curve[0], f"loss did not fall on 8 memorisable rows: {curve}"
    b_norms = [p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n]
    assert b_norms and all(v > 0 for v in b_norms), "every lora_B moved away from its zero init"
    prefix = f"{spec.sweep}/{spec.trial_id}"
    marker = store.verify_marker(f"{prefix}/{TRAINED}")
    assert f"{prefix}/adapter/adapter_model.safetensors" in marker["files"]
    record = store.read_json(f"{prefix}/train.json")
    assert record["train_tokens"] > 0 and record["tokens_per_s"] > 0 and record["peak_memory_gb"] > 0
    assert record["versions"]["trl"] and record["trainable_params"] > 0 and record["steps"] == 20


@LLAMA_ONLY
def test_a_trained_trial_is_skipped_unless_its_stored_adapter_is_damaged(sft_trained, tmp_path, caplog):
    """`python -m trainer` on a trial the store holds skips it; once the adapter no longer matches its _TRAINED
    checksum (what made the evaluation fail), a retried attempt trains it again and the store verifies."""
    import shutil

    from finesweep import exitcodes
    from trainer.__main__ import train as train_command

    spec, store, _, _, _ = sft_trained
    copy = LocalStore(shutil.copytree(store.root, tmp_path / "store"))
    adapter = f"{spec.sweep}/{spec.trial_id}/adapter/adapter_model.safetensors"
    before = copy.read_bytes(adapter)
    with caplog.at_level("INFO", logger="finesweep"):
        assert train_command(spec, copy, force=False) == exitcodes.OK
    assert "already trained" in caplog.text and copy.read_bytes(adapter) == before

    caplog.clear()
    copy.write_bytes(adapter, before[: len(before) // 2])  # cut short, as a broken upload or a bad disk would
    with pytest.raises(Exception, match="checksum differs"):
        copy.verify_marker(f"{spec.sweep}/{spec.trial_id}/{TRAINED}")
    with caplog.at_level("INFO", logger="finesweep"):
        assert train_command(spec, copy, force=False) == exitcodes.OK
    assert "fails its _TRAINED checksums" in caplog.text and "training again" in caplog.text
    marker = copy.verify_marker(f"{spec.sweep}/{spec.trial_id}/{TRAINED}")
    assert adapter in marker["files"] and len(copy.read_bytes(adapter)) == len(before)


def test_gradient_checkpointing_still_trains_the_adapter(tiny_family, tmp_path):
    trial = {**MEMORISE, "epochs": 6, "gradient_checkpointing": "on"}
    spec = sweep_spec(tiny_family, "sft", trial, str(DATA / "instructions-local" / "train.jsonl"), "instruction")
    recipe, trainer, model, history = train(SFTRecipe, spec, LocalStore(tmp_path))
    try:
        assert trainer.args.gradient_checkpointing and model.base_model.model.is_gradient_checkpointing
        assert all(p.abs().sum().item() > 0 for n, p in model.named_parameters() if "lora_B" in n)
        curve = losses(history)
        assert curve[-1] < curve[0] - 1.0, curve
    finally:
        recipe.cleanup()


PREFS = str(DATA / "preferences-local" / "train.jsonl")


def _mean(values):
    return sum(values) / len(values)


def test_dpo_reference_is_the_sft_model_and_accuracy_rises(sft_trained, tiny_family):
    from evaluator.scoring import preference_scores, sequence_logprobs
    from trainer.modeling import load_base_model
    from trainer.runtime import detect_hardware
    from trainer.sequences import dpo_pair

    sft_spec, store, _, _, _ = sft_trained
    store.write_json(f"{sft_spec.sweep}/best.json", {"trial_id": sft_spec.trial_id})
    trial = {"name": "d", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 5.0e-3, "beta": 0.1, "batch_size": 4,
             "epochs": 4, "warmup_ratio": 0.0, "scheduler": "constant"}
    spec = sweep_spec(tiny_family, "dpo", trial, PREFS, "preference", start=StartRef(sft_spec.sweep,
                                                                                       sft_spec.trial_id))
    recipe = DPORecipe(spec, store)
    recipe.setup()
    trainer = recipe.trainer
    from trainer.data import load_splits, render_dpo

    raw_train, _ = load_splits(spec.dataset, spec.hyper)
    tok, model = trainer.processing_class, trainer.model
    pairs = [dpo_pair(tok, p["prompt"], p["chosen"], p["rejected"], 96)
             for p in render_dpo(raw_train, tok, spec.prompt_format)]

    # The SFT adapter really changed the weights the DPO policy starts from ...
    base = load_base_model(str(tiny_family), detect_hardware())
    sft_lp = sequence_logprobs(model, tok, [pairs[0][0]], 1)[0][0]
    base_lp = sequence_logprobs(base, tok, [pairs[0][0]], 1)[0][0]
    assert abs(sft_lp - base_lp) > 1.0
    before = preference_scores(model, tok, pairs, 4, spec.hyper.beta, reference=model.disable_adapter)["rows"]
    recipe.train()
    history = trainer.state.log_history
    # ... and at step 1 the policy equals the reference: the reference is the SFT model, not the raw base.
    first = next(e for e in history if "loss" in e)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    after = preference_scores(model, tok, pairs, 4, spec.hyper.beta, reference=model.disable_adapter)["rows"]
    assert _mean(before["preference_accuracy"]) == 0.0
    assert _mean(before["reward_margin"]) == pytest.approx(0.0, abs=1e-6)
    assert _mean(after["preference_accuracy"]) >= 0.8 and _mean(after["reward_margin"]) > 0, after
    assert _mean(after["logp_preference_accuracy"]) >= _mean(before["logp_preference_accuracy"])
    recipe.save()
    recipe.cleanup()
    assert store.exists(f"{spec.sweep}/{spec.trial_id}/{TRAINED}")


@LLAMA_ONLY
def test_dpo_trains_with_the_sweeps_lora_dropout(sft_trained, tiny_family):
    """Regression (issue 10, bug 6): TRL's DPOConfig.disable_dropout=True silently zeroed LoRA dropout in every
    DPO trial after PEFT built it; the sweep's dropout now runs, and train.json says what ran."""
    from trainer.recipe import effective_lora_dropout

    sft_spec, store, _, _, _ = sft_trained
    trial = {"name": "drop", "r": 8, "alpha": 16, "dropout": 0.15, "lr": 5.0e-3, "beta": 0.1, "batch_size": 4,
             "max_steps": 1}
    spec = sweep_spec(tiny_family, "dpo", trial, PREFS, "preference", start=StartRef(sft_spec.sweep,
                                                                                       sft_spec.trial_id))
    recipe = DPORecipe(spec, store)
    recipe.setup()
    try:
        assert effective_lora_dropout(recipe.trainer.model) == [0.15]
        recipe.train()
        recipe.save()
        record = store.read_json(f"{spec.sweep}/{spec.trial_id}/train.json")
        assert record["lora_dropout_effective"] == [0.15]
        assert record["rows"]["kept"] + record["rows"]["dropped_by_max_length"] == record["rows"]["train"]
    finally:
        recipe.cleanup()
