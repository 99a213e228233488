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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finesweep.prompts import render_prompt, user_turn
from finesweep.spec import BenchmarkSpec, DatasetSpec, Hyper


log = logging.getLogger("finesweep")


class DatasetError(ValueError):
    """Data that cannot be used as the sweep names it. `field` is the setting at fault, relative to the dataset
    reference (path, name, split, test_split, data_files, format, test_fraction, min_answer_chars; "" for the
    reference as a whole: a local path that does not exist), and `fix` says what to change, so the preflight names
    the sweep file's field (dataset.split, eval.benchmark.name, dataset) around them and the trainer's error line
    carries the fix."""

    def __init__(self, problem: str, fix: str | None = None, field: str | None = None):
        self.problem, self.fix, self.field = problem, fix, field
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)


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


def read_local_json(path: Path, split: str, fmt: str, source: str, field: str = "split"):
    """A local JSON/JSONL(.gz) file, read and checked row by row before Arrow sees it: pyarrow's JSON reader
    (under load_dataset) crashes the process or silently casts numbers to text on some malformed files, and
    its errors name no row. Only the fields the format uses are kept. The file is the split "train"."""
    import gzip
    import json

    from datasets import Dataset, ReadInstruction

    required = REQUIRED_FIELDS[fmt]
    fix_data = "fix the file (one JSON object per line, UTF-8), or point `path` at the right file"
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
        raise DatasetError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})", fix_data, "path") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{source}: line {line_no or err.lineno}: not valid JSON ({err.msg})", fix_data,
                           "path") from None
    except (OSError, EOFError) as err:  # EOFError: a truncated .gz
        raise DatasetError(f"{source}: cannot be read ({err})", fix_data, "path") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{source}: expected one JSON object per row", fix_data, "path")
    missing = [f for f in required if all(f not in r for r in rows)]
    if missing:
        raise DatasetError(f"{source}: format {fmt!r} needs fields {', '.join(required)}; missing "
                           f"{', '.join(missing)}", _fix_format(fmt), "format")
    for i, row in enumerate(rows):
        for name in required:
            if bad_field(row, name):
                raise DatasetError(f"{source}: row {i}: field {name!r} is empty or not text",
                                   "give that row text in the field, or remove the row", "path")
    try:
        ds = Dataset.from_list([{name: row[name] for name in required} for row in rows])
    except (UnicodeEncodeError, ValueError) as err:  # lone surrogates and the like
        raise DatasetError(f"{source}: text Arrow cannot store ({type(err).__name__}: {str(err)[:200]})",
                           fix_data, "path") from None
    if len(ds) == 0:
        raise DatasetError(f"{source}: has no rows", "point `path` at a file with rows", "path")
    try:
        (instruction,) = ReadInstruction.from_spec(split).to_absolute({"train": len(ds)})
    except (ValueError, KeyError) as err:  # resolve_source refuses these first; kept for direct callers
        raise DatasetError(f"{source}: split {split!r}: a single local file is the split 'train' ({err})",
                           f"write `{field}: train` (slices work: `train[:1000]`)", field) from None
    if instruction.to <= instruction.from_:
        raise _empty_slice(source, split, {"train": len(ds)}, field)
    return ds.select(range(instruction.from_, instruction.to))


def _fix_format(fmt: str) -> str:
    """The fix for data whose columns do not fit `fmt`: the formats there are, by the fields each needs."""
    formats = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in REQUIRED_FIELDS.items() if name != fmt)
    return f"choose the `format` whose fields the data has ({formats}), or point `path` at data with those fields"


# ---------------------------------------------------------------------------------------- resolution
# One function says how a dataset reference of a sweep (dataset:, eval.benchmark:) is read: which file, folder,
# builder or Hub id, with which config name and split. The loader (load_split) reads exactly what it says, and the
# submitter's preflight (check_dataset, check_benchmark) runs the same loader on local sources before anything is
# submitted, so whatever the loader would refuse is refused there, naming the sweep field and the fix.

# Builders `datasets` ships, read from `data_files` (path: json, data_files: [a.jsonl]).
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
# What marks a name as a local path rather than a Hub id when nothing exists there (a typo, a missing folder).
LOCAL_PREFIXES = ("/", "./", "../", "build/", "tests/")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz")
_FILE_BUILDERS = (("parquet", "parquet"), ("csv", "csv"), ("json", "json"))


def looks_local(path: str) -> bool:
    """A name meant as a local file or folder (it need not exist), not a Hub id."""
    return path.startswith(LOCAL_PREFIXES) or path.endswith(LOCAL_SUFFIXES)


@dataclass(frozen=True)
class Source:
    """One dataset reference as the loader reads it (resolve_source)."""

    path: str  # as the sweep names it
    # json-file: a local JSON/JSONL(.gz) file, read row by row (read_local_json); file: a local Parquet/CSV file
    # (`target` is its builder, `data_files` the file); folder: a local folder of data files (a Hub snapshot, or
    # any folder: datasets reads train*/test* files as those splits); builder: json/csv/parquet with data_files;
    # hub: a Hub id, read by `datasets.load_dataset` and not checked before it is loaded (no network here).
    kind: str
    target: str  # what `load_dataset` is given (a local path: the store's staged copy when there is one)
    config: str | None  # the config name passed on (None: the source's default)
    data_files: Any
    split: str  # in datasets' slicing syntax, as read
    splits: tuple[str, ...] = ()  # the splits a local source has
    ignored_name: str | None = None  # a Hub default config name (eval.benchmark's `main`) a local source lacks

    @property
    def local(self) -> bool:
        return self.kind != "hub"


def _clip(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def split_names(split: str, field: str = "split") -> list[str]:
    """The split names in a split expression (`train[:5000]`, `train+test`); DatasetError when datasets would not
    parse it."""
    from datasets import ReadInstruction

    try:
        if any(c.isspace() for c in split):  # datasets' pattern lets a trailing newline through, its loader not
            raise ValueError("it contains whitespace")
        instruction = ReadInstruction.from_spec(split)
    except (ValueError, TypeError, AssertionError) as err:
        raise DatasetError(f"{_clip(split)} is not a split datasets can read ({' '.join(str(err).split())[:120]})",
                           f"write a split name, optionally sliced: `{field}: train`, `train[:5000]`, `train[10%:]`",
                           field) from None
    return [rel.splitname for rel in instruction._relative_instructions]


def resolve_source(spec: DatasetSpec, split: str, *, field: str = "split", default_name: str | None = None,
                   whole_file: bool = False) -> Source:
    """How `spec` is read for `split` (its field in the sweep: `field`), or DatasetError naming the field at
    fault and the fix. `default_name` is a config name the sweep gets by default (eval.benchmark's `main`, which
    openai/gsm8k needs): a local source without that config ignores it, while any other name a local source
    lacks is refused. `whole_file`: a single local file is read whole, whatever the split says (a benchmark file
    is the test split itself). Hub ids are not looked up (offline); only their split syntax is checked."""
    from finesweep.staging import local_source

    names = split_names(split, field)
    target = local_source("datasets", spec.path)  # the store's staged copy when there is one
    local = Path(target)
    name = spec.name or None
    if _is_file(local):
        return _resolve_file(spec, local, split, names, field, name, default_name, whole_file)
    if _is_dir(local):
        return _resolve_folder(spec, target, split, names, field, name, default_name)
    if spec.path in PACKAGED_BUILDERS:
        return _resolve_builder(spec, split, names, field, name)
    if looks_local(spec.path):  # field "": the reference as a whole (the preflight says `dataset:` as it always did)
        raise DatasetError(f"local data {_clip(spec.path)} does not exist (looked in {Path.cwd()})",
                           "fix the path (relative to the directory the command runs in: the project root under "
                           "make), stage it (finesweep stage), or name a Hub dataset id", "")
    return Source(spec.path, "hub", spec.path, name, list(spec.data_files) if spec.data_files else None, split)


def _no_configs(spec: DatasetSpec, what: str, name: str | None, default_name: str | None) -> str | None:
    """The config name a local source without configs ignores (the sweep's default), else None; DatasetError for
    a name the user chose."""
    if name is None:
        return None
    if name == default_name:
        return name
    raise DatasetError(f"{_clip(spec.path)} is {what}, which has no configs, so `name: {_clip(name)}` cannot be "
                       "chosen", "remove `name:` (a config name selects a subset of a Hub dataset)", "name")


def _check_split(spec: DatasetSpec, split: str, names: list[str], splits: tuple[str, ...], field: str,
                 fix: str) -> None:
    missing = [n for n in names if n not in splits]
    if missing and splits:
        raise DatasetError(f"{_clip(spec.path)} has no split {_clip(missing[0])} (its splits: {', '.join(splits)}; "
                           f"{field}: {_clip(split)})", fix, field)


def _resolve_file(spec, local: Path, split, names, field, name, default_name, whole_file) -> Source:
    if spec.data_files:
        raise DatasetError(f"`data_files` is set, but path {_clip(spec.path)} is a single file",
                           "remove `data_files` (the file is the data), or point `path` at the folder or builder "
                           "(json, parquet, csv) the data files belong to", "data_files")
    ignored = _no_configs(spec, "a single file", name, default_name)
    suffixes = "".join(local.suffixes[-2:])
    builder = next((b for ext, b in _FILE_BUILDERS if ext in suffixes), None)
    if builder is None:
        raise DatasetError(f"{_clip(spec.path)}: cannot tell the file type", "use a .jsonl, .json, .parquet or .csv "
                           "file (.jsonl.gz and .json.gz too)", "path")
    if whole_file:
        split, names = "train", ["train"]
    other = "test_fraction" if field == "test_split" else "test_split or test_fraction"
    _check_split(spec, split, names, ("train",), field,
                 f"a single file is the split 'train': write `{field}: train` (slices work: `train[:1000]`, "
                 f"`train[-200:]`), or hold rows out with {other}")
    kind, target, files = ("json-file", str(local), None) if builder == "json" and "json" in suffixes \
        else ("file", builder, str(local))
    return Source(spec.path, kind, target, None, files, split, ("train",), ignored)


def _resolve_folder(spec, target: str, split, names, field, name, default_name) -> Source:
    from datasets import get_dataset_config_names, get_dataset_default_config_name, load_dataset_builder

    files = list(spec.data_files) if spec.data_files else None
    at = "data_files" if files else "path"
    try:
        configs = get_dataset_config_names(target, data_files=files)
        default = get_dataset_default_config_name(target, data_files=files)
    except Exception as err:  # noqa: BLE001 - no data files, unreadable README metadata: the folder's fault
        raise DatasetError(f"local folder {_clip(spec.path)} cannot be read as a dataset ({type(err).__name__}: "
                           f"{str(err)[:200]})", "point `path` at a folder of .jsonl/.json/.parquet/.csv files (a "
                           "split per file name: train.jsonl, test.jsonl)" + (", and `data_files` at files in it"
                                                                             if files else ""), at) from None
    plain = configs == ["default"]  # data files only: no `configs:` in a README.md
    ignored = None
    if name is not None and name not in configs:
        if plain:
            ignored = _no_configs(spec, "a local folder of data files", name, default_name)
        elif name == default_name and default is not None:
            ignored = name
        else:
            raise DatasetError(f"local folder {_clip(spec.path)} has no config {_clip(name)} (its configs: "
                               f"{', '.join(configs)})", f"use `name:` one of {', '.join(configs)}", "name")
        name = None
    if name is None and default is None:
        raise DatasetError(f"local folder {_clip(spec.path)} has configs {', '.join(configs)} and no default one",
                           f"choose one with `name:` ({', '.join(configs)})", "name")
    try:
        builder = load_dataset_builder(target, name if not plain else None, data_files=files)
    except Exception as err:  # noqa: BLE001 - data files that are not there, a config that cannot be built
        raise DatasetError(f"local folder {_clip(spec.path)} cannot be read as a dataset ({type(err).__name__}: "
                           f"{str(err)[:200]})", "fix the folder's data files" + (" or `data_files`" if files
                                                                                  else ""), at) from None
    splits = tuple(str(s) for s in (builder.config.data_files or {}))
    _check_split(spec, split, names, splits, field,
                 f"use one of {', '.join(splits)}" + (" (or hold rows out with test_fraction)"
                                                      if field == "test_split" else ""))
    return Source(spec.path, "folder", target, None if plain else name, files, split, splits, ignored)


def _resolve_builder(spec, split, names, field, name) -> Source:
    from datasets import load_dataset_builder

    if not spec.data_files:
        raise DatasetError(f"path {spec.path!r} is datasets' {spec.path} reader, which needs the files to read",
                           f"list them in `data_files: [my-data.{spec.path}]`, or point `path` at the file", "data_files")
    try:
        builder = load_dataset_builder(spec.path, name, data_files=list(spec.data_files))
    except Exception as err:  # noqa: BLE001 - missing files above all
        raise DatasetError(f"data_files cannot be read by the {spec.path} reader ({type(err).__name__}: "
                           f"{str(err)[:200]})", "list files that exist (relative to the directory the command "
                           "runs in)", "data_files") from None
    splits = tuple(str(s) for s in (builder.config.data_files or {}))
    _check_split(spec, split, names, splits, field, f"use one of {', '.join(splits)}")
    return Source(spec.path, "builder", spec.path, name, list(spec.data_files), split, splits)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte, exists nowhere
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def load_split(spec: DatasetSpec, split: str, *, field: str = "split", default_name: str | None = None,
               whole_file: bool = False):
    """The rows of one split, read as resolve_source says: a local JSON(L) file row by row (read_local_json),
    anything else with `datasets.load_dataset`. DatasetError (with the field and the fix) for what cannot be
    used; a connection problem is raised as it is (transient: the Job retries it)."""
    from datasets import load_dataset

    src = resolve_source(spec, split, field=field, default_name=default_name, whole_file=whole_file)
    if src.ignored_name:
        log.info("%s: config name %r does not apply to the local %s; reading it as it is", spec.path,
                 src.ignored_name, "file" if src.kind in ("json-file", "file") else "folder")
    shown = f"{spec.path}[{src.split}]"
    if src.kind == "json-file":
        ds = read_local_json(Path(src.target), src.split, spec.format, shown, field)
    else:
        kwargs: dict[str, Any] = {}
        if src.config:
            kwargs["name"] = src.config
        if src.data_files:
            kwargs["data_files"] = src.data_files
        try:
            ds = load_dataset(src.target, split=src.split, **kwargs)
        except (ConnectionError, TimeoutError):
            raise  # transient: the Job retries it
        except Exception as err:  # noqa: BLE001 - bad JSON, bad encoding, empty files, Arrow casts: the data's fault
            sizes = _split_sizes(src, kwargs) if "[" in src.split else None
            if sizes is not None:  # datasets refuses a slice that selects nothing ("corresponds to no data")
                raise _empty_slice(shown, src.split, sizes, field) from None
            cause = err.__cause__ or err
            raise DatasetError(f"dataset {_clip(spec.path)} split {_clip(src.split)} could not be loaded: "
                               f"{type(cause).__name__}: {str(cause)[:300]}",
                               "fix the data named in the error" if src.local else
                               "check the Hub id, name and split (and HF_ENDPOINT / HF_TOKEN), or stage the dataset",
                               "path") from err
    if len(ds) == 0:
        raise DatasetError(f"dataset {_clip(spec.path)} split {_clip(src.split)} has no rows",
                           "point `path` at data that has rows", "path")
    return ds


def _split_sizes(src: Source, kwargs: dict) -> dict[str, int] | None:
    """Rows of each split a sliced split expression names, when its slice is what selects nothing; else None."""
    from datasets import ReadInstruction, load_dataset

    try:
        sizes = {n: len(load_dataset(src.target, split=n, **kwargs)) for n in dict.fromkeys(split_names(src.split))}
        parts = ReadInstruction.from_spec(src.split).to_absolute(sizes)
    except Exception:  # noqa: BLE001 - the split itself does not load: the original error says why
        return None
    return sizes if all(p.to <= p.from_ for p in parts) else None


def _empty_slice(source: str, split: str, sizes: dict[str, int], field: str) -> DatasetError:
    rows = ", ".join(f"{name} has {count} rows" for name, count in sizes.items())
    name, count = next(iter(sizes.items()))
    return DatasetError(f"{source}: split {_clip(split)} selects no rows: the slice starts at or past the end "
                        f"({rows})", f"slice within the rows there are, e.g. `{field}: {name}[:{max(1, count // 2)}]` "
                        f"or `{name}[-{max(1, count // 10)}:]`", field)


def normalize(ds, fmt: str, source: str, report: dict | None = None):
    """Apply the schema adapter; a row missing a field fails with the row number and the expected fields."""
    required = REQUIRED_FIELDS[fmt]
    missing = [f for f in required if f not in ds.column_names]
    if missing:
        raise DatasetError(f"{source}: format {fmt!r} needs fields {', '.join(required)}; "
                           f"missing {', '.join(missing)} (columns: {', '.join(ds.column_names)})",
                           _fix_format(fmt), "format")
    adapter = ADAPTERS[fmt]

    def convert(row, idx):
        for name in required:
            if bad_field(row, name):
                raise DatasetError(f"{source}: row {idx}: field {name!r} is empty or not text",
                                   "give that row text in the field, or remove the row", "path")
        try:
            return {"drop": "", **adapter(row)}
        except DatasetError as err:
            raise DatasetError(f"{source}: row {idx}: {err}", "fix or remove that row", "path") from None

    try:
        out = ds.map(convert, with_indices=True, remove_columns=ds.column_names, desc=f"normalize {fmt}")
    except UnicodeDecodeError as err:  # bytes that are not UTF-8 inside a text field
        raise DatasetError(f"{source}: text is not valid UTF-8 ({err.reason} at byte {err.start})",
                           "save the data as UTF-8", "path") from None
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
        test = normalize(load_split(spec, spec.test_split, field="test_split"), spec.format,
                         f"{spec.path}[{spec.test_split}]", report)
    before = len(train)
    if spec.min_answer_chars and "chosen" in train.column_names:
        keep = (lambda r: len(r["chosen"]) > spec.min_answer_chars and len(r["rejected"]) > spec.min_answer_chars)
        train = train.filter(keep, desc="drop short answers")
        test = test.filter(keep, desc="drop short answers") if test is not None else None
    if spec.test_fraction:
        if len(train) < 2:
            raise DatasetError(f"{source}: {len(train)} rows cannot be split into train and test",
                               "use a split with more rows, or hold rows out with test_split", "test_fraction")
        parts = train.train_test_split(test_size=spec.test_fraction, seed=spec.seed)
        train, test = parts["train"], parts["test"]
    if hyper is not None:
        if hyper.train_rows:
            train = train.select(range(min(hyper.train_rows, len(train))))
        if hyper.test_rows and test is not None:
            test = test.select(range(min(hyper.test_rows, len(test))))
    if len(train) == 0:
        short = before and spec.min_answer_chars
        raise DatasetError(f"{source}: no training rows left (check split, filters and train_rows)"
                           + (f": min_answer_chars {spec.min_answer_chars} dropped all {before}" if short else ""),
                           "lower min_answer_chars" if short else "use a larger split",
                           "min_answer_chars" if short else "split")
    return train, test


# ------------------------------------------------------------------------------------ benchmark, preflight

# The config name eval.benchmark gets by default: openai/gsm8k's `main`; a local file or folder ignores it.
BENCHMARK_DEFAULT_NAME = BenchmarkSpec.name
BENCHMARK_FORMAT = "gsm8k"


def benchmark_dataset(bench: BenchmarkSpec) -> DatasetSpec:
    return DatasetSpec(path=bench.path, format=BENCHMARK_FORMAT, split=bench.split, name=bench.name)


def load_benchmark(bench: BenchmarkSpec):
    """The benchmark's first `rows` normalized rows (GSM8K question/answer), read as every dataset is: a local
    file is the test split itself (read whole), a local folder's split is `split`, a Hub id is loaded with its
    config `name`."""
    data = benchmark_dataset(bench)
    try:
        raw = load_split(data, bench.split, default_name=BENCHMARK_DEFAULT_NAME, whole_file=True)
        rows = normalize(raw, BENCHMARK_FORMAT, f"{bench.path}[{bench.split}]")
    except DatasetError as err:
        if err.field != "format":
            raise
        # A benchmark has no `format:` to change: the data is what is wrong.
        raise DatasetError(err.problem, "point `path` at GSM8K-style data: fields question and answer (the answer "
                           "ending in `#### <number>`), e.g. openai/gsm8k or ../shared/data/gsm8k", "path") from None
    return rows.select(range(min(bench.rows, len(rows))))


# Preflight results by what was checked (the reference and the files' sizes and times): a sweep file names the
# same data in several sweeps, and status/report/submit each run the preflight.
_checked: dict[tuple, Any] = {}


def check_dataset(spec: DatasetSpec) -> dict | None:
    """The preflight of a sweep's `dataset:`: resolve both splits and, for a local source, load exactly what the
    trainer will load (load_splits). None for a Hub id (not loaded here); DatasetError with the field and the fix
    for anything the trainer would refuse. Row counts of what loaded."""
    src = resolve_source(spec, spec.split)
    if spec.test_split:
        resolve_source(spec, spec.test_split, field="test_split")
    if not src.local:
        return None

    def run() -> dict:
        train, test = load_splits(spec)
        return {"train": len(train), "test": len(test) if test is not None else 0}

    return _memo(("dataset", repr(spec)), src, run)


def check_benchmark(bench: BenchmarkSpec) -> dict | None:
    """The preflight of `eval.benchmark:`: what the evaluator will load (load_benchmark), for a local source."""
    src = resolve_source(benchmark_dataset(bench), bench.split, default_name=BENCHMARK_DEFAULT_NAME,
                         whole_file=True)
    if not src.local:
        return None
    return _memo(("benchmark", repr(bench)), src, lambda: {"rows": len(load_benchmark(bench)),
                                                           "ignored_name": src.ignored_name})


def _memo(key: tuple, src: Source, run: Callable[[], dict]) -> dict:
    files = [src.target] if src.kind in ("json-file", "folder") else list(
        [src.data_files] if isinstance(src.data_files, str) else src.data_files or [])
    key = (*key, str(Path.cwd()), repr(src), tuple(_signature(Path(f)) for f in files))
    if key not in _checked:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # the submitter's output stays one line per finding
        try:
            _checked[key] = run()
        except DatasetError as err:
            _checked[key] = err
        finally:
            if bars:
                datasets.enable_progress_bars()
    if isinstance(_checked[key], DatasetError):
        raise _checked[key]
    return _checked[key]


def _signature(path: Path) -> tuple:
    """Sizes and modification times of the files at or under `path`: a changed file is checked again."""
    try:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files[:10_000])
    except (OSError, ValueError):
        return (str(path), "unreadable")


def render_sft(ds, tokenizer, prompt_format: str):
    return ds.map(lambda r: {"prompt": render_prompt(tokenizer, prompt_format, r["messages"]),
                             "completion": r["response"]},
                  remove_columns=ds.column_names, desc="render prompts")


def render_dpo(ds, tokenizer, prompt_format: str):
    return ds.map(lambda r: {"prompt": render_prompt(tokenizer, prompt_format, r["messages"]),
                             "chosen": r["chosen"], "rejected": r["rejected"]},
                  remove_columns=ds.column_names, desc="render prompts")
