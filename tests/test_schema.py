"""jobs/sweep.schema.json: generated from finesweep.spec (never stale), every shipped sweep validates against it,
and it agrees with the validator wherever a schema can say the rule (keys, types, choices)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from finesweep import schema as generator
from finesweep import spec as S
from finesweep.spec import SweepError, load_sweeps, read_yaml

from .conftest import ROOT
from .test_sweeps import BAD, BASE

SCHEMA_FILE = ROOT / "jobs" / "sweep.schema.json"
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=./sweep.schema.json"


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_accepts(validator, text: str) -> bool:
    return validator.is_valid(read_yaml(text, "case.yaml"))


def finesweep_accepts(tmp_path: Path, text: str) -> bool:
    path = tmp_path / "case.yaml"
    path.write_text(text)
    try:
        load_sweeps(path)
    except SweepError:
        return False
    return True


def test_committed_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text() == generator.render(), (
        "jobs/sweep.schema.json is stale: run .venv/bin/python -m finesweep.schema > jobs/sweep.schema.json")


def test_every_top_level_key_and_type_field_is_in_the_schema():
    """New keys flow in: every SWEEP_KEYS entry and every field of the sweep dataclasses has a property."""
    built = generator.build_schema()
    defs = built["definitions"]
    assert set(defs["sweep"]["properties"]) == set(S.SWEEP_KEYS)
    for cls in generator.BUILT:
        assert set(defs[cls.__name__]["properties"]) == {f.name for f in dataclasses.fields(cls)}
    assert "Checked by finesweep only" in built["description"]


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_shipped_sweep_validates_and_points_at_the_schema(path, validator):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# make submit SWEEP=") and MODELINE in lines[:3]
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(
        read_yaml(path.read_text(), str(path)))]
    assert not errors, errors


# Each bad case of tests/test_sweeps.py: True where the schema can reject it too, else why it cannot.
CROSS_FIELD = "a range or cross-field rule (validator only)"
BAD_VERDICTS = {
    "trials: [{r: 0}]": CROSS_FIELD, "trials: [{r: -4}]": CROSS_FIELD,
    "trials: [{target_modules: []}]": CROSS_FIELD, "trials: [{target_modules: [q_prj]}]": True,
    "trials: [{lr: fast}]": True, "trials: [{lr: 0}]": CROSS_FIELD, "trials: [{batch_size: 2.5}]": True,
    "trials: [{dropout: 1.5}]": CROSS_FIELD, "trials: [{epochs: 0}]": CROSS_FIELD,
    "trials: [{learning_rate: 1.0e-4}]": True, "trials: [{r: 8}]\nmax_lenght: 256": True,
    "trials: [{r: 8}]\nmax_length: 4": CROSS_FIELD, "trials: [{r: 8}]\nselect: {metric: accuracy}": True,
    "trials: [{r: 8}]\nname: Bad_Name": True, "trials: [{r: 8}]\nfrom: sft:best": True,
    "trials: []": CROSS_FIELD, "trials: [{r: 8}, {r: 8}]\ngrid: {r: []}": True,
    "trials: [{name: a}, {name: a}]": CROSS_FIELD,
}


@pytest.mark.parametrize("extra,field,fix", BAD, ids=[b[1] + ":" + b[0][:30] for b in BAD])
def test_schema_agrees_on_the_validators_bad_cases(tmp_path, validator, extra, field, fix):
    assert extra in BAD_VERDICTS, f"new bad case {extra!r}: say in BAD_VERDICTS whether the schema can reject it"
    text = BASE + extra + "\n"
    assert not finesweep_accepts(tmp_path, text)
    if BAD_VERDICTS[extra] is True:
        assert not schema_accepts(validator, text), f"the schema accepts what finesweep rejects at {field}"
    else:  # the schema cannot say it, so it must let it through to the validator (and says so)
        assert schema_accepts(validator, text)


SFT = BASE + "trials: [{r: 8}]\n"
DPO = SFT.replace("stage: sft", "stage: dpo").replace("format: dolly", "format: hh-rlhf")
# (text, accepted by both?) : keys, types and choices at every level, the stage-dependent rules, and the forms
# the validator accepts that a naive schema would not (text numbers, a bare string for a list, nulls).
CASES = [
    (SFT, True),
    (SFT + "prompt_format: instruction\nmax_parallel: 2\n", True),
    (SFT + "prompt_format: markdown\n", False),
    (SFT.replace("stage: sft", "stage: ppo"), False),
    (SFT.replace("model: build/tiny-llama\n", ""), False),
    (SFT + "colour: blue\n", False),
    (SFT.replace("format: dolly}", "format: dolly, splits: train}"), False),
    (SFT.replace("format: dolly}", "format: dolly, data_files: a.jsonl, name: null}"), True),
    (SFT.replace("format: dolly}", "format: hh-rlhf}"), False),  # a DPO format in an SFT sweep
    (SFT.replace("format: dolly}", "format: dolly, test_fraction: '0.1'}"), True),
    (SFT.replace("format: dolly}", "format: dolly, seed: 4.5}"), False),
    (SFT.replace("{set: sft-open-questions}", "{set: sft-open-questions, batch: 4}"), False),
    (SFT.replace("{set: sft-open-questions}", "{set: sft-open-questions, extra_sets: math-word-problems}"), True),
    (SFT.replace("{set: sft-open-questions}", "{set: sft-open-questions, benchmark: {rows: 10}}"), True),
    (SFT.replace("{set: sft-open-questions}", "{set: sft-open-questions, benchmark: {rowz: 10}}"), False),
    (SFT.replace("{set: sft-open-questions}", "{set: sft-open-questions, max_new_tokens: many}"), False),
    (SFT + "select: {metric: bleu, mode: max, tie_break: chrf}\n", True),
    (SFT + "select: {metric: bleu, mode: up}\n", False),
    (SFT + "select: {metric: bleu, guardrails: [{metric: refusal_rate, min: base}, {metric: chrf, max: 90}]}\n",
     True),
    (SFT + "select: {metric: bleu, guardrails: [{metric: refusal_rate, min: baseline}]}\n", False),
    (SFT + "select: {metric: bleu, guardrails: [{metrik: chrf, min: 1}]}\n", False),
    (BASE + "defaults: {target_modules: q_proj, lr: 2e-4}\ntrials: [{name: 7}]\n", True),
    (BASE + "defaults:\ntrials: [{scheduler: cosine, gradient_checkpointing: 'on'}]\n", True),
    (BASE + "trials: [{scheduler: exponential}]\n", False),
    (BASE + "trials: [{gradient_checkpointing: sometimes}]\n", False),
    (BASE + "trials: [{r: eight}]\n", False),
    (BASE + "trials: [{train_rows: null, test_rows: 10}]\n", True),
    (BASE + "trials: [{name: -bad}]\n", False),
    (BASE + "grid: {r: [4, 8], lr: [1.0e-4, 3e-4]}\n", True),
    (BASE + "grid: {rank: [4, 8]}\n", False),
    (BASE + "grid: {scheduler: [cosine, step]}\n", False),
    (DPO + "from: sft:best\n", True),
    (DPO + "from: sft:sft-0123456789\n", True),
    (DPO, False),  # a DPO sweep without `from:`
    (DPO + "from: sft\n", False),
    (DPO.replace("format: hh-rlhf", "format: dolly") + "from: sft:best\n", False),
    ("pipeline:\n" + textwrap.indent("- " + SFT.replace("\n", "\n  ").rstrip() + "\n  name: a\n", "  "), True),
    ("pipeline:\n" + textwrap.indent("- " + SFT.replace("\n", "\n  ").rstrip() + "\n", "  "), False),  # no name
    ("pipeline: []\n", False),
    ("pipeline:\n" + textwrap.indent("- " + SFT.replace("\n", "\n  ").rstrip() + "\n  name: a\n", "  ")
     + "stage: sft\n", False),
    ("- just\n- a list\n", False),
]
if hasattr(S, "SEARCH_KEYS"):  # the search issue's keys, as far as they exist here
    CASES += [
        (SFT + "search: {budget: 4, space: {lr: {low: 1.0e-5, high: 1.0e-3, log: true}}}\n", True),
        (SFT + "search: {budget: 4, space: {lr: {low: 1.0e-5, high: 1.0e-3, logg: true}}}\n", False),
        (SFT + "search: {budget: 4, space: {rank: {choices: [4, 8]}}}\n", False),
        (SFT + "search: {budget: 4, method: annealing, space: {r: {choices: [4, 8]}}}\n", False),
        (SFT + "search: {budget: 4, colour: 1, space: {r: {choices: [4, 8]}}}\n", False),
    ]


@pytest.mark.parametrize("text,accepted", CASES, ids=[f"{i}-{'ok' if c[1] else 'bad'}" for i, c in enumerate(CASES)])
def test_schema_and_validator_agree(tmp_path, validator, text, accepted):
    assert finesweep_accepts(tmp_path, text) is accepted, text
    assert schema_accepts(validator, text) is accepted, text


def test_every_choice_the_schema_offers_is_one_the_validator_takes(tmp_path, validator):
    """The enums come from spec's constants, except gradient_checkpointing (a literal in _check_hyper)."""
    raw = yaml.safe_load(SFT)
    for value in generator.GRADIENT_CHECKPOINTING:
        raw["trials"] = [{"gradient_checkpointing": value}]
        text = yaml.safe_dump(raw)
        assert finesweep_accepts(tmp_path, text) and schema_accepts(validator, text), value
    props = generator.build_schema()["definitions"]["Hyper"]["properties"]
    assert props["gradient_checkpointing"] == {"enum": list(generator.GRADIENT_CHECKPOINTING)}
