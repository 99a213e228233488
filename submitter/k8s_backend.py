"""Kubernetes backend of the submitter: the thin layer between pure manifests and the API server.

    settings = load_settings({"namespace": "ml"})          # chart defaults (+ overrides); no cluster needed
    submit(sweep, trials, "s3://bucket/runs", settings, dry_run=False)   -> names of the Jobs created
    status("sft", settings)                                -> one row per Job
    follow_logs("sft", "sft-0123456789", settings)         -> streams train then eval logs

Manifests come from submitter/k8s_manifests.py (pure). Everything here that needs `kubernetes` imports it
inside the function, so the dry-run path never loads a kubeconfig or opens a connection.

Concurrency: one Job per trial, and at most `sweep.max_parallel` unfinished Jobs of a sweep exist at a time.
`submit` creates the first ones, then (settings.wait_for_slots) watches the sweep's Jobs and creates the next
as earlier ones finish. Interrupted, it is simply run again: existing Jobs are left alone, done trials
skipped. See docs/kubernetes.md.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import yaml

from finesweep.spec import Sweep, TrialSpec
from submitter.k8s_manifests import (
    ANNOTATION_TRIAL_NAME, EVAL_CONTAINER, LABEL_KUEUE_QUEUE, LABEL_STAGE, LABEL_TRIAL, TRAIN_CONTAINER,
    ClusterSettings, configmap_name, job_name, resolved_defaults, settings_from_defaults, sweep_manifests,
    sweep_selector, trial_configmap, trial_job)

ROOT = Path(__file__).resolve().parent.parent
VALUES_FILE = ROOT / "charts" / "finesweep" / "values.yaml"
DEFAULTS_CONFIGMAP = "finesweep-defaults"  # rendered by charts/finesweep/templates/defaults-configmap.yaml
DEFAULTS_KEY = "defaults.json"


# ------------------------------------------------------------------------------------------------ settings

def load_settings(overrides: dict | None = None) -> ClusterSettings:
    """ClusterSettings from charts/finesweep/values.yaml plus `overrides` (ClusterSettings field names such as
    `namespace`, `gpus_per_trial`, or document paths such as `jobs.gpusPerTrial`). Touches no cluster; a real
    submit/status later layers the cluster's finesweep-defaults ConfigMap under the same overrides."""
    values = yaml.safe_load(VALUES_FILE.read_text(encoding="utf-8"))
    overrides = dict(overrides or {})
    namespace = overrides.get("namespace", "finesweep")
    return settings_from_defaults(resolved_defaults(values, namespace=namespace), overrides=overrides)


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
    values = yaml.safe_load(VALUES_FILE.read_text(encoding="utf-8"))
    file_defaults = resolved_defaults(values, namespace=settings.namespace)
    return settings_from_defaults(file_defaults, cluster, overrides=dict(settings.overrides))


# ------------------------------------------------------------------------------------------------ submit

def submit(sweep: Sweep, trials: list[TrialSpec], store_url: str, settings: ClusterSettings, dry_run: bool,
           out: TextIO | None = None, *, err: TextIO | None = None,
           sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Create a ConfigMap + Job per trial not yet done, at most `sweep.max_parallel` unfinished at a time.

    Returns the names of the Jobs created (dry_run: the Jobs that would be created). Progress lines go to
    `out`; a dry run instead prints one YAML stream of every manifest to `out` and touches no cluster.
    out/err default to sys.stdout/sys.stderr as they are at call time."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    trials = _unique(trials)
    if not store_url.startswith("s3://"):
        if not dry_run:
            raise ValueError(f"store {store_url!r}: the k8s backend needs s3://bucket/prefix (trial pods cannot "
                             f"see a local folder)")
        print(f"note: store {store_url!r} is not s3://...; trial pods could not reach it", file=err)
    todo = _not_done(trials, store_url, dry_run, out if not dry_run else err, err)

    if dry_run:
        manifests = sweep_manifests(todo, settings, store_url)
        names = [m["metadata"]["name"] for m in manifests if m["kind"] == "Job"]
        out.write(f"# finesweep dry run: sweep {sweep.name}, {len(names)} Job(s) in namespace "
                  f"{settings.namespace}; the submitter keeps at most {sweep.max_parallel} unfinished at a time.\n")
        yaml.safe_dump_all(manifests, out, sort_keys=False, explicit_start=True, width=120)
        return names

    batch, core = _clients(settings)
    if settings.use_cluster_defaults:
        settings = with_cluster_defaults(settings, core, err)
    selector = sweep_selector(sweep.name)
    existing = {job["metadata"]["name"]: job for job in _items(batch.list_namespaced_job(
        settings.namespace, label_selector=selector, _preload_content=False))}

    pending: list[TrialSpec] = []
    for spec in todo:
        name = job_name(spec)
        if name in existing:
            _ensure_configmap(core, spec, settings, existing[name])
            print(f"{_who(spec)}: exists (job {name}, {_job_phase(existing[name])})", file=out)
        else:
            pending.append(spec)

    created: list[str] = []
    last_wait = None
    while pending:
        running = sum(1 for job in _items(batch.list_namespaced_job(
            settings.namespace, label_selector=selector, _preload_content=False)) if not _finished(job))
        slots = sweep.max_parallel - running
        if slots <= 0:
            if not settings.wait_for_slots:
                for spec in pending:
                    print(f"{_who(spec)}: queued (max_parallel {sweep.max_parallel} reached; submit again "
                          f"later)", file=out)
                break
            if last_wait != (running, len(pending)):
                print(f"waiting: {running} job(s) of sweep {sweep.name} unfinished (max_parallel "
                      f"{sweep.max_parallel}), {len(pending)} trial(s) left to submit", file=out)
                last_wait = (running, len(pending))
            sleep(settings.poll_seconds)
            continue
        for spec in pending[:slots]:
            if _create_trial(batch, core, spec, settings, store_url):
                created.append(job_name(spec))
                print(f"{_who(spec)}: created job {job_name(spec)}", file=out)
            else:
                print(f"{_who(spec)}: exists (job {job_name(spec)})", file=out)
        pending = pending[slots:]
    return created


def _create_trial(batch: Any, core: Any, spec: TrialSpec, settings: ClusterSettings, store_url: str) -> bool:
    """Job first, then its spec ConfigMap owned by the Job, so that deleting the Job (by hand or by
    ttlSecondsAfterFinished) garbage-collects the ConfigMap too. The pod waits for the volume in the few ms in
    between. False when the Job already existed (someone else created it meanwhile)."""
    from kubernetes.client.exceptions import ApiException

    try:
        job = _json(batch.create_namespaced_job(settings.namespace, trial_job(spec, settings, store_url),
                                                _preload_content=False))
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise
    try:
        _create_configmap(core, spec, settings, job)
    except Exception:
        # A Job without its spec would wait for the volume forever: take it back, then report.
        batch.delete_namespaced_job(job["metadata"]["name"], settings.namespace, propagation_policy="Background")
        raise
    return True


def _create_configmap(core: Any, spec: TrialSpec, settings: ClusterSettings, job: dict) -> None:
    from kubernetes.client.exceptions import ApiException

    body = trial_configmap(spec, settings)
    # No blockOwnerDeletion: setting it needs update rights on jobs/finalizers, which the submitter lacks.
    body["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job",
                                            "name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}]
    try:
        core.create_namespaced_config_map(settings.namespace, body, _preload_content=False)
    except ApiException as exc:
        if exc.status != 409:
            raise
        # Left over from a Job deleted before the garbage collector ran; it is immutable, so replace it.
        core.delete_namespaced_config_map(body["metadata"]["name"], settings.namespace)
        core.create_namespaced_config_map(settings.namespace, body, _preload_content=False)


def _ensure_configmap(core: Any, spec: TrialSpec, settings: ClusterSettings, job: dict) -> None:
    """Repair a submit interrupted between creating a Job and its ConfigMap."""
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_config_map(configmap_name(spec), settings.namespace, _preload_content=False)
    except ApiException as exc:
        if exc.status != 404:
            raise
        _create_configmap(core, spec, settings, job)


def _not_done(trials: list[TrialSpec], store_url: str, dry_run: bool, out: TextIO, err: TextIO) -> list[TrialSpec]:
    """Trials whose _DONE marker is absent. A dry run carries on without the check when the store cannot be
    read (no credentials, no network); a real submit cannot, since the trials need that store."""
    from finesweep.store import open_store, trial_state

    try:
        store = open_store(store_url)
        states = {spec.trial_id: trial_state(store, spec.sweep, spec.trial_id) for spec in trials}
    except Exception as exc:  # noqa: BLE001 - any store failure means the same thing here
        if not dry_run:
            raise
        print(f"note: store {store_url} could not be read ({type(exc).__name__}: {exc}); the dry run lists every "
              f"trial without checking which are done", file=err)
        return list(trials)
    todo = []
    for spec in trials:
        if states[spec.trial_id] == "done":
            print(f"{_who(spec)}: done in the store, not submitted", file=out)
        else:
            todo.append(spec)
    return todo


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
    finished, exit_code = None, None
    if "Complete" in conditions:
        phase, reason = "Succeeded", ""
        finished = state.get("completionTime") or conditions["Complete"].get("lastTransitionTime")
    elif "Failed" in conditions:
        cond = conditions["Failed"]
        phase, reason = "Failed", ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
        # The Job's condition says only that it gave up; the pod says why (OOMKilled, exit 3, ...).
        ended, exit_code = _failed_container(pod) if pod else ("", None)
        reason = f"{reason}; last pod: {ended}" if ended else reason
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
    }


def _failed_container(pod: dict) -> tuple[str, int | None]:
    """(`train: OOMKilled (exit 137)`, 137) for the first container of the pod that ended badly, else ("", None)."""
    status_ = pod.get("status") or {}
    for container in (status_.get("initContainerStatuses") or []) + (status_.get("containerStatuses") or []):
        ended = (container.get("state") or {}).get("terminated") or \
            (container.get("lastState") or {}).get("terminated") or {}
        if ended.get("exitCode") not in (None, 0):
            code = ended["exitCode"]
            return f"{container['name']}: {ended.get('reason') or 'Error'} (exit {code})", code
    return "", None


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

    if os.environ.get("KUBERNETES_SERVICE_HOST") and not settings.kube_context:
        config.load_incluster_config()
    else:
        config.load_kube_config(context=settings.kube_context)
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
