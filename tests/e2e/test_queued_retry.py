"""One sweep through the chart's Kueue queue, as 2-process trial pods, with a trial made to fail and retried.

A second release (namespace finesweep-e2e-queued) is installed with `jobs.kueueQueueName` (its trial Jobs carry
kueue.x-k8s.io/queue-name and are created suspended), `jobs.processesPerTrial: 2` (finesweep-train launches two
data-parallel ranks, as on a 2-GPU node) and `jobs.backoffLimit: 0`. Its ClusterQueue's quota on what a trial
pod requests (cpu and memory) fits one trial pod, and the sweep allows two in flight: Kueue, not the controller,
makes them run one at a time.

The sweep is the base row plus one trial. Once the trial's adapter is stored (its _TRAINED marker written, the
evaluation container not yet started) the test damages the adapter in MinIO: the evaluation refuses it (checksum),
the Job fails, the controller records the failure and ends. A resubmit runs exactly that trial again, as attempt
2 (Job `<sweep>-<id>-a2`): the trainer sees the damaged adapter, trains again, the evaluation passes; the base
row's Job is left alone.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.conftest import install_release, kubectl, submitter
from tests.e2e.test_cluster import ONE_TRIAL_SWEEP, condition, controller_job, jobs, store_of
from tests.e2e.test_kueue import cond, get_json, make_queue

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NS = "finesweep-e2e-queued"
QUEUE = "finesweep-trials"  # the chart's jobs.kueueQueueName: a LocalQueue in the release's namespace
CQ = FLAVOR = "finesweep-e2e-queued"
SWEEP = "e2e-retry"
TRIAL_REQUESTS = {"cpu": "100m", "memory": "512Mi"}  # conftest.install_release's jobs.resources.requests
QUOTA = {"cpu": "100m", "memory": "768Mi"}  # one trial pod fits, two do not (in either resource)

RETRY_SWEEP = ONE_TRIAL_SWEEP.format(
    purpose="The base row and one SFT trial, two in flight, queued by Kueue; the trial's adapter is damaged after "
            "training, then the sweep is resubmitted.",
    name=SWEEP, epochs=1, trial="damaged").replace("batch_size: 1,", "batch_size: 2,") + "max_parallel: 2\n"


def cleanup() -> None:
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--timeout=120s", check=False, timeout=150)
    kubectl("delete", "clusterqueue", CQ, "--ignore-not-found", "--timeout=30s", check=False, timeout=60)
    kubectl("delete", "resourceflavor", FLAVOR, "--ignore-not-found", "--timeout=30s", check=False, timeout=60)


@pytest.fixture(scope="module")
def queued(cluster, minio_server, tmp_path_factory):
    crd = kubectl("get", "crd", "clusterqueues.kueue.x-k8s.io", check=False)
    assert crd.returncode == 0, ("Kueue is not running on this cluster: start it with `make kueue`, or run the "
                                 "suite through `make e2e`")
    cleanup()
    release = install_release(NS, minio_server, tmp_path_factory, {
        "kueueQueueName": QUEUE, "processesPerTrial": 2, "backoffLimit": 0})
    make_queue(tmp_path_factory.mktemp("queues"), NS, FLAVOR, CQ, QUEUE, QUOTA)
    yield release
    cleanup()


class Watch:
    """Every trial Job of the sweep seen so far (uid -> last state), and any moment two ran at once."""

    def __init__(self):
        self.seen: dict[str, dict] = {}
        self.overlaps: list[list[str]] = []

    def poll(self) -> list[dict]:
        found = jobs(f"finesweep.io/sweep={SWEEP}", namespace=NS)
        running = []
        for job in found:
            self.seen[job["metadata"]["uid"]] = job
            if not job["spec"].get("suspend") and condition(job) is None and (job["status"].get("active") or 0):
                running.append(job["metadata"]["name"])
        if len(running) > 1:
            self.overlaps.append(running)
        return found


def trial_jobs(found: list[dict], stage: str) -> list[dict]:
    return [j for j in found if j["metadata"]["labels"]["finesweep.io/stage"] == stage]


def container_log(job_name: str, container: str) -> str:
    return kubectl("logs", f"job/{job_name}", "-n", NS, "-c", container, check=False).stdout


def wait_controller(name: str, timeout: float, watch: Watch) -> str:
    deadline = time.time() + timeout
    while condition(controller_job(name, NS) or {}) is None:
        watch.poll()
        assert time.time() < deadline, f"the controller did not finish in {timeout:.0f}s"
        time.sleep(1)
    return condition(controller_job(name, NS))


def check_two_process_training(log: str) -> None:
    """Two ranks trained (the trainer says so), and only the main one logged progress and saved (one writer)."""
    assert re.search(r"2 processes \(.*\), global batch 2 = 1 per process x 2", log), log[-3000:]
    steps = re.findall(r"step (\d+)/(\d+) \(", log)
    assert steps and len(steps) == len(set(steps)), f"each progress line once: {steps}"
    assert log.count("saved adapter and train.json") == 1, log[-3000:]


def test_queued_two_process_trial_fails_once_and_only_it_is_retried(queued, tmp_path):
    from finesweep.store import TRAINED, read_status

    controller = f"finesweep-controller-{SWEEP}"
    store = store_of(queued)
    sweep_path = tmp_path / f"{SWEEP}.yaml"
    sweep_path.write_text(RETRY_SWEEP)
    submitter(queued, "submit", str(sweep_path), timeout=120)
    watch = Watch()

    # Both Jobs (base row and trial) appear suspended with the queue's label; Kueue admits them in turn.
    deadline = time.time() + 300
    while len(found := watch.poll()) < 2:
        assert time.time() < deadline, f"the controller created {len(found)} of 2 Jobs"
        time.sleep(0.5)
    for job in found:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
    (trial_job,) = trial_jobs(found, "sft")
    trial_id = trial_job["metadata"]["labels"]["finesweep.io/trial"]
    prefix = f"{SWEEP}/{trial_id}"

    # Damage the adapter between training and evaluation (the eval container needs seconds to start Python).
    deadline = time.time() + 900
    while not store.exists(f"{prefix}/{TRAINED}"):
        watch.poll()
        assert time.time() < deadline, "the trial was not trained within 900s"
        time.sleep(0.2)
    adapter = f"{prefix}/adapter/adapter_model.safetensors"
    good = store.read_bytes(adapter)
    store.write_bytes(adapter, good[: len(good) // 2])

    assert wait_controller(controller, 600, watch) == "Failed"  # exit 1: a trial failed
    status = read_status(store, SWEEP, trial_id)
    assert status.state.value == "failed" and status.attempt == 1, status
    # Recorded as a local run records it: the failing container as the phase, its error line as the reason.
    assert "checksum differs" in status.failure.reason and status.failure.phase == "eval", status.failure
    first_train_log = container_log(trial_job["metadata"]["name"], "train")
    check_two_process_training(first_train_log)
    print(f"queued retry: attempt 1 failed as planned: {status.failure.reason[:200]}")

    # Resubmitted: the trial runs again as attempt 2, the base row's Job is not touched.
    (base_job,) = [j for j in watch.seen.values() if j["metadata"]["labels"]["finesweep.io/stage"] == "base"]
    submitter(queued, "submit", str(sweep_path), timeout=120)
    assert wait_controller(controller, 900, watch) == "Complete", kubectl(
        "logs", f"job/{controller}", "-n", NS, check=False).stdout[-4000:]
    found = watch.poll()
    assert [j["metadata"]["uid"] for j in trial_jobs(found, "base")] == [base_job["metadata"]["uid"]]
    (retried,) = trial_jobs(found, "sft")
    assert retried["metadata"]["name"] == f"{trial_job['metadata']['name']}-a2", retried["metadata"]["name"]
    assert retried["metadata"]["labels"]["finesweep.io/attempt"] == "2" and condition(retried) == "Complete"
    trial_uids = {uid for uid, j in watch.seen.items() if j["metadata"]["labels"]["finesweep.io/stage"] == "sft"}
    assert len(trial_uids) == 2, "one Job per attempt"
    status = read_status(store, SWEEP, trial_id)
    assert status.state.value == "done" and status.attempt == 2, status
    assert [a.outcome for a in status.attempts] == ["failed", "done"], status.attempts
    assert read_status(store, SWEEP, base_job["metadata"]["labels"]["finesweep.io/trial"]).attempt == 1

    second_train_log = container_log(retried["metadata"]["name"], "train")
    assert "fails its _TRAINED checksums" in second_train_log and "training again" in second_train_log
    check_two_process_training(second_train_log)
    store.verify_marker(f"{prefix}/{TRAINED}")
    store.verify_marker(f"{prefix}/_DONE")
    train = store.read_json(f"{prefix}/train.json")
    assert train["processes"] == 2 and train["global_batch"] == 2, {k: train.get(k) for k in ("processes",
                                                                                               "global_batch")}

    # Kueue admitted every Job through the queue, never two at once on a quota that fits one.
    workloads = get_json("workloads.kueue.x-k8s.io", "-n", NS)["items"]
    admitted = {o["name"] for wl in workloads for o in wl["metadata"].get("ownerReferences") or []
                if o["kind"] == "Job" and (wl["status"].get("admission") or {}).get("clusterQueue") == CQ}
    assert {j["metadata"]["name"] for j in found} <= admitted, (admitted, [j["metadata"]["name"] for j in found])
    assert all(cond(wl, "Finished") for wl in workloads)
    assert not watch.overlaps, f"two trial Jobs ran at once on a quota that fits one: {watch.overlaps[:3]}"
    print(f"queued retry: {len(watch.seen)} Jobs through Kueue queue {QUEUE}, one at a time; attempt 2 done")
