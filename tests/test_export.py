"""finesweep export: a DPO trial (on its SFT start) comes out as a merged model that plain transformers loads
and that reproduces base + adapters; a wrong merge fails the check and leaves no folder that looks finished;
what cannot be exported is one line and exit 2."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from finesweep import selection
from finesweep.spec import SelectSpec, StartRef
from finesweep.store import DONE, TRAINED, LocalStore
from submitter.__main__ import main
from trainer import export
from trainer.sft import SFTRecipe
from trainer.dpo import DPORecipe

from .test_training import DATA, PREFS, sweep_spec, train

EVAL = {"set": "sft-open-questions", "max_new_tokens": 4, "heldout_rows": 0, "bootstrap_samples": 50}
FAST = {"r": 8, "alpha": 16, "dropout": 0.0, "batch_size": 4, "max_steps": 3, "warmup_ratio": 0.0,
        "scheduler": "constant"}


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A 3-step SFT trial and a 3-step DPO trial on top of it, both evaluated (done), best.json for each."""
    from evaluator.evaluate import evaluate_trial

    root = tmp_path_factory.mktemp("export-store")
    store = LocalStore(root)
    sft = sweep_spec(tiny_model, "sft", {"name": "s", "lr": 1.0e-2, **FAST},
                     str(DATA / "instructions-local" / "train.jsonl"), "instruction", eval=EVAL)
    recipe, *_ = train(SFTRecipe, sft, store)
    recipe.cleanup()
    evaluate_trial(sft, store)
    store.write_json(f"{sft.sweep}/best.json", {"trial_id": sft.trial_id, "name": sft.name})
    dpo = sweep_spec(tiny_model, "dpo", {"name": "d", "lr": 5.0e-3, "beta": 0.1, **FAST}, PREFS, "preference",
                     start=StartRef(sft.sweep, sft.trial_id), eval=EVAL)
    recipe, *_ = train(DPORecipe, dpo, store)
    recipe.cleanup()
    evaluate_trial(dpo, store)
    # The selection record the submitter writes (finesweep.selection.choose), for the model card.
    row = {"name": dpo.name, "trial_id": dpo.trial_id, "stage": "dpo", "state": "done",
           "eval": store.read_json(f"{dpo.sweep}/{dpo.trial_id}/eval.json")}
    best = selection.choose([row], SelectSpec(metric="chrf", mode="max", tie_break="ref_perplexity"), n_boot=50)
    assert best["trial_id"] == dpo.trial_id and best["validation_ids"]
    store.write_json(f"{dpo.sweep}/best.json", best)
    return store, sft, dpo


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def test_export_best_dpo_trial_reproduces_base_plus_adapters(trained, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.modeling import build_model, load_base_model

    store, sft, dpo = trained
    out = tmp_path / "exported"
    assert main(["export", dpo.sweep, "best", "--store", store.url, "--out", str(out)]) == 0
    assert out.is_dir() and not (tmp_path / "exported.partial").exists()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
                 "export.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    # The adapter alone is byte for byte the trained one, and the start chain's adapter is there too.
    prefix = f"{dpo.sweep}/{dpo.trial_id}"
    marker = store.verify_marker(f"{prefix}/{TRAINED}")
    stored = store.read_bytes(f"{prefix}/adapter/adapter_model.safetensors")
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == stored
    assert f"{prefix}/adapter/adapter_model.safetensors" in marker["files"]
    start = out / "start_adapters" / f"01-{sft.sweep}-{sft.trial_id}" / "adapter_model.safetensors"
    assert start.read_bytes() == store.read_bytes(f"{sft.sweep}/{sft.trial_id}/adapter/adapter_model.safetensors")

    record = json.loads((out / "export.json").read_text())
    check = record["check"]
    # The tolerance comes from the model: its own fp32 noise (vs fp64) on the compared positions, times a safety
    # factor, floored at a few ulps of the logits' scale; recorded with how it was derived.
    assert 0 < check["fp32_noise"] < 1e-4 and check["logit_scale"] > 0
    assert check["tolerance"] == pytest.approx(max(export.NOISE_SAFETY * check["fp32_noise"],
                                                   export.ULP_FLOOR * export.FP32_EPS * check["logit_scale"]))
    assert "fp32 noise" in check["tolerance_rule"] and "ulps" in check["tolerance_rule"]
    assert check["max_abs_diff"] <= check["tolerance"] < 1e-4 and check["prompts"] == export.CHECK_PROMPTS
    # Only the positions after the template's fixed prefix ("<s><|user|>\n" for TinyLlama's) are compared.
    assert 0 < check["template_prefix_tokens"] < min(check["tokens"])
    assert check["compared_positions"] == sum(t - check["template_prefix_tokens"] for t in check["tokens"])
    assert check["own_adapter_effect"] > 100 * check["tolerance"], "a missing or mis-scaled adapter must show"
    assert check["max_abs_diff_vs_base"] > 1e-2, "the adapters must move logits, or the check proves nothing"
    # The base model's generation config, with only the evaluation's settings changed (and recorded).
    generation = record["generation_config"]
    assert generation["source"] == "the base model's generation_config.json"
    assert generation["changed"]["max_new_tokens"] == {"base": None, "export": 4}
    assert "bos_token_id" not in generation["changed"] and generation["stop_tokens"] == ["</s>"]

    # Independently of the export's own check: plain transformers, the chat template it shipped, the prompt
    # the evaluator would render, against base + SFT merged + DPO adapter built the evaluator's way.
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and tok.pad_token_id is not None
    prompt = export.check_prompts(dpo, tok, 1)[0]
    assert prompt.rstrip().endswith("<|assistant|>"), "rendered with the sweep's prompt format (chat)"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    reference, loaded = build_model(dpo, store, export.CPU_FP32, tmp_path / "ref", with_own_adapter=True)
    base = load_base_model(loaded["base"], export.CPU_FP32, dtype=torch.float32).eval()
    got, want, plain = _logits(merged, ids), _logits(reference.float().eval(), ids), _logits(base, ids)
    assert (got - want).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-2
    assert merged.generation_config.do_sample is False and merged.generation_config.max_new_tokens == 4
    base_generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert all(getattr(merged.generation_config, k) == v for k, v in base_generation.items()
               if k != "transformers_version"), "the base model's own settings (bos, eos, pad) are kept"

    card = (out / "README.md").read_text()
    for text in (dpo.trial_id, sft.trial_id, f"{dpo.sweep}/{dpo.name}", "## Hyperparameters", "| beta | 0.1 |",
                 "preferences-local", "95% interval", "| bleu |", "Why this trial (best.json)", "by chrf (max)",
                 "x fp32 noise", "measured against the same model in fp64", "stop tokens `</s>`",
                 "max_new_tokens unset -> 4", "| transformers |"):
        assert text in card, text
    assert '"validation_ids"' not in card
    # A bootstrap interval per metric, from eval.json's per-row data.
    assert record["intervals"]["ref_perplexity"]["ci"][0] <= record["intervals"]["ref_perplexity"]["value"]

    # The same folder to a store: every file, then the marker listing them with checksums.
    target = LocalStore(tmp_path / "published")
    export.publish_to_store(out, target)
    assert target.verify_marker(export.EXPORTED)["files"].keys() >= {"model.safetensors", "adapter/adapter_config.json"}
    with pytest.raises(export.ExportError, match="already holds an export"):
        export.publish_to_store(out, target)


def test_a_wrong_merge_fails_the_check_and_leaves_no_finished_folder(trained, tmp_path, monkeypatch, caplog):
    """The DPO trial exported without its own adapter (only the SFT start merged): exit 1, no DIR."""
    store, sft, dpo = trained
    original = export.merged_model

    def forgets_own_adapter(spec, chain, store, workdir):
        return original(chain[-1], chain[:-1], store, workdir)

    monkeypatch.setattr(export, "merged_model", forgets_own_adapter)
    out = tmp_path / "exported"
    with caplog.at_level(logging.ERROR, logger="finesweep"):
        assert main(["export", dpo.sweep, dpo.name, "--store", store.url, "--out", str(out)]) == 1
    assert not out.exists()
    assert (tmp_path / "exported.partial" / "model.safetensors").is_file()
    assert not (tmp_path / "exported.partial" / "README.md").exists(), "no model card for an unchecked model"
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "logit check failed" in message and "> tolerance" in message and "fp32 noise" in message
    assert "exported.partial" in message
    # A second run starts over from a clean partial folder and succeeds once the merge is right.
    monkeypatch.setattr(export, "merged_model", original)
    assert main(["export", dpo.sweep, dpo.trial_id, "--store", store.url, "--out", str(out)]) == 0
    assert out.is_dir() and not (tmp_path / "exported.partial").exists()


def test_a_mis_scaled_adapter_fails_the_check(trained, tmp_path, monkeypatch):
    """A merge whose own adapter is scaled wrongly (10% too strong, e.g. a wrong alpha/r) is refused: the
    tolerance derived from the model's noise is far below what a mis-scaled adapter moves."""
    from trainer.modeling import fetch_adapter, load_adapter_checked

    store, sft, dpo = trained

    def mis_scaled(spec, chain, store, workdir):
        model = export.load_base_model(chain[0].model if chain else spec.model, export.CPU_FP32,
                                       dtype=torch.float32)
        folders = []
        for trial in [*chain, spec]:
            folder = fetch_adapter(store, trial, workdir / "adapters")
            peft_model, _ = load_adapter_checked(model, folder)
            if trial is spec:
                with torch.no_grad():
                    for name, p in peft_model.named_parameters():
                        if "lora_B" in name:
                            p.mul_(1.1)
            model = peft_model.merge_and_unload()
            folders.append(folder)
        return model, folders

    monkeypatch.setattr(export, "merged_model", mis_scaled)
    with pytest.raises(export.ExportCheckError, match=r"logit check failed: .* > tolerance .*fp32 noise"):
        export.export_trial(store, dpo.sweep, dpo.name, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_template_prefix_is_what_every_prompt_shares(tiny_model):
    """The compared positions start at the user's content: TinyLlama's template puts "<s><|user|>\n" first."""
    from trainer.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    spec = sweep_spec(tiny_model, "sft", {"name": "p"}, str(DATA / "instructions-local" / "train.jsonl"),
                      "instruction")
    n = export.template_prefix_tokens(spec, tok)
    prompts = [tok(p)["input_ids"] for p in export.check_prompts(spec, tok, 3)]
    assert all(p[:n] == prompts[0][:n] for p in prompts) and n == len(tok("<|user|>\n")["input_ids"])
    assert tok.decode(prompts[0][n:]).startswith(export.load_evalset(spec.eval.set)[0]["prompt"].strip()[:10])


def test_a_wrong_reference_fails_the_check(trained, tmp_path):
    """check_export compares for real: the SFT trial's export checked as if it were the DPO trial fails."""
    store, sft, dpo = trained
    out = tmp_path / "sft"
    export.export_trial(store, sft.sweep, "best", str(out))
    with pytest.raises(export.ExportCheckError, match="logit check failed"):
        export.check_export(dpo, store, out, tmp_path / "work", 2)


def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_what_cannot_be_exported_is_one_line_and_exit_2(trained, tmp_path, caplog, capsys):
    store, sft, dpo = trained
    copy = tmp_path / "store"
    shutil.copytree(store.url, copy)
    (copy / sft.sweep / sft.trial_id / DONE).unlink()
    (copy / dpo.sweep / "best.json").unlink()
    exists = tmp_path / "exists"
    exists.mkdir()
    cases = [
        ([sft.sweep, "best"], f"trial {sft.sweep}/{sft.name} ({sft.trial_id}) is trained, not done"),
        ([dpo.sweep, "best"], f"sweep '{dpo.sweep}' has no best trial in store"),
        ([dpo.sweep, "nope"], f"sweep '{dpo.sweep}' has no trial 'nope'"),
        (["smoke", "best"], "has no trained trial of sweep 'smoke'"),
        ([dpo.sweep, dpo.name, "--out", str(exists)], f"--out {exists} already exists"),
    ]
    for args, expected in cases:
        caplog.clear()
        argv = ["export", *args, "--store", str(copy)] + ([] if "--out" in args else ["--out", str(tmp_path / "o")])
        with caplog.at_level(logging.ERROR, logger="finesweep"):
            assert main(argv) == 2, args
        (message,) = _errors(caplog)
        assert expected in message and "Fix: " in message and "\n" not in message, message
        assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_export_of_a_smollm2_shaped_model_keeps_its_tied_head_and_skips_the_system_prompt(tiny_chatml_model,
                                                                                         tmp_path):
    """The chatml tiny model is shaped like SmolLM2 (tied embeddings, pad = eos = <|im_end|>, no BOS on plain
    text, a template that injects a default system prompt): its export passes the check, compares only what
    follows the injected system prompt and the user header, and stores the tied head once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from evaluator.evaluate import evaluate_trial
    from trainer.modeling import load_tokenizer

    store = LocalStore(tmp_path / "store")
    sft = sweep_spec(tiny_chatml_model, "sft", {"name": "c", "lr": 1.0e-2, **FAST},
                     str(DATA / "instructions-local" / "train.jsonl"), "instruction", eval=EVAL)
    recipe, *_ = train(SFTRecipe, sft, store)
    recipe.cleanup()
    evaluate_trial(sft, store)
    out = tmp_path / "exported"
    check = export.export_trial(store, sft.sweep, sft.name, str(out))["check"]
    assert check["max_abs_diff"] <= check["tolerance"] < check["own_adapter_effect"]
    tok = load_tokenizer(str(tiny_chatml_model))
    header = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False).split("X", 1)[0]
    assert "<|im_start|>system\n" in header and check["template_prefix_tokens"] == len(tok(header)["input_ids"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert merged.generation_config.eos_token_id == merged.generation_config.pad_token_id == 2


def test_export_keeps_the_base_generation_config_and_changes_only_the_evaluations_settings(tiny_model, tmp_path):
    """A base model that samples and stops on an end-of-turn id as well as EOS: the export keeps its stop ids and
    its other settings, turns it greedy with the evaluation's max_new_tokens, unsets what greedy never reads (else
    transformers refuses to save it), records every change, and saves."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from trainer.modeling import load_tokenizer

    base = GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=2, do_sample=True, temperature=0.7,
                            top_p=0.9, repetition_penalty=1.1, max_new_tokens=512)
    spec = sweep_spec(tiny_model, "sft", {"name": "g"}, str(DATA / "instructions-local" / "train.jsonl"),
                      "instruction", eval={"set": "sft-open-questions", "max_new_tokens": 64})
    config, record = export.export_generation_config(SimpleNamespace(generation_config=base),
                                                     load_tokenizer(str(tiny_model)), spec)
    assert record["changed"] == {"do_sample": {"base": True, "export": False},
                                 "num_beams": {"base": None, "export": 1},
                                 "max_new_tokens": {"base": 512, "export": 64},
                                 "use_cache": {"base": None, "export": True},
                                 "temperature": {"base": 0.7, "export": None},
                                 "top_p": {"base": 0.9, "export": None}}
    assert record["stop_token_ids"] == [2, 7] and record["source"] == "the base model's generation_config.json"
    assert (config.eos_token_id, config.bos_token_id, config.repetition_penalty) == ([2, 7], 1, 1.1)
    assert base.do_sample is True, "the base model's own config is not modified"
    config.save_pretrained(tmp_path)  # strict validation: no sampling-only setting left on a greedy config
    assert GenerationConfig.from_pretrained(tmp_path).do_sample is False
