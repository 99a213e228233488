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


# ------------------------------------------------------------------------------------------------ refusals

def test_refusals_with_typographic_apostrophes():
    """Chat models and people write "I’m sorry, I can’t" (U+2019) as often as the ASCII apostrophe."""
    for text in ("I’m sorry, I can’t help with that.", "I can‘t do that.", "Sorry, I won’t help.",
                 "Iʼm unable to assist with this request.", "I can`t help with that.", "I´m sorry, no.",
                 "I＇m not able to do that."):
        assert metrics.is_refusal(text), text
    assert not metrics.is_refusal("It’s a lovely day; here’s a haiku about it.")
    assert metrics.normalize_apostrophes("can’t ‘x’ ʼ ` ´ ′ ＇") == "can't 'x' ' ' ' ' '"


def test_refusals_in_hh_rlhf_harmless_chosen_answers():
    """The real harmless test split writes its apostrophes typographically: counted with them, the chosen
    answers that decline are 202 of 2,310, not 64 (a dialogue's last turn is its answer; 2 end with a user turn)."""
    import gzip

    from trainer.data import parse_hh_dialogue

    from .conftest import shared_file

    path = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        dialogues = [parse_hh_dialogue(json.loads(line)["chosen"]) for line in f]
    answers = [d[-1]["content"] for d in dialogues if d[-1]["role"] == "assistant"]
    assert len(dialogues) == 2312 and len(answers) == 2310
    ascii_only = sum(bool(metrics.REFUSAL_PATTERNS.search(a[:400])) for a in answers)
    assert (ascii_only, sum(map(metrics.is_refusal, answers))) == (64, 202)


# ------------------------------------------------------------------------------ generation and stop tokens

class _ScriptedModel:
    """Stands in for a causal LM whose generate() returns fixed new tokens per row (what a real model would
    produce for these ids), with its own generation_config; records the config generate was called with."""

    def __init__(self, rows, eos_token_id):
        from transformers import GenerationConfig

        self.rows, self.device = rows, torch.device("cpu")
        self.generation_config = GenerationConfig(eos_token_id=eos_token_id)
        self.configs = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.configs.append(generation_config)
        new = torch.tensor(self.rows[: len(input_ids)], dtype=torch.long)
        self.rows = self.rows[len(input_ids):]
        return torch.cat([input_ids, new], dim=1)


def test_generate_stops_at_any_stop_id_and_counts_answers_that_hit_the_limit(tiny_model, caplog):
    """Stop ids are the model's generation_config eos ids (an int or a list) plus the tokenizer's EOS; an answer
    is cut at the first of any; one with none ran out of max_new_tokens and is counted and warned about."""
    import logging

    from evaluator.scoring import generate
    from trainer.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    word = tok("hello", add_special_tokens=False)["input_ids"][0]
    turn_end = tok("world", add_special_tokens=False)["input_ids"][0]  # the model's own end-of-turn id
    eos = tok.eos_token_id
    rows = [[word, turn_end, word, word],  # stops on the model's end-of-turn id, not the tokenizer's EOS
            [word, word, eos, eos],        # stops on EOS; generate pads after it (pad == eos here)
            [word, word, word, word],      # no stop id: ran out of max_new_tokens
            [eos, eos, eos, eos]]          # an empty answer (stopped at once)
    model = _ScriptedModel(rows, eos_token_id=[turn_end])
    with caplog.at_level(logging.WARNING, logger="finesweep"):
        answers, record = generate(model, tok, ["a", "b", "c", "d"], max_new_tokens=4, batch_size=2)
    text = lambda n: tok.decode([word] * n, skip_special_tokens=True).strip()  # noqa: E731
    assert answers == [text(1), text(2), text(4), ""]
    assert sorted(model.configs[0].eos_token_id) == sorted({turn_end, eos})
    assert record["stop_token_ids"] == sorted({turn_end, eos}) and record["hit_limit"] == 1
    assert record["hit_limit_rows"] == [2] and record["new_tokens"] == 1 + 2 + 4 + 0
    assert record["model_generation_config"]["eos_token_id"] == [turn_end]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 of 4 generations reached max_new_tokens=4 without a stop token" in warning
    assert "raise eval.max_new_tokens" in warning and "eval.benchmark.max_new_tokens" in warning


def test_stop_ids_take_an_int_a_list_or_none():
    from types import SimpleNamespace

    from trainer.sequences import stop_token_ids

    tok = SimpleNamespace(eos_token_id=2)
    model = lambda eos: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))  # noqa: E731
    assert stop_token_ids(model(2), tok) == [2]
    assert stop_token_ids(model([7, 2]), tok) == [2, 7]
    assert stop_token_ids(model(None), tok) == [2]
    assert stop_token_ids(SimpleNamespace(), tok) == [2]


# ------------------------------------------------------------------------ the model, checked at trial start

def _tiny_copy(tiny_model, tmp_path, template: str | None = None, max_positions: int | None = None):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    if max_positions is not None:
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = max_positions
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# A ChatML template (turns end with <|im_end|>) on a tokenizer whose EOS is </s>: TRL would append </s>.
MISMATCHED_TEMPLATE = ("{% for m in messages %}"
                       "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_template_must_end_an_assistant_turn_with_eos(tiny_model, tmp_path):
    from trainer.modeling import ModelError, check_turn_end_is_eos, load_tokenizer

    assert check_turn_end_is_eos(load_tokenizer(str(tiny_model)), "tiny") == "</s>"
    folder = _tiny_copy(tiny_model, tmp_path, MISMATCHED_TEMPLATE)
    with pytest.raises(ModelError) as err:
        check_turn_end_is_eos(load_tokenizer(str(folder)), str(folder))
    message = str(err.value)
    for text in (f"model {folder}", "ends an assistant turn with '<|im_end|>", "eos_token is '</s>'",
                 "TRL appends", "Fix: ", "prompt_format: instruction"):
        assert text in message, (text, message)
    tok = load_tokenizer(str(folder))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ModelError, match="ends an assistant turn with nothing"):
        check_turn_end_is_eos(tok, "plain")


def _trial_spec(model, tmp_path, max_length=96, prompt_format="chat"):
    import yaml

    from finesweep.spec import parse_sweep, to_dict

    raw = yaml.safe_load(f"""
        stage: sft
        model: {model}
        prompt_format: {prompt_format}
        dataset: {{path: tests/fixtures/datasets/instructions-local/train.jsonl, format: instruction}}
        max_length: {max_length}
        eval: {{set: sft-open-questions}}
        trials: [{{name: t, r: 4, max_steps: 1}}]
    """)
    spec = parse_sweep(raw, "t.yaml", "", "t").trial_specs()[0]
    (tmp_path / "spec.json").write_text(json.dumps(to_dict(spec)))
    return spec


def test_a_trial_refuses_a_model_it_cannot_train_right(tiny_model, tmp_path, capsys, caplog, monkeypatch):
    """At trial start (before anything is built): a template ending turns with another token than the EOS, and
    max_length past the model's positions, are configuration errors: one line, exit 3, no traceback."""
    import logging
    import re

    from finesweep import exitcodes
    from trainer.__main__ import main as train_main
    from trainer.modeling import ModelError, check_trial_model
    from trainer.sft import SFTRecipe
    from finesweep.store import LocalStore

    assert check_trial_model(_trial_spec(tiny_model, tmp_path)) == {
        "max_length": 96, "max_position_embeddings": 1024, "turn_end": "</s>"}
    mismatched = _trial_spec(_tiny_copy(tiny_model, tmp_path / "a", MISMATCHED_TEMPLATE), tmp_path)
    with pytest.raises(ModelError, match=re.escape("ends an assistant turn with '<|im_end|>'")):
        SFTRecipe(mismatched, LocalStore(tmp_path / "store"))
    # The instruction format never renders the template, so the same model trains.
    assert "turn_end" not in check_trial_model(_trial_spec(mismatched.model, tmp_path, prompt_format="instruction"))

    short = _trial_spec(_tiny_copy(tiny_model, tmp_path / "b", max_positions=64), tmp_path, max_length=96)
    with pytest.raises(ModelError, match=r"max_length 96 is longer than model .* has positions for \(max_position_"
                                         r"embeddings 64 in its config.json\).*Fix: set max_length to 64"):
        check_trial_model(short)
    # The command's own logging setup points the root logger at this test's captured stdout, which is closed
    # after the test; caplog sees the same records without it.
    monkeypatch.setattr("trainer.runtime.setup_logging", lambda: None)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="finesweep"):
        code = train_main(["--spec", str(tmp_path / "spec.json"), "--store", str(tmp_path / "store")])
    assert code == exitcodes.CONFIG_ERROR
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "configuration error: max_length 96 is longer than model" in message and "\n" not in message
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
