"""finesweep export on the real SmolLM2-135M-Instruct (build/smollm2-135m-instruct): a correct merge passes the
logit check, whose tolerance comes from the model's own fp32 noise (a fixed 1e-4, tuned on the 2-layer tiny
model, refused correct SmolLM2 merges: 30 layers round more); a mis-scaled adapter is still refused; the export
keeps the tied embeddings and the base model's generation config.

One real SFT trial (2 steps of LoRA r=8 on all seven projections, on the fixture's short instruction rows) is
trained and evaluated once for the module; each export then takes about a minute on 2 CPU cores (merge, save
538 MB, reload, the reference in fp32 and fp64)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from finesweep.store import LocalStore
from trainer import export

from .test_training import DATA, sweep_spec

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
log = logging.getLogger("finesweep")

EVAL = {"set": "sft-open-questions", "max_new_tokens": 8, "batch_size": 10, "heldout_rows": 0,
        "bootstrap_samples": 50}
TRIAL = {"name": "real", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 1.0e-3, "batch_size": 4, "max_steps": 2,
         "warmup_ratio": 0.0, "scheduler": "constant",
         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture(scope="module")
def real_trained(real_model, tmp_path_factory):
    """A 2-step SFT trial of the real model, evaluated (done): what `finesweep export` takes."""
    from evaluator.evaluate import evaluate_trial
    from trainer.sft import SFTRecipe

    store = LocalStore(tmp_path_factory.mktemp("real-export-store"))
    spec = sweep_spec(real_model, "sft", TRIAL, str(DATA / "instructions-local" / "train.jsonl"), "instruction",
                      eval=EVAL, max_length=192, prompt_format="chat")
    SFTRecipe(spec, store).run()
    evaluate_trial(spec, store)
    return store, spec


def test_a_correct_export_of_the_real_model_passes_its_derived_tolerance(real_trained, real_model, tmp_path):
    from safetensors import safe_open

    store, spec = real_trained
    out = tmp_path / "exported"
    record = export.export_trial(store, spec.sweep, spec.name, str(out))
    check = record["check"]
    figures = {k: check[k] for k in ("fp32_noise", "tolerance", "max_abs_diff", "per_prompt_max_abs_diff",
                                     "own_adapter_effect", "undetectable_scale_error", "logit_scale",
                                     "template_prefix_tokens", "tokens", "compared_positions")}
    print("real export check:", json.dumps(figures))
    log.info("real export check: %s", json.dumps(figures))
    assert out.is_dir()
    assert check["max_abs_diff"] <= check["tolerance"] < check["own_adapter_effect"]
    assert check["tolerance"] == pytest.approx(max(export.NOISE_SAFETY * check["fp32_noise"],
                                                   export.ULP_FLOOR * export.FP32_EPS * check["logit_scale"]))
    # The real model's own fp32 rounding is far above the tiny model's (~1e-5): what a fixed bound missed.
    assert check["fp32_noise"] > 1e-5
    # The injected default system prompt and the headers around it (24 tokens) are the fixed prefix.
    assert check["template_prefix_tokens"] == len(real_prefix_ids(real_model)) == 24
    assert check["compared_positions"] == sum(t - check["template_prefix_tokens"] for t in check["tokens"])

    # Tied embeddings stay tied: the head is the embedding matrix, stored once.
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    # The base model's generation config (bos 1, eos = pad = <|im_end|> 2) with the evaluation's settings only.
    generation = json.loads((out / "generation_config.json").read_text())
    base = json.loads((real_model / "generation_config.json").read_text())
    assert {k: generation[k] for k in base if k != "transformers_version"} == {
        k: v for k, v in base.items() if k != "transformers_version"}
    assert generation["max_new_tokens"] == EVAL["max_new_tokens"] and generation.get("do_sample") is False
    assert set(record["generation_config"]["changed"]) <= {"do_sample", "num_beams", "max_new_tokens", "use_cache"}
    assert record["generation_config"]["stop_tokens"] == ["<|im_end|>"]


def test_a_mis_scaled_adapter_is_refused_on_the_real_model(real_trained, tmp_path, monkeypatch):
    """The adapter merged 10% too strong (a wrong alpha/r, say): refused, and no finished folder."""
    from trainer.modeling import fetch_adapter, load_adapter_checked

    store, spec = real_trained

    def mis_scaled(spec, chain, store, workdir):
        model = export.load_base_model(spec.model, export.CPU_FP32, dtype=torch.float32)
        folder = fetch_adapter(store, spec, workdir / "adapters")
        peft_model, _ = load_adapter_checked(model, folder)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.1)
        return peft_model.merge_and_unload(), [folder]

    monkeypatch.setattr(export, "merged_model", mis_scaled)
    with pytest.raises(export.ExportCheckError, match=r"logit check failed: .* > tolerance .*fp32 noise"):
        export.export_trial(store, spec.sweep, spec.name, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def real_prefix_ids(real_model) -> list[int]:
    """<|im_start|>system\\n{default system prompt}<|im_end|>\\n<|im_start|>user\\n, tokenized."""
    from trainer.modeling import load_tokenizer

    tok = load_tokenizer(str(real_model))
    text = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False)
    return tok(text.split("X", 1)[0])["input_ids"]
