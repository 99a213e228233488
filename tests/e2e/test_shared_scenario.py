"""One search sweep, run the same way on the local backend and on the offline cluster, with the same outcome.

The sweep (SHARED_SWEEP) is a random search of three trials, one at a time, tracked in a real MLflow server on
loopback (the trial pods reach it through hostNetwork): `steady` (listed, 40 steps), `unreadable-checkpoint`
(listed) and one suggested trial. Before anything runs, the test leaves `unreadable-checkpoint` a checkpoint in
the store that verifies against its marker but that no trainer can load (as one written by another library
version would be), so each of its attempts fails the same way, at run time, where validation cannot see it.

Each backend goes through the same four steps with the same commands (`finesweep submit / cancel / logs`, only
`--backend` differs):
  1. submit; once `steady` is under way, cancel: it is marked stopped, nothing of the sweep keeps running;
  2. submit again: `steady` carries on as the same attempt, `unreadable-checkpoint` fails (attempt 1), the
     suggested trial completes;
  3. submit again with --max-attempts 2: only `unreadable-checkpoint` runs again (attempt 2) and fails again;
  4. logs of `unreadable-checkpoint` show why.
Then the two backends' outcomes are compared: the same trials (ids), states, attempts, failure reasons and MLflow
runs (one per trial, whatever was cancelled or retried). It shares the suite's cluster, release and store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import NAMESPACE, ROOT, kubectl, submitter
from tests.e2e.test_cluster import condition, controller_job, jobs, pods, store_of
from tests.support.mlflow import mlflow_server  # noqa: F401  (session fixture)
from trainer.tracking import TRIAL_TAG

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SWEEP = "e2e-shared"
STEADY, BROKEN = "steady", "unreadable-checkpoint"
SHARED_SWEEP = """\
# The shared local/cluster scenario's search sweep (tests/e2e/test_shared_scenario.py).
name: e2e-shared
stage: sft
model: build/tiny-llama
dataset: {{path: tests/fixtures/datasets/databricks-dolly-15k, format: dolly, split: train, test_fraction: 0.2}}
prompt_format: chat
max_length: 128
eval: {{set: sft-open-questions, max_new_tokens: 8, batch_size: 12, heldout_rows: 4, bootstrap_samples: 50}}
select: {{metric: heldout_loss}}
defaults: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj], batch_size: 4, max_steps: 12}}
trials:
  - {{name: steady, lr: 2.0e-3, max_steps: 40}}
  - {{name: unreadable-checkpoint, lr: 5.0e-3}}
search: {{method: random, seed: 0, budget: 3, parallel: 1, space: {{lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}}}}}
tracking: {{mlflow_uri: "{uri}", experiment: "{experiment}"}}
"""
CONTROLLER = f"finesweep-controller-{SWEEP}"  # the pipeline is named after the file: e2e-shared.yaml


def plan_of(sweep_file: Path, store):
    from submitter.plan import load_plan

    (plan,) = load_plan(str(sweep_file), store, allow_unresolved=True, check_data=False)
    return plan


def leave_unreadable_checkpoint(store, sweep_file: Path) -> str:
    """A checkpoint of BROKEN that passes the marker's checksums but holds no loadable weights."""
    from finesweep.store import checksum

    (spec,) = [s for s in plan_of(sweep_file, store).sweep.trial_specs() if s.name == BROKEN]
    prefix = f"{SWEEP}/{spec.trial_id}/checkpoint"
    files = {}
    for name, data in {"adapter_model.safetensors": b"written by a version this trainer cannot read\n",
                       "trainer_state.json": json.dumps({"global_step": 3}).encode()}.items():
        store.write_bytes(f"{prefix}/checkpoint-3/{name}", data)
        files[f"{prefix}/checkpoint-3/{name}"] = checksum(data)
    store.write_marker(f"{prefix}/_CHECKPOINT", files, name="checkpoint-3", step=3)
    return spec.trial_id


def outcome(store, sweep_file: Path) -> dict:
    """name -> (trial id, state, attempts as (number, outcome), the failures' reasons) as the store holds them."""
    from finesweep.store import read_status
    from submitter.engine import sweep_specs

    plan = plan_of(sweep_file, store)
    found = {}
    for spec in sweep_specs(plan, store):
        status = read_status(store, SWEEP, spec.trial_id)
        reasons = [a.failure["reason"] for a in status.attempts if a.failure]
        if status.failure is not None and not (status.attempts and status.attempts[-1].failure):
            reasons.append(status.failure.reason)  # the last attempt's, until a next attempt files it there
        found[spec.name] = {"id": spec.trial_id, "state": status.state.value,
                            "attempts": [(a.number, a.outcome) for a in status.attempts], "reasons": reasons}
    return found


class LocalRun:
    """The scenario's commands on the local backend: a folder store, the submit in the background."""

    backend = "local"

    def __init__(self, folder: Path, sweep_file: Path):
        from finesweep.store import LocalStore

        self.folder, self.sweep_file = folder, sweep_file
        self.store = LocalStore(folder / "store")
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "submitter", *args, "--store", str(self.store.root)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def submit(self, *extra: str) -> None:
        self.runs += 1
        out = open(self.folder / f"submit-{self.runs}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "submitter", "submit", str(self.sweep_file), *extra,
                                      "--store", str(self.store.root)], cwd=ROOT, stdout=out,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return (self.folder / f"submit-{self.runs}.log").read_text()

    def cancel(self) -> str:
        run = self.cli("cancel", str(self.sweep_file))
        assert run.returncode == 0, run.stdout + run.stderr
        assert self.proc.wait(timeout=120) == 130, self.output()[-3000:]
        return run.stdout

    def nothing_left(self) -> bool:
        return not self.running()

    def logs(self, trial: str) -> str:
        run = self.cli("logs", str(self.sweep_file), "--trial", trial)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout


class ClusterRun:
    """The same commands with --backend k8s: the controller Job runs the sweep in the cluster."""

    backend = "k8s"

    def __init__(self, release: dict, sweep_file: Path):
        self.release, self.sweep_file = release, sweep_file
        self.store = store_of(release)

    def submit(self, *extra: str) -> None:
        submitter(self.release, "submit", str(self.sweep_file), *extra, timeout=120)
        deadline = time.time() + 120
        while controller_job(CONTROLLER) is None:
            assert time.time() < deadline, "the controller Job did not appear"
            time.sleep(1)

    def running(self) -> bool:
        job = controller_job(CONTROLLER)
        return job is not None and condition(job) is None

    def output(self) -> str:
        return kubectl("logs", f"job/{CONTROLLER}", "-n", NAMESPACE, check=False).stdout

    def cancel(self) -> str:
        return submitter(self.release, "cancel", str(self.sweep_file), timeout=300).stdout

    def nothing_left(self) -> bool:
        return not (pods(f"finesweep.io/sweep={SWEEP}") or pods(f"batch.kubernetes.io/job-name={CONTROLLER}")
                    or jobs(f"finesweep.io/sweep={SWEEP}") or controller_job(CONTROLLER))

    def logs(self, trial: str) -> str:
        return submitter(self.release, "logs", str(self.sweep_file), "--trial", trial, timeout=300).stdout


def wait_for(what: str, check, timeout: float, run) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"{run.backend}: {what} not within {timeout:.0f}s:\n{run.output()[-4000:]}"
        time.sleep(0.5)


def scenario(run, mlflow, experiment: str) -> dict:
    """The four steps on one backend; returns what the store and MLflow hold at the end, and the logs."""
    from finesweep.store import read_status

    broken_id = leave_unreadable_checkpoint(run.store, run.sweep_file)
    steady_id = next(s.trial_id for s in plan_of(run.sweep_file, run.store).sweep.trial_specs() if s.name == STEADY)

    # 1. Cancel while `steady` is under way.
    run.submit("--max-attempts", "2")
    wait_for("steady under way",
             lambda: read_status(run.store, SWEEP, steady_id).state.value == "running", 900, run)
    said = run.cancel()
    assert "marked stopped" in said, said
    wait_for("nothing of the sweep left running", run.nothing_left, 180, run)
    first = outcome(run.store, run.sweep_file)
    assert first[STEADY]["state"] == "stopped" and first[STEADY]["attempts"] == [(1, "stopped")], first
    assert first["base"]["state"] == "done", first
    assert first.get(BROKEN, {"state": "pending"})["state"] == "pending", first  # not reached before the cancel

    # 2. Submitted again: `steady` carries on (same attempt), the broken trial fails, the suggestion completes.
    run.submit("--max-attempts", "2")
    wait_for("the second submit to finish", lambda: not run.running(), 1200, run)
    second = outcome(run.store, run.sweep_file)
    assert second[STEADY]["state"] == "done" and second[STEADY]["attempts"] == [(1, "done")], second
    assert second[BROKEN]["state"] == "failed" and second[BROKEN]["attempts"] == [(1, "failed")], second
    suggested = [name for name in second if name not in ("base", STEADY, BROKEN)]
    assert len(suggested) == 1 and second[suggested[0]]["state"] == "done", second

    # 3. Submitted with --max-attempts 2: only the failed trial runs again, as attempt 2, and fails again.
    run.submit("--max-attempts", "2")
    wait_for("the third submit to finish", lambda: not run.running(), 900, run)
    third = outcome(run.store, run.sweep_file)
    assert third[BROKEN]["state"] == "failed", third
    assert third[BROKEN]["attempts"] == [(1, "failed"), (2, "failed")], third
    assert {k: v for k, v in third.items() if k != BROKEN} == {k: v for k, v in second.items() if k != BROKEN}
    assert len(third[BROKEN]["reasons"]) == 2, third[BROKEN]
    for reason in third[BROKEN]["reasons"]:
        assert "SafetensorError" in reason, third[BROKEN]

    # 4. Its logs say why.
    logs = run.logs(BROKEN)
    assert "resuming from checkpoint-3" in logs and "SafetensorError" in logs, logs[-3000:]

    client = mlflow.client()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    tracked = {}
    for found in client.search_runs([experiment_id]):
        trial_id = found.data.tags.get(TRIAL_TAG)
        assert trial_id not in tracked, f"{run.backend}: two MLflow runs for trial {trial_id}"
        reports = [a.path for a in client.list_artifacts(found.info.run_id, "report")]
        tracked[trial_id] = (found.info.status, sorted(k for k in found.data.metrics if k.startswith("eval/")),
                             "report/report.md" in reports)
    return {"trials": third, "mlflow": tracked, "broken": broken_id}


def test_search_sweep_behaves_the_same_on_both_backends(release, mlflow_server, tmp_path):  # noqa: F811
    tag = uuid.uuid4().hex[:6]
    results = {}
    for backend in ("local", "k8s"):
        folder = tmp_path / backend
        folder.mkdir()
        sweep_file = folder / f"{SWEEP}.yaml"
        experiment = f"{SWEEP}-{backend}-{tag}"
        sweep_file.write_text(SHARED_SWEEP.format(uri=mlflow_server.uri, experiment=experiment))
        run = LocalRun(folder, sweep_file) if backend == "local" else ClusterRun(release, sweep_file)
        started = time.time()
        results[backend] = scenario(run, mlflow_server, experiment)
        print(f"{backend}: scenario in {time.time() - started:.0f}s: "
              + ", ".join(f"{n} {t['state']} x{len(t['attempts'])}" for n, t in results[backend]["trials"].items()))

    local, cluster = results["local"], results["k8s"]
    # The same trials (the ids hash the training, so the same search suggestion), states and attempts.
    shape = {backend: {name: (t["id"], t["state"], t["attempts"]) for name, t in r["trials"].items()}
             for backend, r in results.items()}
    assert shape["local"] == shape["k8s"], shape
    # The same failure, each attempt (the paths inside the message differ: a local temp dir, the pod's scratch).
    strip = lambda text: re.sub(r"\S*/\S*", "PATH", text)  # noqa: E731
    assert ([strip(r) for r in local["trials"][BROKEN]["reasons"]]
            == [strip(r) for r in cluster["trials"][BROKEN]["reasons"]]), (local["trials"][BROKEN],
                                                                           cluster["trials"][BROKEN])
    # Tracked alike: one MLflow run per trial that trained, finished, with the same evaluation metrics.
    assert local["mlflow"] == cluster["mlflow"], (local["mlflow"], cluster["mlflow"])
    done = [t["id"] for t in local["trials"].values() if t["state"] == "done" and not t["id"].startswith("base")]
    for trial_id in done:
        status, metrics, report = local["mlflow"][trial_id]
        assert status == "FINISHED" and "eval/heldout_loss" in metrics and report, local["mlflow"]
