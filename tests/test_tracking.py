"""Runs in the tools teams watch (trainer/tracking.py): a tiny SFT trial trained and evaluated through the real
entry points (child processes, as the local backend runs them) with a real MLflow tracking server on 127.0.0.1;
its TensorBoard event files read back from the store with TensorBoard's own reader."""

from __future__ import annotations

import pytest
import yaml

from finesweep.spec import SweepError, parse_sweep
from finesweep.store import DONE, TRAINED, LocalStore, trial_prefix
from submitter.local import run_phase
from trainer.tracking import MLFLOW_RECORD, TRIAL_TAG, tensorboard_prefix

from .conftest import FIXTURES, ROOT
from .support.mlflow import mlflow_server  # noqa: F401 - the fixture

DATA = FIXTURES / "datasets" / "instructions-local" / "train.jsonl"
TRIAL = {"name": "tb1", "r": 4, "alpha": 8, "dropout": 0.0, "lr": 5.0e-3, "batch_size": 4, "max_steps": 3,
         "warmup_ratio": 0.0, "scheduler": "constant"}


def raw_sweep(model, tracking=None) -> dict:
    raw = {"name": "t-track", "stage": "sft", "model": str(model), "max_length": 96, "prompt_format": "instruction",
           "dataset": {"path": str(DATA), "format": "instruction", "split": "train[:12]", "test_fraction": 0.25},
           "eval": {"set": "sft-open-questions", "max_new_tokens": 8, "heldout_rows": 3, "bootstrap_samples": 50},
           "trials": [TRIAL]}
    if tracking is not None:
        raw["tracking"] = tracking
    return yaml.safe_load(yaml.safe_dump(raw))


def test_tracking_key_does_not_change_trial_ids(tiny_model):
    plain = parse_sweep(raw_sweep(tiny_model), "t.yaml", "", None)
    tracked = parse_sweep(raw_sweep(tiny_model, {"mlflow_uri": "http://127.0.0.1:5000", "experiment": "e"}),
                          "t.yaml", "", None)
    assert [s.trial_id for s in tracked.trial_specs()] == [s.trial_id for s in plain.trial_specs()]
    assert tracked.tracking.env(tracked.name) == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
                                                  "MLFLOW_EXPERIMENT_NAME": "e"}
    default = parse_sweep(raw_sweep(tiny_model, {"mlflow_uri": "https://mlflow.example"}), "t.yaml", "", None)
    assert default.tracking.env(default.name)["MLFLOW_EXPERIMENT_NAME"] == "t-track"  # one experiment per sweep
    assert plain.tracking is None


@pytest.mark.parametrize("tracking, field, fix", [
    ({"mlflow_uri": "mlflow.example:5000"}, "tracking.mlflow_uri", "http://"),
    ({"mlflow_uri": "https://user:secret@mlflow.example"}, "tracking.mlflow_uri", "MLFLOW_TRACKING_TOKEN"),
    ({"experiment": "x"}, "tracking.experiment", "mlflow_uri"),
    ({"mlflow_url": "http://x"}, "tracking", "mlflow_uri"),  # a typo: unknown key, with "did you mean"
])
def test_bad_tracking_settings_name_the_field_and_the_fix(tiny_model, tracking, field, fix):
    with pytest.raises(SweepError) as err:
        parse_sweep(raw_sweep(tiny_model, tracking), "t.yaml", "", None)
    assert field in str(err.value) and fix in str(err.value)
    assert "secret" not in str(err.value)  # a credential is never echoed


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else None


def test_trial_tracked_in_mlflow_and_tensorboard(tiny_model, tmp_path, mlflow_server, monkeypatch):  # noqa: F811
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = parse_sweep(raw_sweep(tiny_model, {"mlflow_uri": mlflow_server.uri}), "t.yaml", "", None)
    spec = sweep.trial_specs()[0]
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    env = sweep.tracking.env(sweep.name)
    prefix = trial_prefix(spec.sweep, spec.trial_id)

    assert run_phase("trainer", spec, store, str(store_dir), env) == 0
    assert run_phase("evaluator", spec, store, str(store_dir), env) == 0
    first_run_id = store.read_json(f"{prefix}/{MLFLOW_RECORD}")["run_id"]
    # A retried evaluator pod: the first one died after logging but before _DONE, and before (or while) writing
    # mlflow.json, so the retry must find the run by its trial-id tag, not make a second one.
    store.delete(f"{prefix}/{DONE}")
    store.delete(f"{prefix}/{MLFLOW_RECORD}")
    assert run_phase("evaluator", spec, store, str(store_dir), env) == 0
    assert store.read_json(f"{prefix}/{MLFLOW_RECORD}")["run_id"] == first_run_id

    train = store.read_json(f"{prefix}/train.json")
    summary = store.read_json(f"{prefix}/eval.json")["summary"]
    losses = [(e["step"], e["loss"]) for e in train["log_history"] if "loss" in e]
    assert [s for s, _ in losses] == [1, 2, 3]

    # MLflow: exactly one run for the trial in the sweep's experiment, with params, curves, eval and tag.
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(sweep.name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.run_id == first_run_id
    assert run.data.tags[TRIAL_TAG] == spec.trial_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["r"], params["alpha"], params["lr"], params["batch_size"], params["max_steps"]) == (
        "4", "8", "0.005", "4", "3")
    assert params["target_modules"] == ",".join(spec.hyper.target_modules)
    assert params["model"] == str(tiny_model) and params["stage"] == "sft"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v in losses]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/learning_rate")} == {1, 2, 3}
    assert client.get_metric_history(run.info.run_id, "train/tokens_per_s")[0].value > 0
    for metric in ("ref_perplexity", "heldout_loss", "bleu"):
        values = [m.value for m in client.get_metric_history(run.info.run_id, f"eval/{metric}")]
        assert values == [pytest.approx(summary[metric])] * 2, metric  # both evaluations, the same figure

    # TensorBoard: the trial's event files in the store, listed in the markers, read back by TensorBoard.
    run_dir = store_dir / tensorboard_prefix(spec)
    events = sorted(p.name for p in run_dir.iterdir())
    assert events and all(name.startswith("events.out.tfevents.") for name in events)
    trained = store.read_json(f"{prefix}/{TRAINED}")["files"]
    done = store.read_json(f"{prefix}/{DONE}")["files"]
    in_markers = {k.rsplit("/", 1)[-1] for k in [*trained, *done] if "/tensorboard/" in k}
    assert in_markers == set(events)
    assert sum(name.endswith(".eval") for name in events) == 1  # the retry replaced the first evaluation's file
    tb_loss = scalars(run_dir, "train/loss")
    assert tb_loss == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]  # float32 in event files
    assert [s for s, _ in scalars(run_dir, "train/grad_norm")] == [1, 2, 3]
    assert scalars(run_dir, "eval/ref_perplexity") == [(3, pytest.approx(summary["ref_perplexity"], rel=1e-6))]

    # The report links to the event files and is an artifact of the trial's run.
    from evaluator.report import build_report

    key = build_report(store, sweep, [spec])
    assert f"tensorboard --logdir {store_dir}/{sweep.name}" in store.read_bytes(key).decode()
    names = {a.path for a in client.list_artifacts(first_run_id, "report")}
    assert "report/report.md" in names


def test_preempted_trial_keeps_one_tensorboard_curve(tiny_model, tmp_path, monkeypatch):
    """SIGTERM mid-training: the event files go to the store with the checkpoint; the resumed trainer continues
    them, so the store's curve has every step once and equals train.json (which the resumed Trainer rebuilds from
    the checkpoint's state)."""
    import os
    import signal
    import subprocess
    import sys

    from finesweep import exitcodes

    from .conftest import ROOT, twenty_step_sft_trial

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = twenty_step_sft_trial(tiny_model, "t-resume", tmp_path / "spec.json")
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "trainer", "--spec", str(tmp_path / "spec.json"), "--store", str(store_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if " step 5/" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == exitcodes.PREEMPTED, "".join(output)[-3000:]
    run_dir = store_dir / tensorboard_prefix(spec)
    store = LocalStore(store_dir)
    stopped_at = store.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/checkpoint/_CHECKPOINT")["step"]
    before = scalars(run_dir, "train/loss")
    assert [s for s, _ in before] == list(range(1, stopped_at + 1))  # uploaded with the checkpoint

    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    train = store.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/train.json")
    losses = [(e["step"], e["loss"]) for e in train["log_history"] if "loss" in e]
    assert [s for s, _ in losses] == list(range(1, 21))
    assert scalars(run_dir, "train/loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    assert scalars(run_dir, "train/loss")[:stopped_at] == before  # the first pod's points, kept as they were
    trained = store.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/{TRAINED}")["files"]
    assert {k.rsplit("/", 1)[-1] for k in trained if "/tensorboard/" in k} == {p.name for p in run_dir.iterdir()}
    assert len(list(run_dir.iterdir())) == 2  # one file per pod


def test_mlflow_reports_nothing_home(tmp_path):
    """MLflow's client reports usage to mlflow-telemetry.io unless MLFLOW_DISABLE_TELEMETRY is set before it is
    imported (found when the controller image grew ~/.config/mlflow/telemetry.json at build time). Pytest's own
    environment (PYTEST_CURRENT_TEST) switches it off too, so this runs in a process without it, as `make submit`
    or a pod runs the trainer: importing finesweep's tracking module is enough to keep it quiet."""
    import os
    import subprocess
    import sys

    probe = ("import trainer.tracking, mlflow; from mlflow.tracking import MlflowClient; "
             "MlflowClient(tracking_uri='http://127.0.0.1:9'); "
             "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stdout + run.stderr[-2000:]
    assert not (tmp_path / ".config").exists()
