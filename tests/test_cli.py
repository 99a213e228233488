"""The installed `finesweep` command: the console script, the wheel's package data, and user mistakes in
settings that end with one line and exit 2 (no traceback)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from submitter.__main__ import main

from .conftest import ROOT

VENV_BIN = Path(sys.executable).parent
COMMANDS = ("submit", "status", "logs", "report", "cancel")


def test_console_script_lists_every_command():
    """What `make setup` installs (scripts/setup.sh: pip install -e . into .venv) and the Makefile calls."""
    script = VENV_BIN / "finesweep"
    assert script.is_file(), f"{script} missing: run make setup"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: finesweep")
    for command in COMMANDS:
        assert command in proc.stdout
    makefile = (ROOT / "Makefile").read_text()
    assert "SUBMIT := .venv/bin/finesweep" in makefile
    for command in COMMANDS:
        assert f"\t$(SUBMIT) {command} $(SWEEP)" in makefile, command


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel `pip install .` would install, built offline like scripts/setup.sh and the images do, and
    unpacked into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-index", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp, timeout=300)
    (wheel,) = (tmp / "dist").glob("finesweep-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp / "site")
    return wheel, tmp / "site"


def test_wheel_carries_the_eval_sets_and_the_chart_values(installed):
    wheel, site = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (ROOT / "evaluator" / "evalsets").glob("*.jsonl"):
        assert f"evaluator/evalsets/{shipped.name}" in names
    # A copy of the chart's values, not a link: the chart keeps the one source.
    values = site / "submitter" / "chart-values.yaml"
    assert not values.is_symlink() and values.read_bytes() == (ROOT / "charts/finesweep/values.yaml").read_bytes()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "finesweep = submitter.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_reads_its_data_outside_the_repository(installed, tmp_path):
    """Run from an unrelated folder with only the installed package on the path (no repository files)."""
    _, site = installed
    code = ("import finesweep.evalsets as e, submitter.k8s_backend as k\n"
            "assert e.__file__.startswith(sys.argv[1]), e.__file__\n"
            "assert len(e.load_evalset('sft-open-questions')) == 10\n"
            "assert k.load_settings().namespace == 'finesweep'\n"
            "print(','.join(e.shipped_names()))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(site)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "dpo-mixed-prompts,math-word-problems,sft-open-questions"


# ------------------------------------------------------------------------------------- settings errors

def _run(caplog, *argv: str) -> tuple[int, list[logging.LogRecord]]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finesweep"):
        code = main(list(argv))
    return code, [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def no_kubeconfig(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.mark.parametrize("argv,needles", [
    (["submit", "smoke", "--backend", "k8s", "--namespace", "Bad_NS", "--dry-run"],
     ["--namespace", "'Bad_NS' is not a valid namespace name", "Fix:", "nothing was submitted"]),
    (["status", "smoke", "--backend", "k8s", "--namespace", "Bad_NS"], ["--namespace", "'Bad_NS'", "Fix:"]),
    (["submit", "smoke", "--backend", "k8s", "--store", "/tmp/x"],
     ["--store", "'/tmp/x' is a local folder", "s3://bucket/prefix"]),
    (["submit", "smoke", "--store", "ftp://bucket/x"], ["ftp://bucket/x", "s3://bucket/prefix"]),
    (["status", "smoke", "--store", "s3://"], ["names no bucket"]),
    (["submit", "no-such-sweep"], ["jobs/no-such-sweep.yaml", "no such sweep file", "Fix: use one of", "smoke"]),
    (["status", "smoke", "--backend", "k8s", "--kube-context", "nope"],
     ["--kube-context", "context 'nope'", "no-such-kubeconfig", "Fix:"]),
    (["logs", "smoke", "--backend", "k8s"], ["--kube-context", "the current context", "Fix:"]),
    (["cancel", "smoke", "--backend", "k8s", "--kube-context", "nope"], ["--kube-context", "context 'nope'"]),
], ids=["bad-namespace-dry-run", "bad-namespace-status", "local-store-k8s", "bad-store-url", "s3-no-bucket",
        "missing-sweep", "bad-context", "no-kubeconfig", "cancel-bad-context"])
def test_settings_mistakes_exit_2_with_one_line(caplog, no_kubeconfig, argv, needles):
    code, errors = _run(caplog, *argv)
    assert code == 2
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message.strip()
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_values_in_the_clusters_defaults_name_the_setting():
    """A finesweep-defaults ConfigMap (helm values) with a non-number is a settings error, not a ValueError
    from int() deep inside."""
    from submitter import k8s_manifests as km

    with pytest.raises(km.SettingsError, match=r"gpus_per_trial \(jobs.gpusPerTrial\): 'two' is not a whole "
                                               r"number.*Fix: fix jobs.gpusPerTrial"):
        km.settings_from_defaults({"jobs": {"gpusPerTrial": "two"}})


def test_console_script_prints_no_traceback(tmp_path):
    """The same through the real entry point, as a user sees it."""
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none")}
    proc = subprocess.run([str(VENV_BIN / "finesweep"), "submit", "smoke", "--backend", "k8s", "--namespace",
                           "Bad_NS", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ------------------------------------------------------------------------------------- status

def _done_sweep(tmp_path: Path, errors: list[dict] | None) -> tuple[Path, Path]:
    """A one-trial SFT sweep (Hub model id, local data, the local GSM8K folder as benchmark) whose base row and
    trial are done in a local store, the trial's eval.json with `errors` when given."""
    from finesweep.spec import load_sweeps
    from finesweep.store import DONE, LocalStore, trial_prefix

    data = ROOT / "tests" / "fixtures" / "datasets"
    sweep_file = tmp_path / "errs.yaml"
    sweep_file.write_text(
        "name: errs\nstage: sft\nmodel: TinyLlama/TinyLlama-1.1B-Chat-v1.0\n"
        f"dataset: {{path: {data / 'instructions-local' / 'train.jsonl'}, format: instruction}}\n"
        f"eval: {{set: math-word-problems, benchmark: {{path: {data / 'gsm8k-local'}}}}}\n"
        "select: {metric: gsm8k_accuracy}\ntrials: [{name: a, lr: 1.0e-4}]\n", encoding="utf-8")
    (sweep,) = load_sweeps(sweep_file)
    store = LocalStore(tmp_path / "store")
    for spec in sweep.reference_specs() + sweep.trial_specs():
        prefix = trial_prefix(spec.sweep, spec.trial_id)
        ev = {"summary": {"bleu": 1.5, "gsm8k_accuracy": None if spec.trains else 0.25},
              "sets": {"math-word-problems": {"rows": 1, "fingerprint": spec.name,
                                              "generation": {"max_new_tokens": 8, "batch_size": 4}}}}
        if spec.trains and errors:
            ev["errors"] = errors
        store.write_json(f"{prefix}/eval.json", ev)
        store.write_bytes(f"{prefix}/samples.jsonl", b"")
        if spec.trains:
            store.write_json(f"{prefix}/train.json", {"wall_time_s": 1.0, "log_history": []})
        store.write_marker(f"{prefix}/{DONE}", {})
    return sweep_file, tmp_path / "store"


def test_status_shows_the_parts_of_an_evaluation_that_failed(tmp_path, capsys):
    """A done trial whose benchmark and an extra eval set failed (eval.json `errors`) says so in the note column,
    each reason on one line and cut short."""
    reason = "local benchmark folder 'x' has no split 'test' (it has: train). Fix: " + "set eval.benchmark.split " * 20
    sweep_file, store = _done_sweep(tmp_path, [{"part": "benchmark", "error": "DatasetError", "reason": reason},
                                               {"part": "set:math-word-problems", "error": "RuntimeError",
                                                "reason": "CUDA error:\n  device-side assert"}])
    assert main(["status", str(sweep_file), "--store", str(store)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "eval errors" not in lines["base"] and lines["base"].split()[2] == "done"
    note = lines["a"].split("  eval errors: ", 1)[1]
    assert lines["a"].split()[2] == "done" and " - " in lines["a"]  # no gsm8k_accuracy: "-"
    assert note.startswith("benchmark: DatasetError: local benchmark folder 'x' has no split 'test'")
    assert "; set:math-word-problems: RuntimeError: CUDA error: device-side assert" in note
    assert len(note) < 300 and "..." in note  # each reason cut short: the whole one is in eval.json


def test_read_only_commands_do_not_read_the_data(tmp_path, capsys, monkeypatch):
    """status, report, logs and cancel check the sweep's data as paths only: no `datasets` import (seconds);
    submit keeps the full check (trainer.data.check_dataset/check_benchmark)."""
    from finesweep.store import LocalStore
    from submitter import plan

    sweep_file, store = _done_sweep(tmp_path, None)
    calls = []
    monkeypatch.setattr(plan, "check_data", lambda *a, **k: calls.append(a))
    assert main(["status", str(sweep_file), "--store", str(store)]) == 0
    assert main(["cancel", str(sweep_file), "--store", str(store)]) == 0
    assert main(["logs", str(sweep_file), "--store", str(store)]) == 1  # no logs in this store
    assert main(["report", str(sweep_file), "--store", str(store)]) == 0
    assert calls == []
    plan.load_plan(str(sweep_file), LocalStore(store))
    assert len(calls) == 1  # the default (submit, dry run, controller): the full check
    missing = sweep_file.read_text().replace("gsm8k-local", "no-such-folder")
    sweep_file.write_text(missing)
    assert main(["status", str(sweep_file), "--store", str(store)]) == 2  # a missing local path still fails
