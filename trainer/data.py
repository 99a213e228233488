"""Dataset loading through `datasets.load_dataset`, with one adapter per real schema.

Each adapter maps a raw row to a normalized row:
    SFT: {"messages": [...ending with a user turn], "response": str}
    DPO: {"messages": [...], "chosen": str, "rejected": str}
`render_*` then turns normalized rows into the prompt/completion text TRL trains on.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from finesweep.prompts import render_prompt, user_turn
from finesweep.spec import DatasetSpec, Hyper


log = logging.getLogger("finesweep")


class DatasetError(ValueError):
    pass


# Fields each schema needs, for the error a wrong file gets.
REQUIRED_FIELDS = {
    "dolly": ("instruction", "context", "response"),
    "grade-school-math": ("INSTRUCTION", "RESPONSE"),
    "gsm8k": ("question", "answer"),
    "instruction": ("prompt", "response"),
    "ultrafeedback": ("instruction", "chosen_response", "rejected_response"),
    "hh-rlhf": ("chosen", "rejected"),
    "preference": ("prompt", "chosen", "rejected"),
}

# A few real dialogues start a turn after two spaces instead of a blank line ("...later?  Human: ...").
_HH_TURN = re.compile(r"(?:\n\n|  )(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{'role': 'user', ...}, {'role': 'assistant', ...}]."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DatasetError(f"not an HH-RLHF dialogue (expected '\\n\\nHuman: ...' turns): {text[:80]!r}")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def _hh_row(row: dict) -> dict:
    chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
    if (chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant" or len(chosen) < 2
            or chosen[-2]["role"] != "user"):
        return _dropped("no user turn before the final answer")
    # Both dialogues must share every turn but the last answer: that history is the prompt. A few real rows
    # differ earlier, and pairing their answers with either history would train on a wrong prompt.
    if chosen[:-1] != rejected[:-1]:
        return _dropped("chosen and rejected dialogues differ before the final answer")
    if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
        return _dropped("empty chosen or rejected answer")
    return {"messages": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _dropped(reason: str) -> dict:
    """A row the adapter cannot use: kept out of training and counted by reason (normalize)."""
    return {"messages": [], "chosen": "", "rejected": "", "drop": reason}


ADAPTERS: dict[str, Callable[[dict], dict]] = {
    "dolly": lambda r: {"messages": user_turn(r["instruction"], r.get("context") or ""), "response": r["response"]},
    "grade-school-math": lambda r: {"messages": user_turn(r["INSTRUCTION"]), "response": r["RESPONSE"]},
    "gsm8k": lambda r: {"messages": user_turn(r["question"]), "response": r["answer"]},
    "instruction": lambda r: {"messages": user_turn(r["prompt"]), "response": r["response"]},
    "ultrafeedback": lambda r: {"messages": user_turn(r["instruction"]), "chosen": r["chosen_response"],
                                "rejected": r["rejected_response"]},
    "hh-rlhf": _hh_row,
    "preference": lambda r: {"messages": user_turn(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]},
}


def bad_field(row: dict, name: str) -> bool:
    value = row.get(name)
    return not isinstance(value, str) or (name != "context" and not value.strip())


def read_local_json(path: Path, split: str, fmt: str, source: str):
    """A local JSON/JSONL(.gz) file, read and checked row by row before Arrow sees it: pyarrow's JSON reader
    (under load_dataset) crashes the process or silently casts numbers to text on some malformed files, and
    its errors name no row. Only the fields the format uses are kept. The file is the split "train"."""
    import gzip
    import json

    from datasets import Dataset, ReadInstruction

    required = REQUIRED_FIELDS[fmt]
    rows, line_no = [], 0
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
            if ".jsonl" in path.suffixes:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        rows.append(json.loads(line))
            else:
                data = json.load(f)
                rows = data if isinstance(data, list) else data.get("data", data) if isinstance(data, dict) else data
    except UnicodeDecodeError as err:
        raise DatasetError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{source}: line {line_no or err.lineno}: not valid JSON ({err.msg})") from None
    except OSError as err:
        raise DatasetError(f"{source}: cannot be read ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{source}: expected one JSON object per row")
    missing = [f for f in required if all(f not in r for r in rows)]
    if missing:
        raise DatasetError(f"{source}: format {fmt!r} needs fields {', '.join(required)}; missing "
                           f"{', '.join(missing)}")
    for i, row in enumerate(rows):
        for name in required:
            if bad_field(row, name):
                raise DatasetError(f"{source}: row {i}: field {name!r} is empty or not text")
    try:
        ds = Dataset.from_list([{name: row[name] for name in required} for row in rows])
    except (UnicodeEncodeError, ValueError) as err:  # lone surrogates and the like
        raise DatasetError(f"{source}: text Arrow cannot store ({type(err).__name__}: {str(err)[:200]})") from None
    if len(ds) == 0:
        raise DatasetError(f"{source}: has no rows")
    try:
        (instruction,) = ReadInstruction.from_spec(split).to_absolute({"train": len(ds)})
    except (ValueError, KeyError) as err:
        raise DatasetError(f"{source}: split {split!r}: a single local file is the split 'train' ({err})") from None
    return ds.select(range(instruction.from_, instruction.to))


def load_split(spec: DatasetSpec, split: str):
    """`datasets.load_dataset` for a Hub id, a local folder, or a local Parquet/CSV file; local JSON(L) files
    go through read_local_json."""
    from datasets import load_dataset

    from finesweep.staging import local_source

    kwargs: dict[str, Any] = {}
    path = local_source("datasets", spec.path)  # the store's staged copy when there is one
    local = Path(path)
    suffixes = "".join(local.suffixes[-2:])
    if local.is_file() and "json" in suffixes and not spec.data_files:
        return read_local_json(local, split, spec.format, f"{spec.path}[{split}]")
    if local.is_file():
        builder = next((b for ext, b in (("parquet", "parquet"), ("csv", "csv"), ("json", "json"))
                        if ext in suffixes), None)
        if builder is None:
            raise DatasetError(f"{path}: cannot tell the file type; use .jsonl, .json, .parquet or .csv")
        path, kwargs["data_files"] = builder, str(local)
    if spec.name:
        kwargs["name"] = spec.name
    if spec.data_files:
        kwargs["data_files"] = list(spec.data_files)
    try:
        ds = load_dataset(path, split=split, **kwargs)
    except (ConnectionError, TimeoutError):
        raise  # transient: the Job retries it
    except Exception as err:  # noqa: BLE001 - bad JSON, bad encoding, empty files, Arrow casts: all the data's fault
        cause = err.__cause__ or err
        raise DatasetError(f"dataset {spec.path!r} split {split!r} could not be loaded: "
                           f"{type(cause).__name__}: {str(cause)[:300]}") from err
    if len(ds) == 0:
        raise DatasetError(f"dataset {spec.path!r} split {split!r} has no rows")
    return ds


def normalize(ds, fmt: str, source: str, report: dict | None = None):
    """Apply the schema adapter; a row missing a field fails with the row number and the expected fields."""
    required = REQUIRED_FIELDS[fmt]
    missing = [f for f in required if f not in ds.column_names]
    if missing:
        raise DatasetError(f"{source}: format {fmt!r} needs fields {', '.join(required)}; "
                           f"missing {', '.join(missing)} (columns: {', '.join(ds.column_names)})")
    adapter = ADAPTERS[fmt]

    def convert(row, idx):
        for name in required:
            if bad_field(row, name):
                raise DatasetError(f"{source}: row {idx}: field {name!r} is empty or not text")
        try:
            return {"drop": "", **adapter(row)}
        except DatasetError as err:
            raise DatasetError(f"{source}: row {idx}: {err}") from None

    try:
        out = ds.map(convert, with_indices=True, remove_columns=ds.column_names, desc=f"normalize {fmt}")
    except UnicodeDecodeError as err:  # bytes that are not UTF-8 inside a text field
        raise DatasetError(f"{source}: text is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    reasons = Counter(r for r in out["drop"] if r)
    kept = out.filter(lambda r: not r["drop"], desc="drop malformed rows").remove_columns("drop")
    for reason, count in sorted(reasons.items()):
        log.warning("%s: dropped %d of %d rows: %s", source, count, len(out), reason)
    if report is not None:
        report.setdefault("dropped", {})
        for reason, count in reasons.items():
            report["dropped"][reason] = report["dropped"].get(reason, 0) + count
    return kept


def load_splits(spec: DatasetSpec, hyper: Hyper | None = None, report: dict | None = None):
    """(train, test or None) normalized rows, the same for the trainer and the evaluator. `report`, when
    given, receives the rows dropped by reason ({"dropped": {reason: count}})."""
    source = f"{spec.path}[{spec.split}]"
    train = normalize(load_split(spec, spec.split), spec.format, source, report)
    test = None
    if spec.test_split:
        test = normalize(load_split(spec, spec.test_split), spec.format, f"{spec.path}[{spec.test_split}]",
                         report)
    if spec.min_answer_chars and "chosen" in train.column_names:
        keep = (lambda r: len(r["chosen"]) > spec.min_answer_chars and len(r["rejected"]) > spec.min_answer_chars)
        train = train.filter(keep, desc="drop short answers")
        test = test.filter(keep, desc="drop short answers") if test is not None else None
    if spec.test_fraction:
        if len(train) < 2:
            raise DatasetError(f"{source}: {len(train)} rows cannot be split into train and test")
        parts = train.train_test_split(test_size=spec.test_fraction, seed=spec.seed)
        train, test = parts["train"], parts["test"]
    if hyper is not None:
        if hyper.train_rows:
            train = train.select(range(min(hyper.train_rows, len(train))))
        if hyper.test_rows and test is not None:
            test = test.select(range(min(hyper.test_rows, len(test))))
    if len(train) == 0:
        raise DatasetError(f"{source}: no training rows left (check split, filters and train_rows)")
    return train, test


def render_sft(ds, tokenizer, prompt_format: str):
    return ds.map(lambda r: {"prompt": render_prompt(tokenizer, prompt_format, r["messages"]),
                             "completion": r["response"]},
                  remove_columns=ds.column_names, desc="render prompts")


def render_dpo(ds, tokenizer, prompt_format: str):
    return ds.map(lambda r: {"prompt": render_prompt(tokenizer, prompt_format, r["messages"]),
                             "chosen": r["chosen"], "rejected": r["rejected"]},
                  remove_columns=ds.column_names, desc="render prompts")
