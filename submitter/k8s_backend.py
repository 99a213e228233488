"""Kubernetes backend of the submitter: the thin layer between pure manifests and the API server.

    settings = load_settings({"namespace": "ml"})          # chart defaults (+ overrides); no cluster needed
    dry_run(sweep, trials, "s3://bucket/runs", settings)   -> prints the trial objects the controller creates
    create_trial_objects(batch, core, trial_objects(...))  -> one trial attempt's Job + ConfigMap (controller.K8sBackend)
    submit_controller(pipeline, text, store_url, settings) -> the pipeline's controller ConfigMap + Job
    status("sft", settings)                                -> one row per Job
    follow_logs("sft", "sft-0123456789", settings)         -> streams train then eval logs
    cancel("sft", settings)                                -> deletes the sweep's Jobs and ConfigMaps

Which trials run, are retried or are left alone is decided by the sweep engine (submitter/engine.py, with
finesweep.store.next_action) in the controller; its K8sBackend creates each attempt's Job through
create_trial_objects, idempotently by name. Retries: attempt n gets a Job of its own name (`<sweep>-<trial
id>-a<n>`, finesweep.io/attempt label), so no attempt's Job is ever created twice. Preemptions are retried inside
the Job (podFailurePolicy) and are no attempt.

Manifests come from submitter/k8s_manifests.py (pure); a dry run prints the very objects a submit creates
(trial_objects, controller_manifests, built with effective_settings by both). Everything here that needs
`kubernetes` imports it inside the function; a dry run opens a connection only to read the cluster's
finesweep-defaults ConfigMap, and only where a kubeconfig exists (dry_run_core). See docs/kubernetes.md.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TextIO

import yaml

from finesweep.spec import Sweep, TrialSpec
from finesweep.store import DEFAULT_MAX_ATTEMPTS, TrialState, TrialStatus, failure_line
from submitter.cluster_settings import DEFAULT_NAMESPACE, chart_values
from submitter.k8s_manifests import (
    ANNOTATION_TRIAL_NAME, EVAL_CONTAINER, LABEL_ATTEMPT, LABEL_KUEUE_QUEUE, LABEL_STAGE, LABEL_TRIAL, TRAIN_CONTAINER,
    CONTROLLER_CONTAINER, ClusterSettings, SettingsError, controller_manifests, controller_name,
    job_name, resolved_defaults, settings_from_defaults, sweep_manifests,
    sweep_selector, with_sweep_tracking)

DEFAULTS_CONFIGMAP = "finesweep-defaults"  # rendered by charts/finesweep/templates/defaults-configmap.yaml
DEFAULTS_KEY = "defaults.json"


# ------------------------------------------------------------------------------------------------ settings

def load_settings(overrides: dict | None = None) -> ClusterSettings:
    """ClusterSettings from charts/finesweep/values.yaml plus `overrides` (ClusterSettings field names such as
    `namespace`, `gpus_per_trial`, or document paths such as `jobs.gpusPerTrial`). Touches no cluster; a real
    submit/status later layers the cluster's finesweep-defaults ConfigMap under the same overrides."""
    overrides = dict(overrides or {})
    namespace = overrides.get("namespace", DEFAULT_NAMESPACE)
    return settings_from_defaults(resolved_defaults(chart_values(), namespace=namespace), overrides=overrides)


def overrides_from(args) -> dict:
    """The cluster settings a command line sets (--namespace, --kube-context), for load_settings; the submitter's
    commands and the controller parse the same flags."""
    overrides = {}
    if getattr(args, "namespace", ""):
        overrides["namespace"] = args.namespace
    if getattr(args, "kube_context", ""):
        overrides["kube_context"] = args.kube_context
    return overrides


def with_cluster_defaults(settings: ClusterSettings, core: Any, err: TextIO | None = None) -> ClusterSettings:
    """Layer the chart's finesweep-defaults ConfigMap (what `helm install` was given) between the chart file's
    defaults and the explicit overrides. Without the ConfigMap (chart not installed) settings stay as they are."""
    from kubernetes.client.exceptions import ApiException

    try:
        configmap = _json(core.read_namespaced_config_map(DEFAULTS_CONFIGMAP, settings.namespace,
                                                          _preload_content=False))
    except ApiException as exc:
        if exc.status in (403, 404):
            print(f"note: no readable ConfigMap {settings.namespace}/{DEFAULTS_CONFIGMAP} (is the finesweep chart "
                  f"installed there?); using the chart's default values", file=sys.stderr if err is None else err)
            return settings
        raise
    cluster = json.loads((configmap.get("data") or {}).get(DEFAULTS_KEY, "{}"))
    file_defaults = resolved_defaults(chart_values(), namespace=settings.namespace)
    return settings_from_defaults(file_defaults, cluster, overrides=dict(settings.overrides))


def effective_settings(settings: ClusterSettings, sweep: Sweep | None, core: Any | None,
                       err: TextIO | None = None) -> ClusterSettings:
    """The settings a submit builds its objects with: the cluster's finesweep-defaults ConfigMap layered in
    (with_cluster_defaults; when `core` is given and submitter.useClusterDefaults is on), then the sweep's tracking
    (with_sweep_tracking). A dry run, a submit and the controller all build through this, so what a dry run prints
    is what they create."""
    if core is not None and settings.use_cluster_defaults:
        settings = with_cluster_defaults(settings, core, err)
    return with_sweep_tracking(settings, sweep)


def dry_run_core(settings: ClusterSettings, err: TextIO | None = None) -> Any | None:
    """The CoreV1Api a dry run reads the cluster's finesweep-defaults with (it reads that one ConfigMap, and
    creates, changes or deletes nothing), so it prints the objects a submit would create there. None, with a note,
    where the defaults are off or no cluster is configured (no kubeconfig, no in-cluster service account) or it
    cannot be read: the objects then use the chart's values.yaml, as a submit to a cluster without the chart
    would."""
    err = sys.stderr if err is None else err
    if not settings.use_cluster_defaults:
        return None
    kubeconfigs = (os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")).split(os.pathsep)
    if not (os.environ.get("KUBERNETES_SERVICE_HOST") or any(os.path.isfile(p) for p in kubeconfigs if p)):
        print("note: no kubeconfig: the objects below use the chart's values.yaml defaults; a submit to a cluster "
              "layers that cluster's finesweep-defaults ConfigMap (helm install's values) over them", file=err)
        return None
    try:
        core = _clients(settings)[1]
        from kubernetes.client.exceptions import ApiException

        try:  # reachable? (what is in it, or that it is missing, with_cluster_defaults reads and says)
            core.read_namespaced_config_map(DEFAULTS_CONFIGMAP, settings.namespace, _preload_content=False,
                                            _request_timeout=10)
        except ApiException:
            pass
        return core
    except Exception as exc:  # noqa: BLE001 - a dry run goes on offline, and says so
        print(f"note: the cluster could not be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): the "
              f"objects below use the chart's values.yaml defaults, not the cluster's finesweep-defaults", file=err)
        return None


# ------------------------------------------------------------------------------------------------ submit

def check_store_url(store_url: str, dry_run: bool) -> bool:
    """Trial pods reach the store over the network: a local folder is refused for a real submit (SettingsError);
    for a dry run it only earns a note. Returns True when the note is due."""
    if store_url.startswith("s3://"):
        return False
    if not dry_run:
        raise SettingsError("store", f"{store_url[:200]!r} is a local folder, which trial pods cannot see",
                            "the k8s backend needs --store s3://bucket/prefix (make submit ... STORE=s3://...)")
    return True


def dry_run(sweep: Sweep, trials: list[TrialSpec], store_url: str, settings: ClusterSettings,
            out: TextIO | None = None, *, err: TextIO | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
            core: Any | None = None) -> list[str]:
    """`submit --dry-run` for one sweep: print one YAML stream of the objects the controller creates for its trials
    (k8s_manifests.trial_objects with effective_settings, the very objects controller.K8sBackend creates), for
    every trial store.next_action would run: a trial whose current attempt failed below `max_attempts` as its next
    attempt's Job (`-a<n>`, with a note on stderr), done trials left out. Writes nothing to a cluster; `core`
    (dry_run_core) is where it reads the cluster's defaults, None for the chart's. Returns the Jobs' names.
    out/err default to sys.stdout/sys.stderr as they are at call time."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    trials = _unique(trials)
    if check_store_url(store_url, dry_run=True):
        print(f"note: store {store_url!r} is not s3://...; trial pods could not reach it", file=err)
    statuses = _read_statuses(trials, store_url, err)
    steps = plan_attempts(trials, statuses, max_attempts, err)
    for step in steps:
        if step.retry_of:
            print(f"{_who(step.spec)}: {step.replaces()}: a submit deletes job "
                  f"{job_name(step.spec, step.retry_of)} and runs attempt {step.attempt}", file=err)
    manifests = sweep_manifests([s.spec for s in steps], effective_settings(settings, sweep, core, err), store_url,
                                {s.spec.trial_id: s.attempt for s in steps})
    names = [m["metadata"]["name"] for m in manifests if m["kind"] == "Job"]
    out.write(f"# finesweep dry run: sweep {sweep.name}, {len(names)} Job(s) in namespace {settings.namespace}; "
              f"the controller keeps at most {sweep.search.parallel if sweep.search else sweep.max_parallel} in "
              f"flight.\n")
    yaml.safe_dump_all(manifests, out, sort_keys=False, explicit_start=True, width=120)
    return names


@dataclass(frozen=True)
class AttemptStep:
    """What a submit does for one trial: run `attempt` (a Job named for it), after deleting the Job of the
    failed attempt `retry_of` when that is set."""
    spec: TrialSpec
    attempt: int
    retry_of: int = 0
    # retry_of was done, under other evaluation settings: the new attempt only evaluates (the trainer skips a
    # trained adapter), NextAction.EVALUATE
    evaluate_only: bool = False

    def replaces(self) -> str:
        """Why the Job of attempt `retry_of` makes way for this one."""
        from finesweep.store import EVALUATE_NOTE

        return EVALUATE_NOTE if self.evaluate_only else f"attempt {self.retry_of} failed; retrying"


def plan_attempts(trials: list[TrialSpec], statuses: dict[str, TrialStatus] | None, max_attempts: int,
                  out: TextIO) -> list[AttemptStep]:
    """Which trials a submit (or its dry run) runs, by the store's one rule (finesweep.store.next_action): done
    trials are skipped, failed ones retried below the attempt limit, the rest run as their current attempt.
    Without statuses (a dry run that cannot read the store) every trial is attempt 1."""
    from finesweep.store import NextAction, next_action, over_limit_note

    steps = []
    for spec in trials:
        status_ = statuses.get(spec.trial_id) if statuses is not None else None
        if status_ is None:
            steps.append(AttemptStep(spec, 1))
            continue
        action = next_action(status_, max_attempts)
        current = max(status_.attempt, 1)
        if action is NextAction.SKIP:
            print(f"{_who(spec)}: {status_.state.value} in the store, not submitted", file=out)
        elif action is NextAction.OVER_LIMIT:
            print(f"{_who(spec)}: {over_limit_note(status_, max_attempts)}", file=out)
        elif action is NextAction.RETRY:
            steps.append(AttemptStep(spec, current + 1, retry_of=current))
        elif action is NextAction.EVALUATE:
            steps.append(AttemptStep(spec, current + 1, retry_of=current, evaluate_only=True))
        else:
            steps.append(AttemptStep(spec, current))
    return steps


def _read_statuses(trials: list[TrialSpec], store_url: str, err: TextIO,
                   store: Any = None) -> dict[str, TrialStatus] | None:
    """Each trial's status from the store. A dry run (no `store` given) carries on without it when the store
    cannot be read (no credentials, no network): None. A real submit cannot, since the trials need that store."""
    from finesweep.store import open_store, status_of

    if store is not None:
        return {spec.trial_id: status_of(store, spec) for spec in trials}
    try:
        opened = open_store(store_url)
        return {spec.trial_id: status_of(opened, spec) for spec in trials}
    except Exception as exc:  # noqa: BLE001 - any store failure means the same thing here
        print(f"note: store {store_url} could not be read ({type(exc).__name__}: {exc}); the dry run lists every "
              f"trial without checking which are done", file=err)
        return None


def record_job_failures(store: Any, trials: Iterable[TrialSpec], rows: list[dict]) -> int:
    """Record the failure of trials whose Job the cluster gave up on (OOMKilled, exit 3, deadline): the pod
    could not write it itself, and status, report and a waiting pipeline read failures from the store. Only a
    Job of the trial's current attempt counts. `rows` are the sweep's status rows. Returns how many were
    recorded."""
    from finesweep.store import record_failure, status_of

    specs = {s.trial_id: s for s in trials}
    written = 0
    for row in rows:
        spec = specs.get(row["trial_id"])
        if row["phase"] != "Failed" or spec is None:
            continue
        current = status_of(store, spec)
        # A Job of an earlier attempt, or of none this store knows (its attempts.json gone): not this attempt's.
        if current.state in (TrialState.DONE, TrialState.FAILED) or row["attempt"] != current.attempt:
            continue
        phase, reason = row["failure"] or ("job", row["reason"])
        if record_failure(store, spec.sweep, spec.trial_id, phase, reason, row["exit_code"],
                          job=row["job"], attempt=row["attempt"]) is not None:
            logging.getLogger("finesweep").warning("%s: job %s failed: %s", _who(spec), row["job"], row["reason"])
            written += 1
    return written


def cancel(sweep_name: str, settings: ClusterSettings, out: TextIO | None = None) -> list[str]:
    """Delete every Job of the sweep (their pods go with them: Background propagation) and every trial
    ConfigMap; the store, with whatever finished, is left as it is. Returns the names of the Jobs deleted."""
    out = sys.stdout if out is None else out
    batch, core = _clients(settings)
    selector = sweep_selector(sweep_name)
    jobs = _items(batch.list_namespaced_job(settings.namespace, label_selector=selector, _preload_content=False))
    deleted = []
    for job in jobs:
        name = job["metadata"]["name"]
        if _delete_trial_objects(batch, core, settings, name):
            deleted.append(name)
            print(f"deleted job {name} ({_job_phase(job)})", file=out)
    # ConfigMaps whose Job was already gone (garbage collection not yet run, or an interrupted submit).
    for cm in _items(core.list_namespaced_config_map(settings.namespace, label_selector=selector,
                                                     _preload_content=False)):
        _delete_ignoring_404(core.delete_namespaced_config_map, cm["metadata"]["name"], settings.namespace)
    return deleted


# ------------------------------------------------------------------------------------------------ controller

def submit_controller(pipeline: str, sweep_text: str, store_url: str, settings: ClusterSettings,
                      max_attempts: int = DEFAULT_MAX_ATTEMPTS, out: TextIO | None = None) -> tuple[str, str]:
    """Create the pipeline's controller ConfigMap + Job (k8s_manifests.controller_manifests). A controller Job
    that is still running is left alone ("exists"); a finished one is replaced (deleted, then created again),
    so a resubmit runs the pipeline again and retries its failed trials. Returns (job name, what happened:
    created | exists | replaced)."""
    out = sys.stdout if out is None else out
    batch, core = _clients(settings)
    configmap, job = controller_manifests(pipeline, sweep_text, effective_settings(settings, None, core, out),
                                          store_url, max_attempts)
    name = job["metadata"]["name"]
    action = "created"
    current = _read_job(batch, name, settings.namespace)
    if current is not None:
        if not _finished(current):
            return name, "exists"
        # Foreground: the old pod is gone before the new Job starts one, so two controllers never overlap.
        _delete_ignoring_404(batch.delete_namespaced_job, name, settings.namespace,
                             propagation_policy="Foreground")
        _wait_gone(batch, name, settings.namespace)
        action = "replaced"
    # The ConfigMap holds this submit's sweep file (it may have changed since): immutable, so replace it.
    _delete_ignoring_404(core.delete_namespaced_config_map, configmap["metadata"]["name"], settings.namespace)
    core.create_namespaced_config_map(settings.namespace, configmap, _preload_content=False)
    from kubernetes.client.exceptions import ApiException

    try:
        batch.create_namespaced_job(settings.namespace, job, _preload_content=False)
    except ApiException as exc:
        if exc.status != 409:
            raise
        return name, "exists"  # another submit created it meanwhile
    return name, action


def cancel_controller(pipeline: str, settings: ClusterSettings) -> bool:
    """Delete the pipeline's controller Job (its pod by propagation) and ConfigMap; False when there was none.
    Called before the trial Jobs are deleted, so the controller cannot create more meanwhile."""
    batch, core = _clients(settings)
    name = controller_name(pipeline)
    found = _delete_ignoring_404(batch.delete_namespaced_job, name, settings.namespace,
                                 propagation_policy="Foreground")
    _delete_ignoring_404(core.delete_namespaced_config_map, f"{name}-sweep", settings.namespace)
    if found:
        _wait_gone(batch, name, settings.namespace)
    return found


def follow_controller(pipeline: str, settings: ClusterSettings, out: TextIO | None = None,
                      poll_seconds: float = 2.0) -> bool:
    """Stream the controller's log (each pod in turn, a replacement after a takeover) until its Job
    finishes. True when it completed, False when it failed (or was deleted)."""
    out = sys.stdout if out is None else out
    batch, core = _clients(settings)
    name = controller_name(pipeline)
    followed: set[str] = set()
    while True:
        job = _read_job(batch, name, settings.namespace)
        if job is None:
            print(f"controller job {name} is gone (cancelled?)", file=out, flush=True)
            return False
        pods = _items(core.list_namespaced_pod(settings.namespace, _preload_content=False,
                                               label_selector=f"batch.kubernetes.io/job-name={name}"))
        pod = _newest_pods(pods).get(name)
        state = _container_state(pod, CONTROLLER_CONTAINER) if pod else {}
        if pod and pod["metadata"]["name"] not in followed and ("running" in state or "terminated" in state):
            followed.add(pod["metadata"]["name"])
            for raw in core.read_namespaced_pod_log(pod["metadata"]["name"], settings.namespace,
                                                    container=CONTROLLER_CONTAINER, follow=True,
                                                    _preload_content=False):
                out.write(raw.decode("utf-8", "replace"))
                out.flush()
            continue
        if _finished(job):
            complete = any(c.get("type") == "Complete" and c.get("status") == "True"
                           for c in (job.get("status") or {}).get("conditions") or [])
            print(f"controller job {name} {'completed' if complete else 'failed'}", file=out, flush=True)
            return complete
        time.sleep(poll_seconds)


def _read_job(batch: Any, name: str, namespace: str) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return _json(batch.read_namespaced_job(name, namespace, _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _wait_gone(batch: Any, name: str, namespace: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while _read_job(batch, name, namespace) is not None:
        if time.time() > deadline:
            raise TimeoutError(f"job {name} still exists {timeout_s:.0f}s after it was deleted (a finalizer?)")
        time.sleep(1.0)


def _delete_trial_objects(batch: Any, core: Any, settings: ClusterSettings, job: str) -> bool:
    """Delete a trial's Job (pods by propagation) and its spec ConfigMap; False when the Job was not there."""
    found = _delete_ignoring_404(batch.delete_namespaced_job, job, settings.namespace,
                                 propagation_policy="Background")
    _delete_ignoring_404(core.delete_namespaced_config_map, f"{job}-spec", settings.namespace)
    return found


def _delete_ignoring_404(delete: Callable[..., Any], name: str, namespace: str, **kwargs: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        delete(name, namespace, **kwargs)
        return True
    except ApiException as exc:
        if exc.status != 404:
            raise
        return False


def create_trial_objects(batch: Any, core: Any, objects: list[dict]) -> bool:
    """Create one trial attempt's objects (k8s_manifests.trial_objects, the list a dry run prints): the Job, then
    its ConfigMap with the created Job's uid as its owner's. The pod waits for the volume in the few ms in between.
    False when the Job already existed (its ConfigMap is then made sure of)."""
    from kubernetes.client.exceptions import ApiException

    job_body, configmap = objects
    namespace = job_body["metadata"]["namespace"]
    try:
        job = _json(batch.create_namespaced_job(namespace, job_body, _preload_content=False))
    except ApiException as exc:
        if exc.status != 409:
            raise
        # It exists (a controller before this one made it): put back its ConfigMap if that creator was interrupted
        # between the two, or the pod would wait for its volume forever.
        existing = _read_job(batch, job_body["metadata"]["name"], namespace)
        if existing is not None:
            _ensure_configmap(core, configmap, existing)
        return False
    try:
        _create_configmap(core, configmap, job)
    except Exception:
        # A Job without its spec would wait for the volume forever: take it back, then report.
        batch.delete_namespaced_job(job["metadata"]["name"], namespace, propagation_policy="Background")
        raise
    return True


def _create_configmap(core: Any, configmap: dict, job: dict) -> None:
    """The trial's ConfigMap (trial_objects' second object) owned by the created `job`."""
    from kubernetes.client.exceptions import ApiException

    body = copy.deepcopy(configmap)
    (owner,) = body["metadata"]["ownerReferences"]
    assert owner["name"] == job["metadata"]["name"], (owner, job["metadata"]["name"])
    owner["uid"] = job["metadata"]["uid"]
    namespace = body["metadata"]["namespace"]
    try:
        core.create_namespaced_config_map(namespace, body, _preload_content=False)
    except ApiException as exc:
        if exc.status != 409:
            raise
        # Left over from a Job deleted before the garbage collector ran; it is immutable, so replace it.
        core.delete_namespaced_config_map(body["metadata"]["name"], namespace)
        core.create_namespaced_config_map(namespace, body, _preload_content=False)


def _ensure_configmap(core: Any, configmap: dict, job: dict) -> None:
    """Repair a submit interrupted between creating a Job and its ConfigMap."""
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_config_map(configmap["metadata"]["name"], configmap["metadata"]["namespace"],
                                        _preload_content=False)
    except ApiException as exc:
        if exc.status != 404:
            raise
        _create_configmap(core, configmap, job)


# ------------------------------------------------------------------------------------------------ status

def status(sweep_name: str, settings: ClusterSettings) -> list[dict]:
    """One row per Job of the sweep: trial_id, trial, stage, job, phase (Pending/Running/Succeeded/Failed),
    started, finished (ISO times or None), reason (why Pending/Failed; training/evaluating when Running)."""
    batch, core = _clients(settings)
    selector = sweep_selector(sweep_name)
    jobs = _items(batch.list_namespaced_job(settings.namespace, label_selector=selector, _preload_content=False))
    pods = _items(core.list_namespaced_pod(settings.namespace, label_selector=selector, _preload_content=False))
    newest_pod = _newest_pods(pods)
    rows = [job_row(job, newest_pod.get(job["metadata"]["name"])) for job in jobs]
    return sorted(rows, key=lambda row: (row["stage"] != "base", row["trial"], row["trial_id"]))


def job_row(job: dict, pod: dict | None) -> dict:
    """A status row from a Job and its newest pod (both as API JSON). Pure, so it is tested without a cluster."""
    meta, spec, state = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    conditions = {c["type"]: c for c in state.get("conditions") or [] if c.get("status") == "True"}
    failed_attempts = state.get("failed") or 0
    finished, exit_code, failure = None, None, None
    if "Complete" in conditions:
        phase, reason = "Succeeded", ""
        finished = state.get("completionTime") or conditions["Complete"].get("lastTransitionTime")
    elif "Failed" in conditions:
        cond = conditions["Failed"]
        phase, reason = "Failed", ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
        # The Job's condition says only that it gave up; the pod says why (OOMKilled, exit 3, ...).
        ended, exit_code = _failed_container(pod) if pod else ("", None)
        reason = f"{reason}; last pod: {ended}" if ended else reason
        failure = _own_failure(pod) if pod else None
        finished = cond.get("lastTransitionTime")
    elif spec.get("suspend"):
        phase = "Pending"
        reason = "suspended: waiting for Kueue admission" if LABEL_KUEUE_QUEUE in labels else "suspended"
    elif pod is None:
        phase, reason = "Pending", "no pod yet"
    else:
        phase, reason = _pod_phase(pod)
    if failed_attempts and phase in ("Pending", "Running"):
        reason = f"{reason} (after {failed_attempts} failed attempt{'s' if failed_attempts > 1 else ''})"
    return {
        "trial_id": labels.get(LABEL_TRIAL, ""),
        "trial": annotations.get(ANNOTATION_TRIAL_NAME, ""),
        "stage": labels.get(LABEL_STAGE, ""),
        "job": meta["name"],
        "phase": phase,
        "started": state.get("startTime"),
        "finished": finished,
        "reason": reason,
        "exit_code": exit_code,  # of the failed container, when the Job failed
        # (phase, reason) to record for a failed Job: what its process said, as a local run records it, when it
        # exited with an error of its own; else None, and the Job's reason stands (phase "job").
        "failure": failure,
        "attempt": int(labels.get(LABEL_ATTEMPT) or 0),  # every trial Job carries its attempt; 0: none
    }


def _failed_container(pod: dict) -> tuple[str, int | None]:
    """(`train: OOMKilled (exit 137)`, 137) for the first container of the pod that ended badly, else ("", None).
    With the container's last log line when the kubelet kept it (terminationMessagePolicy FallbackToLogsOnError):
    `eval: Error (exit 3): ... configuration error: ...: checksum differs from marker ...`."""
    found = _first_failed(pod)
    if found is None:
        return "", None
    name, ended, last = found
    code = ended["exitCode"]
    reason = f"{name}: {ended.get('reason') or 'Error'} (exit {code})"
    return (f"{reason}: {last}" if last else reason), code


def _own_failure(pod: dict) -> tuple[str, str] | None:
    """(container, its failure line) when the pod's first failed container exited with an error of its own and
    said why: the phase and reason a local run records for the same failure (local.run_phase: failure_line of
    the process's output). None when the cluster ended it (OOMKilled, a deadline) or it said nothing."""
    found = _first_failed(pod)
    if found is None:
        return None
    name, ended, last = found
    return (name, last) if last and (ended.get("reason") or "Error") == "Error" else None


def _first_failed(pod: dict) -> tuple[str, dict, str] | None:
    """(name, its `terminated` state, its failure line or "") of the first container of the pod that ended badly."""
    status_ = pod.get("status") or {}
    for container in (status_.get("initContainerStatuses") or []) + (status_.get("containerStatuses") or []):
        ended = (container.get("state") or {}).get("terminated") or \
            (container.get("lastState") or {}).get("terminated") or {}
        if ended.get("exitCode") not in (None, 0):
            last = failure_line((ended.get("message") or "").splitlines())
            if len(last) > FAILURE_LINE_LIMIT:  # one line a person reads in `make status`
                last = last[:FAILURE_LINE_LIMIT - 3] + "..."
            return container["name"], ended, last
    return None


FAILURE_LINE_LIMIT = 400


def _pod_phase(pod: dict) -> tuple[str, str]:
    status_ = pod.get("status") or {}
    for container in status_.get("initContainerStatuses") or []:
        if "running" in (container.get("state") or {}):
            return "Running", "training"
    for container in status_.get("containerStatuses") or []:
        if "running" in (container.get("state") or {}):
            return "Running", "evaluating"
    for container in (status_.get("initContainerStatuses") or []) + (status_.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "PodInitializing"):
            return "Pending", f"{container['name']}: {waiting['reason']}"
    for cond in status_.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return "Pending", ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    if status_.get("phase") in ("Failed", "Succeeded"):
        return "Pending", f"pod {status_['phase'].lower()}, waiting for the Job controller"
    return "Pending", "starting"


# ------------------------------------------------------------------------------------------------ logs

def follow_logs(sweep_name: str, trial_id: str | None, settings: ClusterSettings,
                out: TextIO | None = None) -> None:
    """Stream the logs of the newest pod of one trial (all trials when trial_id is None): the `train` init
    container, then `eval`, each line prefixed with [trial/container]. Returns when the pods' containers end."""
    out = sys.stdout if out is None else out
    _, core = _clients(settings)
    pods = _items(core.list_namespaced_pod(settings.namespace, label_selector=sweep_selector(sweep_name, trial_id),
                                           _preload_content=False))
    newest = list(_newest_pods(pods).values())
    if not newest:
        which = f"trial {trial_id}" if trial_id else f"sweep {sweep_name}"
        print(f"no pods for {which} in namespace {settings.namespace} (not submitted, pending or cleaned up)",
              file=out)
        return
    lock = threading.Lock()
    threads = [threading.Thread(target=_follow_pod, args=(core, settings.namespace, pod, out, lock), daemon=True)
               for pod in newest]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _follow_pod(core: Any, namespace: str, pod: dict, out: TextIO, lock: threading.Lock,
                poll_seconds: float = 2.0) -> None:
    name = pod["metadata"]["name"]
    trial = (pod["metadata"].get("annotations") or {}).get(ANNOTATION_TRIAL_NAME) or name
    init_names = [c["name"] for c in pod["spec"].get("initContainers") or []]
    for container in [c for c in (TRAIN_CONTAINER,) if c in init_names] + [EVAL_CONTAINER]:
        # The log endpoint answers 400 until a container has started: wait for it (or for the pod to end).
        while True:
            current = _json(core.read_namespaced_pod(name, namespace, _preload_content=False))
            state = _container_state(current, container)
            if "running" in state or "terminated" in state:
                break
            if (current.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                with lock:
                    print(f"[{trial}/{container}] (never started: pod {current['status']['phase'].lower()})",
                          file=out, flush=True)
                return
            time.sleep(poll_seconds)
        response = core.read_namespaced_pod_log(name, namespace, container=container, follow=True,
                                                _preload_content=False)
        for raw in response:
            for line in raw.decode("utf-8", "replace").splitlines():
                with lock:
                    print(f"[{trial}/{container}] {line}", file=out, flush=True)
        ended = _container_state(_json(core.read_namespaced_pod(name, namespace, _preload_content=False)),
                                 container).get("terminated") or {}
        if ended.get("exitCode") not in (0, None):
            with lock:
                print(f"[{trial}/{container}] exited with code {ended['exitCode']}", file=out, flush=True)
            return  # a failed `train` means `eval` never runs in this pod


def _container_state(pod: dict, container: str) -> dict:
    status_ = pod.get("status") or {}
    for entry in (status_.get("initContainerStatuses") or []) + (status_.get("containerStatuses") or []):
        if entry.get("name") == container:
            return entry.get("state") or {}
    return {}


# ------------------------------------------------------------------------------------------------ helpers

def _clients(settings: ClusterSettings) -> tuple[Any, Any]:
    """(BatchV1Api, CoreV1Api) from the in-cluster service account or the kubeconfig. Tests replace this."""
    import os

    from kubernetes import client, config

    from kubernetes.config.config_exception import ConfigException

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not settings.kube_context:
            config.load_incluster_config()
        else:
            config.load_kube_config(context=settings.kube_context)
    except ConfigException as exc:
        # No kubeconfig, a context it lacks, a broken file: the user's set-up, said in one line.
        which = f"context {settings.kube_context!r}" if settings.kube_context else "the current context"
        raise SettingsError("kube_context", f"cannot use {which} of the kubeconfig "
                            f"({os.environ.get('KUBECONFIG') or '~/.kube/config'}): {str(exc)[:300].rstrip('.')}",
                            "pass --kube-context (KUBE_CONTEXT=) with a context from `kubectl config "
                            "get-contexts`, or set KUBECONFIG") from None
    api = client.ApiClient()
    return client.BatchV1Api(api), client.CoreV1Api(api)


def _json(response: Any) -> dict:
    """API responses are read raw (_preload_content=False) and parsed here: the code then handles the same
    camelCase dicts the manifests are written in, and tests can fake the API with plain dicts."""
    return json.loads(response.data)


def _items(response: Any) -> list[dict]:
    return _json(response).get("items") or []


def _finished(job: dict) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def _job_phase(job: dict) -> str:
    return job_row(job, None)["phase"].lower()


def _newest_pods(pods: Iterable[dict]) -> dict[str, dict]:
    """Job name -> its newest pod (a retried trial has one pod per attempt)."""
    newest: dict[str, dict] = {}
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if job and (job not in newest or pod["metadata"].get("creationTimestamp", "")
                    >= newest[job]["metadata"].get("creationTimestamp", "")):
            newest[job] = pod
    return newest


def _unique(trials: Iterable[TrialSpec]) -> list[TrialSpec]:
    seen, out = set(), []
    for spec in trials:
        if spec.trial_id not in seen:
            seen.add(spec.trial_id)
            out.append(spec)
    return out


def _who(spec: TrialSpec) -> str:
    return f"{spec.sweep}/{spec.name} ({spec.trial_id})"
