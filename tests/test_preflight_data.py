"""Every dataset reference of a sweep (dataset path/split/name/test_split/data_files, eval.benchmark) is resolved by
the preflight exactly as the loader resolves it (trainer.data.resolve_source, the one resolution both use), so what
the trainer or evaluator would refuse fails before anything runs, naming the file, the field and the fix; and an
evaluation whose benchmark fails still writes every other figure.

The benchmark that started it: `eval: {benchmark: {path: ../shared/data/gsm8k}}` (a folder of train.jsonl /
test.jsonl) passed the preflight, then every evaluation failed on the default config name `main`, which a local
folder does not have. tests/fixtures/datasets/gsm8k-local has the same layout (original rows), for machines
without ../shared/data.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from finesweep.spec import BenchmarkSpec, DatasetSpec, SweepError, load_sweeps
from finesweep.store import LocalStore
from submitter.plan import load_plan, preflight
from trainer.data import (DatasetError, check_benchmark, check_dataset, load_benchmark, load_splits,
                          resolve_source)

from .conftest import FIXTURES, ROOT, SHARED_DATA

DATA = FIXTURES / "datasets"
GSM8K_LOCAL = DATA / "gsm8k-local"  # train.jsonl + test.jsonl + LICENSE, as ../shared/data/gsm8k
GSM8K_FOLDERS = [pytest.param(GSM8K_LOCAL, id="fixture-folder"),
                 pytest.param(SHARED_DATA / "gsm8k", id="shared-folder",
                              marks=pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(),
                                                       reason="../shared/data/gsm8k is absent (optional)"))]
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")


def _sweep_file(tmp_path: Path, dataset: str, benchmark: str | None = None, eval_set: str = "math-word-problems",
                name: str = "local-data") -> Path:
    """A one-trial SFT sweep on a Hub model id (no model folder needed) with the dataset and benchmark given as
    YAML flow mappings."""
    bench = f", benchmark: {benchmark}" if benchmark else ""
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        stage: sft
        model: TinyLlama/TinyLlama-1.1B-Chat-v1.0
        dataset: {dataset}
        eval: {{set: {eval_set}, max_new_tokens: 8{bench}}}
        trials: [{{name: a, lr: 1.0e-4}}]
        """), encoding="utf-8")
    return path


def _preflight_error(path: Path, store: Path) -> SweepError:
    with pytest.raises(SweepError) as err:
        load_plan(str(path), LocalStore(store))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and ". Fix: " in message and err.value.fix.strip(), message
    assert "Traceback" not in message and len(message) < 2000, message[:300]
    return err.value


# ------------------------------------------------------------------------------- the fixture itself

def test_gsm8k_local_fixture_has_the_shared_layout_and_checked_arithmetic():
    """The fixture mirrors ../shared/data/gsm8k: the same files and fields, answers with calculator annotations
    that are right and end in '#### <the last result>' (the conventions tests/fixtures/check_fixtures.py checks for
    the parquet gsm8k fixture)."""
    assert sorted(p.name for p in GSM8K_LOCAL.iterdir()) == ["LICENSE", "test.jsonl", "train.jsonl"]
    shared = SHARED_DATA / "gsm8k"
    if shared.is_dir():
        assert {p.name for p in GSM8K_LOCAL.iterdir()} == {p.name for p in shared.iterdir()}
    for split, count in (("train", 6), ("test", 5)):
        rows = [json.loads(line) for line in (GSM8K_LOCAL / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == count and all(list(r) == ["question", "answer"] for r in rows)
        for i, row in enumerate(rows):
            final = re.search(r"\n#### (-?\d+)$", row["answer"])
            found = ANNOTATION.findall(row["answer"])
            assert final and found, f"{split} row {i}"
            for expr, result in found:
                assert re.fullmatch(r"[\d\s.+\-*/()]+", expr), expr
                assert abs(eval(expr, {"__builtins__": {}}) - float(result)) < 1e-9, f"{split} row {i}: {expr}"
            assert float(found[-1][1]) == int(final.group(1)), f"{split} row {i}"


# -------------------------------------------------------------- a local GSM8K folder as the benchmark

@pytest.mark.parametrize("folder", GSM8K_FOLDERS)
def test_benchmark_on_a_local_gsm8k_folder_passes_the_preflight_and_loads(tmp_path, folder):
    """What the user wrote: no `name:`, so the benchmark's default config name `main` (openai/gsm8k's) applies,
    which a plain local folder does not have. The preflight accepts it, and the evaluator's loader reads the
    folder's test split, without `main` (and the trial id keeps the name, so trials trained before still match)."""
    sweep_file = _sweep_file(tmp_path, f"{{path: {GSM8K_LOCAL}, format: gsm8k, test_split: test}}",
                             f"{{path: {folder}, split: test, rows: 3}}")
    (plan,) = load_plan(str(sweep_file), LocalStore(tmp_path / "store"))
    bench = plan.sweep.eval.benchmark
    assert bench.name == "main" and plan.trials()[0].eval.benchmark == bench
    src = resolve_source(DatasetSpec(str(folder), "gsm8k", split="test", name="main"), "test", default_name="main")
    assert (src.kind, src.config, src.ignored_name) == ("folder", None, "main") and set(src.splits) == {"train",
                                                                                                        "test"}
    rows = load_benchmark(bench)
    assert len(rows) == 3 and rows[0]["messages"][-1]["role"] == "user"
    assert all(r["response"].rstrip().split("\n")[-1].startswith("#### ") for r in rows)
    first_test = json.loads((Path(folder) / "test.jsonl").read_text().splitlines()[0])
    assert rows[0]["messages"][-1]["content"] == first_test["question"].strip()  # the test split, not train
    assert check_benchmark(bench)["rows"] == 3
    # The same folder as the training data, split by file name: train.jsonl is `train`, test.jsonl is `test`.
    train, test = load_splits(DatasetSpec(str(folder), "gsm8k", split="train", test_split="test"))
    assert len(train) == sum(1 for _ in (Path(folder) / "train.jsonl").open())
    assert len(test) == sum(1 for _ in (Path(folder) / "test.jsonl").open())


def test_benchmark_file_folder_with_configs_and_hub_id_resolve_as_before(tmp_path):
    """A single file is the test split itself (read whole); a folder whose README names configs keeps its config
    `main`; a Hub id keeps `main` and is not looked up here (offline)."""
    whole = load_benchmark(BenchmarkSpec(path=str(GSM8K_LOCAL / "test.jsonl"), rows=100))
    assert len(whole) == 5
    configs = resolve_source(DatasetSpec(str(DATA / "gsm8k"), "gsm8k", split="train", name="main"), "train",
                             default_name="main")
    assert (configs.kind, configs.config, configs.ignored_name) == ("folder", "main", None)
    assert len(load_benchmark(BenchmarkSpec(path=str(DATA / "gsm8k"), split="train", rows=4))) == 4
    hub = resolve_source(DatasetSpec("openai/gsm8k", "gsm8k", split="test", name="main"), "test",
                         default_name="main")
    assert (hub.kind, hub.config, hub.local) == ("hub", "main", False)
    assert check_benchmark(BenchmarkSpec()) is None  # the Hub default: said to come from the Hub, not loaded
    sweep_file = _sweep_file(tmp_path, "{path: databricks/databricks-dolly-15k, format: dolly, test_fraction: 0.1}",
                             "{path: openai/gsm8k, name: main, split: test}")
    (plan,) = load_plan(str(sweep_file), LocalStore(tmp_path / "store"))
    from submitter.plan import describe_sources

    lines = describe_sources(plan, LocalStore(tmp_path / "store"))
    assert len(lines) == 3 and "benchmark openai/gsm8k: not staged: trial pods download it from the Hub" in lines[2]


# --------------------------------------------------------- whatever the loader refuses, the preflight refuses

def _two_config_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "two-configs"
    folder.mkdir()
    (folder / "a.jsonl").write_text((GSM8K_LOCAL / "train.jsonl").read_text())
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: x\n  data_files: a.jsonl\n"
                                      "- config_name: y\n  data_files: a.jsonl\n---\n")
    return folder


def _bad_rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad-rows.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "#### 1"}) + "\n" +
                    json.dumps({"question": "q2?", "answer": ""}) + "\n")
    return path


# (id, dataset mapping, benchmark mapping or None, field the error names, words the problem or fix must hold)
REFUSALS = [
    # A local path that is not there: the reference as a whole (`dataset`, `eval.benchmark`), as the preflight
    # has always named it.
    ("dataset-folder-missing", "{path: tests/fixtures/datasets/no-such-folder, format: dolly}", None,
     "dataset", "does not exist"),
    ("dataset-file-missing", "{path: data/missing.jsonl, format: instruction}", None, "dataset",
     "does not exist"),
    ("benchmark-folder-missing", "{path: GSM, format: gsm8k}", "{path: ../no-such/gsm8k}", "eval.benchmark",
     "does not exist"),
    ("dataset-split-not-in-folder", "{path: GSM, format: gsm8k, split: validation}", None, "dataset.split",
     "its splits: train, test"),
    ("dataset-test-split-not-in-folder", "{path: tests/fixtures/datasets/databricks-dolly-15k, format: dolly, "
     "test_split: test}", None, "dataset.test_split", "test_fraction"),
    ("benchmark-split-not-in-folder", "{path: GSM, format: gsm8k}", "{path: GSM, split: validation}",
     "eval.benchmark.split", "use one of train, test"),
    ("dataset-split-of-a-single-file", "{path: GSM/train.jsonl, format: gsm8k, split: test}", None,
     "dataset.split", "a single file is the split 'train'"),
    ("dataset-name-on-a-plain-folder", "{path: GSM, format: gsm8k, name: main}", None, "dataset.name",
     "remove `name:`"),
    ("dataset-name-on-a-single-file", "{path: GSM/train.jsonl, format: gsm8k, name: socratic}", None,
     "dataset.name", "remove `name:`"),
    ("benchmark-name-on-a-plain-folder", "{path: GSM, format: gsm8k}", "{path: GSM, name: socratic}",
     "eval.benchmark.name", "remove `name:`"),
    ("dataset-config-not-in-folder", "{path: tests/fixtures/datasets/gsm8k, format: gsm8k, name: socratic}", None,
     "dataset.name", "one of main"),
    ("dataset-folder-needs-a-config", "{path: TWO, format: gsm8k}", None, "dataset.name", "x, y"),
    ("dataset-slice-past-the-end", "{path: tests/fixtures/datasets/databricks-dolly-15k, format: dolly, "
     "split: 'train[100:]'}", None, "dataset.split", "slice"),
    ("test-split-slice-past-the-end", "{path: GSM, format: gsm8k, test_split: 'test[50:]'}", None,
     "dataset.test_split", "slice"),
    ("benchmark-slice-past-the-end", "{path: GSM, format: gsm8k}", "{path: GSM, split: 'test[99:]'}",
     "eval.benchmark.split", "slice"),
    ("split-syntax", "{path: GSM, format: gsm8k, split: 'train[:'}", None, "dataset.split",
     "not a split datasets can read"),
    ("hub-split-syntax", "{path: databricks/databricks-dolly-15k, format: dolly, split: 'train[:10'}", None,
     "dataset.split", "not a split datasets can read"),
    ("dataset-columns-for-the-format", "{path: tests/fixtures/datasets/databricks-dolly-15k, format: instruction}",
     None, "dataset.format", "missing prompt"),
    ("benchmark-columns", "{path: GSM, format: gsm8k}",
     "{path: tests/fixtures/datasets/instructions-local/train.jsonl}", "eval.benchmark.path", "question and answer"),
    ("data-files-on-a-single-file", "{path: GSM/train.jsonl, format: gsm8k, data_files: [x.jsonl]}", None,
     "dataset.data_files", "remove `data_files`"),
    ("data-files-missing-in-folder", "{path: GSM, format: gsm8k, data_files: [nope.jsonl]}", None,
     "dataset.data_files", "nope.jsonl"),
    ("bad-row", "{path: BAD, format: gsm8k}", None, "dataset.path", "row 1: field 'answer'"),
    ("test-fraction-of-one-row", "{path: GSM, format: gsm8k, split: 'train[:1]', test_fraction: 0.5}", None,
     "dataset.test_fraction", "cannot be split"),
]


def _fill(text: str | None, tmp_path: Path) -> str | None:
    if text is None:
        return None
    if "TWO" in text:
        text = text.replace("TWO", str(_two_config_folder(tmp_path)))
    if "BAD" in text:
        text = text.replace("BAD", str(_bad_rows_file(tmp_path)))
    return text.replace("GSM", str(GSM8K_LOCAL))


@pytest.mark.parametrize("dataset,benchmark,field,words", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_what_the_loader_refuses_fails_in_the_preflight(tmp_path, dataset, benchmark, field, words):
    sweep_file = _sweep_file(tmp_path, _fill(dataset, tmp_path), _fill(benchmark, tmp_path))
    err = _preflight_error(sweep_file, tmp_path / "store")
    assert err.field_path == field, str(err)
    assert words in str(err), str(err)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))
    # The loader refuses it too, naming the same field: one resolution, no drift.
    (sweep,) = load_sweeps(sweep_file)
    with pytest.raises(DatasetError) as loader:
        if field.startswith("eval.benchmark"):
            load_benchmark(sweep.eval.benchmark)
        else:
            load_splits(sweep.dataset)
    reference = "eval.benchmark" if field.startswith("eval.benchmark") else "dataset"
    relative = field[len(reference) + 1:]  # "" for the reference as a whole
    assert loader.value.field == relative and loader.value.fix, str(loader.value)


def test_a_benchmark_error_names_the_sweep_of_a_pipeline(tmp_path):
    """In a pipeline, the field carries the sweep's position, and nothing of the pipeline runs."""
    sft = _sweep_file(tmp_path, f"{{path: {GSM8K_LOCAL}, format: gsm8k, test_split: test}}",
                      f"{{path: {GSM8K_LOCAL}, split: validation}}").read_text()
    fine = sft.replace(", benchmark: {path: " + str(GSM8K_LOCAL) + ", split: validation}", "")
    assert fine != sft
    body = "".join(textwrap.indent(text, "    ").replace("    stage: sft", f"  - name: {name}\n    stage: sft", 1)
                   for name, text in (("first", fine), ("second", sft)))
    path = tmp_path / "pipe.yaml"
    path.write_text("pipeline:\n" + body)
    err = _preflight_error(path, tmp_path / "store")
    assert err.field_path == "pipeline[1].eval.benchmark.split", str(err)


def test_hub_ids_are_not_looked_up_and_say_where_they_come_from(tmp_path):
    """HF_HUB_OFFLINE is set in the tests: a Hub dataset and a Hub benchmark pass the preflight unloaded (their
    split syntax is checked), as before."""
    assert check_dataset(DatasetSpec("databricks/databricks-dolly-15k", "dolly", split="train[:100]",
                                     test_split="train[100:120]")) is None
    sweep_file = _sweep_file(tmp_path, "{path: databricks/databricks-dolly-15k, format: dolly, split: validation}",
                             "{path: openai/gsm8k, split: nosuchsplit}")
    (sweep,) = load_sweeps(sweep_file)
    preflight(sweep)  # a split the Hub dataset may not have cannot be known offline


def test_a_staged_dataset_absent_here_is_not_loaded(tmp_path):
    """A local name staged in the store is what trial pods load; absent here, it is not checked here."""
    from finesweep import staging

    store = LocalStore(tmp_path / "store")
    copy = tmp_path / "gsm8k-copy"
    copy.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (copy / name).write_text((GSM8K_LOCAL / name).read_text())
    staging.stage(store, str(copy), kind="datasets", say=lambda _: None)
    sweep_file = _sweep_file(tmp_path, f"{{path: {copy}, format: gsm8k, test_split: test}}",
                             f"{{path: {copy}, rows: 2}}")
    for name in ("train.jsonl", "test.jsonl"):
        (copy / name).unlink()
    copy.rmdir()
    (plan,) = load_plan(str(sweep_file), store)
    assert [r[0] for r in plan.sources] == ["models", "datasets"]  # the benchmark is the dataset: one row


def test_cli_submit_of_a_sweep_with_a_broken_benchmark_runs_nothing(tmp_path):
    import os
    import subprocess
    import sys

    sweep_file = _sweep_file(tmp_path, f"{{path: {GSM8K_LOCAL}, format: gsm8k, test_split: test}}",
                             f"{{path: {GSM8K_LOCAL}, name: socratic}}")
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "submitter", "submit", str(sweep_file), "--store", str(store)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"{sweep_file}: eval.benchmark.name: " in out and "Fix: remove `name:`" in out, out[-3000:]
    assert "Traceback" not in out and "examples/s" not in out, out[-3000:]
    assert not store.exists() or not any(store.rglob("*"))


# ------------------------------------------------------------------- a failed part keeps the other figures

def _base_spec(tiny_model: Path, benchmark: str, eval_set: str = "math-word-problems"):
    import yaml

    from finesweep.spec import parse_sweep

    raw = yaml.safe_load(textwrap.dedent(f"""
        stage: sft
        model: {tiny_model}
        dataset: {{path: {GSM8K_LOCAL}, format: gsm8k, split: train, test_split: test}}
        max_length: 128
        eval: {{set: {eval_set}, max_new_tokens: 4, batch_size: 12, heldout_rows: 3, bootstrap_samples: 20,
               benchmark: {benchmark}}}
        select: {{metric: gsm8k_accuracy}}
        trials: [{{r: 4}}]
    """))
    sweep = parse_sweep(raw, "t.yaml", "", "t")
    return sweep, sweep.reference_specs()[0]


def test_a_failed_benchmark_keeps_every_other_figure(tmp_path, tiny_model):
    """The benchmark's data is gone by the time the evaluation runs (it was checked at submit): the evaluation
    records the failure and writes the eval sets and held-out figures, _DONE included; selection counts the trial
    as having no gsm8k_accuracy and the report is built, without a crash."""
    from evaluator.evaluate import evaluate_trial
    from evaluator.report import build_report, collect_rows
    from finesweep import selection
    from finesweep.store import DONE, read_status

    gone = tmp_path / "gsm8k-gone"
    sweep, base = _base_spec(tiny_model, f"{{path: {gone}, split: test, rows: 2}}")
    store = LocalStore(tmp_path / "store")
    result = evaluate_trial(base, store)
    prefix = f"t/{base.trial_id}"
    assert store.verify_marker(f"{prefix}/{DONE}") and read_status(store, "t", base.trial_id).done
    saved = store.read_json(f"{prefix}/eval.json")
    assert saved == json.loads(json.dumps(result, default=str))
    (error,) = saved["errors"]
    assert error["part"] == "benchmark" and error["error"] == "DatasetError"
    assert "does not exist" in error["reason"] and "Fix:" in error["reason"]
    assert "benchmark" not in saved and "gsm8k_accuracy" not in saved["per_row"]
    assert saved["sets"]["math-word-problems"]["rows"] == 12 and saved["heldout"]["rows"] >= 1
    assert {"bleu", "math_accuracy", "heldout_loss"} <= set(saved["per_row"])
    assert saved["summary"]["eval_rows"] == 12 and saved["summary"]["heldout_loss"] is not None
    assert len(store.read_bytes(f"{prefix}/samples.jsonl").decode().splitlines()) == 12
    rows = collect_rows(store, [base])
    assert rows[0]["state"] == "done" and selection.value_of(rows[0], "gsm8k_accuracy") is None
    record = selection.choose(rows + [{**rows[0], "name": "t1", "stage": "sft", "trial_id": "sft-x"}],
                              sweep.select, n_boot=20)
    assert record["trial_id"] is None and "has no gsm8k_accuracy" in record["ineligible"][0]["reason"]
    assert store.exists(build_report(store, sweep, [base]))


def test_a_failed_primary_set_ends_the_evaluation_with_what_there_is(tmp_path, tiny_model):
    """eval.set is what the summary is made of: without it the evaluation fails (no _DONE, the error raised for
    the exit code), and eval.json still says which part failed and why."""
    from evaluator.evaluate import evaluate_trial
    from finesweep.evalsets import EvalSetError
    from finesweep.store import DONE

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"prompt": "2+2?", "reference": "4"}) + "\n")
    _, base = _base_spec(tiny_model, f"{{path: {GSM8K_LOCAL}, rows: 2}}", eval_set=str(questions))
    questions.unlink()
    store = LocalStore(tmp_path / "store")
    with pytest.raises(EvalSetError):
        evaluate_trial(base, store)
    prefix = f"t/{base.trial_id}"
    assert not store.exists(f"{prefix}/{DONE}")
    saved = store.read_json(f"{prefix}/eval.json")
    assert saved["incomplete"] is True and saved["errors"][0]["part"] == f"set:{questions}"
    assert saved["errors"][0]["error"] == "EvalSetError" and "not found" in saved["errors"][0]["reason"]
