"""Every dataset adapter reads rows in its real schema: the project's fixtures and, where present, the real
files in ../shared/data. Prompts render the same way for training and evaluation."""

from __future__ import annotations

import gzip
import json

import pytest

from finesweep.prompts import render_prompt, user_turn
from finesweep.spec import DatasetSpec, Hyper
from trainer.data import DatasetError, load_splits, parse_hh_dialogue, render_dpo, render_sft

from .conftest import FIXTURES, shared_file

DATA = FIXTURES / "datasets"

CASES = [
    # (spec, expected train rows) - paths and configs as a user would write them in a sweep
    (DatasetSpec(str(DATA / "databricks-dolly-15k"), "dolly"), 40),
    (DatasetSpec(str(DATA / "grade-school-math-instructions"), "grade-school-math"), 20),
    (DatasetSpec(str(DATA / "gsm8k"), "gsm8k", name="main"), 20),
    (DatasetSpec(str(DATA / "instructions-local" / "train.jsonl"), "instruction"), 20),
    (DatasetSpec(str(DATA / "ultrafeedback-binarized-preferences"), "ultrafeedback"), 30),
    (DatasetSpec(str(DATA / "hh-rlhf"), "hh-rlhf"), 30),
    (DatasetSpec(str(DATA / "preferences-local" / "train.jsonl"), "preference"), 20),
]


@pytest.mark.parametrize("spec,rows", CASES, ids=[c[0].format for c in CASES])
def test_adapter_reads_fixture_in_real_schema(spec, rows, tiny_model):
    from trainer.modeling import load_tokenizer

    train, test = load_splits(spec)
    assert len(train) == rows and test is None
    tok = load_tokenizer(str(tiny_model))
    first = train[0]
    assert first["messages"][-1]["role"] == "user" and first["messages"][-1]["content"].strip()
    if "chosen" in train.column_names:
        rendered = render_dpo(train, tok, "chat")
        assert set(rendered.column_names) == {"prompt", "chosen", "rejected"}
        assert all(r["chosen"] != r["rejected"] for r in rendered)
    else:
        rendered = render_sft(train, tok, "instruction")
        assert set(rendered.column_names) == {"prompt", "completion"}
        assert rendered[0]["prompt"].startswith("### Instruction:\n")
        assert rendered[0]["prompt"].endswith("### Response:\n")
        assert rendered[0]["completion"] == first["response"]


def test_dolly_context_goes_into_the_prompt():
    train, _ = load_splits(DatasetSpec(str(DATA / "databricks-dolly-15k"), "dolly"))
    raw = [json.loads(line) for line in (DATA / "databricks-dolly-15k" / "databricks-dolly-15k.jsonl").open()]
    with_context = next(i for i, r in enumerate(raw) if r["context"])
    assert raw[with_context]["context"].strip() in train[with_context]["messages"][0]["content"]


def test_hh_dialogue_split_into_history_and_final_answers():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the "
                     "chicken cross the road?",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: no"}
    from trainer.data import ADAPTERS

    out = ADAPTERS["hh-rlhf"](row)
    assert out["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Tell me a joke."}]
    assert out["chosen"] == "Why did the chicken cross the road?" and out["rejected"] == "no"
    with pytest.raises(DatasetError):
        parse_hh_dialogue("no speaker markers here")


def test_split_holds_out_the_same_rows_every_time():
    spec = DatasetSpec(str(DATA / "databricks-dolly-15k"), "dolly", test_fraction=0.25, seed=7)
    a_train, a_test = load_splits(spec)
    b_train, b_test = load_splits(spec)
    assert len(a_test) == 10 and len(a_train) == 30
    assert list(a_test["response"]) == list(b_test["response"])
    assert not set(a_test["response"]) & set(a_train["response"])
    capped_train, capped_test = load_splits(spec, Hyper(train_rows=5, test_rows=3))
    assert (len(capped_train), len(capped_test)) == (5, 3)


def test_slicing_split_and_short_answer_filter():
    spec = DatasetSpec(str(DATA / "hh-rlhf"), "hh-rlhf", split="train[:12]", test_split="train[20:]",
                       min_answer_chars=10)
    train, test = load_splits(spec)
    assert len(train) <= 12 and len(test) <= 10
    assert all(len(r["chosen"]) > 10 and len(r["rejected"]) > 10 for r in list(train) + list(test))


def test_row_missing_a_field_names_the_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DatasetError, match="needs fields prompt, response; missing response"):
        load_splits(DatasetSpec(str(path), "instruction"))
    path.write_text(json.dumps({"prompt": "hi", "response": ""}) + "\n")
    with pytest.raises(DatasetError, match="row 0: field 'response' is empty"):
        load_splits(DatasetSpec(str(path), "instruction"))


def test_chat_and_instruction_prompts(tiny_model):
    from trainer.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    chat = render_prompt(tok, "chat", user_turn("What is 2+2?"))
    assert chat == "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"  # TinyLlama: one newline after the tag
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Bye"}]
    assert render_prompt(tok, "instruction", history) == \
        "### Instruction:\nUser: Hi\nAssistant: Hello\nUser: Bye\n\n### Response:\n"


# --------------------------------------------------------------------------- real files in ../shared/data

def test_real_gsm8k_rows():
    path = shared_file("gsm8k", "train.jsonl")
    train, test = load_splits(DatasetSpec(str(path), "gsm8k", split="train[:200]", test_fraction=0.1))
    assert (len(train), len(test)) == (180, 20)
    assert all("####" in r["response"] for r in train)


def test_real_hh_rlhf_rows():
    path = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    with gzip.open(path, "rt") as f:
        total = sum(1 for _ in f)
    train, _ = load_splits(DatasetSpec(str(path), "hh-rlhf", min_answer_chars=10))
    assert 0.8 * total < len(train) <= total  # a few short answers dropped, the rest parsed
    for row in train.select(range(50)):
        assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "user"
        assert row["chosen"] != row["rejected"]
