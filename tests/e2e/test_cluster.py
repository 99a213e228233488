"""The whole path on a real cluster: helm install, submit the smoke pipeline with the Kubernetes backend, pods
train and evaluate, artifacts land in MinIO, status and report read them back; then resubmission, a pod
deleted mid-run, a broken sweep, and the chart's RBAC. Run by `make e2e` (which brings the cluster up and down).

The tests run in file order and build on each other (the smoke pipeline's results are used by the next ones).
"""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from tests.e2e.conftest import (NAMESPACE, OOM_NAMESPACE, RELEASE, ROOT, helm, install_release, kubectl,
                                submitter)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MANAGED = "app.kubernetes.io/managed-by=finesweep-submitter"  # trial Jobs and the controller Jobs
TRIALS = f"{MANAGED},app.kubernetes.io/component=trial"
CONTROLLER = "finesweep-controller-smoke"
PROGRESS = re.compile(r"step \d+/\d+ \(\d+%\) loss [0-9.]+ .*tok/s \d+ .*eta ")


def jobs(selector: str = TRIALS, field_selector: str = "", namespace: str = NAMESPACE) -> list[dict]:
    extra = ["--field-selector", field_selector] if field_selector else []
    return json.loads(kubectl("get", "jobs", "-n", namespace, "-l", selector, *extra, "-o", "json").stdout)["items"]


def appeared(selector: str, timeout: float = 300) -> list[dict]:
    """The trial Jobs matching `selector` once the controller has created them (a submit only starts it)."""
    deadline = time.time() + timeout
    while not (found := jobs(selector)):
        assert time.time() < deadline, f"no Job {selector} after {timeout}s"
        time.sleep(2)
    return found


def controller_job(name: str = CONTROLLER, namespace: str = NAMESPACE) -> dict | None:
    found = jobs(f"{MANAGED},app.kubernetes.io/component=controller", f"metadata.name={name}", namespace)
    return found[0] if found else None


def pods(selector: str) -> list[dict]:
    return json.loads(kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout)["items"]


def condition(job: dict) -> str | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return cond["type"]
    return None


def wait_jobs_complete(selector: str, expected: int, timeout: float, field_selector: str = "") -> list[dict]:
    """Every Job matching the selectors (there must be `expected`) Complete; fails at once on a Failed one."""
    deadline = time.time() + timeout
    while True:
        found = jobs(selector, field_selector)
        failed = [j["metadata"]["name"] for j in found if condition(j) == "Failed"]
        assert not failed, f"Jobs failed: {failed}"
        if len(found) == expected and all(condition(j) == "Complete" for j in found):
            return found
        assert time.time() < deadline, f"{[(j['metadata']['name'], condition(j)) for j in found]} after {timeout}s"
        time.sleep(5)


def store_of(release: dict):
    """The e2e store as the submitter sees it (MinIO on loopback, credentials from the environment)."""
    import os

    import boto3

    from finesweep.store import S3Store

    boto3.DEFAULT_SESSION = None
    os.environ.update({k: v for k, v in release["env"].items() if k != "KUBECONFIG"})
    return S3Store(release["store"])


def test_helm_test_reaches_the_store_from_a_pod(release):
    """The chart's own test hook: the bucket is readable and writable from inside the cluster, with the
    credentials of the existingSecret, exactly as trial pods will use them."""
    # No --logs: the hook pod is deleted on success before helm could read them (helm/helm#9098); the pod
    # exits 0 only after its head/put/get/delete round trip.
    out = helm("test", RELEASE, "-n", NAMESPACE, "--timeout", "3m").stdout
    assert re.search(r"TEST SUITE:\s+finesweep-test-store\s.*Phase:\s+Succeeded", out, re.S), out


@pytest.fixture(scope="module")
def smoke(release):
    """jobs/smoke.yaml submitted detached with the k8s backend; the controller Job runs it to completion, its
    pod deleted during the SFT stage: (submit output, plans, store, figures)."""
    from submitter.plan import load_plan, resolve_recorded_starts

    started = time.time()
    proc = submitter(release, "submit", "jobs/smoke.yaml", timeout=120)
    returned_s = time.time() - started
    print(f"detached submit returned in {returned_s:.1f}s")
    assert returned_s < 10, proc.stdout
    assert f"kubectl logs -f job/{CONTROLLER} -n {NAMESPACE}" in proc.stdout, proc.stdout

    # Every trial Job uid ever seen, per trial: a Job created twice (even deleted in between) shows two.
    uids: dict[str, set[str]] = {}

    def observe() -> list[dict]:
        found = jobs()
        for job in found:
            uids.setdefault(job["metadata"]["labels"]["finesweep.io/trial"], set()).add(job["metadata"]["uid"])
        return found

    # Takeover: once the SFT stage has a running trial Job, delete the controller's pod.
    deadline = time.time() + 600
    while not [j for j in observe() if j["metadata"]["labels"]["finesweep.io/stage"] == "sft"]:
        assert time.time() < deadline, "the controller created no SFT Job"
        time.sleep(1)
    (first,) = pods(f"batch.kubernetes.io/job-name={CONTROLLER}")
    deleted_at = time.time()
    kubectl("delete", "pod", first["metadata"]["name"], "-n", NAMESPACE, "--wait=false")
    takeover_s = None
    while True:
        observe()
        running = [p for p in pods(f"batch.kubernetes.io/job-name={CONTROLLER}")
                   if p["metadata"]["name"] != first["metadata"]["name"] and p["status"].get("phase") == "Running"]
        if running:
            takeover_s = time.time() - deleted_at
            break
        assert time.time() < deleted_at + 300, "no replacement controller pod within 300s"
        time.sleep(1)
    print(f"controller takeover: a new pod running {takeover_s:.1f}s after the old one was deleted")

    deadline = time.time() + 1800
    while condition(controller_job()) is None:
        observe()
        assert time.time() < deadline, "the controller did not finish the pipeline in 1800s"
        time.sleep(5)
    observe()
    controller_log = kubectl("logs", f"job/{CONTROLLER}", "-n", NAMESPACE).stdout
    assert condition(controller_job()) == "Complete", controller_log[-4000:]
    store = store_of(release)
    plans = load_plan("jobs/smoke.yaml", store, allow_unresolved=True)
    resolve_recorded_starts(plans, store)
    specs = [s for plan in plans for s in plan.all_specs()]
    done = wait_jobs_complete(TRIALS, expected=len(specs), timeout=60)
    print(f"smoke pipeline on the cluster: {len(done)} Jobs complete in {time.time() - started:.0f}s; "
          f"Jobs per trial: {sorted(len(v) for v in uids.values())}")
    return {"output": proc.stdout + proc.stderr, "log": controller_log, "uids": uids}, plans, store


def test_controller_log_shows_the_stages_and_the_selection(smoke):
    figures, plans, _ = smoke
    log = figures["log"]  # the replacement pod's log: it carried on from the store
    for plan in plans:
        assert f"sweep {plan.sweep.name} ({plan.sweep.stage})" in log, log[-4000:]
        assert re.search(rf"sweep {plan.sweep.name} .*: selected \S+ \([\w-]+\): ", log), log[-4000:]
        assert re.search(rf"sweep {plan.sweep.name} .*: settled", log), log[-4000:]
    assert "smoke-sft:best = trial" in log and "pipeline finished" in log


def test_takeover_created_every_trial_job_exactly_once(smoke):
    figures, plans, store = smoke
    from finesweep.store import read_status

    for plan in plans:
        for spec in plan.all_specs():
            assert len(figures["uids"].get(spec.trial_id, ())) == 1, (spec.name, figures["uids"])
            assert read_status(store, spec.sweep, spec.trial_id).attempt == 1, spec.name
    for job in jobs():
        assert job["metadata"]["labels"]["finesweep.io/attempt"] == "1"


def test_smoke_pipeline_runs_as_jobs(smoke, release):
    figures, plans, store = smoke
    from finesweep.store import trial_state

    by_trial = {j["metadata"]["labels"]["finesweep.io/trial"]: j for j in jobs()}
    for plan in plans:
        for spec in plan.all_specs():
            assert spec.trial_id in by_trial, f"no Job for {spec.sweep}/{spec.name}"
            assert condition(by_trial[spec.trial_id]) == "Complete"
            assert trial_state(store, spec.sweep, spec.trial_id) == "done", spec.name
            store.verify_marker(f"{spec.sweep}/{spec.trial_id}/_DONE")  # checksums of what the pod wrote
            assert store.read_json(f"{spec.sweep}/{spec.trial_id}/eval.json")["summary"]
            if spec.trains:
                keys = store.list(f"{spec.sweep}/{spec.trial_id}/adapter")
                assert any(k.endswith("adapter_model.safetensors") for k in keys), keys
    # The log is the replacement pod's (the first was deleted during SFT): it found the SFT Jobs, made the DPO ones.
    assert "smoke-sft" in figures["log"] and "created job smoke-dpo-" in figures["log"]


def test_trainer_progress_in_kubectl_logs(smoke):
    trained = [j for j in jobs() if j["metadata"]["labels"]["finesweep.io/stage"] in ("sft", "dpo")]
    assert trained
    for job in trained:
        logs = kubectl("logs", f"job/{job['metadata']['name']}", "-n", NAMESPACE, "-c", "train").stdout
        assert PROGRESS.search(logs), f"no progress line in {job['metadata']['name']}:\n{logs[-2000:]}"
        evaluation = kubectl("logs", f"job/{job['metadata']['name']}", "-n", NAMESPACE, "-c", "eval").stdout
        assert "+ own adapter" in evaluation, evaluation[-2000:]


def test_dpo_starts_from_best_sft_trial_in_store(smoke):
    _, plans, store = smoke
    sft, dpo = plans
    best = store.read_json("smoke-sft/best.json")
    assert best["trial_id"] in {s.trial_id for s in sft.trials()}
    for spec in dpo.trials():
        assert spec.start is not None and spec.start.trial_id == best["trial_id"], spec
        # The pod's own record of what it trained from.
        train = store.read_json(f"smoke-dpo/{spec.trial_id}/train.json")
        assert best["trial_id"] in json.dumps(train)


def test_status_and_report_read_the_store(smoke, release):
    _, plans, store = smoke
    status = submitter(release, "status", "jobs/smoke.yaml").stdout
    for plan in plans:
        for spec in plan.trials():
            line = next(l for l in status.splitlines() if spec.trial_id in l)
            assert " done " in line and "Succeeded" in line, line
    submitter(release, "report", "jobs/smoke.yaml")
    for sweep in ("smoke-sft", "smoke-dpo"):
        report = store.read_bytes(f"{sweep}/report/report.md").decode()
        assert "| **best** |" in report, report[:1500]
        assert store.exists(f"{sweep}/report/metrics.png")
        assert (ROOT / "build" / "reports" / sweep / "report.md").exists()


def test_no_credential_in_anything_the_cluster_run_produced(smoke, release):
    """Manifests, ConfigMaps, pod specs, events, every container's log, every text object in the store and the
    submitter's output: none holds the S3 credentials or the submitter's token (Secrets themselves excepted)."""
    import base64

    figures, _, store = smoke
    texts = {"submit output": figures["output"], "controller log": figures["log"],
             "objects": kubectl("get", "jobs,configmaps,pods,events,serviceaccounts,roles", "-n", NAMESPACE,
                                "-o", "yaml").stdout}
    for pod in pods(MANAGED):
        spec = pod["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            name = f"log {pod['metadata']['name']}/{container['name']}"
            texts[name] = kubectl("logs", pod["metadata"]["name"], "-n", NAMESPACE, "-c", container["name"]).stdout
    for key in store.list(""):
        if key.endswith((".json", ".md", ".log", ".txt", ".yaml", ".csv")):
            texts[f"store {key}"] = store.read_bytes(key).decode("utf-8", "replace")
    assert len(texts) > 20
    secrets = [release["env"]["AWS_SECRET_ACCESS_KEY"], release["env"]["AWS_ACCESS_KEY_ID"], release["token"]]
    needles = secrets + [base64.b64encode(s.encode()).decode() for s in secrets]
    leaks = [(where, i) for where, text in texts.items() for i, needle in enumerate(needles) if needle in text]
    assert not leaks, f"credentials found in: {leaks}"


def test_resubmit_creates_no_jobs(smoke, release):
    """The finished controller is replaced (a resubmit runs the pipeline again); it finds every trial done."""
    before = sorted(j["metadata"]["uid"] for j in jobs())
    out = submitter(release, "submit", "jobs/smoke.yaml", "--wait", timeout=600).stdout
    after = sorted(j["metadata"]["uid"] for j in jobs())
    assert after == before
    assert "replaced" in out and f"controller job {CONTROLLER} completed" in out, out[-3000:]
    _, plans, _ = smoke
    for plan in plans:
        for spec in plan.all_specs():
            assert f"({spec.trial_id}) already done; skipping" in out, out[-3000:]
    assert "created job" not in out


def test_broken_sweep_fails_before_any_job(smoke, release, tmp_path):
    text = (ROOT / "jobs" / "smoke.yaml").read_text().replace("name: smoke-sft", "name: e2e-broken-sft") \
        .replace("name: smoke-dpo", "name: e2e-broken-dpo").replace("from: smoke-sft:best", "from: e2e-broken-sft:best")
    # The first SFT trial is fine; the second has a learning rate nobody meant.
    text = text.replace("{name: lr-low, lr: 1.0e-4,", "{name: lr-low, lr: fast,")
    broken = tmp_path / "e2e-broken.yaml"
    broken.write_text(text)
    before = sorted(j["metadata"]["uid"] for j in jobs())
    proc = submitter(release, "submit", str(broken), check=False, timeout=300)
    assert proc.returncode == 2
    message = proc.stdout + proc.stderr
    assert "nothing was submitted" in message and "lr" in message and "Fix" in message, message[-2000:]
    assert "Traceback" not in message
    assert sorted(j["metadata"]["uid"] for j in jobs()) == before
    assert jobs("finesweep.io/sweep=e2e-broken-sft") == []


ONE_TRIAL_SWEEP = """\
# {purpose}
name: {name}
stage: sft
model: build/tiny-llama
dataset: {{path: tests/fixtures/datasets/databricks-dolly-15k, format: dolly, split: train, test_fraction: 0.2}}
prompt_format: chat
max_length: 128
eval: {{set: sft-open-questions, max_new_tokens: 8, batch_size: 12, heldout_rows: 4, bootstrap_samples: 50}}
select: {{metric: heldout_perplexity}}
defaults: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj], batch_size: 1, epochs: {epochs}, lr: 1.0e-3}}
trials:
  - {{name: {trial}}}
"""
DRY_RUN_SWEEP = ONE_TRIAL_SWEEP.format(purpose="One SFT trial: its dry run against what the submit creates.",
                                      name="e2e-dry-run", epochs=1, trial="planned")


def contained(printed, live, path: str = "") -> list[str]:
    """Where the live object differs from the printed one: every value printed must be there as printed. The API
    server adds defaults (absent from the print, so not compared) and drops empty values (omitempty)."""
    if isinstance(printed, dict):
        if not isinstance(live, dict):
            return [f"{path}: {live!r} is no mapping"]
        return [d for key, value in printed.items() for d in
                (contained(value, live[key], f"{path}.{key}") if key in live
                 else ([] if value in (None, "", [], {}) else [f"{path}.{key}: missing"]))]
    if isinstance(printed, list):
        if not isinstance(live, list) or len(live) != len(printed):
            return [f"{path}: {len(printed)} items printed, live {live!r:.200}"]
        return [d for i, (a, b) in enumerate(zip(printed, live)) for d in contained(a, b, f"{path}[{i}]")]
    return [] if printed == live else [f"{path}: printed {printed!r:.120}, live {live!r:.120}"]


def test_dry_run_equals_what_submit_created(release, tmp_path):
    """`submit --dry-run` prints the objects a submit creates (one build, TorchX's dryrun/schedule): the controller's
    ConfigMap and Job, and the trial Jobs and ConfigMaps the controller then creates, field for field as the API
    server holds them (with the cluster's finesweep-defaults, which the dry run read), and nothing the dry run did
    not print. The only value left to creation is the owner's uid of a trial ConfigMap."""
    from submitter.k8s_manifests import OWNER_UID_AT_CREATION

    sweep_file = tmp_path / "e2e-dry-run.yaml"
    sweep_file.write_text(DRY_RUN_SWEEP)
    dry = submitter(release, "submit", str(sweep_file), "--dry-run", timeout=120)
    assert "no kubeconfig" not in dry.stderr and "could not be read" not in dry.stderr, dry.stderr
    printed = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(dry.stdout) if d is not None}
    controller = "finesweep-controller-e2e-dry-run"
    assert {("ConfigMap", f"{controller}-sweep"), ("Job", controller)} <= set(printed), sorted(printed)
    trial_jobs = {name for kind, name in printed if kind == "Job" and name != controller}
    assert trial_jobs, sorted(printed)

    submitter(release, "submit", str(sweep_file), timeout=120)
    try:
        first = appeared("finesweep.io/sweep=e2e-dry-run")
        live = {("Job", controller): controller_job(controller),
                ("ConfigMap", f"{controller}-sweep"): json.loads(kubectl(
                    "get", "configmap", f"{controller}-sweep", "-n", NAMESPACE, "-o", "json").stdout)}
        for job in first:
            name = job["metadata"]["name"]
            configmap = json.loads(kubectl("get", "configmap", f"{name}-spec", "-n", NAMESPACE, "-o", "json").stdout)
            live[("Job", name)], live[("ConfigMap", f"{name}-spec")] = job, configmap
            (owner,) = configmap["metadata"]["ownerReferences"]
            assert owner["uid"] == job["metadata"]["uid"]
        # Everything the submit created for this sweep was printed, and matches what was printed field by field.
        assert set(live) <= set(printed), sorted(set(live) - set(printed))
        differences = []
        for key, obj in live.items():
            expected = printed[key]
            if key[0] == "ConfigMap" and expected["metadata"].get("ownerReferences"):
                assert expected["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID_AT_CREATION
                expected = json.loads(json.dumps(expected))
                expected["metadata"]["ownerReferences"][0]["uid"] = obj["metadata"]["ownerReferences"][0]["uid"]
            differences += [f"{key[0]}/{key[1]}{d}" for d in contained(expected, obj)]
        assert not differences, "\n".join(differences)
        print(f"dry run = submit: {len(live)} objects compared field by field ({len(printed)} printed)")
    finally:
        submitter(release, "cancel", str(sweep_file), timeout=300)


PREEMPT_SWEEP = ONE_TRIAL_SWEEP.format(purpose="One long-enough SFT trial: its pod is deleted mid-training.",
                                       name="e2e-preempt", epochs=12, trial="deleted-mid-run")


def test_pod_deleted_mid_run_is_retried_and_completes(smoke, release, tmp_path):
    sweep_file = tmp_path / "e2e-preempt.yaml"
    sweep_file.write_text(PREEMPT_SWEEP)
    submitter(release, "submit", str(sweep_file), timeout=600)
    (job,) = appeared("finesweep.io/sweep=e2e-preempt,finesweep.io/stage=sft")
    name = job["metadata"]["name"]

    # Wait until training is under way but far from done, then delete the pod (as a node drain or a user would).
    deadline, first = time.time() + 600, None
    while time.time() < deadline:
        for pod in pods(f"batch.kubernetes.io/job-name={name}"):
            train = [c for c in pod["status"].get("initContainerStatuses") or [] if c["name"] == "train"]
            if not train or "running" not in (train[0].get("state") or {}):
                continue
            logs = kubectl("logs", pod["metadata"]["name"], "-n", NAMESPACE, "-c", "train", check=False).stdout
            steps = [(int(a), int(b)) for a, b in re.findall(r"step (\d+)/(\d+)", logs)]
            if steps and steps[-1][0] >= 10:
                first, (at_step, total_steps) = pod["metadata"]["name"], steps[-1]
                break
        if first:
            break
        time.sleep(1)
    else:
        pytest.fail("the trial never got 10 steps into training")
    assert at_step < total_steps - 20, f"training too fast to interrupt: step {at_step}/{total_steps}"
    kubectl("delete", "pod", first, "-n", NAMESPACE, "--wait=false")

    (done,) = wait_jobs_complete(TRIALS, expected=1, timeout=900, field_selector=f"metadata.name={name}")
    # Exit 143 after the checkpoint matches the podFailurePolicy's Ignore rule: not a counted failure.
    assert (done["status"].get("failed") or 0) == 0, done["status"]
    (second,) = [p for p in pods(f"batch.kubernetes.io/job-name={name}") if p["metadata"]["name"] != first]
    resumed = kubectl("logs", second["metadata"]["name"], "-n", NAMESPACE, "-c", "train").stdout
    assert "resuming from" in resumed, resumed[-3000:]

    store = store_of(release)
    trial_id = job["metadata"]["labels"]["finesweep.io/trial"]
    train = store.read_json(f"e2e-preempt/{trial_id}/train.json")
    # Same step count as an uninterrupted run, and the loss curve continues where the first pod stopped.
    assert train["steps"] == total_steps
    logged = [e["step"] for e in train["log_history"] if "loss" in e]
    assert logged == sorted(set(logged)) and logged[-1] <= total_steps


OUTAGE_SWEEP = ONE_TRIAL_SWEEP.format(purpose="One SFT trial whose store (MinIO) goes down while it trains.",
                                     name="e2e-outage", epochs=3, trial="store-outage")


def test_store_outage_during_a_cluster_trial_loses_nothing(smoke, release, minio_server, tmp_path):
    """MinIO stops while a trial pod trains and comes back once the pod has felt it: the pod's store calls wait
    (a retry line in `kubectl logs`), the Job completes without a counted failure, every file matches its marker."""
    sweep_file = tmp_path / "e2e-outage.yaml"
    sweep_file.write_text(OUTAGE_SWEEP)
    submitter(release, "submit", str(sweep_file), timeout=600)
    (job,) = appeared("finesweep.io/sweep=e2e-outage,finesweep.io/stage=sft")
    name = job["metadata"]["name"]

    def pod_logs() -> str:  # of every pod of the Job so far (one, unless the outage cost a pod)
        return "".join(kubectl("logs", pod["metadata"]["name"], "-n", NAMESPACE, "-c", c, check=False).stdout
                       for pod in pods(f"batch.kubernetes.io/job-name={name}") for c in ("train", "eval"))

    # Down once training is under way (the trainer touches the store only before and after its steps) ...
    deadline = time.time() + 600
    while not re.search(r"step \d+/\d+", pod_logs()):
        assert time.time() < deadline, "the trial never started training"
        time.sleep(1)
    minio_server.stop(kill=True)
    outage_started = time.time()
    try:
        # ... and back once a store call of the pod has failed and is waiting (upload of the adapter, or the
        # evaluator's download of it if the upload beat the outage).
        while "retrying in" not in pod_logs():
            assert time.time() - outage_started < 300, f"no store retry in the pod's logs:\n{pod_logs()[-3000:]}"
            time.sleep(2)
        time.sleep(5)
    finally:
        minio_server.start()
    print(f"store outage: {time.time() - outage_started:.0f}s")

    (done,) = wait_jobs_complete(TRIALS, expected=1, timeout=900, field_selector=f"metadata.name={name}")
    assert (done["status"].get("failed") or 0) == 0, done["status"]
    store = store_of(release)
    trial_id = job["metadata"]["labels"]["finesweep.io/trial"]
    trained = store.verify_marker(f"e2e-outage/{trial_id}/_TRAINED")  # every file there, checksums equal
    assert any(k.endswith("adapter_model.safetensors") for k in trained["files"])
    store.verify_marker(f"e2e-outage/{trial_id}/_DONE")
    assert store.read_json(f"e2e-outage/{trial_id}/eval.json")["summary"]


CANCEL_SWEEP = ONE_TRIAL_SWEEP.format(purpose="One SFT trial cancelled while it trains, then submitted again.",
                                     name="e2e-cancel", epochs=2, trial="cancelled")


def test_cancel_leaves_nothing_and_a_later_submit_resumes(smoke, release, tmp_path):
    from finesweep.store import read_status

    sweep_file = tmp_path / "e2e-cancel.yaml"
    sweep_file.write_text(CANCEL_SWEEP)
    submitter(release, "submit", str(sweep_file), timeout=120)
    (job,) = appeared("finesweep.io/sweep=e2e-cancel")
    trial_id = job["metadata"]["labels"]["finesweep.io/trial"]
    out = submitter(release, "cancel", str(sweep_file), timeout=300).stdout
    assert "controller job and its ConfigMap deleted" in out, out

    # Nothing of the sweep is left: no controller, no trial Job, no pod (deleted in the background).
    deadline = time.time() + 180
    while pods("finesweep.io/sweep=e2e-cancel") or pods("batch.kubernetes.io/job-name=finesweep-controller-e2e-cancel"):
        assert time.time() < deadline, "pods of the cancelled sweep are still there after 180s"
        time.sleep(2)
    assert jobs("finesweep.io/sweep=e2e-cancel") == [] and controller_job("finesweep-controller-e2e-cancel") is None
    store = store_of(release)
    assert read_status(store, "e2e-cancel", trial_id).state.value == "stopped"

    # Submitted again: the same trial runs as the same attempt (a cancel is no failed attempt) and completes.
    submitter(release, "submit", str(sweep_file), timeout=120)
    (again,) = appeared("finesweep.io/sweep=e2e-cancel")
    assert again["metadata"]["name"] == job["metadata"]["name"] and again["metadata"]["uid"] != job["metadata"]["uid"]
    wait_jobs_complete(TRIALS, expected=1, timeout=900, field_selector=f"metadata.name={again['metadata']['name']}")
    deadline = time.time() + 300
    while condition(controller_job("finesweep-controller-e2e-cancel")) is None:
        assert time.time() < deadline, "the resubmitted controller did not finish"
        time.sleep(3)
    assert condition(controller_job("finesweep-controller-e2e-cancel")) == "Complete"
    status = read_status(store_of(release), "e2e-cancel", trial_id)
    assert status.state.value == "done" and status.attempt == 1


def search_sweep_text() -> str:
    """jobs/smoke-search.yaml with longer trials (40 steps: a pruning decision has many evaluations to land at,
    whatever the controller's poll and the pod's speed) and a budget of 4 trials, as sweep e2e-search."""
    raw = yaml.safe_load((ROOT / "jobs" / "smoke-search.yaml").read_text())
    raw["name"] = "e2e-search"
    raw["defaults"]["max_steps"] = 40
    raw["search"]["budget"] = 4
    return yaml.safe_dump(raw, sort_keys=False)


def test_search_sweep_prunes_in_pods_two_at_a_time(release, tmp_path):
    """A search with successive halving through the controller: trial Jobs two at a time, the lr 1e-6 trial (or
    another loser at a rung) pruned inside its pod by the decision its trainer takes at the evaluation, decisions in `kubectl logs`,
    pruned trials marked in the report."""
    from finesweep.store import read_progress, read_status

    sweep_file = tmp_path / "e2e-search.yaml"
    sweep_file.write_text(search_sweep_text())
    submitter(release, "submit", str(sweep_file), timeout=120)
    controller = "finesweep-controller-e2e-search"
    store = store_of(release)
    in_flight, seen = 0, {}
    deadline = time.time() + 1200
    while condition(controller_job(controller) or {}) is None:
        found = jobs("finesweep.io/sweep=e2e-search,finesweep.io/stage=sft")
        seen.update({j["metadata"]["uid"]: j for j in found})
        # Trials in flight: a pod running a trial the store does not have settled. (A pruned trial's pod may
        # still be finishing for a moment after its attempt closed; the next trial rightly starts then.)
        running = [j for j in found if (j["status"].get("active") or 0)
                   and not read_status(store, "e2e-search", j["metadata"]["labels"]["finesweep.io/trial"]).settled]
        in_flight = max(in_flight, len(running))
        assert time.time() < deadline, "the search did not finish within 1200s"
        time.sleep(1)
    log = kubectl("logs", f"job/{controller}", "-n", NAMESPACE).stdout
    assert condition(controller_job(controller)) == "Complete", log[-4000:]
    assert in_flight == 2, f"at most and at some point two trials at once (search.parallel 2): {in_flight}"

    trial_ids = {j["metadata"]["labels"]["finesweep.io/trial"]: j["metadata"]["name"] for j in seen.values()}
    states = {tid: read_status(store, "e2e-search", tid).state.value for tid in trial_ids}
    pruned = [tid for tid, state in states.items() if state == "pruned"]
    assert len(trial_ids) == 4 and pruned and set(states.values()) <= {"done", "pruned"}, states
    for tid in pruned:
        progress = read_progress(store, "e2e-search", tid)
        assert progress["stopped"]["reason"] == "pruned" and progress["stopped"]["step"] < 40, progress["stopped"]
        train_log = kubectl("logs", f"job/{trial_ids[tid]}", "-n", NAMESPACE, "-c", "train").stdout
        assert "stop requested by the search: pruned" in train_log, train_log[-3000:]
    assert re.search(r"search e2e-search: pruning \S+ \(\S+\) at \d+ examples: heldout_loss", log), log[-4000:]
    assert re.search(rf"settled \(\d+ complete, {len(pruned)} pruned, 0 failed\)", log), log[-4000:]
    report = store.read_bytes("e2e-search/report/report.md").decode()
    assert "## Search" in report and "pruned (ineligible)" in report, report[:3000]
    print(f"search on the cluster: {len(trial_ids)} trials, {len(pruned)} pruned, at most {in_flight} at once")


def test_trial_pods_ran_unprivileged(smoke):
    """What the kubelet ran, read back from the API: every trial container as uid 1000 (non-root), on a
    read-only root filesystem, no privilege escalation, no capabilities, no ServiceAccount token mounted; and
    these pods trained and evaluated under it (their Jobs completed)."""
    ran = [p for p in pods(TRIALS) if p["status"].get("phase") == "Succeeded"]
    assert len(ran) >= 7, [p["metadata"]["name"] for p in ran]
    for pod in ran:
        spec, name = pod["spec"], pod["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000, name
        assert spec.get("automountServiceAccountToken") is False, name
        # Reference rows (base, DPO start) only evaluate: no training init container.
        containers = spec.get("initContainers", []) + spec["containers"]
        mounts = [m["mountPath"] for c in containers for m in c["volumeMounts"]]
        assert not any("serviceaccount" in m for m in mounts), (name, mounts)
        for container in containers:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, (name, ctx)
            assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add"), (name, ctx)


def test_submitter_role_is_least_privilege(release):
    sa = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"

    def can(verb: str, resource: str, namespace: str = NAMESPACE) -> bool:
        proc = kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", sa, check=False)
        return proc.stdout.strip() == "yes"

    for verb, resource in [("create", "jobs.batch"), ("list", "jobs.batch"), ("watch", "jobs.batch"),
                           ("delete", "jobs.batch"), ("create", "configmaps"), ("get", "configmaps"),
                           ("list", "pods"), ("get", "pods/log"), ("list", "events")]:
        assert can(verb, resource), f"the submitter needs {verb} {resource}"
    for verb, resource in [("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("create", "pods/exec"),
                           ("patch", "jobs.batch"), ("update", "jobs.batch"), ("update", "configmaps"),
                           ("create", "roles.rbac.authorization.k8s.io"), ("create", "serviceaccounts/token")]:
        assert not can(verb, resource), f"the submitter must not {verb} {resource}"
    assert not can("create", "jobs.batch", "default"), "the Role must stay in its namespace"
    assert not can("list", "nodes", "")


OOM_SWEEP = ONE_TRIAL_SWEEP.format(purpose="One SFT trial whose pod gets far too little memory: it is OOMKilled.",
                                   name="e2e-oom", epochs=1, trial="starved")


def test_out_of_memory_trial_fails_with_its_reason_in_status_and_report(cluster, minio_server, tmp_path_factory,
                                                                        tmp_path):
    starved = install_release(OOM_NAMESPACE, minio_server, tmp_path_factory, {
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "96Mi"}},
        "shmSize": "16Mi", "backoffLimit": 0})
    sweep_file = tmp_path / "e2e-oom.yaml"
    sweep_file.write_text(OOM_SWEEP)
    submitter(starved, "submit", str(sweep_file), timeout=600)

    deadline = time.time() + 600
    while True:
        found = jobs("finesweep.io/sweep=e2e-oom", namespace=OOM_NAMESPACE)
        # The controller runs the base row, then the starved trial (max_parallel 1): wait for both Jobs.
        if len(found) == 2 and all(condition(j) for j in found):
            break
        assert time.time() < deadline, [(j["metadata"]["name"], condition(j)) for j in found]
        time.sleep(3)
    assert {condition(j) for j in found} == {"Failed"}

    status = submitter(starved, "status", str(sweep_file)).stdout
    line = next(l for l in status.splitlines() if " starved " in l)
    assert " failed " in line and "OOMKilled (exit 137)" in line, status

    submitter(starved, "report", str(sweep_file))
    store = store_of(starved)
    trial = next(j for j in found if j["metadata"]["labels"]["finesweep.io/stage"] == "sft")
    marker = store.read_json(f"e2e-oom/{trial['metadata']['labels']['finesweep.io/trial']}/_FAILED")
    assert marker["exit_code"] == 137 and "OOMKilled" in marker["reason"]
    report = store.read_bytes("e2e-oom/report/report.md").decode()
    assert "starved: failed in job (exit 137)" in report and "OOMKilled" in report, report[:3000]
