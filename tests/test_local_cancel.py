"""`finesweep cancel` on the local backend: it stops the `finesweep submit` running the sweep on this machine (found
through the sweep's _LOCAL_RUN record in the store), whose trial saves a checkpoint and is marked stopped, as the
cluster's cancel stops a controller and its Jobs; a later submit carries the trial on as the same attempt, from
its checkpoint. A record whose submit is gone, or that names another machine, is handled without a traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from finesweep.store import LocalStore, read_local_run, read_status, record_local_run, start_attempt
from submitter.plan import load_plan

from .conftest import FIXTURES, ROOT

pytestmark = pytest.mark.slow


def long_sweep(tiny_model, folder):
    """One trial far too long to finish while the test looks (3000 steps), so it is always under way."""
    raw = {"name": "local-cancel", "stage": "sft", "model": str(tiny_model), "max_length": 128,
           "dataset": {"path": str(FIXTURES / "datasets" / "databricks-dolly-15k"), "format": "dolly",
                       "split": "train", "test_fraction": 0.2, "seed": 42},
           "eval": {"set": "sft-open-questions", "max_new_tokens": 4, "heldout_rows": 4, "bootstrap_samples": 10},
           "defaults": {"r": 4, "alpha": 8, "dropout": 0.0, "batch_size": 4, "max_steps": 3000},
           "trials": [{"name": "long", "lr": 1.0e-3}]}
    path = folder / "local-cancel.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "submitter", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def submit_until(sweep_file, store_dir, pattern: str, log_file) -> subprocess.Popen:
    """Start a local submit in the background and return once its output shows `pattern`."""
    out = open(log_file, "w")
    proc = subprocess.Popen([sys.executable, "-m", "submitter", "submit", str(sweep_file), "--store", str(store_dir)],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not re.search(pattern, log_file.read_text()):
        assert proc.poll() is None, log_file.read_text()[-3000:]
        assert time.time() < deadline, f"no {pattern!r} within 300s:\n" + log_file.read_text()[-3000:]
        time.sleep(0.5)
    return proc


def the_trial(sweep_file, store):
    (plan,) = load_plan(str(sweep_file), store)
    return plan.sweep.trial_specs()[0]


def test_cancel_stops_a_local_submit_and_a_resubmit_carries_on(tiny_model, tmp_path):
    sweep_file, store_dir = long_sweep(tiny_model, tmp_path), tmp_path / "store"
    store = LocalStore(store_dir)
    submit = submit_until(sweep_file, store_dir, r"step \d+/3000", tmp_path / "first.log")
    record = read_local_run(store, "local-cancel")
    assert record["pid"] == submit.pid and record["host"] == socket.gethostname(), record

    cancelled = cli("cancel", str(sweep_file), "--store", str(store_dir))
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert f"local submit (pid {submit.pid}) stopped" in cancelled.stdout, cancelled.stdout
    assert submit.wait(timeout=60) == 130
    first = (tmp_path / "first.log").read_text()
    assert "SIGTERM: saving a checkpoint after this step" in first, first[-3000:]
    assert "interrupted; the trials under way are marked stopped" in first, first[-3000:]
    spec = the_trial(sweep_file, store)
    status = read_status(store, "local-cancel", spec.trial_id)
    assert status.state.value == "stopped" and status.attempt == 1, status
    assert read_local_run(store, "local-cancel") is None
    stored_log = store.read_bytes(f"local-cancel/{spec.trial_id}/logs/train.log").decode()
    assert "checkpoint saved, a restart resumes it" in stored_log, stored_log[-2000:]

    # Submitted again: the same attempt resumes from the checkpoint; cancelled again, it is still attempt 1.
    again = submit_until(sweep_file, store_dir, r"resuming from checkpoint-\d+", tmp_path / "second.log")
    assert cli("cancel", str(sweep_file), "--store", str(store_dir)).returncode == 0
    assert again.wait(timeout=60) == 130
    status = read_status(store, "local-cancel", spec.trial_id)
    assert status.state.value == "stopped" and status.attempt == 1 and len(status.attempts) == 1, status


def test_cancel_after_the_submit_died_marks_its_trials_stopped(tiny_model, tmp_path):
    sweep_file, store = long_sweep(tiny_model, tmp_path), LocalStore(tmp_path / "store")
    spec = the_trial(sweep_file, store)
    start_attempt(store, "local-cancel", spec.trial_id, "local")  # a trial left running by a submit killed hard
    gone = subprocess.Popen(["true"])
    gone.wait()
    record_local_run(store, "local-cancel", socket.gethostname(), gone.pid)
    run = cli("cancel", str(sweep_file), "--store", str(store.root))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 more trial(s) marked stopped" in run.stdout, run.stdout
    assert read_status(store, "local-cancel", spec.trial_id).state.value == "stopped"
    assert read_local_run(store, "local-cancel") is None


def test_cancel_of_a_sweep_run_on_another_machine_says_where(tiny_model, tmp_path):
    sweep_file, store = long_sweep(tiny_model, tmp_path), LocalStore(tmp_path / "store")
    record_local_run(store, "local-cancel", "gpu-box-7", 4242)
    run = cli("cancel", str(sweep_file), "--store", str(store.root))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "local submit on host gpu-box-7 (pid 4242)" in run.stdout and "Fix: run `finesweep cancel` there" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    assert read_local_run(store, "local-cancel")["host"] == "gpu-box-7"  # not ours to remove
