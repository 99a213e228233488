"""The Helm chart (charts/finesweep), rendered by the real, pinned helm binary (scripts/install-helm.sh builds it
once with Go into ~/.cache/finesweep/bin). Every rendered object is validated against the same pinned Kubernetes
JSON schema as the trial Jobs (scripts/k8s_schemas.py), and the chart's finesweep-defaults ConfigMap is checked
against what the submitter computes from the same values, so the two cannot drift apart.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from submitter import k8s_backend
from submitter import k8s_manifests as km
from tests.test_k8s_manifests import STORE_URL, k8s_schemas, trials_of

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "finesweep"
RELEASE, NAMESPACE = "finesweep", "finesweep"
KUBE_VERSION = "1.33.1"  # the version the schemas are pinned to (scripts/k8s_schemas.py)
TEST_ACCESS_KEY = "AKIAFINESWEEPHELMTEST"
TEST_SECRET_KEY = "helm-test-secret-value-never-in-configmaps"


@pytest.fixture(scope="module")
def helm() -> str:
    script = ROOT / "scripts" / "install-helm.sh"
    if not Path("/usr/local/go/bin/go").exists() and not shutil.which("go") and \
            not (Path.home() / ".cache" / "finesweep" / "bin" / "helm").exists():
        pytest.skip("no Go toolchain to build the pinned helm with (scripts/install-helm.sh)")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # No kubeconfig: nothing here may reach a cluster (template, lint and client-side dry runs need none).
    env = {**os.environ, "KUBECONFIG": str(ROOT / "build" / "no-such-kubeconfig"), "HELM_CACHE_HOME": "/tmp/helm-cache",
           "HELM_CONFIG_HOME": "/tmp/helm-config", "HELM_DATA_HOME": "/tmp/helm-data"}
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def render(helm: str, *args: str) -> list[dict]:
    out = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION,
                   *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def defaults_doc(docs: list[dict]) -> dict:
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "finesweep-defaults"]
    return json.loads(configmap["data"]["defaults.json"])


def pods_of(doc: dict) -> dict | None:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] in ("Deployment", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


VARIANTS = {
    "defaults": [],
    "minio": ["--set", "minio.enabled=true"],
    "minio-pvc": ["--set", "minio.enabled=true", "--set", "minio.persistence.enabled=true",
                  "--set", "minio.persistence.storageClass=standard"],
    "existing-secret": ["--set", "s3.existingSecret=team-s3", "--set", "s3.endpoint=https://s3.example.org"],
    "credentials": ["--set", f"s3.accessKeyId={TEST_ACCESS_KEY}", "--set", f"s3.secretAccessKey={TEST_SECRET_KEY}"],
    "2xT4-kueue": ["--set", "jobs.gpusPerTrial=2", "--set", "jobs.kueueQueueName=t4",
                   "--set", "rbac.extraSubjects[0].kind=Group", "--set", "rbac.extraSubjects[0].name=ml-team",
                   "--set", "rbac.extraSubjects[0].apiGroup=rbac.authorization.k8s.io"],
}


# ------------------------------------------------------------------------------------------ lint

def test_helm_lint(helm):
    for extra in ([], ["--strict"], ["--strict", "--set", "minio.enabled=true"],
                  ["--strict", "--set", "s3.existingSecret=team-s3"]):
        proc = run_helm(helm, "lint", str(CHART), *extra)
        assert "0 chart(s) failed" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------ render

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_objects_are_valid_kubernetes_with_labels(helm, variant):
    docs = render(helm, *VARIANTS[variant])
    assert k8s_schemas.validate_stream(docs) == []
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "finesweep"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/part-of"] == "finesweep"
        assert labels["helm.sh/chart"] == "finesweep-0.1.0"
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_default_render(helm):
    kinds = by_kind(render(helm))
    assert sorted(kinds) == ["ConfigMap", "Pod", "Role", "RoleBinding", "Secret", "ServiceAccount"]
    (test_pod,) = kinds["Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (secret,) = kinds["Secret"]
    assert secret["metadata"]["name"] == "finesweep-s3"
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    (binding,) = kinds["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "finesweep", "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == kinds["Role"][0]["metadata"]["name"] == "finesweep-submitter"


def test_minio_render(helm):
    kinds = by_kind(render(helm, *VARIANTS["minio"]))
    assert {"Deployment", "Service", "Job"} <= set(kinds) and "PersistentVolumeClaim" not in kinds
    (deployment,) = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z"
    env = {e["name"]: e for e in container["env"]}
    for var in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "finesweep-s3"
    assert {v["name"]: v for v in pod["volumes"]}["data"] == {"name": "data", "emptyDir": {}}
    (hook,) = kinds["Job"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert defaults_doc(render(helm, *VARIANTS["minio"]))["s3"]["endpoint"] == \
        "http://finesweep-minio.finesweep.svc.cluster.local:9000"
    kinds = by_kind(render(helm, *VARIANTS["minio-pvc"]))
    (pvc,) = kinds["PersistentVolumeClaim"]
    assert pvc["spec"]["storageClassName"] == "standard"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    volumes = {v["name"]: v for v in kinds["Deployment"][0]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "finesweep-minio"}


def test_existing_secret_renders_no_secret(helm):
    docs = render(helm, *VARIANTS["existing-secret"])
    assert "Secret" not in by_kind(docs)
    refs = []

    def collect(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.append(node["secretKeyRef"]["name"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(docs)
    assert refs and set(refs) == {"team-s3"}
    doc = defaults_doc(docs)
    assert doc["s3"]["secretName"] == "team-s3" and doc["s3"]["endpoint"] == "https://s3.example.org"


@pytest.mark.parametrize("bad, complaint", [
    (["--set", "jobs.gpusPerTrial=-1"], "/jobs/gpusPerTrial"),
    (["--set", "images.trainer.tag=latest"], "/images/trainer/tag"),
    (["--set", "jobs.gpuPerTrial=2"], "gpuPerTrial"),
    (["--set", "s3.endpoint=minio:9000"], "/s3/endpoint"),
    (["--set", "images.pullPolicy=Sometimes"], "/images/pullPolicy"),
    (["--set", "minio.enabled=yes"], "/minio/enabled"),
], ids=["negative-gpus", "latest-tag", "typo-key", "endpoint-no-scheme", "pull-policy", "string-bool"])
def test_values_schema_rejects_bad_values(helm, bad, complaint):
    proc = run_helm(helm, "template", RELEASE, str(CHART), *bad, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert complaint in proc.stderr


# ------------------------------------------------------------------------------------------ secrets, RBAC

def test_credentials_only_in_the_secret(helm, tmp_path):
    docs = render(helm, *VARIANTS["credentials"])
    (secret,) = by_kind(docs)["Secret"]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY}
    forms = [TEST_ACCESS_KEY, TEST_SECRET_KEY, *(base64.b64encode(v.encode()).decode() for v in decoded.values())]
    for doc in docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert not any(form in text for form in forms), f"{doc['kind']}/{doc['metadata']['name']} leaks"
    # NOTES.txt is printed on install: no credentials there either.
    notes = render_notes(helm, tmp_path, *VARIANTS["credentials"])
    assert "Store: bucket finesweep at AWS S3, credentials from Secret finesweep-s3." in notes
    assert not any(form in notes for form in forms)


def render_notes(helm: str, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it. `helm template` skips NOTES.txt and a client-side install dry
    run still asks a cluster for its version, so render it through `tpl` in a copy of the chart."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "notes-source.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        "    {{- tpl (.Files.Get \"notes-source.txt\") . | nindent 4 }}\n")
    out = run_helm(helm, "template", RELEASE, str(chart), "-n", NAMESPACE, "--kube-version", KUBE_VERSION,
                   "--show-only", "templates/zz-notes.yaml", *args).stdout
    return yaml.safe_load(out)["data"]["notes"]


def test_notes(helm, tmp_path):
    notes = render_notes(helm, tmp_path)
    assert "WARNING: the credentials in Secret finesweep-s3 were generated at random" in notes
    assert "helm test finesweep -n finesweep" in notes
    notes = render_notes(helm, tmp_path / "minio", "--set", "minio.enabled=true")
    assert "WARNING" not in notes and "port-forward svc/finesweep-minio 9000:9000" in notes


def test_rbac_is_exactly_least_privilege(helm):
    for variant in ("defaults", "2xT4-kueue"):
        (role,) = by_kind(render(helm, *VARIANTS[variant]))["Role"]
        rules = {(group, resource): sorted(rule["verbs"])
                 for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
        assert rules == {
            ("batch", "jobs"): sorted(["create", "get", "list", "watch", "delete"]),
            ("", "configmaps"): sorted(["create", "get", "list", "delete"]),
            ("", "pods"): sorted(["get", "list", "watch"]),
            ("", "pods/log"): sorted(["get", "list", "watch"]),
            ("", "events"): ["list"],
        }
    (binding,) = by_kind(render(helm, *VARIANTS["2xT4-kueue"]))["RoleBinding"]
    assert binding["subjects"][1] == {"kind": "Group", "name": "ml-team", "apiGroup": "rbac.authorization.k8s.io"}
    kinds = by_kind(render(helm, "--set", "rbac.create=false", "--set", "serviceAccount.create=false"))
    assert not {"Role", "RoleBinding", "ServiceAccount"} & set(kinds)


def test_chart_pods_are_locked_down(helm):
    for variant in ("defaults", "minio"):
        for doc in render(helm, *VARIANTS[variant]):
            pod = pods_of(doc)
            if pod is None:
                continue
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            if doc["kind"] != "Deployment":
                assert pod["restartPolicy"] == "Never"
            for container in pod["containers"]:
                ctx = container["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False
                assert ctx["readOnlyRootFilesystem"] is True
                assert ctx["capabilities"] == {"drop": ["ALL"]}
                image = container["image"]
                assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


# ------------------------------------------------------------------------------------------ chart <-> submitter

@pytest.mark.parametrize("variant", ["defaults", "minio", "existing-secret", "2xT4-kueue"])
def test_defaults_configmap_matches_the_submitter(helm, variant, tmp_path):
    """The ConfigMap the chart renders is what the submitter computes from the same values, and the trial Jobs
    built from it are valid: the chart and submitter/k8s_manifests.py agree on every default."""
    overlay = _set_args_to_values(VARIANTS[variant])
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(overlay))
    rendered = defaults_doc(render(helm, "-f", str(values_file)))
    chart_values = km.deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), overlay)
    assert rendered == km.resolved_defaults(chart_values, namespace=NAMESPACE, release=RELEASE)

    file_defaults = km.resolved_defaults(yaml.safe_load((CHART / "values.yaml").read_text()), namespace=NAMESPACE)
    settings = km.settings_from_defaults(file_defaults, rendered)
    assert settings.s3_secret_name == rendered["s3"]["secretName"]
    assert settings.gpus_per_trial == rendered["jobs"]["gpusPerTrial"]
    from finesweep.spec import load_sweeps
    from tests.test_k8s_manifests import EXAMPLE_PIPELINE

    sweep_file = tmp_path / "example.yaml"
    sweep_file.write_text(EXAMPLE_PIPELINE)
    for sweep in load_sweeps(sweep_file):
        assert k8s_schemas.validate_stream(km.sweep_manifests(trials_of(sweep), settings, STORE_URL)) == []


def test_chart_defaults_are_the_submitters_defaults(helm):
    rendered = defaults_doc(render(helm))
    settings = km.settings_from_defaults(rendered)
    assert settings == k8s_backend.load_settings()


def _set_args_to_values(args: list[str]) -> dict:
    """`--set a.b=c` pairs as a values mapping (enough for the variants above: ints, bools, a list index)."""
    values: dict = {}
    for flag, assignment in zip(args[0::2], args[1::2]):
        assert flag == "--set"
        path, raw = assignment.split("=", 1)
        value = yaml.safe_load(raw)
        node = values
        parts = path.replace("]", "").replace("[", ".").split(".")
        for part, following in zip(parts, parts[1:] + [None]):
            key = int(part) if part.isdigit() else part
            if following is None:
                _put(node, key, value)
            else:
                child = _get(node, key)
                if child is None:
                    child = [] if following.isdigit() else {}
                    _put(node, key, child)
                node = child
    return values


def _get(node, key):
    if isinstance(node, list):
        return node[key] if key < len(node) else None
    return node.get(key)


def _put(node, key, value):
    if isinstance(node, list):
        while len(node) <= key:
            node.append(None)
        node[key] = value
    else:
        node[key] = value
