"""Trial Job manifests (submitter/k8s_manifests.py) and the Kubernetes backend's cluster-free paths.

Every manifest is validated against the strict JSON schema of one pinned Kubernetes version
(scripts/k8s_schemas.py: kubernetes-validate, Kubernetes 1.33). The manifests of an example pipeline are
compared with tests/expected/k8s-example-pipeline.yaml; after a deliberate change, regenerate it with
FINESWEEP_UPDATE_EXPECTED=1 and review the diff. The backend is exercised against an in-memory fake API.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finesweep import exitcodes
from finesweep.spec import StartRef, TrackingSpec, TrialSpec, load_sweeps, trial_from_dict
from submitter import cluster_settings as cs
from submitter import k8s_backend
from submitter import k8s_manifests as km
from submitter import values_schema

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ROOT / "tests" / "expected" / "k8s-example-pipeline.yaml"
STORE_URL = "s3://finesweep/runs"
# Test credentials: present in the submitter's environment, must never reach a manifest.
TEST_ACCESS_KEY = "AKIAFINESWEEPTEST0001"
TEST_SECRET_KEY = "finesweep-test-secret-key-do-not-print"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

EXAMPLE_PIPELINE = """\
pipeline:
  - name: sft
    stage: sft
    model: TinyLlama/TinyLlama-1.1B-Chat-v1.0
    dataset: {path: databricks/databricks-dolly-15k, format: dolly, test_fraction: 0.1}
    eval: {set: chat-small, max_new_tokens: 64}
    max_parallel: 2
    defaults: {epochs: 1, batch_size: 4, grad_accum: 4}
    trials:
      - {name: r4-lr2e-4, r: 4, alpha: 8, lr: 2e-4}
      - {name: r8-lr1e-4, r: 8, alpha: 16, lr: 1e-4}
  - name: dpo
    stage: dpo
    from: sft:best
    model: TinyLlama/TinyLlama-1.1B-Chat-v1.0
    dataset: {path: argilla/ultrafeedback-binarized-preferences, format: ultrafeedback, test_fraction: 0.1}
    eval: {set: chat-small, max_new_tokens: 64}
    trials:
      - {name: beta0.1, beta: 0.1, lr: 5e-6, train_rows: 500, test_rows: 200}
"""


def _load_schemas():
    spec = importlib.util.spec_from_file_location("k8s_schemas", ROOT / "scripts" / "k8s_schemas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


k8s_schemas = _load_schemas()


def trials_of(sweep) -> list[TrialSpec]:
    """What the CLI hands the backend: the sweep's trials and its reference rows."""
    start = StartRef(sweep.start_sweep, "sft-0123456789") if sweep.stage == "dpo" else None
    return sweep.trial_specs(start) + sweep.reference_specs(start)


@pytest.fixture(scope="module")
def example_sweeps(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweeps") / "example.yaml"
    path.write_text(EXAMPLE_PIPELINE)
    return load_sweeps(path)


def _sweep_files() -> list[Path]:
    """Shipped sweeps under jobs/ (while there are none, the example pipeline stands in)."""
    return sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.fixture(params=["example"] + [p.name for p in _sweep_files()])
def sweeps(request, example_sweeps):
    if request.param == "example":
        return example_sweeps
    return load_sweeps(ROOT / "jobs" / request.param)


@pytest.fixture
def settings():
    return k8s_backend.load_settings()


def jobs_of(manifests):
    return [m for m in manifests if m["kind"] == "Job"]


def pod_containers(job):
    pod = job["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


# ------------------------------------------------------------------------------------------ schema

@pytest.mark.parametrize("overrides", [
    {},
    {"gpus_per_trial": 0},
    {"gpus_per_trial": 2},
    {"kueue_queue_name": "gpu-t4", "hf_token_secret": "hf-token", "service_account_name": "trials",
     "priority_class_name": "batch-low", "image_pull_secrets": ["regcred"], "active_deadline_seconds": 0,
     "ttl_seconds_after_finished": 0, "cache_size_limit": None},
    {"gpus_per_trial": 0, "host_network": True,
     "extra_env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
     "extra_volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
     "extra_volume_mounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]},
], ids=["defaults", "cpu", "2xT4", "everything-on", "air-gapped-dev"])
def test_every_manifest_is_valid_kubernetes(sweeps, overrides):
    settings = k8s_backend.load_settings(overrides)
    for sweep in sweeps:
        manifests = km.sweep_manifests(trials_of(sweep), settings, STORE_URL)
        assert len(jobs_of(manifests)) == len(sweep.trials) + (2 if sweep.stage == "dpo" else 1)
        assert k8s_schemas.validate_stream(manifests) == []


def test_the_validator_catches_mistakes(example_sweeps, settings):
    job = jobs_of(km.sweep_manifests(trials_of(example_sweeps[0]), settings, STORE_URL))[0]
    typo = copy.deepcopy(job)
    typo["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    no_status = copy.deepcopy(job)
    del no_status["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["status"]
    problems = k8s_schemas.validate_stream([typo, no_status])
    assert len(problems) == 2
    assert "restartPolicyy" in problems[0] and "status" in problems[1]


# ------------------------------------------------------------------------------------------ expected file

def test_manifests_match_the_reviewed_expected_file(example_sweeps, settings):
    manifests = [m for sweep in example_sweeps for m in km.sweep_manifests(trials_of(sweep), settings, STORE_URL)]
    text = yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True, width=120)
    if os.environ.get("FINESWEEP_UPDATE_EXPECTED"):
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        EXPECTED.write_text(text)
    assert text == EXPECTED.read_text(), (
        f"manifests differ from {EXPECTED.relative_to(ROOT)}; if the change is intended, rerun with "
        f"FINESWEEP_UPDATE_EXPECTED=1 and review the diff")


# ------------------------------------------------------------------------------------------ contents

def test_no_literal_credentials_only_secret_refs(example_sweeps, monkeypatch):
    import finesweep.store

    # The submitter's own environment holds credentials (to read the store): they must not leak. The store
    # itself stays out of reach: tests send no traffic anywhere.
    monkeypatch.setattr(finesweep.store, "open_store", _unreachable_store)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    settings = k8s_backend.load_settings({"s3_secret_name": "store-creds", "s3_endpoint": "http://minio:9000"})
    out, err = io.StringIO(), io.StringIO()
    for sweep in example_sweeps:
        k8s_backend.dry_run(sweep, trials_of(sweep), STORE_URL, settings, out=out, err=err)
    for text in (out.getvalue(), err.getvalue()):
        assert TEST_ACCESS_KEY not in text and TEST_SECRET_KEY not in text
    for job in jobs_of(yaml.safe_load_all(out.getvalue())):
        for container in pod_containers(job):
            env = {e["name"]: e for e in container["env"]}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the Secret's keys default to the names
                assert "value" not in env[var]
                assert env[var]["valueFrom"] == {"secretKeyRef": {"name": "store-creds", "key": var}}
            assert env["FINESWEEP_S3_ENDPOINT"]["value"] == "http://minio:9000"
            assert env["AWS_REGION"]["value"] == "us-east-1"
            assert not any("SECRET" in e["name"] and "value" in e for e in container["env"])


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_gpu_limits_and_pool(example_sweeps, gpus):
    settings = k8s_backend.load_settings({"gpus_per_trial": gpus})
    manifests = km.sweep_manifests(trials_of(example_sweeps[0]), settings, STORE_URL)
    for job in jobs_of(manifests):
        pod = job["spec"]["template"]["spec"]
        for container in pod_containers(job):
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["FINESWEEP_NUM_GPUS"] == str(gpus)
            limits = container["resources"].get("limits", {})
            if gpus:
                assert limits["nvidia.com/gpu"] == gpus
                assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
            else:
                assert "nvidia.com/gpu" not in limits
        if gpus:
            assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
            assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        else:
            assert "nodeSelector" not in pod and "tolerations" not in pod
    if not gpus:
        assert "nvidia.com/gpu" not in yaml.safe_dump_all(manifests)


def test_processes_per_trial_without_gpus(example_sweeps):
    """jobs.processesPerTrial reaches the train container as FINESWEEP_PROCESSES (finesweep-train launches that
    many ranks); the eval container runs one process; the default (1) sets nothing; with GPUs it is refused."""
    trials, trained = trials_of(example_sweeps[0]), 0
    for processes, expected in ((2, "2"), (1, None)):
        settings = k8s_backend.load_settings({"gpus_per_trial": 0, "jobs.processesPerTrial": processes})
        for job in jobs_of(km.sweep_manifests(trials, settings, STORE_URL)):
            by_name = {c["name"]: {e["name"]: e.get("value") for e in c["env"]} for c in pod_containers(job)}
            assert "FINESWEEP_PROCESSES" not in by_name[km.EVAL_CONTAINER]
            if km.TRAIN_CONTAINER in by_name:  # a baseline trial only evaluates
                assert by_name[km.TRAIN_CONTAINER].get("FINESWEEP_PROCESSES") == expected
                trained += 1
    assert trained
    with pytest.raises(km.SettingsError, match=r"processes_per_trial \(jobs.processesPerTrial\).*one process per "
                                               r"GPU.*Fix: set jobs.processesPerTrial to 1"):
        k8s_backend.load_settings({"gpus_per_trial": 2, "processes_per_trial": 2})
    with pytest.raises(km.SettingsError, match=r"processes_per_trial.*0 is not a process count"):
        k8s_backend.load_settings({"gpus_per_trial": 0, "processes_per_trial": 0})


def test_pod_failure_policy_and_retries(example_sweeps, settings):
    for job in jobs_of(km.sweep_manifests(trials_of(example_sweeps[1]), settings, STORE_URL)):
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        assert spec["podFailurePolicy"]["rules"] == [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [exitcodes.CONFIG_ERROR]}},
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [exitcodes.PREEMPTED]}},
        ]
        assert (exitcodes.CONFIG_ERROR, exitcodes.PREEMPTED) == (3, 143)
        assert spec["podReplacementPolicy"] == "Failed"
        assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 86400
        assert spec["ttlSecondsAfterFinished"] == 604800
        assert "suspend" not in spec


def test_security_context_and_writable_paths(example_sweeps, settings):
    for job in jobs_of(km.sweep_manifests(trials_of(example_sweeps[0]), settings, STORE_URL)):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["fsGroup"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
        for container in pod_containers(job):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert set(mounts) == {"/etc/finesweep", "/tmp", "/home/finesweep/.cache", "/work", "/dev/shm"}
            assert mounts["/etc/finesweep"]["readOnly"] is True
            for path, mount in mounts.items():
                if path != "/etc/finesweep":
                    assert "emptyDir" in volumes[mount["name"]], path
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HF_HOME"].startswith("/home/finesweep/.cache/")


def test_labels_annotations_and_names(sweeps, settings):
    names = []
    for sweep in sweeps:
        trials = trials_of(sweep)
        manifests = km.sweep_manifests(trials, settings, STORE_URL)
        for spec, job, configmap in zip(trials, manifests[0::2], manifests[1::2]):
            name = job["metadata"]["name"]
            assert name == km.job_name(spec) and DNS1123_LABEL.match(name) and len(name) <= 63
            names.append(name)
            expected = {
                "app.kubernetes.io/name": "finesweep", "app.kubernetes.io/component": "trial",
                "app.kubernetes.io/part-of": "finesweep", "app.kubernetes.io/managed-by": "finesweep-submitter",
                "finesweep.io/sweep": sweep.name, "finesweep.io/trial": spec.trial_id,
                "finesweep.io/stage": spec.stage,
            }
            for obj in (configmap, job, job["spec"]["template"]):
                # The Job and its pods also say which attempt of the trial they run; the ConfigMap is per Job.
                attempt = {} if obj is configmap else {"finesweep.io/attempt": "1"}
                assert obj["metadata"]["labels"] == {**expected, **attempt}
                assert obj["metadata"]["annotations"]["finesweep.io/trial-name"] == spec.name
            assert configmap["metadata"]["name"] == f"{name}-spec"
            assert job["metadata"]["namespace"] == configmap["metadata"]["namespace"] == "finesweep"
    assert len(names) == len(set(names)), "job names must be unique"


def test_job_names_are_deterministic_and_always_valid(example_sweeps):
    spec = example_sweeps[0].trial_specs()[0]
    assert km.job_name(spec) == f"sft-{spec.trial_id}" == km.job_name(copy.deepcopy(spec))
    long_a = dataclasses.replace(spec, sweep="a" * 70 + "-one")
    long_b = dataclasses.replace(spec, sweep="a" * 70 + "-two")
    odd = dataclasses.replace(spec, sweep="Mixed_Case.sweep")
    names = [km.job_name(s) for s in (long_a, long_b, odd)]
    for name, trial in zip(names, (long_a, long_b, odd)):
        assert len(name) <= 63 and DNS1123_LABEL.match(name), name
        assert name.endswith(trial.trial_id)  # the id survives any cut: `kubectl get jobs` shows it
    assert len(set(names)) == 3
    assert km.job_name(long_a) == km.job_name(dataclasses.replace(long_a))


def test_stage_layout_train_init_then_eval(example_sweeps, settings):
    for sweep in example_sweeps:
        trials = trials_of(sweep)
        manifests = km.sweep_manifests(trials, settings, STORE_URL)
        for spec, job, configmap in zip(trials, manifests[0::2], manifests[1::2]):
            pod = job["spec"]["template"]["spec"]
            (main,) = pod["containers"]
            assert main["name"] == "eval" and main["image"] == "finesweep/evaluator:0.1.0"
            assert "command" not in main  # keep the image's tini entrypoint
            assert main["args"] == ["finesweep-eval", "--spec", "/etc/finesweep/spec.json", "--store", STORE_URL]
            if spec.stage == "base":
                assert "initContainers" not in pod
            else:
                (train,) = pod["initContainers"]
                assert train["name"] == "train" and train["image"] == "finesweep/trainer:0.1.0"
                assert "command" not in train
                assert train["args"] == ["finesweep-train", "--spec", "/etc/finesweep/spec.json",
                                            "--store", STORE_URL]
            # The mounted file is exactly to_dict(spec): the pod rebuilds the same trial (and id).
            assert pod["volumes"][0]["configMap"] == {"name": configmap["metadata"]["name"],
                                                      "items": [{"key": "spec.json", "path": "spec.json"}]}
            rebuilt = trial_from_dict(json.loads(configmap["data"]["spec.json"]))
            assert rebuilt == spec and rebuilt.trial_id == spec.trial_id
    stages = [s.stage for s in trials_of(example_sweeps[1])]
    assert stages == ["dpo", "base", "base"]  # trial, base model, SFT start model


def test_kueue_queue_label_and_suspend(example_sweeps):
    settings = k8s_backend.load_settings({"jobs.kueueQueueName": "t4-queue"})
    for job in jobs_of(km.sweep_manifests(trials_of(example_sweeps[0]), settings, STORE_URL)):
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t4-queue"
        assert job["spec"]["suspend"] is True
        assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]


def test_plan_is_idempotent(tmp_path, settings):
    path = tmp_path / "example.yaml"
    path.write_text(EXAMPLE_PIPELINE)
    first = [km.sweep_manifests(trials_of(s), settings, STORE_URL) for s in load_sweeps(path)]
    second = [km.sweep_manifests(trials_of(s), k8s_backend.load_settings(), STORE_URL) for s in load_sweeps(path)]
    assert yaml.safe_dump_all(first) == yaml.safe_dump_all(second)
    sweep = load_sweeps(path)[0]
    doubled = km.sweep_manifests(trials_of(sweep) + trials_of(sweep), settings, STORE_URL)
    assert doubled == first[0]  # a trial listed twice is one Job


# ------------------------------------------------------------------------------------------ settings

def test_host_network_and_extra_env_volumes_reach_both_containers(example_sweeps):
    settings = k8s_backend.load_settings({
        "jobs.hostNetwork": True, "jobs.extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "jobs.extraVolumes": [{"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}}],
        "jobs.extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]})
    job = jobs_of(km.sweep_manifests(trials_of(example_sweeps[0]), settings, STORE_URL))[-1]
    pod = job["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["volumes"][-1] == {"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}}
    for container in pod_containers(job):
        assert container["env"][-1] == {"name": "HF_HUB_OFFLINE", "value": "1"}
        assert container["volumeMounts"][-1] == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert "hostNetwork" not in jobs_of(km.sweep_manifests(trials_of(example_sweeps[0]), k8s_backend.load_settings(),
                                                           STORE_URL))[0]["spec"]["template"]["spec"]


@pytest.mark.parametrize("overrides,match", [
    ({"extra_volume_mounts": [{"name": "nope", "mountPath": "/x"}]}, "extra_volume_mounts.*names no volume"),
    ({"extra_volumes": [{"name": "m", "emptyDir": {}}], "extra_volume_mounts": [{"name": "m", "mountPath": "x"}]},
     "absolute mountPath"),
    ({"extra_volumes": [{"name": "tmp", "emptyDir": {}}]}, "extra_volumes.*other than"),
    ({"extra_env": [{"value": "1"}]}, "extra_env.*needs a name"),
])
def test_extra_settings_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        k8s_backend.load_settings(overrides)


def test_settings_defaults_mirror_the_chart():
    assert k8s_backend.load_settings() == km.ClusterSettings()


def test_committed_values_schema_is_the_generated_one():
    assert (ROOT / "charts" / "finesweep" / "values.schema.json").read_text() == values_schema.render(), (
        "charts/finesweep/values.schema.json is stale: run "
        ".venv/bin/python -m submitter.values_schema > charts/finesweep/values.schema.json")


def test_every_chart_setting_is_declared_once_with_its_default_in_values_yaml():
    """Each cluster setting is one row of cluster_settings.SETTINGS; its default is values.yaml's (the rows
    carry none), every key of the settings' groups in values.yaml is a row or a chart-only key, and the
    ConfigMap document carries every chart setting."""
    values = yaml.safe_load((ROOT / "charts" / "finesweep" / "values.yaml").read_text())
    rows = cs.SETTINGS
    assert [s.field for s in rows] == [f.name for f in dataclasses.fields(km.ClusterSettings)][:-1]  # + overrides
    assert len({s.path for s in rows}) == len(rows) and set(cs.SETTINGS_PATHS) == {s.field for s in rows}
    doc = km.resolved_defaults(values)
    defaults = km.ClusterSettings()
    for setting in rows:
        if setting.source == cs.SUBMITTER:
            assert getattr(defaults, setting.field) == cs.convert(setting, setting.default)
            continue
        assert setting.default is None, f"{setting.field}: the default belongs in values.yaml"
        found, value = cs.lookup(doc, setting.path)
        assert found, f"{setting.path} missing from the finesweep-defaults document"
        assert getattr(defaults, setting.field) == cs.convert(setting, value)
        if setting.source == cs.VALUES:
            assert cs.lookup(values, setting.path)[0], f"{setting.path} missing from values.yaml"
    assert defaults.processes_per_trial == values["jobs"]["processesPerTrial"]
    assert defaults.poll_seconds == values["controller"]["pollSeconds"]
    schema = values_schema.build_schema()
    for group in ("images", "jobs", "s3", "controller"):
        assert set(values[group]) == set(schema["properties"][group]["properties"])
        for key in values[group]:
            assert f"{group}.{key}" in values_schema.value_comments(
                (ROOT / "charts" / "finesweep" / "values.yaml").read_text()), f"{group}.{key} has no comment"
    import jsonschema

    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)


def test_settings_schema_type_matches_the_field_type():
    """A setting's values.yaml schema and its ClusterSettings field agree: changing the type in the row
    changes both."""
    schema = values_schema.build_schema()
    for setting in cs.SETTINGS:
        if setting.source != cs.VALUES:
            continue
        group, key = setting.path.split(".")
        prop = schema["properties"][group]["properties"][key]
        if setting.schema is cs.IMAGE:
            assert cs.base_type(setting) is str and prop["type"] == "object"  # {repository, tag} -> "repo:tag"
        elif setting.schema is cs.QUANTITY:
            assert cs.base_type(setting) is str and "oneOf" in prop
        else:
            assert prop["type"] == values_schema._JSON_TYPES[cs.base_type(setting)], setting.field


def test_settings_overrides_by_field_or_path():
    by_field = k8s_backend.load_settings({"gpus_per_trial": 2, "namespace": "ml"})
    by_path = k8s_backend.load_settings({"jobs.gpusPerTrial": 2, "namespace": "ml"})
    assert by_field.gpus_per_trial == by_path.gpus_per_trial == 2
    assert by_field.namespace == "ml"
    with pytest.raises(ValueError, match="unknown cluster setting 'gpus'"):
        k8s_backend.load_settings({"gpus": 2})
    with pytest.raises(ValueError, match="fixed tag"):
        k8s_backend.load_settings({"trainer_image": "finesweep/trainer:latest"})
    with pytest.raises(ValueError, match="fixed tag"):
        k8s_backend.load_settings({"evaluator_image": "registry:5000/finesweep/evaluator"})
    with pytest.raises(ValueError, match="namespace"):
        k8s_backend.load_settings({"namespace": "Not_Valid"})
    assert k8s_backend.load_settings({"trainer_image": "registry:5000/t@sha256:" + "a" * 64}).trainer_image


def test_cluster_defaults_sit_between_chart_and_overrides(fake_cluster):
    doc = {"jobs": {"gpusPerTrial": 0, "shmSize": "512Mi"}, "s3": {"endpoint": "http://minio.dev:9000",
                                                                     "secretName": "dev-s3"}}
    fake_cluster.configmaps["finesweep-defaults"] = {"metadata": {"name": "finesweep-defaults"},
                                                     "data": {"defaults.json": json.dumps(doc)}}
    settings = k8s_backend.load_settings({"jobs.shmSize": "1Gi"})
    layered = k8s_backend.with_cluster_defaults(settings, fake_cluster)
    assert layered.gpus_per_trial == 0 and layered.s3_endpoint == "http://minio.dev:9000"
    assert layered.s3_secret_name == "dev-s3"
    assert layered.shm_size == "1Gi"  # an explicit override still wins
    assert layered.trainer_image == settings.trainer_image
    del fake_cluster.configmaps["finesweep-defaults"]
    err = io.StringIO()
    assert k8s_backend.with_cluster_defaults(settings, fake_cluster, err) == settings
    assert "finesweep-defaults" in err.getvalue()


# ------------------------------------------------------------------------------------------ dry run

def test_dry_run_without_a_kubeconfig_prints_one_stream_and_touches_no_cluster(tmp_path):
    """In a fresh interpreter with a kubeconfig that does not exist: the stream comes out (the chart's defaults,
    said in a note), and the `kubernetes` package is never even imported."""
    path = tmp_path / "example.yaml"
    path.write_text(EXAMPLE_PIPELINE)
    store = tmp_path / "store"
    code = f"""
import sys
from finesweep.spec import load_sweeps, StartRef
from submitter import k8s_backend
sweep = load_sweeps({str(path)!r})[0]
trials = sweep.trial_specs() + sweep.reference_specs()
settings = k8s_backend.load_settings()
names = k8s_backend.dry_run(sweep, trials, {str(store)!r}, settings, core=k8s_backend.dry_run_core(settings))
print("RESULT", len(names), any(m.startswith("kubernetes") for m in sys.modules), file=sys.stderr)
"""
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-such-kubeconfig"), "KUBERNETES_SERVICE_HOST": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT 3 False" in proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    assert [d["kind"] for d in docs] == ["Job", "ConfigMap"] * 3  # the order a submit creates them in
    assert proc.stdout.startswith("# finesweep dry run: sweep sft, 3 Job(s)")
    assert "not s3://" in proc.stderr  # a local folder is no store for pods: said, not hidden
    assert "no kubeconfig: the objects below use the chart's values.yaml defaults" in proc.stderr
    assert not (tmp_path / "no-such-kubeconfig").exists()


def test_dry_run_skips_trials_the_store_marks_done(tmp_path, example_sweeps, settings):
    from finesweep.store import DONE, open_store, trial_prefix

    sweep = example_sweeps[0]
    trials = trials_of(sweep)
    store = open_store(tmp_path)
    store.write_json(f"{trial_prefix(sweep.name, trials[0].trial_id)}/{DONE}",
                     {"files": {}, "evaluation": trials[0].evaluation_id})
    out, err = io.StringIO(), io.StringIO()
    names = k8s_backend.dry_run(sweep, trials, str(tmp_path), settings, out=out, err=err)
    assert names == [km.job_name(t) for t in trials[1:]]
    assert f"{trials[0].trial_id}): done in the store" in err.getvalue()
    assert trials[0].trial_id not in out.getvalue().split("---", 1)[1]


def test_dry_run_evaluates_again_a_trial_done_under_other_eval_settings(tmp_path, example_sweeps, settings):
    """A changed eval section keeps the trial id (nothing retrains) and makes the finished trial's Job make way
    for attempt 2, which only evaluates (NextAction.EVALUATE)."""
    from finesweep.store import DONE, end_attempt, open_store, start_attempt, trial_prefix

    sweep = example_sweeps[0]
    trials = trials_of(sweep)
    store = open_store(tmp_path)
    first = trials[0]
    start_attempt(store, sweep.name, first.trial_id, "k8s", job=km.job_name(first))
    store.write_json(f"{trial_prefix(sweep.name, first.trial_id)}/{DONE}",
                     {"files": {}, "evaluation": first.evaluation_id})
    end_attempt(store, sweep.name, first.trial_id, "done")
    longer = dataclasses.replace(sweep.eval, max_new_tokens=sweep.eval.max_new_tokens + 64)
    changed = dataclasses.replace(sweep, eval=longer)
    again = trials_of(changed)
    assert [t.trial_id for t in again] == [t.trial_id for t in trials]  # evaluation is not identity
    assert again[0].evaluation_id != first.evaluation_id
    out, err = io.StringIO(), io.StringIO()
    names = k8s_backend.dry_run(changed, again, str(tmp_path), settings, out=out, err=err)
    assert names == [km.job_name(again[0], 2)] + [km.job_name(t) for t in again[1:]]
    assert (f"was evaluated under other eval settings; evaluating it again (not retraining): a submit deletes job "
            f"{km.job_name(first)} and runs attempt 2") in err.getvalue()
    # The unchanged sweep still finds it done.
    out, err = io.StringIO(), io.StringIO()
    assert k8s_backend.dry_run(sweep, trials, str(tmp_path), settings, out=out,
                              err=err) == [km.job_name(t) for t in trials[1:]]


def _unreachable_store(url):
    from finesweep.store import StoreError

    raise StoreError(f"{url}: not reachable from tests")


def test_dry_run_goes_on_when_the_store_cannot_be_read(monkeypatch, example_sweeps, settings):
    import finesweep.store

    monkeypatch.setattr(finesweep.store, "open_store", _unreachable_store)
    out, err = io.StringIO(), io.StringIO()
    sweep = example_sweeps[0]
    names = k8s_backend.dry_run(sweep, trials_of(sweep), STORE_URL, settings, out=out, err=err)
    assert len(names) == 3
    assert "could not be read" in err.getvalue() and "without checking" in err.getvalue()


# ------------------------------------------------------------------------------------------ fake cluster

class _Response:
    def __init__(self, obj):
        self.data = json.dumps(obj).encode()


class FakeCluster:
    """The slice of BatchV1Api + CoreV1Api the backend uses, in memory, answering raw JSON like the real client
    with _preload_content=False."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.configmaps: dict[str, dict] = {}
        self.pods: list[dict] = []
        self.logs: dict[tuple[str, str], list[bytes]] = {}
        self.most_unfinished = 0
        self.deleted_jobs: list[tuple[str, str | None]] = []
        self.created_jobs: list[str] = []

    @staticmethod
    def _matches(obj, selector):
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in (part.split("=", 1) for part in selector.split(",")))

    def _unfinished(self):
        return sum(1 for job in self.jobs.values() if not k8s_backend._finished(job))

    def _conflict(self, status):
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=status, reason="fake")

    # batch/v1
    def create_namespaced_job(self, namespace, body, _preload_content=True):
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise self._conflict(409)
        job = copy.deepcopy(body)
        job["metadata"]["uid"] = f"uid-{name}"
        job["status"] = {}
        self.jobs[name] = job
        self.created_jobs.append(name)
        self.most_unfinished = max(self.most_unfinished, self._unfinished())
        return _Response(job)

    def read_namespaced_job(self, name, namespace, _preload_content=True):
        if name not in self.jobs:
            raise self._conflict(404)
        return _Response(self.jobs[name])

    def list_namespaced_job(self, namespace, label_selector, _preload_content=True):
        return _Response({"items": [j for j in self.jobs.values() if self._matches(j, label_selector)]})

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        if name not in self.jobs:
            raise self._conflict(404)
        self.jobs.pop(name)
        self.deleted_jobs.append((name, propagation_policy))
        # Garbage collection of what the Job owns (its pods, its spec ConfigMap), at once here.
        self.pods = [p for p in self.pods if (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name")
                     != name]

    # core/v1
    def create_namespaced_config_map(self, namespace, body, _preload_content=True):
        name = body["metadata"]["name"]
        if name in self.configmaps:
            raise self._conflict(409)
        self.configmaps[name] = copy.deepcopy(body)
        return _Response(body)

    def read_namespaced_config_map(self, name, namespace, _preload_content=True):
        if name not in self.configmaps:
            raise self._conflict(404)
        return _Response(self.configmaps[name])

    def delete_namespaced_config_map(self, name, namespace):
        if name not in self.configmaps:
            raise self._conflict(404)
        self.configmaps.pop(name)

    def list_namespaced_config_map(self, namespace, label_selector, _preload_content=True):
        return _Response({"items": [c for c in self.configmaps.values() if self._matches(c, label_selector)]})

    def list_namespaced_pod(self, namespace, label_selector, _preload_content=True):
        return _Response({"items": [p for p in self.pods if self._matches(p, label_selector)]})

    def read_namespaced_pod(self, name, namespace, _preload_content=True):
        return _Response(next(p for p in self.pods if p["metadata"]["name"] == name))

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content=True):
        assert follow
        return iter(self.logs[(name, container)])

    def finish_all(self, condition="Complete"):
        for job in self.jobs.values():
            if not k8s_backend._finished(job):
                job["status"] = {"conditions": [{"type": condition, "status": "True"}]}


@pytest.fixture
def fake_cluster(monkeypatch):
    cluster = FakeCluster()
    monkeypatch.setattr(k8s_backend, "_clients", lambda settings: (cluster, cluster))
    return cluster


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    """A real submit needs s3://; point that URL at a local folder so the done-markers can be checked."""
    import finesweep.store

    real_open = finesweep.store.open_store
    monkeypatch.setattr(finesweep.store, "open_store", lambda url: real_open(tmp_path))
    return tmp_path


def schedule(cluster, store_dir, sweep, trials, settings=None, max_attempts: int = 3) -> list[str]:
    """What the controller's engine does for each trial it runs: controller.K8sBackend.schedule (the store's
    rule, then the attempt's Job and its ConfigMap); returns the names of the Jobs created."""
    from finesweep.store import LocalStore
    from submitter.controller import K8sBackend

    before = len(cluster.created_jobs)
    backend = K8sBackend(LocalStore(store_dir), STORE_URL, settings or k8s_backend.load_settings(), max_attempts,
                         sweep=sweep)
    for spec in trials:
        backend.schedule(spec)
    return cluster.created_jobs[before:]


def test_dry_run_prints_exactly_the_objects_submit_creates(fake_cluster, local_store, example_sweeps, settings):
    """One build for both (TorchX's dryrun/schedule): with the cluster's finesweep-defaults in place and a tracked
    sweep, the dry run's stream is object for object what the submit then creates, in the same order; the only
    difference is the owner's uid, which exists once the Job does."""
    doc = {"jobs": {"shmSize": "768Mi"}, "s3": {"endpoint": "http://minio.dev:9000"}}
    fake_cluster.configmaps["finesweep-defaults"] = {"metadata": {"name": "finesweep-defaults"},
                                                     "data": {"defaults.json": json.dumps(doc)}}
    sweep = dataclasses.replace(example_sweeps[0], max_parallel=5)
    sweep = dataclasses.replace(sweep, tracking=TrackingSpec(mlflow_uri="http://mlflow.example:5000"))
    out = io.StringIO()
    planned = k8s_backend.dry_run(sweep, trials_of(sweep), STORE_URL, settings, out=out,
                                 err=io.StringIO(), core=fake_cluster)
    printed = [d for d in yaml.safe_load_all(out.getvalue()) if d is not None]
    created = schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    assert created == planned and len(printed) == 2 * len(created)
    live = []
    for name in created:  # the order the submit created them in: each Job, then its ConfigMap
        job = copy.deepcopy(fake_cluster.jobs[name])
        configmap = copy.deepcopy(fake_cluster.configmaps[f"{name}-spec"])
        assert configmap["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        configmap["metadata"]["ownerReferences"][0]["uid"] = km.OWNER_UID_AT_CREATION
        del job["metadata"]["uid"], job["status"]
        live += [job, configmap]
    assert printed == live
    # the cluster's defaults and the sweep's tracking reached both
    env = {e["name"]: e.get("value") for e in pod_containers(printed[0])[-1]["env"]}
    assert env["FINESWEEP_S3_ENDPOINT"] == "http://minio.dev:9000" and "MLFLOW_TRACKING_URI" in env
    assert "768Mi" in json.dumps(printed[0])


def test_submit_creates_job_then_owned_configmap_and_is_idempotent(fake_cluster, local_store, example_sweeps,
                                                                     settings):
    sweep = example_sweeps[0]  # max_parallel 2, 3 trials
    sweep = dataclasses.replace(sweep, max_parallel=5)
    names = schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    assert names == [km.job_name(t) for t in trials_of(sweep)]
    for name in names:
        owner = fake_cluster.configmaps[f"{name}-spec"]["metadata"]["ownerReferences"]
        assert owner == [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": f"uid-{name}"}]
    # Again (a replacement controller): nothing new; a ConfigMap lost between its Job and itself is put back.
    del fake_cluster.configmaps[f"{names[0]}-spec"]
    assert schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings) == []
    assert f"{names[0]}-spec" in fake_cluster.configmaps
    owner = fake_cluster.configmaps[f"{names[0]}-spec"]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == f"uid-{names[0]}"


def test_the_engine_keeps_at_most_max_parallel_jobs_in_flight(fake_cluster, local_store, example_sweeps, settings):
    """The controller's loop (engine.run_sweep with K8sBackend) on the in-memory API: with max_parallel 1 only one
    of the sweep's Jobs is unfinished at any time, and every trial gets exactly one Job."""
    from finesweep.store import DONE, LocalStore
    from submitter import engine
    from submitter.controller import K8sBackend

    store = LocalStore(local_store)
    sweep = dataclasses.replace(example_sweeps[0], max_parallel=1)
    specs = {s.trial_id: s for s in trials_of(sweep)}

    class RunningPods(K8sBackend):
        def wait(self, seconds):  # time passes: each Job's pod finishes its trial, which the store then shows
            for job in fake_cluster.jobs.values():
                if not k8s_backend._finished(job):
                    spec = specs[job["metadata"]["labels"]["finesweep.io/trial"]]
                    store.write_marker(f"{spec.sweep}/{spec.trial_id}/{DONE}", {"evaluation": spec.evaluation_id})
            fake_cluster.finish_all()
            super().wait(0)

    counts = engine.run_sweep(sweep, store, RunningPods(store, STORE_URL, settings, 3, sweep=sweep), poll_s=0)
    assert fake_cluster.most_unfinished == 1
    assert sorted(fake_cluster.created_jobs) == sorted(km.job_name(s) for s in specs.values())
    assert counts["complete"] == len(sweep.trial_specs()) and counts["failed"] == 0


def test_submit_refuses_a_local_store(example_sweeps, tmp_path):
    with pytest.raises(ValueError, match="s3://"):
        k8s_backend.check_store_url(str(tmp_path), dry_run=False)


def test_status_rows(fake_cluster, local_store, example_sweeps, settings):
    sweep = example_sweeps[0]
    sweep = dataclasses.replace(sweep, max_parallel=5)
    trials = trials_of(sweep)
    schedule(fake_cluster, local_store, sweep, trials, settings)
    training, failed, queued = (fake_cluster.jobs[km.job_name(t)] for t in trials)
    training["status"] = {"startTime": "2026-01-01T00:00:00Z", "active": 1}
    failed["status"] = {"startTime": "2026-01-01T00:00:00Z", "failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "lastTransitionTime": "2026-01-01T00:05:00Z",
         "message": "Container train for pod x failed with exit code 3 matching FailJob rule at index 1"}]}
    pod_labels = dict(training["spec"]["template"]["metadata"]["labels"],
                      **{"batch.kubernetes.io/job-name": training["metadata"]["name"]})
    fake_cluster.pods.append({
        "metadata": {"name": "p1", "labels": pod_labels, "creationTimestamp": "2026-01-01T00:00:01Z"},
        "status": {"phase": "Pending", "initContainerStatuses": [{"name": "train", "state": {"running": {}}}],
                   "containerStatuses": [{"name": "eval", "state": {"waiting": {"reason": "PodInitializing"}}}]}})
    failed_labels = dict(failed["spec"]["template"]["metadata"]["labels"],
                         **{"batch.kubernetes.io/job-name": failed["metadata"]["name"]})
    fake_cluster.pods.append({
        "metadata": {"name": "p2", "labels": failed_labels, "creationTimestamp": "2026-01-01T00:00:02Z"},
        "status": {"phase": "Failed", "initContainerStatuses": [
            {"name": "train", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}})
    rows = {row["trial_id"]: row for row in k8s_backend.status(sweep.name, settings)}
    assert set(rows) == {t.trial_id for t in trials}
    row = rows[trials[0].trial_id]
    assert (row["phase"], row["reason"], row["trial"], row["stage"]) == ("Running", "training", trials[0].name, "sft")
    assert row["started"] == "2026-01-01T00:00:00Z" and row["finished"] is None
    row = rows[trials[1].trial_id]
    assert row["phase"] == "Failed" and row["reason"].startswith("PodFailurePolicy: ")
    # The pod says why: the reason a person reads in `make status` and in the report.
    assert row["reason"].endswith("; last pod: train: OOMKilled (exit 137)") and row["exit_code"] == 137
    assert row["finished"] == "2026-01-01T00:05:00Z"
    assert (rows[trials[2].trial_id]["phase"], rows[trials[2].trial_id]["reason"]) == ("Pending", "no pod yet")
    assert set(row) == {"trial_id", "trial", "stage", "job", "phase", "started", "finished", "reason", "exit_code",
                        "attempt", "failure"}
    assert row["attempt"] == 1 and row["failure"] is None  # the cluster ended it: the Job's reason is recorded


def test_failure_reason_carries_the_containers_last_error_line(example_sweeps):
    """terminationMessagePolicy FallbackToLogsOnError: the kubelet keeps a failed container's log tail as its
    termination message; the failure reason quotes the line naming the error, not the traceback around it."""
    log_tail = ("INFO step 8/8 (100%) loss 9.1\n"
                "2026-12-02 01:00:00 ERROR [e2e/damaged 0123] configuration error: s3://b/p/adapter_model.safetensors:"
                " checksum differs from marker _TRAINED\n")
    pod = {"status": {"containerStatuses": [{"name": "eval", "state": {"terminated": {
        "exitCode": 3, "reason": "Error", "message": log_tail}}}]}}
    reason, code = k8s_backend._failed_container(pod)
    assert code == 3 and reason.startswith("eval: Error (exit 3): ") and reason.endswith(
        "checksum differs from marker _TRAINED"), reason
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: " + "x" * 900
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = traceback
    reason, _ = k8s_backend._failed_container(pod)
    assert "RuntimeError: xxx" in reason and reason.endswith("...") and len(reason) < 450
    for job in jobs_of(km.sweep_manifests(trials_of(example_sweeps[0]), k8s_backend.load_settings({}), STORE_URL)):
        for container in pod_containers(job):
            assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_a_process_failure_is_recorded_as_a_local_run_records_it():
    """Drift found by the shared local/cluster e2e scenario: the same trial failing the same way was recorded as
    `train: SafetensorError: ...` locally and as `job: BackoffLimitExceeded: ...; last pod: train: Error (exit
    1): SafetensorError: ...` on the cluster. A process that exited with an error of its own is now recorded with
    its container as the phase and its failure line (store.failure_line, as local.run_phase takes it) as the
    reason; the Job's wording stays in `status`. What the cluster ended (OOMKilled) keeps the Job's reason."""
    from finesweep.store import failure_line

    log_tail = ("18:59:09 INFO resuming from checkpoint-3 (step 3) in s3://b/p\n"
                "18:59:09 ERROR [e2e/broken sft-0123] SafetensorError: Error while deserializing header\n"
                "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                "safetensors._safetensors_rust.SafetensorError: Error while deserializing header\n")
    job = {"metadata": {"name": "e2e-broken-a2", "labels": {"finesweep.io/attempt": "2"}},
           "status": {"failed": 2, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                    "message": "Job has reached the specified backoff limit"}]}}
    pod = {"status": {"initContainerStatuses": [{"name": "train", "state": {"terminated": {
        "exitCode": 1, "reason": "Error", "message": log_tail}}}]}}
    row = k8s_backend.job_row(job, pod)
    assert row["failure"] == ("train", failure_line(log_tail.splitlines()))
    assert row["reason"].startswith("BackoffLimitExceeded: ") and row["attempt"] == 2  # what `status` shows
    pod["status"]["initContainerStatuses"][0]["state"]["terminated"] = {"exitCode": 137, "reason": "OOMKilled",
                                                                        "message": log_tail}
    assert k8s_backend.job_row(job, pod)["failure"] is None


def test_jobs_the_cluster_gave_up_on_are_recorded_in_the_store_once(fake_cluster, local_store, example_sweeps,
                                                                     settings):
    """An OOMKilled pod cannot write its own _FAILED marker: the submitter writes it, so status, report and a
    pipeline waiting on the sweep see the failure (instead of waiting for a marker that never comes)."""
    from finesweep.store import LocalStore, trial_state
    from submitter import engine
    from submitter.plan import SweepPlan

    sweep = dataclasses.replace(example_sweeps[0], max_parallel=10)
    plan = SweepPlan(sweep, None)
    specs = plan.all_specs()
    schedule(fake_cluster, local_store, sweep, specs, settings)
    starved = fake_cluster.jobs[km.job_name(specs[-1])]
    starved["status"] = {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]}
    fake_cluster.pods.append(_pod(starved, "p-oom", "2026-01-01T00:00:00Z",
                                  {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, {"waiting": {}}))
    store = LocalStore(local_store)

    assert engine.record_cluster_failures(plan, store, k8s_backend.status(sweep.name, settings)) == 1
    marker = store.read_json(f"{sweep.name}/{specs[-1].trial_id}/_FAILED")
    assert marker["exit_code"] == 137 and marker["phase"] == "job" and marker["job"] == starved["metadata"]["name"]
    assert marker["reason"] == ("BackoffLimitExceeded: Job has reached the specified backoff limit; "
                                "last pod: train: OOMKilled (exit 137)")
    assert trial_state(store, sweep.name, specs[-1].trial_id) != "done"
    assert engine.record_cluster_failures(plan, store, k8s_backend.status(sweep.name, settings)) == 0  # written once

    # The rest finish; a _FAILED lost meanwhile is written again from the Job (the controller records them
    # before each sweep and at every wait, so the loop never waits on a Job the cluster gave up on).
    fake_cluster.finish_all()
    for i, spec in enumerate(specs[:-1]):
        store.write_json(f"{sweep.name}/{spec.trial_id}/eval.json", {"summary": {sweep.select.metric: float(i)}})
        store.write_marker(f"{sweep.name}/{spec.trial_id}/_DONE", {})
    store.delete(f"{sweep.name}/{specs[-1].trial_id}/_FAILED")
    assert engine.record_cluster_failures(plan, store, k8s_backend.status(sweep.name, settings)) == 1
    assert store.exists(f"{sweep.name}/{specs[-1].trial_id}/_FAILED")


def _pod(job: dict, name: str, created: str, init_state: dict | None, main_state: dict) -> dict:
    labels = dict(job["spec"]["template"]["metadata"]["labels"],
                  **{"batch.kubernetes.io/job-name": job["metadata"]["name"]})
    spec = {"containers": [{"name": "eval"}]}
    status = {"phase": "Failed", "containerStatuses": [{"name": "eval", "state": main_state}]}
    if init_state is not None:
        spec["initContainers"] = [{"name": "train"}]
        status["initContainerStatuses"] = [{"name": "train", "state": init_state}]
    return {"metadata": {"name": name, "labels": labels, "creationTimestamp": created,
                         "annotations": job["spec"]["template"]["metadata"]["annotations"]},
            "spec": spec, "status": status}


def test_follow_logs_streams_train_then_eval_of_the_newest_pod(fake_cluster, local_store, example_sweeps, settings):
    sweep = dataclasses.replace(example_sweeps[0], max_parallel=5)
    trials = trials_of(sweep)
    schedule(fake_cluster, local_store, sweep, trials, settings)
    job = fake_cluster.jobs[km.job_name(trials[0])]
    done = {"terminated": {"exitCode": 0}}
    fake_cluster.pods += [
        _pod(job, "old", "2026-01-01T00:00:00Z", {"terminated": {"exitCode": 143}}, {"waiting": {}}),
        _pod(job, "new", "2026-01-01T01:00:00Z", done, done),
    ]
    fake_cluster.logs = {("new", "train"): [b"step 1 loss 2.0\nstep 2 loss 1.5\n"], ("new", "eval"): [b"bleu=12.3\n"]}
    out = io.StringIO()
    k8s_backend.follow_logs(sweep.name, trials[0].trial_id, settings, out=out)
    name = trials[0].name
    assert out.getvalue().splitlines() == [f"[{name}/train] step 1 loss 2.0", f"[{name}/train] step 2 loss 1.5",
                                           f"[{name}/eval] bleu=12.3"]
    # A training that failed: its exit code is shown and eval (which never ran) is not waited for.
    fake_cluster.pods[1]["status"]["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 3}}
    fake_cluster.pods[1]["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "PodInitializing"}}
    out = io.StringIO()
    k8s_backend.follow_logs(sweep.name, trials[0].trial_id, settings, out=out)
    assert out.getvalue().splitlines()[-1] == f"[{name}/train] exited with code 3"
    out = io.StringIO()
    k8s_backend.follow_logs(sweep.name, trials[1].trial_id, settings, out=out)
    assert "no pods for trial" in out.getvalue()


def test_a_job_whose_configmap_cannot_be_created_is_taken_back(fake_cluster, local_store, example_sweeps, settings,
                                                                monkeypatch):
    from kubernetes.client.exceptions import ApiException

    def refuse(namespace, body, _preload_content=True):
        raise ApiException(status=403, reason="forbidden")

    monkeypatch.setattr(fake_cluster, "create_namespaced_config_map", refuse)
    with pytest.raises(ApiException):
        schedule(fake_cluster, local_store, example_sweeps[0], trials_of(example_sweeps[0]), settings)
    assert fake_cluster.jobs == {}


def test_make_dry_run_for_the_dpo_sweep_prints_valid_jobs_for_all_trials(tmp_path):
    """The issue's acceptance command, through make: stdout is one YAML stream (no set-up chatter in it) with the
    controller's ConfigMap and Job first, then a valid Job for each of the 5 trials plus the base and start
    reference rows."""
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none")}
    run = subprocess.run(["make", "-s", "submit", "SWEEP=dpo", "BACKEND=k8s", "DRY_RUN=1", f"STORE={tmp_path}/s"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    docs = [d for d in yaml.safe_load_all(run.stdout) if d]
    assert [d["kind"] for d in docs[:2]] == ["ConfigMap", "Job"]
    controller, jobs = docs[1], [d for d in docs[2:] if d["kind"] == "Job"]
    assert controller["metadata"]["name"] == "finesweep-controller-dpo"
    assert controller["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["finesweep", "controller"]
    assert yaml.safe_load(docs[0]["data"]["sweep.yaml"]) == yaml.safe_load((ROOT / "jobs" / "dpo.yaml").read_text())
    assert len(jobs) == 7
    assert sorted(j["metadata"]["annotations"]["finesweep.io/trial-name"] for j in jobs) == \
        ["base", "start", "t1", "t2", "t3", "t4", "t5"]
    assert k8s_schemas.validate_stream(docs) == []


# ------------------------------------------------------------------------------------------ retries and cancel

def _fail_job(cluster, job_name_, exit_code=3, reason="Error"):
    job = cluster.jobs[job_name_]
    job["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                                  "message": "exit code 3"}]}
    cluster.pods.append(_pod(job, f"{job_name_}-pod", "2026-01-01T00:00:00Z",
                             {"terminated": {"exitCode": exit_code, "reason": reason}}, {"waiting": {}}))


def _record_failed_jobs(store, sweep, settings) -> int:
    """What the controller does before a sweep and at every wait: Jobs the cluster gave up on, into the store."""
    from submitter import engine
    from submitter.plan import SweepPlan

    return engine.record_cluster_failures(SweepPlan(sweep, None), store, k8s_backend.status(sweep.name, settings))


def test_resubmit_retries_exactly_the_failed_trial_as_a_new_attempt(fake_cluster, local_store, example_sweeps,
                                                                     settings, caplog):
    """A failed trial's Job and ConfigMap are deleted and attempt 2 gets a Job of its own name; the finished
    trial and the running one are left alone; the store records both attempts."""
    from finesweep.store import LocalStore, TrialState, read_status

    sweep = dataclasses.replace(example_sweeps[0], max_parallel=10)
    done, failed, running = trials_of(sweep)[:3]
    schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    store = LocalStore(local_store)
    store.write_marker(f"{sweep.name}/{done.trial_id}/_DONE", {"evaluation": done.evaluation_id})
    fake_cluster.jobs[km.job_name(done)]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    _fail_job(fake_cluster, km.job_name(failed))
    before = set(fake_cluster.jobs)

    assert _record_failed_jobs(store, sweep, settings) == 1
    caplog.set_level("INFO", logger="finesweep")
    created = schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    retry = km.job_name(failed, 2)
    assert created == [retry] and retry == f"{km.job_name(failed)}-a2"
    assert fake_cluster.deleted_jobs == [(km.job_name(failed), "Background")]
    assert set(fake_cluster.jobs) == before - {km.job_name(failed)} | {retry}
    assert km.configmap_name(failed) not in fake_cluster.configmaps and km.configmap_name(failed, 2) in \
        fake_cluster.configmaps
    job = fake_cluster.jobs[retry]
    assert job["metadata"]["labels"]["finesweep.io/attempt"] == "2"
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "spec")
    assert volume["configMap"]["name"] == km.configmap_name(failed, 2)
    assert f"created job {retry}" in caplog.text and f"exists, job {km.job_name(running)}" in caplog.text
    status_ = read_status(store, sweep.name, failed.trial_id)
    assert (status_.state, status_.attempt, status_.attempts[0].outcome) == (TrialState.RUNNING, 2, "failed")
    assert "exit 3" in status_.attempts[0].failure["reason"]
    assert read_status(store, sweep.name, running.trial_id).attempt == 1

    # Scheduled again (a replacement controller) creates nothing: every trial's current attempt has its Job.
    assert schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings) == []
    assert fake_cluster.created_jobs.count(retry) == 1


def test_the_attempt_limit_stops_retries(fake_cluster, local_store, example_sweeps, settings, caplog):
    from finesweep.store import LocalStore, read_status

    store = LocalStore(local_store)
    sweep = dataclasses.replace(example_sweeps[0], max_parallel=10)
    spec = trials_of(sweep)[0]
    for attempt in (1, 2):
        assert schedule(fake_cluster, local_store, sweep, [spec], settings, max_attempts=2) == \
            [km.job_name(spec, attempt)]
        _fail_job(fake_cluster, km.job_name(spec, attempt))
        assert _record_failed_jobs(store, sweep, settings) == 1
    caplog.set_level("INFO", logger="finesweep")
    assert schedule(fake_cluster, local_store, sweep, [spec], settings, max_attempts=2) == []
    assert "failed 2 attempt(s), the limit (2); not retried" in caplog.text and "--max-attempts 3" in caplog.text
    assert read_status(store, sweep.name, spec.trial_id).failed_attempts == 2


def test_dry_run_shows_the_retry_a_submit_would_create(fake_cluster, local_store, example_sweeps, settings):
    from finesweep.store import LocalStore, record_failure, start_attempt

    sweep = example_sweeps[0]
    spec = trials_of(sweep)[0]
    store = LocalStore(local_store)
    start_attempt(store, sweep.name, spec.trial_id, "k8s")
    record_failure(store, sweep.name, spec.trial_id, "job", "OOMKilled", 137)
    out, err = io.StringIO(), io.StringIO()
    names = k8s_backend.dry_run(sweep, trials_of(sweep), STORE_URL, settings, out=out, err=err)
    assert names[0] == km.job_name(spec, 2) and names[1:] == [km.job_name(t) for t in trials_of(sweep)[1:]]
    assert f"attempt 1 failed; retrying: a submit deletes job {km.job_name(spec)} and runs attempt 2" in err.getvalue()
    assert not fake_cluster.jobs  # a dry run touches no cluster


def test_cancel_deletes_the_sweeps_jobs_and_configmaps_and_a_resubmit_carries_on(fake_cluster, local_store,
                                                                                  example_sweeps, settings, caplog):
    from finesweep.store import LocalStore, TrialState, read_status
    from submitter.__main__ import main

    sweep = dataclasses.replace(example_sweeps[0], max_parallel=10)
    other = dataclasses.replace(example_sweeps[0], name="other", max_parallel=10)
    schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    schedule(fake_cluster, local_store, other, trials_of(other), settings)
    mine = {km.job_name(t) for t in trials_of(sweep)}
    deleted = k8s_backend.cancel(sweep.name, settings, out=io.StringIO())
    assert set(deleted) == mine and not mine & set(fake_cluster.jobs)
    assert all(policy == "Background" for _, policy in fake_cluster.deleted_jobs)  # pods go with their Job
    assert not [c for c in fake_cluster.configmaps if c.startswith(f"{sweep.name}-")]
    assert {km.job_name(t) for t in trials_of(other)} <= set(fake_cluster.jobs)  # another sweep is left alone
    store = LocalStore(local_store)
    assert read_status(store, sweep.name, trials_of(sweep)[0].trial_id).state is TrialState.RUNNING
    created = schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    assert set(created) == mine  # same attempt, same Job names: cancelling is not a failed attempt
    assert read_status(store, sweep.name, trials_of(sweep)[0].trial_id).attempt == 1

    # The command: Jobs gone, the sweep's unfinished trials marked stopped in the store (not failed).
    path = local_store / "cancel.yaml"  # the example with a shipped eval set, so the command's preflight passes
    path.write_text(EXAMPLE_PIPELINE.replace("chat-small", "sft-open-questions"))
    sweep = dataclasses.replace(load_sweeps(path)[0], max_parallel=10)
    schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    assert main(["cancel", str(path), "--backend", "k8s", "--store", STORE_URL]) == 0
    assert not {km.job_name(t) for t in trials_of(sweep)} & set(fake_cluster.jobs)
    assert read_status(store, sweep.name, trials_of(sweep)[0].trial_id).state is TrialState.STOPPED
    # Submitted again, the controller carries the stopped trial on as the same attempt: its Job again, running.
    first = trials_of(sweep)[0]
    assert schedule(fake_cluster, local_store, sweep, [first], settings) == [km.job_name(first)]
    again = read_status(store, sweep.name, first.trial_id)
    assert (again.state, again.attempt) == (TrialState.RUNNING, 1)
    caplog.set_level("INFO", logger="finesweep")
    assert main(["cancel", str(path), "--store", STORE_URL]) == 0  # local: no local submit runs this sweep
    assert "no local submit is running it; nothing to stop" in caplog.text


# ------------------------------------------------------------------------------------------ controller

CONTROLLER_EXPECTED = ROOT / "tests" / "expected" / "k8s-controller.yaml"


def _controller_settings():
    return k8s_backend.load_settings({"host_network": True, "controller_api_server": "https://127.0.0.1:26443",
                                      "extra_volumes": [{"name": "models", "hostPath": {"path": "/m"}}],
                                      "extra_volume_mounts": [{"name": "models", "mountPath": "/app/build/m"}]})


def test_controller_manifests_match_the_reviewed_expected_file():
    manifests = km.controller_manifests("example", EXAMPLE_PIPELINE, _controller_settings(), STORE_URL, 3)
    assert k8s_schemas.validate_stream(manifests) == []
    text = yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True, width=120)
    if os.environ.get("FINESWEEP_UPDATE_EXPECTED"):
        CONTROLLER_EXPECTED.write_text(text)
    assert text == CONTROLLER_EXPECTED.read_text(), (
        f"manifests differ from {CONTROLLER_EXPECTED.relative_to(ROOT)}; if the change is intended, rerun with "
        f"FINESWEEP_UPDATE_EXPECTED=1 and review the diff")


def test_controller_job_has_the_api_the_store_and_nothing_more():
    configmap, job = km.controller_manifests("example", EXAMPLE_PIPELINE, _controller_settings(), STORE_URL, 3)
    assert configmap["data"]["sweep.yaml"] == EXAMPLE_PIPELINE and configmap["immutable"] is True
    spec = job["spec"]
    # One pod at a time: the replacement only once the old one is gone; a few replacements, then give up.
    assert spec["podReplacementPolicy"] == "Failed" and 0 < spec["backoffLimit"] < 10
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "finesweep" and pod["automountServiceAccountToken"] is True
    assert pod["hostNetwork"] is True and pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "finesweep/controller:0.1.0"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBERNETES_SERVICE_HOST"]["value"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"]["value"] == "26443"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "finesweep-s3"
    assert "/app/build/m" in {m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"][container["args"].index("--store") + 1] == STORE_URL
    # A real cluster: the standard in-cluster config, no overrides, no host network.
    plain = km.controller_job("example", k8s_backend.load_settings(), STORE_URL, 3)["spec"]["template"]["spec"]
    assert "hostNetwork" not in plain
    plain_env = {e["name"] for e in plain["containers"][0]["env"]}
    assert not {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"} & plain_env


def test_controller_names_are_deterministic_and_valid():
    assert km.controller_name("smoke") == "finesweep-controller-smoke"
    odd = "A_very_long_pipeline_name_" * 4
    long = km.controller_name(odd)
    assert len(long) <= 63 and km.DNS1123_LABEL.fullmatch(long) and long == km.controller_name(odd)
    assert km.controller_name("a_b") != km.controller_name("a-b")


def test_controller_api_server_setting_is_checked():
    with pytest.raises(km.SettingsError, match="controller.apiServer"):
        k8s_backend.load_settings({"controller_api_server": "127.0.0.1:6443"})


def test_submit_controller_creates_leaves_a_running_one_and_replaces_a_finished_one(fake_cluster):
    settings = k8s_backend.load_settings()
    name, action = k8s_backend.submit_controller("example", EXAMPLE_PIPELINE, STORE_URL, settings, 3, out=io.StringIO())
    assert (name, action) == ("finesweep-controller-example", "created")
    assert fake_cluster.configmaps[f"{name}-sweep"]["data"]["sweep.yaml"] == EXAMPLE_PIPELINE
    assert k8s_backend.submit_controller("example", EXAMPLE_PIPELINE, STORE_URL, settings, 3,
                                         out=io.StringIO())[1] == "exists"
    assert fake_cluster.created_jobs == [name]  # a running controller is never doubled
    fake_cluster.finish_all("Failed")
    assert k8s_backend.submit_controller("example", EXAMPLE_PIPELINE + "# edited\n", STORE_URL, settings, 3,
                                         out=io.StringIO())[1] == "replaced"
    assert fake_cluster.created_jobs == [name, name] and (name, "Foreground") in fake_cluster.deleted_jobs
    assert fake_cluster.configmaps[f"{name}-sweep"]["data"]["sweep.yaml"].endswith("# edited\n")
    assert k8s_backend.cancel_controller("example", settings) is True
    assert name not in fake_cluster.jobs and f"{name}-sweep" not in fake_cluster.configmaps
    assert k8s_backend.cancel_controller("example", settings) is False


def test_detached_submit_creates_only_the_controller_and_returns(fake_cluster, tmp_path, capsys):
    from submitter.__main__ import main

    path = tmp_path / "detached.yaml"
    path.write_text(EXAMPLE_PIPELINE.replace("chat-small", "sft-open-questions"))
    assert main(["submit", str(path), "--backend", "k8s", "--store", STORE_URL]) == 0
    assert fake_cluster.created_jobs == ["finesweep-controller-detached"]  # trial Jobs are the controller's
    out = capsys.readouterr().out
    assert "kubectl logs -f job/finesweep-controller-detached -n finesweep" in out
    assert main(["submit", str(path), "--backend", "k8s", "--store", STORE_URL]) == 0
    assert "exists" in capsys.readouterr().out and fake_cluster.created_jobs == ["finesweep-controller-detached"]


class _FailingCluster(FakeCluster):
    """Every trial Job fails as soon as it exists (the pod OOMKilled), so the controller's loop can run to its
    end without a trainer: it must record the failures, settle, and stop creating Jobs."""

    def create_namespaced_job(self, namespace, body, _preload_content=True):
        response = super().create_namespaced_job(namespace, body, _preload_content)
        name = body["metadata"]["name"]
        if body["metadata"]["labels"].get(km.LABEL_COMPONENT) == "trial":
            _fail_job(self, name, exit_code=137, reason="OOMKilled")
        return response


def test_controller_runs_a_sweep_to_its_end_and_a_replacement_creates_nothing_twice(monkeypatch, local_store,
                                                                                      tmp_path, caplog):
    import logging

    from finesweep.store import LocalStore, TrialState, read_status
    from submitter.__main__ import main

    cluster = _FailingCluster()
    monkeypatch.setattr(k8s_backend, "_clients", lambda settings: (cluster, cluster))
    path = tmp_path / "one.yaml"
    path.write_text(EXAMPLE_PIPELINE.replace("chat-small", "sft-open-questions").split("  - name: dpo")[0])
    (sweep,) = load_sweeps(path)
    specs = sweep.reference_specs(None) + sweep.trial_specs(None)
    argv = ["controller", "--sweep-file", str(path), "--store", STORE_URL, "--max-attempts", "1"]
    monkeypatch.setattr(k8s_backend, "load_settings", lambda overrides=None, real=k8s_backend.load_settings:
                        dataclasses.replace(real(overrides), poll_seconds=0.01))
    with caplog.at_level(logging.INFO, logger="finesweep"):
        assert main(argv) == 1  # every trial failed: a result, exit 1 (the Job's podFailurePolicy: no retry)
    store = LocalStore(local_store)
    for spec in specs:
        st = read_status(store, spec.sweep, spec.trial_id)
        assert st.state is TrialState.FAILED and "OOMKilled" in st.failure.reason, spec.name
    assert sorted(cluster.created_jobs) == sorted(km.job_name(s) for s in specs)
    text = caplog.text
    assert "[1/1] sweep sft (sft)" in text and "created job" in text and "-> failed" in text
    assert "settled (0 complete, 0 pruned, 3 failed)" in text and "pipeline finished" in text
    # A replacement controller (same Job, new pod) finds every trial settled at the attempt limit: no new Job.
    assert main(argv) == 1
    assert sorted(cluster.created_jobs) == sorted(km.job_name(s) for s in specs)


def test_search_backend_creates_each_trials_job_once_across_controllers(fake_cluster, local_store, example_sweeps):
    from finesweep.store import LocalStore, read_status
    from submitter.controller import K8sBackend

    settings = k8s_backend.load_settings()
    store = LocalStore(local_store)
    first = trials_of(example_sweeps[0])[0]
    backend = K8sBackend(store, STORE_URL, settings, 3)
    backend.schedule(first)
    backend.schedule(first)  # the loop schedules a trial again after a restart: idempotent
    assert fake_cluster.created_jobs == [km.job_name(first)]
    assert read_status(store, first.sweep, first.trial_id).attempts[-1].job == km.job_name(first)
    # A replacement controller: the Job of the trial under way exists, so nothing new.
    replacement = K8sBackend(store, STORE_URL, settings, 3)
    replacement.schedule(first)
    assert fake_cluster.created_jobs == [km.job_name(first)]
    # The Job the cluster gave up on settles the trial as failed at the next wait (else the search would hang).
    _fail_job(fake_cluster, km.job_name(first), exit_code=137, reason="OOMKilled")
    replacement.wait(0)
    assert read_status(store, first.sweep, first.trial_id).state.value == "failed"
    # Scheduled again (a resubmit's loop carries on with it), a failed trial is retried by the store's one rule
    # (finesweep.store.next_action) as attempt 2: a Job of its own, recorded before it is created.
    replacement.schedule(first)
    assert fake_cluster.created_jobs == [km.job_name(first), km.job_name(first, 2)]
    status = read_status(store, first.sweep, first.trial_id)
    assert status.attempt == 2 and status.attempts[-1].job == km.job_name(first, 2)
    # At the attempt limit it is left failed: no third Job.
    _fail_job(fake_cluster, km.job_name(first, 2), exit_code=137, reason="OOMKilled")
    limited = K8sBackend(store, STORE_URL, settings, 2)
    limited.schedule(first)  # attempt 2 is under way: its Job exists, nothing new
    limited.wait(0)
    limited.schedule(first)
    assert fake_cluster.created_jobs == [km.job_name(first), km.job_name(first, 2)]
    assert read_status(store, first.sweep, first.trial_id).failed_attempts == 2


def test_controller_waits_out_a_store_outage_and_not_a_bug(monkeypatch, tmp_path, caplog):
    import logging

    from finesweep.store import StoreError
    from submitter import controller as ctl
    from submitter.__main__ import main

    path = tmp_path / "one.yaml"
    path.write_text(EXAMPLE_PIPELINE.replace("chat-small", "sft-open-questions").split("  - name: dpo")[0])
    monkeypatch.setattr(k8s_backend, "load_settings", lambda overrides=None, real=k8s_backend.load_settings:
                        dataclasses.replace(real(overrides), poll_seconds=0.01))
    calls = []

    def flaky(stage, plan, store, args, settings):
        calls.append(stage)
        if len(calls) == 1:
            raise StoreError("s3://finesweep/runs: connection refused")
        return 0

    monkeypatch.setattr(ctl, "_run_sweep", flaky)
    argv = ["controller", "--sweep-file", str(path), "--store", STORE_URL]
    with caplog.at_level(logging.WARNING, logger="finesweep"):
        assert main(argv) == 0
    assert len(calls) == 2 and "store or API unreachable" in caplog.text

    def bug(*args):
        raise KeyError("summary")

    monkeypatch.setattr(ctl, "_run_sweep", bug)
    with pytest.raises(KeyError):
        main(argv)


def test_controller_poll_interval_comes_from_the_chart():
    """controller.pollSeconds (values.yaml, the finesweep-defaults ConfigMap) sets how often the controller looks
    at its trials: how soon a pruning decision reaches a trial."""
    assert km.settings_from_defaults({"controller": {"pollSeconds": 2}}).poll_seconds == 2.0
    values = yaml.safe_load((ROOT / "charts" / "finesweep" / "values.yaml").read_text())
    assert km.resolved_defaults(values)["controller"]["pollSeconds"] == km.ClusterSettings().poll_seconds
    with pytest.raises(km.SettingsError, match=r"poll_seconds \(controller.pollSeconds\)"):
        km.settings_from_defaults({"controller": {"pollSeconds": "soon"}})


def test_sweep_tracking_reaches_the_trial_pods(fake_cluster, local_store, example_sweeps, settings):
    """`tracking: {mlflow_uri, experiment}` on a k8s sweep: the trial containers get MLflow's variables (as the
    local backend sets them), over a cluster-wide jobs.extraEnv default; a dry run shows the same."""
    from finesweep.spec import TrackingSpec

    sweep = dataclasses.replace(example_sweeps[0], max_parallel=5,
                                tracking=TrackingSpec("http://127.0.0.1:5000", "team-sft"))
    settings = dataclasses.replace(settings, extra_env=(
        {"name": "MLFLOW_TRACKING_URI", "value": "http://cluster-default:5000"}, {"name": "HF_HUB_OFFLINE", "value": "1"}))
    out = io.StringIO()
    k8s_backend.dry_run(sweep, trials_of(sweep), STORE_URL, settings, out=out, err=io.StringIO())
    dry = [d for d in yaml.safe_load_all(out.getvalue().split("\n", 1)[1]) if d and d["kind"] == "Job"]
    names = schedule(fake_cluster, local_store, sweep, trials_of(sweep), settings)
    assert names and len(dry) == len(names)
    for job in dry + [fake_cluster.jobs[n] for n in names]:
        for container in pod_containers(job):
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000", env
            assert env["MLFLOW_EXPERIMENT_NAME"] == "team-sft" and env["HF_HUB_OFFLINE"] == "1"
            assert [e["name"] for e in container["env"]].count("MLFLOW_TRACKING_URI") == 1
