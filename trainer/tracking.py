"""Runs in the tools teams already watch: TensorBoard event files next to each trial in the store, and one MLflow
run per trial when a tracking server is configured.

TensorBoard. The main training process writes the scalars the Trainer logs (train/loss, train/learning_rate,
train/grad_norm, train/tokens_per_s, ...; heldout/* for a search's evaluations during training) with torch's
SummaryWriter into the scratch folder, and uploads them to <sweep>/<trial>/tensorboard/<trial name>/ with every
checkpoint and at save time (the files are listed in _TRAINED). A trial resumed from a checkpoint first downloads
the curve so far and writes on from the checkpoint's step (purge_step: anything an earlier pod logged after that
step is hidden, as TensorBoard does for restarts), so the curve stays one line. The evaluator adds eval/* (the
summary of eval.json) at the trial's last step in a file of its own (suffix .eval, replaced on a retry).
`tensorboard --logdir <store>/<sweep>` shows every trial side by side, named <trial id>/tensorboard/<name>.

MLflow. On when MLFLOW_TRACKING_URI is set (the backends set it from the sweep's `tracking: {mlflow_uri,
experiment}`; a cluster may set it for every pod); experiment MLFLOW_EXPERIMENT_NAME, default the sweep's name.
Training and evaluation run in different processes (pods) and pods retry, so the run is found, not assumed: the
run id kept in <trial>/mlflow.json, else the run tagged finesweep.trial_id=<id> in the experiment, else a new one
(then recorded in mlflow.json). Params: the resolved trial spec; metrics: the same names as in TensorBoard;
the report is logged to each trial's run by evaluator/report.py. MLflow is where people look, not where results
live: a tracking server that fails (after the client's own retries) is a warning naming the setting, never a
failed trial; the store keeps everything.

Only the main process tracks (`main_process_only`). The search's progress callback (trainer/progress.py) is not
merged into this one: it runs on every rank, because every rank must take part in its stop decision; the
held-out figures it records reach this callback through the Trainer's own log call (eval_* keys -> heldout/*).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

from finesweep.spec import TrialSpec, to_dict
from finesweep.store import ArtifactStore, StoreError, checksum, trial_prefix

log = logging.getLogger("finesweep")
# MLflow's client reports usage to mlflow-telemetry.io (and writes ~/.config/mlflow/telemetry.json) unless this is
# set before it is imported; finesweep imports it only here. A trial talks to its store and the tracking server it
# was given, nothing else; a user who wants MLflow's telemetry sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
TENSORBOARD = "tensorboard"
MLFLOW_RECORD = "mlflow.json"
TRIAL_TAG = "finesweep.trial_id"
EVAL_SUFFIX = ".eval"
# What the Trainer logs that is bookkeeping, not a curve.
SKIP_KEYS = {"step", "total_flos", "num_input_tokens_seen"}


def tensorboard_prefix(spec: TrialSpec) -> str:
    """The trial's TensorBoard run folder in the store (the trial's name makes it readable in TensorBoard)."""
    return f"{trial_prefix(spec.sweep, spec.trial_id)}/{TENSORBOARD}/{spec.name}"


def scalar_name(key: str) -> str:
    """One name for a logged figure in TensorBoard and MLflow: held-out evaluations during training (the
    Trainer's eval_* keys) under heldout/, everything else the Trainer logs under train/."""
    return f"heldout/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def numeric(logs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if k not in SKIP_KEYS and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


# ------------------------------------------------------------------------------------------------ MLflow
def mlflow_configured() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _warn(what: str, err: Exception) -> None:
    log.warning("MLflow tracking (MLFLOW_TRACKING_URI=%s, from the sweep's tracking.mlflow_uri): %s failed: %s: "
                "%s. The trial goes on; its figures are in the store. Fix: check that the server is reachable "
                "from the trial, or remove tracking.mlflow_uri", os.environ.get("MLFLOW_TRACKING_URI"), what,
                type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")


def trial_params(spec: TrialSpec) -> dict[str, str]:
    """The resolved hyperparameters and what the trial trains on, as MLflow params (strings)."""
    params = {k: v for k, v in to_dict(spec.hyper).items()} if spec.trains else {}
    params.update(model=spec.model, stage=spec.stage, max_length=spec.max_length, prompt_format=spec.prompt_format,
                  dataset=spec.dataset.path, dataset_format=spec.dataset.format, dataset_split=spec.dataset.split,
                  eval_set=spec.eval.set)
    if spec.start is not None:
        params["start"] = f"{spec.start.sweep}:{spec.start.trial_id}"
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for k, v in params.items()}


class MlflowRun:
    """The trial's one MLflow run, found or created (module docstring). Every method warns instead of raising."""

    def __init__(self, client, run_id: str, label: str):
        self.client, self.run_id, self.label = client, run_id, label
        self.broken = False

    @classmethod
    def open(cls, spec: TrialSpec, store: ArtifactStore) -> "MlflowRun | None":
        if not mlflow_configured():
            return None
        try:
            return cls._open(spec, store)
        except Exception as err:  # noqa: BLE001 - any client or server failure: warn, train on
            _warn("opening the trial's run", err)
            return None

    @classmethod
    def _open(cls, spec: TrialSpec, store: ArtifactStore) -> "MlflowRun":
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ["MLFLOW_TRACKING_URI"]
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.sweep
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # another trial of the sweep created it first
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        key = f"{trial_prefix(spec.sweep, spec.trial_id)}/{MLFLOW_RECORD}"
        run = None
        if store.exists(key):
            record = store.read_json(key)
            if record.get("tracking_uri") == uri and record.get("experiment_id") == experiment_id:
                try:
                    run = client.get_run(record["run_id"])
                except MlflowException:  # deleted on the server: found by tag or made anew below
                    run = None
                if run is not None and run.info.lifecycle_stage != "active":
                    run = None
        if run is None:
            # mlflow.json may be missing although the run exists (a pod that died between the two writes).
            found = client.search_runs([experiment_id], f"tags.`{TRIAL_TAG}` = '{spec.trial_id}'",
                                       order_by=["attributes.start_time ASC"], max_results=1)
            run = found[0] if found else None
        created = run is None
        if created:
            run = client.create_run(experiment_id, run_name=spec.name,
                                    tags={TRIAL_TAG: spec.trial_id, "finesweep.sweep": spec.sweep,
                                          "finesweep.trial": spec.name, "finesweep.stage": spec.stage})
        elif run.info.status != RunStatus.to_string(RunStatus.RUNNING):
            client.update_run(run.info.run_id, status="RUNNING")  # a retry reopens it
        record = {"tracking_uri": uri, "experiment": name, "experiment_id": experiment_id,
                  "run_id": run.info.run_id}
        if not store.exists(key) or store.read_json(key) != record:
            store.write_json(key, record)
        # Params never change for a trial id; a retry logs only what an earlier process did not get to.
        have = run.data.params if not created else {}
        missing = [Param(k, v) for k, v in trial_params(spec).items() if k not in have]
        if missing:
            client.log_batch(run.info.run_id, params=missing)
        label = f"[{spec.sweep}/{spec.name} {spec.trial_id}]"
        log.info("%s: MLflow run %s in experiment %r at %s (%s)", label, run.info.run_id, name, uri,
                 "new" if created else "resumed")
        return cls(client, run.info.run_id, label)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.broken or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        try:
            for i in range(0, len(batch), 1000):  # the REST API's limit per call
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        except Exception as err:  # noqa: BLE001
            _warn(f"logging metrics at step {step}", err)
            self.broken = True  # the client has already retried: do not stall every further step

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.broken:
            return
        try:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        except Exception as err:  # noqa: BLE001
            _warn(f"uploading {artifact_path}", err)

    def finish(self, status: str = "FINISHED") -> None:
        if self.broken:
            return
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as err:  # noqa: BLE001
            _warn("closing the run", err)


def read_run_id(store: ArtifactStore, spec: TrialSpec) -> str | None:
    try:
        return store.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/{MLFLOW_RECORD}")["run_id"]
    except (StoreError, KeyError, ValueError, FileNotFoundError):
        return None


# ------------------------------------------------------------------------------------------------ training
def callbacks(recipe) -> list:
    """[the tracking callback]: always (TensorBoard files are written for every trial); main process only."""
    recipe.tracking = tracking_callback(recipe)
    return [recipe.tracking]


def tracking_callback(recipe):
    from transformers import TrainerCallback

    spec, store = recipe.spec, recipe.store
    remote = tensorboard_prefix(spec)

    class Tracking(TrainerCallback):
        main_process_only = True  # recipe.callbacks registers it on the main process only

        def __init__(self):
            self.local = Path(recipe.workdir) / TENSORBOARD / spec.name
            self.writer = None
            self.mlflow: MlflowRun | None = None
            self.tokens = self.clock = None

        def on_train_begin(self, args, state, control, **kwargs):
            from torch.utils.tensorboard import SummaryWriter

            self.local.mkdir(parents=True, exist_ok=True)
            purge = None
            if state.global_step > 0:
                # Resumed from a checkpoint: continue the curve uploaded with it; what an earlier pod logged after
                # the checkpoint's step is purged by TensorBoard (the new file's restart marker).
                try:
                    store.download_dir(remote, self.local)
                except StoreError:
                    pass  # an older checkpoint without event files: the curve starts here
                purge = state.global_step + 1
            else:
                for key in store.list(f"{remote}/"):  # a fresh start: an earlier attempt's curve is not this one
                    store.delete(key)
            self.writer = SummaryWriter(log_dir=str(self.local), purge_step=purge, flush_secs=30)
            self.mlflow = MlflowRun.open(spec, store)
            self.tokens, self.clock = state.num_input_tokens_seen or 0, time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.writer is None:
                return
            scalars = {scalar_name(k): v for k, v in numeric(logs or {}).items()}
            now, tokens = time.time(), state.num_input_tokens_seen or 0
            if "train/loss" in scalars and now > self.clock and tokens > self.tokens:
                scalars["train/tokens_per_s"] = (tokens - self.tokens) / (now - self.clock)  # non-padding, all ranks
                self.tokens, self.clock = tokens, now
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, state.global_step)
            if self.mlflow is not None:
                self.mlflow.log_metrics(scalars, state.global_step)

        def on_save(self, args, state, control, **kwargs):
            # With every checkpoint: a pod that dies later resumes with the curve up to the checkpoint's step.
            self.upload()

        def upload(self) -> dict[str, str]:
            if self.writer is None:
                return {}
            self.writer.flush()
            return store.upload_dir(self.local, remote)

        def finish(self) -> dict[str, str]:
            """Close the writer and upload the event files; returns {key: sha256} for the _TRAINED marker."""
            if self.writer is None:
                return {}
            self.writer.close()  # flushes the last events
            self.writer = None
            return store.upload_dir(self.local, remote)

    return Tracking()


def finish_training(recipe) -> dict[str, str]:
    """At save (main process): the event files uploaded, {key: sha256} for _TRAINED. The MLflow run stays open
    for the evaluator, which closes it."""
    callback = getattr(recipe, "tracking", None)
    return callback.finish() if callback is not None else {}


# ------------------------------------------------------------------------------------------------ evaluation
def final_metrics(summary: dict) -> dict[str, float]:
    """eval.json's summary as eval/* scalars (row counts and intervals are not curves)."""
    return {f"eval/{k}": v for k, v in numeric(summary).items() if not k.endswith("_rows") and k != "eval_rows"}


def record_evaluation(spec: TrialSpec, store: ArtifactStore, result: dict) -> dict[str, str]:
    """The final evaluation in the trial's TensorBoard run (at its last training step) and MLflow run (then
    closed); returns {key: sha256} of the event file for the _DONE marker. Never raises: tracking is a view."""
    from torch.utils.tensorboard import SummaryWriter

    scalars = final_metrics(result.get("summary") or {})
    step = 0
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    if spec.trains:
        try:
            step = int(store.read_json(f"{prefix}/train.json").get("steps") or 0)
        except (StoreError, ValueError, FileNotFoundError):
            step = 0
    files: dict[str, str] = {}
    remote = tensorboard_prefix(spec)
    try:
        with tempfile.TemporaryDirectory(prefix="finesweep-tb-") as tmp:
            writer = SummaryWriter(log_dir=tmp, filename_suffix=EVAL_SUFFIX)
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            writer.close()
            for key in store.list(f"{remote}/"):  # a retried evaluation replaces the earlier one's file
                if key.endswith(EVAL_SUFFIX):
                    store.delete(key)
            for path in Path(tmp).iterdir():
                data = path.read_bytes()
                store.write_bytes(f"{remote}/{path.name}", data)
                files[f"{remote}/{path.name}"] = checksum(data)
    except Exception as err:  # noqa: BLE001 - the evaluation itself is done; its TensorBoard view is extra
        log.warning("[%s/%s %s] TensorBoard: writing the evaluation's scalars to %s/%s failed: %s", spec.sweep,
                    spec.name, spec.trial_id, store.url, remote, err)
    run = MlflowRun.open(spec, store)
    if run is not None:
        run.log_metrics(scalars, step)
        run.finish("FINISHED")
    return files


def log_report(store: ArtifactStore, sweep, specs: list[TrialSpec], report_prefix: str) -> int:
    """The sweep's report (every file under <sweep>/report/) as an artifact `report/` of each trial's MLflow run;
    returns how many runs got it. Tracking from the sweep's `tracking:` or the environment."""
    env = sweep.tracking.env(sweep.name) if getattr(sweep, "tracking", None) else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if not mlflow_configured():
            return 0
        keys = store.list(f"{report_prefix}/")
        runs = [(spec, read_run_id(store, spec)) for spec in specs]
        runs = [(spec, run_id) for spec, run_id in runs if run_id]
        if not keys or not runs:
            return 0
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        with tempfile.TemporaryDirectory(prefix="finesweep-report-") as tmp:
            for key in keys:
                target = Path(tmp) / key[len(report_prefix) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(store.read_bytes(key))
            done = 0
            for spec, run_id in runs:
                MlflowRun(client, run_id, spec.name).log_artifacts(tmp, "report")
                done += 1
        return done
    except Exception as err:  # noqa: BLE001
        _warn("logging the report", err)
        return 0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def describe_store(store: ArtifactStore, sweep_name: str) -> str:
    """The one-line TensorBoard hint for a report."""
    url = store.url.rstrip("/")
    if url.startswith("s3://"):
        return (f"TensorBoard: `aws s3 sync {url}/{sweep_name} ./tb-{sweep_name} --exclude '*' --include "
                f"'*/tensorboard/*' && tensorboard --logdir ./tb-{sweep_name}` (every trial side by side)")
    return f"TensorBoard: `tensorboard --logdir {url}/{sweep_name}` (every trial side by side)"
