"""Every dataset adapter reads rows in its real schema: the project's fixtures and, where present, the real
files in ../shared/data. Prompts render the same way for training and evaluation."""

from __future__ import annotations

import gzip
import json

import pytest

from finesweep.prompts import render_prompt, user_turn
from finesweep.spec import DatasetSpec, Hyper
from trainer.data import (DatasetError, load_split, load_splits, parse_hh_dialogue, render_dpo, render_sft,
                          resolve_source)

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
    # A plain folder in ../shared/data/gsm8k's layout (train.jsonl, test.jsonl): split by file name, no configs.
    (DatasetSpec(str(DATA / "gsm8k-local"), "gsm8k"), 6),
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


def test_one_resolution_for_every_kind_of_source():
    """resolve_source says how the loader reads a reference: a local JSON(L) file row by row, a Parquet/CSV file
    or a builder through its reader, a folder with its config and splits, a Hub id as it is (not looked up)."""
    cases = [
        (DatasetSpec(str(DATA / "instructions-local" / "train.jsonl"), "instruction"), "json-file", None, ("train",)),
        (DatasetSpec(str(DATA / "gsm8k" / "main" / "train-00000-of-00001.parquet"), "gsm8k"), "file", None,
         ("train",)),
        (DatasetSpec("json", "instruction", data_files=[str(DATA / "instructions-local" / "train.jsonl")]),
         "builder", None, ("train",)),
        (DatasetSpec(str(DATA / "gsm8k-local"), "gsm8k"), "folder", None, ("train", "test")),
        (DatasetSpec(str(DATA / "gsm8k"), "gsm8k", name="main"), "folder", "main", ("train",)),
        (DatasetSpec(str(DATA / "hh-rlhf"), "hh-rlhf", name="harmless-base"), "folder", "harmless-base", ("train",)),
        (DatasetSpec("databricks/databricks-dolly-15k", "dolly"), "hub", None, ()),
    ]
    for spec, kind, config, splits in cases:
        src = resolve_source(spec, "train")
        assert (src.kind, src.config, src.splits) == (kind, config, splits), spec.path
        assert src.local == (kind != "hub")
    assert len(load_split(cases[2][0], "train[:3]")) == 3  # the json builder with data_files


def test_the_hub_default_config_is_ignored_by_local_sources_but_a_chosen_name_is_refused():
    """eval.benchmark's default name `main` is openai/gsm8k's: a local file or folder without it reads as it is.
    A name the sweep chose (dataset.name has no default) must exist: a local source without it is refused, with
    the field and the fix, by the loader itself."""
    folder = DatasetSpec(str(DATA / "gsm8k-local"), "gsm8k", split="test", name="main")
    src = resolve_source(folder, "test", default_name="main")
    assert (src.config, src.ignored_name) == (None, "main")
    assert len(load_split(folder, "test", default_name="main")) == 5
    with pytest.raises(DatasetError) as err:
        load_split(folder, "test")  # `main` chosen by the sweep: refused
    assert err.value.field == "name" and "remove `name:`" in err.value.fix
    # A folder with configs and a default one (hh-rlhf: all): the default name it lacks gives way to its own
    # default; a chosen name it lacks is refused, listing its configs.
    hh = DatasetSpec(str(DATA / "hh-rlhf"), "hh-rlhf", name="main")
    src = resolve_source(hh, "train", default_name="main")
    assert (src.config, src.ignored_name) == (None, "main")
    with pytest.raises(DatasetError) as err:
        resolve_source(hh, "train")
    assert err.value.field == "name" and "all, harmless-base, helpful-base" in err.value.fix


def test_loader_errors_name_the_field_and_the_fix():
    one_file = DatasetSpec(str(DATA / "instructions-local" / "train.jsonl"), "instruction", split="test")
    with pytest.raises(DatasetError) as err:
        load_splits(one_file)
    assert err.value.field == "split" and "split 'train'" in err.value.fix and "Fix: " in str(err.value)
    sliced = DatasetSpec(str(DATA / "gsm8k-local"), "gsm8k", split="train", test_split="test[9:]")
    with pytest.raises(DatasetError) as err:
        load_splits(sliced)
    assert err.value.field == "test_split" and "test has 5 rows" in err.value.problem
    assert "test_split: test[:2]" in err.value.fix


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
