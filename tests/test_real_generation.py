"""Generation and trial-start checks on the real SmolLM2-135M-Instruct (build/smollm2-135m-instruct): its answers
end at <|im_end|> (eos = pad, id 2, from its generation_config and its tokenizer alike), an answer that runs out of
max_new_tokens is counted and warned about, its ChatML template ends a turn with the EOS TRL appends, and its
8,192 positions bound max_length. About half a minute on 2 CPU cores (16 new tokens for 2 prompts)."""

from __future__ import annotations

import logging

import pytest

from finesweep.prompts import render_prompt, user_turn

pytestmark = pytest.mark.real_model


def test_real_answers_stop_at_im_end_and_answers_cut_by_the_limit_are_counted(real_model, caplog):
    from evaluator.scoring import generate
    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.runtime import detect_hardware

    tok = load_tokenizer(str(real_model))
    model = load_base_model(str(real_model), detect_hardware()).eval()
    prompts = [render_prompt(tok, "chat", user_turn(q)) for q in (
        "What is the capital of France? Answer with one word.",   # "The capital of France is Paris." and stops
        "Write a long essay about the history of Rome.")]         # does not stop within 16 tokens
    with caplog.at_level(logging.WARNING, logger="finesweep"):
        answers, record = generate(model, tok, prompts, max_new_tokens=16, batch_size=2)
    assert record["stop_token_ids"] == [2] and record["stop_tokens"] == ["<|im_end|>"]
    assert "Paris" in answers[0] and "<|im_" not in answers[0] and "\nuser" not in answers[0]
    assert record["hit_limit"] == 1 and record["hit_limit_rows"] == [1]
    assert answers[1] and record["new_tokens"] < 32  # the first answer ends before its 16 tokens
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 of 2 generations reached max_new_tokens=16 without a stop token" in warning
    assert "eval.max_new_tokens" in warning


def test_real_model_passes_the_trial_start_checks(real_model, tmp_path):
    import yaml

    from finesweep.spec import parse_sweep
    from trainer.modeling import ModelError, check_trial_model

    def spec(max_length):
        raw = yaml.safe_load(f"""
            stage: sft
            model: {real_model}
            dataset: {{path: tests/fixtures/datasets/instructions-local/train.jsonl, format: instruction}}
            max_length: {max_length}
            eval: {{set: sft-open-questions}}
            trials: [{{name: t, r: 4}}]
        """)
        return parse_sweep(raw, "t.yaml", "", "t").trial_specs()[0]

    assert check_trial_model(spec(512)) == {"max_length": 512, "max_position_embeddings": 8192,
                                            "turn_end": "<|im_end|>"}
    with pytest.raises(ModelError, match="max_length 16384 is longer than .*max_position_embeddings 8192"):
        check_trial_model(spec(16384))
