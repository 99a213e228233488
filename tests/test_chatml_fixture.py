"""The chatml tiny model (trainer/tiny_model.py --family chatml) has SmolLM2-135M-Instruct's conventions, the ones
the TinyLlama-like fixture cannot exercise: ChatML with an injected system prompt, no BOS on plain text, pad = eos =
<|im_end|>, byte-level BPE, tied embeddings; and it builds the same bytes every time. tests/test_real_model.py checks
these facts against the real model's files."""

from __future__ import annotations

import hashlib
import json

import pytest

from finesweep.prompts import render_prompt, user_turn
from trainer.tiny_model import SMOLLM2_CHAT_TEMPLATE, SMOLLM2_DEFAULT_SYSTEM, SMOLLM2_SPECIAL_TOKENS, build

from .conftest import model_family

CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
CHATML_RENDERING = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok(tiny_chatml_model):
    from trainer.modeling import load_tokenizer

    return load_tokenizer(str(tiny_chatml_model))


def test_chatml_template_renders_smollm2s_format_and_injects_its_system_prompt(tok, tiny_chatml_model):
    assert model_family(tiny_chatml_model) == "chatml"
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == CHATML_RENDERING
    # No system message: SmolLM2's default one is written first, so every prompt starts with it.
    prompt = render_prompt(tok, "chat", user_turn("Say hello"))
    assert prompt == (f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
                      "<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n")
    # An assistant turn ends with the EOS TRL appends to completions, then a newline.
    full = tok.apply_chat_template(user_turn("Q") + [{"role": "assistant", "content": "A"}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nA" + tok.eos_token + "\n")


def test_chatml_tokenizer_adds_no_bos_and_pads_with_its_eos(tok):
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert [tok.convert_tokens_to_ids(t) for t in SMOLLM2_SPECIAL_TOKENS] == list(range(len(SMOLLM2_SPECIAL_TOKENS)))
    ids = tok("hello world")["input_ids"]
    assert ids == tok("hello world", add_special_tokens=False)["input_ids"], "nothing is added to plain text"
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    # The template's <|im_start|> and <|im_end|> are single special ids inside text, never spelled out in pieces.
    assert tok("<|im_start|>user\nHi<|im_end|>\n")["input_ids"][0] == 1
    assert tok("<|im_start|>user\nHi<|im_end|>\n")["input_ids"][-2] == 2
    # Byte-level BPE: any text round-trips, with no unknown token.
    text = "Ünïcödé 🙂 tabs\tand  spaces\n\n$12.50"
    assert tok.decode(tok(text)["input_ids"]) == text and tok.unk_token_id not in tok(text)["input_ids"]


def test_chatml_model_ties_its_output_head_to_the_embeddings(tiny_chatml_model):
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_chatml_model / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_chatml_model))
    assert model.lm_head.weight is model.get_input_embeddings().weight


def _digests(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_chatml_build_is_deterministic(tmp_path):
    a = build(tmp_path / "a", family="chatml")
    b = build(tmp_path / "b", family="chatml")
    assert _digests(a) == _digests(b)
    assert json.loads((a / "finesweep-tiny.json").read_text())["family"] == "chatml"
