"""Kubernetes manifests for finesweep trials: pure functions from trial specs and cluster settings to dicts.

No API calls and no kubeconfig here (submitter/k8s_backend.py is the thin layer that talks to a cluster), so
dry runs and tests build exactly what a real submission would create.

One trial = one ConfigMap (the trial spec as JSON) + one Job:
  - stage sft/dpo: init container `train` (finesweep-train), then main container `eval` (finesweep-eval);
  - stage base: only `eval` (reference rows are evaluated, never trained).
Both read the spec from /etc/finesweep/spec.json and exchange the adapter through the artifact store.

Settings are a ClusterSettings, declared and loaded in submitter/cluster_settings.py: from the "resolved
defaults" shape the chart publishes in the finesweep-defaults ConfigMap (`resolved_defaults(values)` computes the
same from a values.yaml), `settings_from_defaults` builds one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from typing import Any, Iterable

from finesweep import exitcodes
from finesweep.spec import TrialSpec, to_dict
# The settings side (declaration, loading, checks) lives in submitter/cluster_settings.py; re-exported here
# because callers build manifests and settings together.
from submitter.cluster_settings import (  # noqa: F401
    DNS1123_LABEL, LABEL_VALUE, SETTINGS, SETTINGS_PATHS, ClusterSettings, SettingsError, chart_fullname,
    check_settings, deep_merge, resolved_defaults, settings_from_defaults, settings_summary)

SPEC_DIR = "/etc/finesweep"
SPEC_FILE = "spec.json"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
CACHE_DIR = "/home/finesweep/.cache"
SCRATCH_DIR = "/work"
TRAIN_CONTAINER = "train"
EVAL_CONTAINER = "eval"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SWEEP = "finesweep.io/sweep"
LABEL_TRIAL = "finesweep.io/trial"
LABEL_STAGE = "finesweep.io/stage"
LABEL_ATTEMPT = "finesweep.io/attempt"  # which attempt of the trial a Job runs (finesweep.store attempts)
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_TRIAL_NAME = "finesweep.io/trial-name"
ANNOTATION_STORE = "finesweep.io/store"
MANAGED_BY = "finesweep-submitter"


# ------------------------------------------------------------------------------------------------ names

def job_name(spec: TrialSpec, attempt: int = 1) -> str:
    """`<sweep>-<trial id>`, e.g. `sft-lr-sft-0123456789`, and `<sweep>-<trial id>-a<n>` for attempt n >= 2 of
    a retried trial: deterministic per trial and attempt, so no attempt's Job is created twice and a failed
    attempt's Job never shadows the next. A DNS-1123 label (<= 63 chars).

    Sweep names are validated to <= 40 chars, so the plain form fits (40 + 1 + 15 + 4). A longer or odd sweep
    name is cut and a short hash of it added, so names stay unique."""
    sweep = re.sub(r"[^a-z0-9-]+", "-", spec.sweep.lower()).strip("-")
    trial_id = spec.trial_id + (f"-a{attempt}" if attempt > 1 else "")
    name = f"{sweep}-{trial_id}"
    if len(name) <= 63 and sweep == spec.sweep and DNS1123_LABEL.fullmatch(name):
        return name
    digest = hashlib.sha256(spec.sweep.encode()).hexdigest()[:6]
    keep = 63 - len(trial_id) - len(digest) - 2
    return f"{sweep[:keep].strip('-') or 'sweep'}-{digest}-{trial_id}"


def configmap_name(spec: TrialSpec, attempt: int = 1) -> str:
    return f"{job_name(spec, attempt)}-spec"


def _app_labels(component: str) -> dict[str, str]:
    """The app.kubernetes.io labels every object finesweep creates carries."""
    return {LABEL_NAME: "finesweep", LABEL_COMPONENT: component, LABEL_PART_OF: "finesweep",
            LABEL_MANAGED_BY: MANAGED_BY}


def trial_labels(spec: TrialSpec) -> dict[str, str]:
    return {
        **_app_labels("trial"),
        LABEL_SWEEP: _label_value(spec.sweep),
        LABEL_TRIAL: spec.trial_id,
        LABEL_STAGE: spec.stage,
    }


def sweep_selector(sweep_name: str, trial_id: str | None = None) -> str:
    """Label selector for the Jobs and pods of a sweep (or of one trial)."""
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_SWEEP}={_label_value(sweep_name)}"
    return f"{selector},{LABEL_TRIAL}={trial_id}" if trial_id else selector


# ------------------------------------------------------------------------------------------------ manifests

def trial_configmap(spec: TrialSpec, settings: ClusterSettings, attempt: int = 1) -> dict:
    """The trial spec, mounted read-only at /etc/finesweep/spec.json. Exactly `to_dict(spec)` as JSON, so the
    trainer and evaluator rebuild the same TrialSpec (and trial id) with finesweep.spec.trial_from_dict."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(spec, attempt),
            "namespace": settings.namespace,
            "labels": trial_labels(spec),
            "annotations": {ANNOTATION_TRIAL_NAME: spec.name},
        },
        # The pod only reads it; immutable also spares the kubelet from watching it.
        "immutable": True,
        "data": {SPEC_FILE: json.dumps(to_dict(spec))},
    }


def trial_job(spec: TrialSpec, settings: ClusterSettings, store_url: str, attempt: int = 1) -> dict:
    labels = {**trial_labels(spec), LABEL_ATTEMPT: str(attempt)}
    if settings.kueue_queue_name:
        labels[LABEL_KUEUE_QUEUE] = settings.kueue_queue_name
    annotations = {ANNOTATION_TRIAL_NAME: spec.name, ANNOTATION_STORE: store_url}
    pod_labels = {**trial_labels(spec), LABEL_ATTEMPT: str(attempt)}

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; retries are new pods, counted by the Job
        # Trial pods never call the API server, so they get no token (least privilege).
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # no service env vars leaking into the training environment
        "terminationGracePeriodSeconds": settings.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.fs_group,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.trains:
        # Training is an init container, evaluation the main container: the kubelet runs `eval` only after
        # `train` exited 0, in the same pod, on the same GPU(s), sharing the model cache in HF_HOME. A failed
        # training therefore never produces an evaluation, the Job completes exactly when evaluation does,
        # and the two logs stay apart (`kubectl logs -c train` / `-c eval`). Two Jobs would need ordering
        # outside Kubernetes and a second GPU scheduling wait; a sidecar would not order them at all.
        pod_spec["initContainers"] = [
            _container(TRAIN_CONTAINER, settings.trainer_image, "finesweep-train", spec, settings, store_url)]
    pod_spec["containers"] = [
        _container(EVAL_CONTAINER, settings.evaluator_image, "finesweep-eval", spec, settings, store_url)]
    pod_spec["volumes"] = _volumes(spec, settings, attempt)
    if settings.gpus_per_trial > 0:
        # CPU-only runs (kind) must not ask for a GPU node pool that does not exist there.
        if settings.node_selector:
            pod_spec["nodeSelector"] = dict(settings.node_selector)
        if settings.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.host_network:
        # Single-node dev clusters (make cluster-up): the store listens on the node's loopback.
        pod_spec["hostNetwork"] = True
    if settings.service_account_name:
        pod_spec["serviceAccountName"] = settings.service_account_name
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]

    job_spec: dict[str, Any] = {
        "backoffLimit": settings.backoff_limit,
        "podFailurePolicy": pod_failure_policy(),
        # With a podFailurePolicy "Failed" is the only allowed value (and the default); spelled out because it
        # matters here: a replacement pod starts only after the old one is gone, so two pods never train
        # the same trial into the same store prefix or hold GPUs twice.
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {"labels": pod_labels, "annotations": {ANNOTATION_TRIAL_NAME: spec.name}},
            "spec": pod_spec,
        },
    }
    if settings.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    if settings.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
    if settings.kueue_queue_name:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) the Job when its queue has quota
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(spec, attempt),
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": job_spec,
    }


def pod_failure_policy() -> dict:
    """Rules are checked in order; the first match decides. Anything unmatched counts against backoffLimit."""
    return {"rules": [
        # Node drain, preemption, eviction by the scheduler: not the trial's fault; the retry resumes from the
        # last checkpoint. (onPodConditions needs `status` since 1.31.)
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # The spec or its data can never work as written: fail the Job now instead of retrying.
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [exitcodes.CONFIG_ERROR]}},
        # SIGTERM'd after saving a checkpoint (e.g. a spot VM going away without a DisruptionTarget
        # condition): retry without counting. activeDeadlineSeconds bounds endless preemption loops.
        {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [exitcodes.PREEMPTED]}},
    ]}


def with_sweep_tracking(settings: ClusterSettings, sweep: Any | None) -> ClusterSettings:
    """The sweep's `tracking:` as MLflow's environment on its trial containers (the local backend sets the same
    variables); the sweep's value wins over the same variable in jobs.extraEnv (a cluster-wide default)."""
    env = sweep.tracking.env(sweep.name) if sweep is not None and sweep.tracking is not None else {}
    if not env:
        return settings
    kept = tuple(e for e in settings.extra_env if e.get("name") not in env)
    return dataclasses.replace(settings, extra_env=kept + tuple({"name": k, "value": v} for k, v in env.items()))


# The uid of the Job that owns a trial's ConfigMap exists only once the Job does: the one value of a trial's objects
# a dry run cannot know. The submit puts the created Job's uid in its place (k8s_backend.create_trial_objects).
OWNER_UID_AT_CREATION = "(the Job's uid, set when the Job is created)"


def trial_objects(spec: TrialSpec, settings: ClusterSettings, store_url: str, attempt: int = 1) -> list[dict]:
    """The objects of one trial attempt, in the order a submit creates them: the Job, then its spec ConfigMap
    owned by the Job (deleting the Job, by hand or by ttlSecondsAfterFinished, garbage-collects the ConfigMap).
    A dry run prints exactly these; a submit creates exactly these, filling in the owner's uid."""
    job = trial_job(spec, settings, store_url, attempt)
    configmap = trial_configmap(spec, settings, attempt)
    # No blockOwnerDeletion: setting it needs update rights on jobs/finalizers, which the submitter lacks.
    configmap["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job",
                                                 "name": job["metadata"]["name"], "uid": OWNER_UID_AT_CREATION}]
    return [job, configmap]


def sweep_manifests(trials: Iterable[TrialSpec], settings: ClusterSettings, store_url: str,
                    attempts: dict[str, int] | None = None) -> list[dict]:
    """trial_objects (Job, then its ConfigMap) for every trial, in the order given (the order the submitter
    creates them in); `attempts` maps trial ids to the attempt a Job is for (default 1). Raises ValueError when
    two trials would get the same Job name."""
    manifests, seen = [], {}
    attempts = attempts or {}
    for spec in trials:
        attempt = attempts.get(spec.trial_id, 1)
        name = job_name(spec, attempt)
        if name in seen:
            if seen[name] == spec.trial_id:
                continue  # the same trial listed twice (e.g. a shared reference row): one Job
            raise ValueError(f"trials {seen[name]} and {spec.trial_id} would both be Job {name}")
        seen[name] = spec.trial_id
        manifests += trial_objects(spec, settings, store_url, attempt)
    return manifests


# ------------------------------------------------------------------------------------------------ controller

CONTROLLER_CONTAINER = "controller"
CONTROLLER_SWEEP_FILE = "sweep.yaml"
LABEL_PIPELINE = "finesweep.io/pipeline"
# A controller pod that dies is replaced by its Job and carries on from the store; a few replacements cover a
# node going away or the pod being deleted, while a controller that crashes at once still ends.
CONTROLLER_BACKOFF_LIMIT = 4
CONTROLLER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def controller_name(pipeline: str) -> str:
    """`finesweep-controller-<pipeline>`: one controller Job (and ConfigMap) per sweep file, so a resubmit
    finds the running one instead of starting a second. Cut with a short hash to stay a DNS-1123 label."""
    clean = re.sub(r"[^a-z0-9-]+", "-", pipeline.lower()).strip("-") or "pipeline"
    name = f"finesweep-controller-{clean}"
    if len(name) <= 63 and clean == pipeline:
        return name
    digest = hashlib.sha256(pipeline.encode()).hexdigest()[:6]
    return f"finesweep-controller-{clean[:34].strip('-')}-{digest}"


def controller_labels(pipeline: str) -> dict[str, str]:
    return {**_app_labels("controller"), LABEL_PIPELINE: _label_value(pipeline)}


def controller_configmap(pipeline: str, sweep_text: str, settings: ClusterSettings) -> dict:
    """The sweep file's text: the controller validates and runs exactly what the user submitted."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{controller_name(pipeline)}-sweep", "namespace": settings.namespace,
                     "labels": controller_labels(pipeline)},
        "immutable": True,
        "data": {CONTROLLER_SWEEP_FILE: sweep_text},
    }


def controller_job(pipeline: str, settings: ClusterSettings, store_url: str, max_attempts: int) -> dict:
    """The Job that runs `finesweep controller` for one sweep file (submitter/controller.py) in the cluster."""
    name = controller_name(pipeline)
    env = [
        {"name": "FINESWEEP_S3_ENDPOINT", "value": settings.s3_endpoint},
        {"name": "AWS_REGION", "value": settings.s3_region},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {
            "name": settings.s3_secret_name, "key": settings.s3_access_key_id_key}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
            "name": settings.s3_secret_name, "key": settings.s3_secret_access_key_key}}},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},  # the report's plots; the root filesystem is read-only
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # log lines reach `kubectl logs` as they happen
    ]
    if settings.controller_api_server:
        # No kube-proxy (the offline cluster): the `kubernetes` Service's ClusterIP leads nowhere, so point the
        # in-cluster config at the API server directly. Container env wins over the kubelet's service env.
        host, port = settings.controller_api_server[len("https://"):].rsplit(":", 1)
        env += [{"name": "KUBERNETES_SERVICE_HOST", "value": host.strip("[]")},
                {"name": "KUBERNETES_SERVICE_PORT", "value": port}]
    env.extend(dict(e) for e in settings.extra_env)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.controller_service_account,
        # Unlike trial pods, the controller talks to the API server (creates and watches trial Jobs).
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.fs_group,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{
            "name": CONTROLLER_CONTAINER,
            "image": settings.controller_image,
            "imagePullPolicy": settings.image_pull_policy,
            "args": ["finesweep", "controller", "--sweep-file", f"{SPEC_DIR}/{CONTROLLER_SWEEP_FILE}",
                     "--store", store_url, "--namespace", settings.namespace,
                     "--max-attempts", str(max_attempts)],
            "env": env,
            "resources": copy.deepcopy(CONTROLLER_RESOURCES),
            "volumeMounts": [
                {"name": "sweep", "mountPath": SPEC_DIR, "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},
                # The sweep file's local paths (model, data) are checked where trial pods will see them.
                *(dict(m) for m in settings.extra_volume_mounts),
            ],
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
            },
        }],
        "volumes": [
            {"name": "sweep", "configMap": {"name": f"{name}-sweep",
                                            "items": [{"key": CONTROLLER_SWEEP_FILE, "path": CONTROLLER_SWEEP_FILE}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            *(dict(v) for v in settings.extra_volumes),
        ],
    }
    if settings.host_network:
        # The offline cluster: the store and the API server listen on the node's loopback.
        pod_spec["hostNetwork"] = True
    if settings.priority_class_name:
        pod_spec["priorityClassName"] = settings.priority_class_name
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": controller_labels(pipeline),
                     "annotations": {ANNOTATION_STORE: store_url}},
        "spec": {
            "backoffLimit": CONTROLLER_BACKOFF_LIMIT,
            # A replacement pod starts only once the old one is gone (not merely terminating), so two
            # controllers never act on the same pipeline at once.
            "podReplacementPolicy": "Failed",
            # Exit 1 (the pipeline ended with failed trials) and 2 (a settings or sweep error) are results, not
            # crashes: a replacement would only retry trials nobody resubmitted. A killed or lost pod is replaced.
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": CONTROLLER_CONTAINER, "operator": "In",
                                                      "values": [1, 2]}}]},
            "template": {"metadata": {"labels": controller_labels(pipeline)}, "spec": pod_spec},
        },
    }


def controller_manifests(pipeline: str, sweep_text: str, settings: ClusterSettings, store_url: str,
                         max_attempts: int) -> list[dict]:
    """ConfigMap then Job, the order a submit creates them in."""
    return [controller_configmap(pipeline, sweep_text, settings),
            controller_job(pipeline, settings, store_url, max_attempts)]


# ------------------------------------------------------------------------------------------------ pieces

def _container(name: str, image: str, command: str, spec: TrialSpec, settings: ClusterSettings,
               store_url: str) -> dict:
    resources = copy.deepcopy(settings.resources) if settings.resources else {}
    resources = {k: dict(v) for k, v in resources.items() if v}
    if settings.gpus_per_trial > 0:
        # GPUs go in limits only (a request, if given, must equal the limit; the API server copies it).
        resources.setdefault("limits", {})[settings.gpu_resource_name] = settings.gpus_per_trial
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        # `args`, not `command`: the images' ENTRYPOINT is tini, which forwards SIGTERM to the trainer so it can
        # checkpoint and exit 143 (PREEMPTED); `command` would replace tini.
        "args": [command, "--spec", SPEC_PATH, "--store", store_url],
        # A container that fails without writing /dev/termination-log gets the tail of its log as its
        # termination message: the trainer's and evaluator's last line names the error (under several
        # processes, the first rank's), which becomes the trial's failure reason (k8s_backend._failed_container).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": _env(name, spec, settings),
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *(dict(m) for m in settings.extra_volume_mounts),
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,  # writable paths are the emptyDirs above, nothing else
            "runAsNonRoot": True,
        },
    }
    if resources:
        container["resources"] = resources
    return container


def _env(container: str, spec: TrialSpec, settings: ClusterSettings) -> list[dict]:
    def secret(env_name: str, secret_name: str, key: str, optional: bool = False) -> dict:
        ref: dict[str, Any] = {"name": secret_name, "key": key}
        if optional:
            ref["optional"] = True
        return {"name": env_name, "valueFrom": {"secretKeyRef": ref}}

    env = [
        {"name": "FINESWEEP_SWEEP", "value": spec.sweep},
        {"name": "FINESWEEP_TRIAL_ID", "value": spec.trial_id},
        {"name": "FINESWEEP_NUM_GPUS", "value": str(settings.gpus_per_trial)},
        {"name": "FINESWEEP_S3_ENDPOINT", "value": settings.s3_endpoint},
        {"name": "AWS_REGION", "value": settings.s3_region},
        # Credentials only by reference: the manifest (and a dry run's output) never holds their values.
        secret("AWS_ACCESS_KEY_ID", settings.s3_secret_name, settings.s3_access_key_id_key),
        secret("AWS_SECRET_ACCESS_KEY", settings.s3_secret_name, settings.s3_secret_access_key_key),
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},  # the root filesystem is read-only
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # logs reach `kubectl logs` as they happen
    ]
    if container == TRAIN_CONTAINER and settings.gpus_per_trial == 0 and settings.processes_per_trial > 1:
        # images/bin/finesweep-train launches this many ranks (accelerate, gloo) as it would one per GPU; the
        # evaluator always runs one process.
        env.append({"name": "FINESWEEP_PROCESSES", "value": str(settings.processes_per_trial)})
    if settings.gpus_per_trial == 0:
        # Where the NVIDIA runtime is the node default it would otherwise expose every GPU to a pod that
        # asked for none; "void" is the device plugin's documented way to get none.
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    if settings.hf_token_secret:
        env.append(secret("HF_TOKEN", settings.hf_token_secret, "HF_TOKEN"))
    env.extend(dict(e) for e in settings.extra_env)
    return env


def _volumes(spec: TrialSpec, settings: ClusterSettings, attempt: int = 1) -> list[dict]:
    def empty_dir(name: str, size_limit: str | None, medium: str | None = None) -> dict:
        source: dict[str, Any] = {}
        if medium:
            source["medium"] = medium
        if size_limit:
            source["sizeLimit"] = size_limit
        return {"name": name, "emptyDir": source}

    return [
        {"name": "spec", "configMap": {"name": configmap_name(spec, attempt),
                                       "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}},
        empty_dir("tmp", "1Gi"),
        empty_dir("cache", settings.cache_size_limit),
        empty_dir("scratch", settings.scratch_size_limit),
        # /dev/shm is 64 MB by default; a memory-backed emptyDir counts against the memory limit, so cap it.
        empty_dir("dshm", settings.shm_size, medium="Memory"),
        *(dict(v) for v in settings.extra_volumes),
    ]


def _label_value(value: str) -> str:
    """Sweep names are DNS-1123 labels (<= 40 chars) already; this only guards hand-built specs."""
    if len(value) <= 63 and LABEL_VALUE.fullmatch(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:56].strip("-_.")
    return f"{cleaned}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"
