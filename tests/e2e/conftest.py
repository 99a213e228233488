"""Fixtures of the end-to-end suite: a real Kubernetes cluster (scripts/cluster/up.sh, via `make e2e`), the
chart installed with helm, a real MinIO on loopback, and the submitter run as the chart's ServiceAccount.

Trial pods use hostNetwork (jobs.hostNetwork) to reach MinIO on 127.0.0.1. The tiny model and the fixture
datasets reach them through the store, as on a multi-node cluster: each release's store gets them by
`finesweep stage` (the names the sweep files use: build/tiny-llama, tests/fixtures/datasets/...), and the pods
fetch and verify them into their cache with HF_HUB_OFFLINE=1; no volume holds models or data. A failing test
gets scripts/cluster/dump.sh's output
(events, pod states, last log lines, component logs) attached to its report.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.minio import minio_server  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path.home() / ".cache" / "finesweep" / "bin"
KUBECONFIG = os.environ.get("KUBECONFIG") or "/tmp/finesweep-cluster/admin.kubeconfig"
NAMESPACE = "finesweep-e2e"
OOM_NAMESPACE = "finesweep-e2e-oom"  # a second release whose trial pods get too little memory
RELEASE = "finesweep"
BUCKET = "finesweep"
TRAINER_IMAGE = os.environ.get("TRAINER_IMAGE", "finesweep/trainer:0.1.0")
EVALUATOR_IMAGE = os.environ.get("EVALUATOR_IMAGE", "finesweep/evaluator:0.1.0")
CONTROLLER_IMAGE = os.environ.get("CONTROLLER_IMAGE", "finesweep/controller:0.1.0")


def run(*cmd: str, check: bool = True, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          stdin=subprocess.DEVNULL, env={**os.environ, "KUBECONFIG": KUBECONFIG, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def kubectl(*args: str, **kw) -> subprocess.CompletedProcess:
    return run(str(BIN / "kubectl"), *args, **kw)


def helm(*args: str, **kw) -> subprocess.CompletedProcess:
    return run(str(BIN / "helm"), *args, **kw)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        # The shared namespaces, and a test module's own (NS: e.g. the queued release), whose pods' logs hold the
        # failing rank's error.
        own = getattr(getattr(item, "module", None), "NS", None)
        for namespace in dict.fromkeys(n for n in (NAMESPACE, OOM_NAMESPACE, own) if n):
            dump = subprocess.run(["bash", str(ROOT / "scripts" / "cluster" / "dump.sh"), namespace],
                                  capture_output=True, text=True, timeout=300)
            report.sections.append((f"cluster state, namespace {namespace} (scripts/cluster/dump.sh)",
                                    dump.stdout[-60000:] + dump.stderr[-2000:]))


@pytest.fixture(scope="session")
def cluster() -> None:
    ready = kubectl("get", "--raw", "/readyz", check=False, timeout=30)
    assert ready.returncode == 0, f"no cluster at {KUBECONFIG}: run `make cluster-up` first ({ready.stderr.strip()})"


STAGED_SOURCES = ("build/tiny-llama", "tests/fixtures/datasets/databricks-dolly-15k",
                  "tests/fixtures/datasets/hh-rlhf")


def install_release(namespace: str, minio, tmp_path_factory, jobs_values: dict | None = None) -> dict:
    """The chart installed into `namespace` against MinIO; returns what the tests need to drive the submitter
    there as the chart's ServiceAccount."""
    from kubernetes import client, config

    minio.bucket(BUCKET)
    # Credentials go into the Secret through the API, never on a command line or into a values file.
    config.load_kube_config(config_file=KUBECONFIG)
    core = client.CoreV1Api()
    kubectl("create", "namespace", namespace)
    s3 = minio.env()
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="e2e-s3"), type="Opaque",
        string_data={name: s3[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}))

    admin = yaml.safe_load(Path(KUBECONFIG).read_text())
    cluster_entry = admin["clusters"][0]["cluster"]
    controller_repo, controller_tag = CONTROLLER_IMAGE.rsplit(":", 1)
    trainer_repo, trainer_tag = TRAINER_IMAGE.rsplit(":", 1)
    evaluator_repo, evaluator_tag = EVALUATOR_IMAGE.rsplit(":", 1)
    values = {
        "images": {"trainer": {"repository": trainer_repo, "tag": trainer_tag},
                   "evaluator": {"repository": evaluator_repo, "tag": evaluator_tag},
                   "controller": {"repository": controller_repo, "tag": controller_tag}},
        # No kube-proxy: the controller pod (host network) reaches the API server where the node does.
        # A tiny trial trains for seconds: the controller looks often enough for a pruning decision to land.
        "controller": {"apiServer": cluster_entry["server"], "pollSeconds": 2},
        "s3": {"endpoint": minio.endpoint, "bucket": BUCKET, "existingSecret": "e2e-s3"},
        "jobs": {
            "gpusPerTrial": 0,
            "hostNetwork": True,
            "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "6Gi"}},
            "shmSize": "256Mi", "cacheSizeLimit": "2Gi", "scratchSizeLimit": "2Gi",
            "terminationGracePeriodSeconds": 60,
            "backoffLimit": 1,
            "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "HF_DATASETS_OFFLINE", "value": "1"}],
            **(jobs_values or {}),
        },
    }
    values_file = tmp_path_factory.mktemp("helm") / "values-e2e.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm("install", RELEASE, str(ROOT / "charts" / "finesweep"), "-n", namespace, "-f", str(values_file),
         "--wait", "--timeout", "2m")

    # The submitter runs as the chart's ServiceAccount, so the chart's Role is what the e2e proves sufficient.
    token = kubectl("create", "token", RELEASE, "-n", namespace, "--duration", "2h").stdout.strip()
    ca = base64.b64encode(Path(cluster_entry["certificate-authority"]).read_bytes()).decode()
    submitter_kubeconfig = tmp_path_factory.mktemp("submitter") / "kubeconfig"
    submitter_kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster_entry["server"], "certificate-authority-data": ca}}],
        "users": [{"name": "finesweep-submitter", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "finesweep-submitter",
                                                 "namespace": namespace}}],
        "current-context": "e2e"}))
    submitter_kubeconfig.chmod(0o600)
    release = {
        "namespace": namespace,
        "store": f"s3://{BUCKET}/e2e-{uuid.uuid4().hex[:8]}",
        "env": {**s3, "KUBECONFIG": str(submitter_kubeconfig)},
        "token": token,
    }
    # What the e2e sweeps load, staged the way a user does it, by the names the sweep files use.
    staged = run(sys.executable, "-m", "submitter", "stage", *STAGED_SOURCES, "--store", release["store"],
                 env={**os.environ, **s3}, timeout=300)
    assert staged.stdout.count("staged in") == len(STAGED_SOURCES), staged.stdout + staged.stderr
    return release


@pytest.fixture(scope="session")
def release(cluster, minio_server, tmp_path_factory):  # noqa: F811
    return install_release(NAMESPACE, minio_server, tmp_path_factory)


def submitter(release: dict, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    """python -m submitter <args> --backend k8s --store <e2e store> --namespace <ns>, as the chart's SA."""
    return run(sys.executable, "-m", "submitter", *args, "--backend", "k8s", "--store", release["store"],
               "--namespace", release["namespace"], env=release["env"], timeout=timeout, check=check)
