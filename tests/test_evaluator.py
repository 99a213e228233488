"""Metrics are right on known inputs, and the trust checks catch what the users hit: adapters that did not
load, adapters that change nothing, and different trials with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch

from evaluator import metrics
from evaluator.evaluate import load_evalset
from evaluator.report import find_warnings
from trainer.modeling import AdapterError, load_adapter_checked, load_base_model
from trainer.runtime import detect_hardware


def test_bleu_chrf_with_bootstrap_interval_and_signature():
    refs = ["The Eiffel Tower is 330 metres tall and opened in 1889.", "Water boils at 100 degrees Celsius."]
    perfect = metrics.bleu_chrf(refs, refs, n_bootstrap=100)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["rows"] == 2 and "nrefs:1" in perfect["bleu_signature"] and "version:" in perfect["bleu_signature"]
    worse = metrics.bleu_chrf(["The tower is tall.", "Water is wet."], refs, n_bootstrap=100)
    assert worse["bleu"] < 50 and worse["chrf"] < perfect["chrf"]
    low, high = worse["bleu_ci95"]
    assert 0 <= low <= high


def test_repetition_refusal_and_final_number():
    assert metrics.repetition_rate("the cat sat on the mat today") == 0.0
    assert metrics.repetition_rate("I am here. " * 20) > 0.8
    assert metrics.is_refusal("I'm sorry, but I can't help with making weapons.")
    assert metrics.is_refusal("I cannot assist with that request.")
    assert not metrics.is_refusal("Sure! Here is a haiku about autumn leaves.")
    assert metrics.final_number("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert metrics.final_number("So the answer is 1,250 dollars") == "1250"
    assert metrics.final_number("No digits here") is None
    assert metrics.math_accuracy(["it is 12", "#### 5"], ["12", "6"]) == {"rows": 2, "math_accuracy": 0.5}


def test_shipped_eval_sets():
    sft = load_evalset("sft-open-questions")
    dpo = load_evalset("dpo-mixed-prompts")
    math = load_evalset("math-word-problems")
    assert len(sft) == 10 and all(any(c.isdigit() for c in r["reference"]) for r in sft)
    assert len(dpo) == 12 and sum(bool(r["harmful"]) for r in dpo) == 3
    assert {r["category"] for r in dpo} >= {"explanation", "list", "haiku", "code", "translation", "harmful"}
    assert all(metrics.final_number(r["reference"]) == r["answer"] for r in math)
    with pytest.raises(FileNotFoundError, match="sft-open-questions"):
        load_evalset("no-such-set")


def _save_adapter(model_dir, out, init_b: str):
    from peft import get_peft_model

    from finesweep.spec import Hyper
    from trainer.recipe import lora_config

    model = load_base_model(str(model_dir), detect_hardware())
    peft_model = get_peft_model(model, lora_config(Hyper(r=4, alpha=8)))
    if init_b == "random":
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def test_trained_adapter_loads_and_changes_logits(tiny_model, tmp_path):
    from evaluator.scoring import max_logit_diff
    from trainer.modeling import load_tokenizer

    adapter = _save_adapter(tiny_model, tmp_path / "ok", "random")
    model, report = load_adapter_checked(load_base_model(str(tiny_model), detect_hardware()), adapter)
    assert report["missing_keys"] == [] and report["lora_B_nonzero"] == report["lora_modules"] == 4
    tok = load_tokenizer(str(tiny_model))
    assert max_logit_diff(model, tok, ["Hello there"], model.disable_adapter) > 0


def test_untrained_adapter_is_rejected(tiny_model, tmp_path):
    """A zero lora_B is exactly the base model: the 'trained' model the users scored was the base."""
    adapter = _save_adapter(tiny_model, tmp_path / "zero", "zero")
    with pytest.raises(AdapterError, match="every lora_B is zero"):
        load_adapter_checked(load_base_model(str(tiny_model), detect_hardware()), adapter)


def test_adapter_missing_weights_is_rejected(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = _save_adapter(tiny_model, tmp_path / "partial", "random")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lacks 1 LoRA weights"):
        load_adapter_checked(load_base_model(str(tiny_model), detect_hardware()), adapter)


def _row(name, answers, stage="sft", changes=True):
    return {"name": name, "stage": stage, "state": "done",
            "eval": {"sets": {"s": {"fingerprint": metrics.output_fingerprint(answers)}},
                     **({"trust": {"adapter_changes_outputs": changes}} if stage != "base" else {})}}


def test_identical_outputs_across_trials_are_flagged():
    rows = [_row("base", ["a", "b"], stage="base"), _row("t1", ["x", "y"]), _row("t3", ["x", "y"]),
            _row("t2", ["a", "b"]), _row("t4", ["p", "q"], changes=False)]
    warnings = find_warnings(rows, "s")
    assert any("t1, t3" in w and "cannot tell them apart" in w for w in warnings), warnings
    assert any("base, t2" in w and "did not change its answers" in w for w in warnings), warnings
    assert any(w.startswith("t4:") and "changes no logit" in w for w in warnings), warnings
    assert not any("t4" in w and "identical" in w for w in warnings)
    assert find_warnings([_row("t1", ["x"]), _row("t2", ["y"])], "s") == []


def test_eval_json_states_rows_and_generation_config(tmp_path, tiny_model):
    """One real evaluation of the base model: every figure says how many rows it is over."""
    import yaml

    from evaluator.evaluate import evaluate_trial
    from finesweep.spec import parse_sweep
    from finesweep.store import DONE, LocalStore

    raw = yaml.safe_load(f"""
        stage: sft
        model: {tiny_model}
        dataset: {{path: tests/fixtures/datasets/databricks-dolly-15k, format: dolly, test_fraction: 0.25}}
        eval: {{set: sft-open-questions, extra_sets: [math-word-problems], max_new_tokens: 8, batch_size: 12,
               heldout_rows: 5, bootstrap_samples: 50}}
        trials: [{{r: 4}}]
    """)
    sweep = parse_sweep(raw, "t.yaml", "", "t")
    (base,) = sweep.reference_specs()
    store = LocalStore(tmp_path)
    result = evaluate_trial(base, store)
    assert store.verify_marker(f"t/{base.trial_id}/{DONE}")
    main = result["sets"]["sft-open-questions"]
    assert main["rows"] == 10 and main["generation"]["do_sample"] is False
    assert main["generation"]["max_new_tokens"] == 8 and main["generation"]["batch_size"] == 12
    assert result["sets"]["math-word-problems"]["math_accuracy"] is not None
    assert result["heldout"]["rows"] == 5 and result["heldout"]["perplexity"] > 1
    assert result["summary"]["eval_rows"] == 10 and result["summary"]["heldout_rows"] == 5
    samples = [json.loads(line) for line in (tmp_path / "t" / base.trial_id / "samples.jsonl").open()]
    assert len(samples) == 22 and {s["set"] for s in samples} == {"sft-open-questions", "math-word-problems"}


def test_gsm8k_benchmark_row_and_per_row_data(tmp_path, tiny_model):
    """A math sweep's real benchmark: exact match of the final number on GSM8K's test split (the real file in
    ../shared/data), with per-row data for intervals, and every per-row metric on ids shared by all rows."""
    import yaml

    from evaluator.evaluate import evaluate_trial
    from finesweep.spec import parse_sweep
    from finesweep.store import LocalStore

    from .conftest import shared_file

    gsm8k_test = shared_file("gsm8k", "test.jsonl")
    raw = yaml.safe_load(f"""
        stage: sft
        model: {tiny_model}
        dataset: {{path: {gsm8k_test}, format: gsm8k, split: "train[:40]", test_fraction: 0.25}}
        max_length: 128
        eval: {{set: math-word-problems, max_new_tokens: 8, batch_size: 12, heldout_rows: 6,
               bootstrap_samples: 50, benchmark: {{path: {gsm8k_test}, rows: 5, max_new_tokens: 8}}}}
        trials: [{{r: 4}}]
    """)
    (base,) = parse_sweep(raw, "t.yaml", "", "t").reference_specs()
    result = evaluate_trial(base, LocalStore(tmp_path))
    bench = result["benchmark"]
    assert bench["rows"] == 5 and 0.0 <= bench["gsm8k_accuracy"] <= 1.0
    per_row = result["per_row"]
    assert per_row["gsm8k_accuracy"]["kind"] == "binary" and len(per_row["gsm8k_accuracy"]["values"]) == 5
    assert result["summary"]["gsm8k_accuracy_rows"] == 5
    # GSM8K rows of 128 tokens: some held-out rows lose their EOS (cut) and the counts say so.
    held = result["heldout"]
    assert held["rows"] + held["dropped"] == 6 and held["cut"] >= 1
    assert len(per_row["heldout_loss"]["ids"]) == held["rows"]
    lp, n = zip(*per_row["heldout_loss"]["values"])
    assert result["summary"]["heldout_loss"] == pytest.approx(-sum(lp) / sum(n), abs=1e-3)
    assert set(per_row) >= {"bleu", "chrf", "ref_perplexity", "repetition_rate", "math_accuracy",
                            "heldout_perplexity", "heldout_loss", "gsm8k_accuracy"}
