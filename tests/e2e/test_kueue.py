"""The real Kueue on the offline cluster (scripts/cluster/kueue.sh, started by `make e2e`): a ClusterQueue
whose cpu quota fits one Job at a time admits two suspended Jobs of its LocalQueue one after the other.

The Jobs run the cluster's own pause image (always there: up.sh imports it, no `make cluster-load` needed)
with a static sleeper compiled here and mounted from the host, so each pod does a few seconds of work and
exits 0 (/pause alone never exits). The objects are the ones a sweep's trial Jobs meet: a ResourceFlavor, a
ClusterQueue with a quota on what the pods request (cpu), a LocalQueue in the Jobs' namespace, and Jobs created
suspended with the kueue.x-k8s.io/queue-name label.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import ROOT, kubectl

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NS = "finesweep-e2e-kueue"
CQ = "finesweep-e2e-kueue"
FLAVOR = "finesweep-e2e-kueue"
QUEUE = "trials"
PAUSE_IMAGE = "finesweep.local/pause:3.10"  # scripts/cluster/lib.sh PAUSE_IMAGE
QUOTA = "250m"  # each Job requests all of it: two cannot run at once
SLEEP_S = 4

SLEEPER_C = r"""
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) { sleep(argc > 1 ? atoi(argv[1]) : 1); return 0; }
"""


def apply(tmp_path: Path, name: str, docs: list[dict]) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    kubectl("apply", "-f", str(path))


def get_json(*args: str) -> dict:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def cond(obj: dict, kind: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return c
    return None


def is_true(obj: dict | None, kind: str) -> bool:
    c = cond(obj or {}, kind)
    return bool(c and c["status"] == "True")


def cleanup() -> None:
    # The namespace first (its Jobs, Workloads, LocalQueue), then the ClusterQueue and the ResourceFlavor,
    # whose finalizers Kueue lifts only once nothing uses them.
    kubectl("delete", "namespace", NS, "--ignore-not-found", "--timeout=60s", check=False, timeout=90)
    kubectl("delete", "clusterqueue", CQ, "--ignore-not-found", "--timeout=30s", check=False, timeout=60)
    kubectl("delete", "resourceflavor", FLAVOR, "--ignore-not-found", "--timeout=30s", check=False, timeout=60)


def dump() -> str:
    out = subprocess.run(["bash", str(ROOT / "scripts/cluster/dump.sh"), NS], capture_output=True, text=True,
                         timeout=120)
    wl = kubectl("get", "workloads,localqueues,clusterqueues", "-A", "-o", "yaml", check=False)
    return f"{out.stdout[-30000:]}\n===== Kueue objects =====\n{wl.stdout[-20000:]}{wl.stderr[-2000:]}"


@pytest.fixture(scope="module")
def kueue(cluster, tmp_path_factory):
    """The test namespace and a static sleeper on the host (for a hostPath mount), Kueue checked up first."""
    crd = kubectl("get", "crd", "clusterqueues.kueue.x-k8s.io", check=False)
    hooks = kubectl("get", "mutatingwebhookconfiguration", "kueue-mutating-webhook-configuration", check=False)
    assert crd.returncode == 0 and hooks.returncode == 0, (
        "Kueue is not running on this cluster (no ClusterQueue CRD or no kueue webhooks): start it with "
        "`make kueue` (bash scripts/cluster/kueue.sh up), or run the suite through `make e2e`")
    cleanup()
    build = tmp_path_factory.mktemp("kueue")
    sleeper_dir = build / "sleeper"
    sleeper_dir.mkdir()
    (build / "sleeper.c").write_text(SLEEPER_C)
    subprocess.run(["gcc", "-static", "-Os", "-o", str(sleeper_dir / "sleeper"), str(build / "sleeper.c")],
                   check=True, timeout=60)
    sleeper_dir.chmod(0o755)
    kubectl("create", "namespace", NS)
    yield sleeper_dir
    cleanup()
    for kind, name in (("clusterqueue", CQ), ("resourceflavor", FLAVOR), ("namespace", NS)):
        left = kubectl("get", kind, name, "--ignore-not-found", "-o", "name", check=False).stdout.strip()
        assert not left, f"test_kueue left {left} behind"


def job(name: str, sleeper_dir: Path, queue: str | None = QUEUE) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": {"kueue.x-k8s.io/queue-name": queue} if queue else {}},
        "spec": {
            "suspend": bool(queue),  # Kueue unsuspends it when it admits the Workload
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "work", "image": PAUSE_IMAGE, "imagePullPolicy": "Never",
                    "command": ["/sleeper/sleeper", str(SLEEP_S)],
                    "resources": {"requests": {"cpu": QUOTA}},
                    "volumeMounts": [{"name": "sleeper", "mountPath": "/sleeper", "readOnly": True}]}],
                "volumes": [{"name": "sleeper", "hostPath": {"path": str(sleeper_dir), "type": "Directory"}}]}},
        },
    }


def make_queue(tmp_path: Path, namespace: str, flavor: str, cluster_queue: str, queue: str,
               quota: dict[str, str]) -> None:
    """A ResourceFlavor, a StrictFIFO ClusterQueue for `namespace` with `quota` ({resource: nominal quota},
    every resource the pods request) and a LocalQueue `queue` in it; returns once the ClusterQueue is Active."""
    apply(tmp_path, "queues", [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
         "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                  "queueingStrategy": "StrictFIFO",
                  "resourceGroups": [{"coveredResources": list(quota), "flavors": [
                      {"name": flavor, "resources": [{"name": r, "nominalQuota": q} for r, q in quota.items()]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": queue, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}},
    ])
    deadline = time.monotonic() + 60
    while not is_true(get_json("clusterqueue", cluster_queue), "Active"):
        assert time.monotonic() < deadline, (f"ClusterQueue {cluster_queue} not Active after 60s: "
                                             f"{get_json('clusterqueue', cluster_queue)}")
        time.sleep(0.5)


def test_quota_of_one_admits_jobs_one_at_a_time(kueue, tmp_path):
    sleeper_dir = kueue
    make_queue(tmp_path, NS, FLAVOR, CQ, QUEUE, {"cpu": QUOTA})

    try:
        started = time.monotonic()
        apply(tmp_path, "first", [job("first", sleeper_dir)])
        # creationTimestamp has one-second resolution: a second apart, FIFO order is unambiguous.
        time.sleep(1.1)
        apply(tmp_path, "second", [job("second", sleeper_dir)])
        timeline = watch_until_both_complete(timeout=75)
        elapsed = time.monotonic() - started
        check_one_at_a_time(timeline)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{dump()}") from None
    print(f"kueue: two Jobs admitted in turn and completed in {elapsed:.1f}s")


def snapshot() -> dict:
    queued = get_json("jobs", "-n", NS, "-l", "kueue.x-k8s.io/queue-name")["items"]
    jobs = {j["metadata"]["name"]: j for j in queued}
    workloads = {}
    for wl in get_json("workloads.kueue.x-k8s.io", "-n", NS)["items"]:
        for owner in wl["metadata"].get("ownerReferences") or []:
            if owner["kind"] == "Job":
                workloads[owner["name"]] = wl
    return {name: {"suspended": j["spec"].get("suspend", False), "complete": is_true(j, "Complete"),
                   "failed": is_true(j, "Failed"), "workload": workloads.get(name)}
            for name, j in jobs.items()}


def watch_until_both_complete(timeout: float) -> list[tuple[float, dict]]:
    timeline = []
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot()
        timeline.append((time.monotonic(), snap))
        failed = [n for n, s in snap.items() if s["failed"]]
        assert not failed, f"Job(s) {failed} failed"
        if len(snap) == 2 and all(s["complete"] for s in snap.values()):
            return timeline
        assert time.monotonic() < deadline, f"not both complete after {timeout}s; last state: {summary(snap)}"
        time.sleep(0.25)


def summary(snap: dict) -> dict:
    return {n: {"suspended": s["suspended"], "complete": s["complete"],
                "workload": s["workload"] and {c["type"]: (c["status"], c.get("reason"), c.get("message"))
                                               for c in s["workload"]["status"].get("conditions", [])}}
            for n, s in snap.items()}


def check_one_at_a_time(timeline: list[tuple[float, dict]]) -> None:
    final = timeline[-1][1]
    # Both got a Workload in the LocalQueue, admitted into the ClusterQueue, and finished.
    for name in ("first", "second"):
        wl = final[name]["workload"]
        assert wl is not None, f"Job {name} has no Workload: {summary(final)}"
        assert wl["spec"]["queueName"] == QUEUE, wl["spec"]
        assert (wl["status"].get("admission") or {}).get("clusterQueue") == CQ, wl["status"]
        assert is_true(wl, "Finished"), f"Workload of {name} not Finished: {summary(final)}"

    def first_seen(pred) -> float | None:
        return next((t for t, snap in timeline if pred(snap)), None)

    running = lambda s: not s["suspended"] and not s["complete"]  # noqa: E731
    both_running = [summary(snap) for _, snap in timeline
                    if len(snap) == 2 and all(running(s) for s in snap.values())]
    assert not both_running, f"both Jobs ran at once on a quota that fits one: {both_running[0]}"

    first_unsuspended = first_seen(lambda s: "first" in s and not s["first"]["suspended"])
    first_done = first_seen(lambda s: "first" in s and s["first"]["complete"])
    second_unsuspended = first_seen(lambda s: "second" in s and not s["second"]["suspended"])
    assert None not in (first_unsuspended, first_done, second_unsuspended), "admission never observed"
    assert first_unsuspended <= first_done <= second_unsuspended, (
        "the first Job must be admitted and complete before the second is admitted: "
        f"first admitted at {first_unsuspended:.2f}, done at {first_done:.2f}, second admitted at "
        f"{second_unsuspended:.2f}")
    # The second waited for quota, not for Kueue to notice it: it had a Workload, pending for lack of cpu,
    # while the first ran.
    waiting = [snap["second"]["workload"] for t, snap in timeline
               if "second" in snap and snap["second"]["workload"] and first_unsuspended <= t < first_done
               and snap["second"]["suspended"]]
    assert waiting, "the second Job's Workload was never seen pending while the first ran"
    # Any of those snapshots will do: the last one may fall between Kueue releasing the first's quota (its
    # Workload Finished) and the first Job's Complete condition, when the second already holds quota but is
    # still suspended.
    reservations = [cond(wl, "QuotaReserved") for wl in waiting]
    assert any(r and r["status"] == "False" and "insufficient" in r.get("message", "").lower()
               for r in reservations), f"the second Workload waited, but not for quota: {reservations}"
    # Kueue's own record agrees with what was observed: quota for the second was reserved after the first
    # finished (timestamps have one-second resolution, hence <=).
    first_finished = cond(final["first"]["workload"], "Finished")["lastTransitionTime"]
    second_reserved = cond(final["second"]["workload"], "QuotaReserved")["lastTransitionTime"]
    assert first_finished <= second_reserved, (first_finished, second_reserved)


def test_jobs_without_queue_name_are_left_alone(kueue, tmp_path):
    """manageJobsWithoutQueueName: false. The rest of the e2e creates Jobs without the label in the same
    cluster: Kueue's webhooks see them, but they run at once, unsuspended, with no Workload."""
    apply(tmp_path, "unqueued", [job("unqueued", kueue, queue=None)])
    kubectl("wait", "-n", NS, "--for=condition=Complete", "job/unqueued", "--timeout=60s", timeout=90)
    owned = [wl["metadata"]["name"] for wl in get_json("workloads.kueue.x-k8s.io", "-n", NS)["items"]
             if any(o["kind"] == "Job" and o["name"] == "unqueued"
                    for o in wl["metadata"].get("ownerReferences") or [])]
    assert not owned, f"Kueue made Workload(s) {owned} for a Job without kueue.x-k8s.io/queue-name"
    assert get_json("job", "-n", NS, "unqueued")["spec"].get("suspend") is False
