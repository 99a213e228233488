"""Artifact store: one layout on a local folder or any S3-compatible endpoint.

Layout (keys are '/'-separated, relative to the store root):
    <sweep>/<trial-id>/spec.json            the resolved trial spec
    <sweep>/<trial-id>/adapter/...          the LoRA adapter (PEFT save_pretrained output)
    <sweep>/<trial-id>/train.json           loss curve, wall time, tokens/s, peak memory, versions
    <sweep>/<trial-id>/_TRAINED             marker: adapter and train.json complete (with checksums)
    <sweep>/<trial-id>/eval.json            metrics
    <sweep>/<trial-id>/samples.jsonl        generated answers
    <sweep>/<trial-id>/_DONE                marker: the trial is finished (with checksums)
    <sweep>/<trial-id>/attempts.json        every attempt to run the trial (backend, Job, start, outcome)
    <sweep>/<trial-id>/_FAILED              why the current attempt failed (phase, exit code, reason, attempt)
    <sweep>/<trial-id>/monitor.json, progress.json    search: evaluation during training and its pruning decision
    <sweep>/search/trials/<number>.json     search: the study's record of each trial (finesweep.search)
    <sweep>/report/...                      report.md, leaderboard.json, plots
    _shared/reference-logps/<key>.json      DPO reference log-probs of one set of training pairs, shared by every
                                            trial with the same start weights, pairs and settings (see below)

A marker is written only after every file it lists, so a trial interrupted half way never counts as done.
A trial's state is read only through `read_status` and its attempts and failures written only through
`start_attempt`, `record_failure`, `end_attempt`: no other module looks at these files.
No torch here: the submitter imports this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger("finesweep")
TRAINED = "_TRAINED"
DONE = "_DONE"
FAILED = "_FAILED"  # why the current attempt failed (phase, exit code, reason); not a completion marker
ATTEMPTS = "attempts.json"
# Resubmits retry a failed trial until it has failed this many times (submit --max-attempts changes it).
DEFAULT_MAX_ATTEMPTS = 3
PREEMPTED_EXIT = 143  # finesweep.exitcodes.PREEMPTED: stopped with a checkpoint saved; not a failed attempt


class StoreError(RuntimeError):
    pass


class ArtifactStore(ABC):
    url: str

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (recursively), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    # ------------------------------------------------------------------ built on the primitives above
    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def upload_dir(self, local_dir: str | Path, prefix: str) -> dict[str, str]:
        """Upload every file below `local_dir`; returns {key: sha256} for a marker."""
        local_dir = Path(local_dir)
        sums = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(local_dir).as_posix()}"
            data = path.read_bytes()
            self.write_bytes(key, data)
            sums[key] = checksum(data)
        return sums

    def download_dir(self, prefix: str, local_dir: str | Path, checksums: dict[str, str] | None = None) -> Path:
        local_dir = Path(local_dir)
        prefix = prefix.rstrip("/") + "/"
        keys = self.list(prefix)
        if not keys:
            raise StoreError(f"{self.url}: nothing stored under {prefix}")
        for key in keys:
            data = self.read_bytes(key)
            if checksums and key in checksums and checksum(data) != checksums[key]:
                raise StoreError(f"{self.url}/{key}: checksum mismatch (corrupt or partial upload)")
            target = local_dir / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return local_dir

    def write_marker(self, key: str, files: dict[str, str], **info: Any) -> None:
        """Write a completion marker listing `files` with checksums. Call it last."""
        self.write_json(key, {"files": files, "written_at": time.time(), **info})

    def verify_marker(self, key: str) -> dict:
        """Read a marker and check every file it lists is present with the recorded checksum."""
        marker = self.read_json(key)
        for file_key, digest in marker["files"].items():
            if checksum(self.read_bytes(file_key)) != digest:
                raise StoreError(f"{self.url}/{file_key}: checksum differs from marker {key}")
        return marker


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: readers see the old file or the whole new one, never half.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.url}: {key} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix.strip("/") else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".part"))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store(ArtifactStore):
    """Any S3-compatible endpoint (AWS, MinIO, Ceph...). Settings come from the standard AWS variables plus
    FINESWEEP_S3_ENDPOINT (custom endpoint URL) and AWS_REGION; path-style addressing for non-AWS endpoints."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None):
        import boto3
        from botocore.config import Config

        if not url.startswith("s3://"):
            raise StoreError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"{url!r} names no bucket; write s3://bucket/prefix")
        self.url, self.bucket, self.prefix = url.rstrip("/"), bucket, prefix.strip("/")
        endpoint_url = endpoint_url or os.environ.get("FINESWEEP_S3_ENDPOINT") or None
        config = Config(
            # Few inner attempts: the outer deadline loop in _call rides out longer outages.
            retries={"max_attempts": int(os.environ.get("FINESWEEP_S3_MAX_ATTEMPTS", "3")), "mode": "standard"},
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            connect_timeout=10,
            read_timeout=60,
        )
        # A session of its own: boto3's shared default session keeps the first credentials it saw.
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                   region_name=region or os.environ.get("AWS_REGION", "us-east-1"), config=config)
        # botocore's own retries give up after ~13 s of connection errors; an endpoint restart (a MinIO or
        # gateway pod rescheduled) takes longer, so whole operations are retried until this deadline.
        self.retry_seconds = float(os.environ.get("FINESWEEP_S3_RETRY_SECONDS", "120"))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        deadline, delay = time.monotonic() + self.retry_seconds, 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except (ConnectionError, HTTPClientError, ClientError) as err:
                status = getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                transient = not isinstance(err, ClientError) or status >= 500 or status == 429
                if not transient or time.monotonic() + delay > deadline:
                    raise
                log.warning("s3 %s on %s: %s; retrying in %.1fs", what, self.url, type(err).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: the object appears whole or not at all.
        self._call("put", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data,
                   ChecksumAlgorithm="SHA256")

    def read_bytes(self, key: str) -> bytes:
        def get():
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        try:
            return self._call("get", get)
        except self.client.exceptions.NoSuchKey:
            raise StoreError(f"{self.url}/{key} does not exist") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("head", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        # Same meaning as LocalStore: a prefix is a folder ('s/t1' must not match 's/t10/...') or one key.
        if prefix and not prefix.endswith("/"):
            if self.exists(prefix):
                return [prefix]
            prefix += "/"
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def pages():
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return keys

        return sorted(self._call("list", pages))

    def delete(self, key: str) -> None:
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))


def open_store(url: str | Path) -> ArtifactStore:
    url = str(url)
    if url.startswith("s3://"):
        return S3Store(url)
    if "://" in url:
        raise StoreError(f"store {url!r}: only a folder path or s3://bucket/prefix is supported")
    return LocalStore(url)


# ------------------------------------------------------------------------------------- trial layout

def trial_prefix(sweep: str, trial_id: str) -> str:
    return f"{sweep}/{trial_id}"


class TrialState(str, Enum):
    PENDING = "pending"  # nothing run yet (or only stopped before training finished)
    RUNNING = "running"  # an attempt is under way: a local child process, or a Job pending/running
    TRAINED = "trained"  # adapter stored, not evaluated, no attempt under way
    DONE = "done"  # _DONE: evaluated; final whatever else the store holds
    FAILED = "failed"  # the current attempt failed; a resubmit retries it (up to the attempt limit)
    STOPPED = "stopped"  # cancelled; a resubmit carries on (same attempt)
    PRUNED = "pruned"  # reserved for a search that stops unpromising trials early

    def __str__(self) -> str:
        return self.value


# States a pipeline waiting on a sweep stops waiting for: nothing more will happen without a resubmit.
SETTLED = frozenset({TrialState.DONE, TrialState.FAILED, TrialState.PRUNED})


@dataclass(frozen=True)
class Failure:
    phase: str  # train | eval | job (the cluster gave up on the Job: OOMKilled, deadline, exit 3)
    reason: str
    exit_code: int | None = None
    attempt: int = 0  # the attempt it ended (record_failure always names one)
    at: float = 0.0
    job: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Attempt:
    number: int
    backend: str
    started_at: float
    job: str | None = None
    # None while under way; done | failed | preempted | stopped once known
    outcome: str | None = None
    ended_at: float | None = None
    failure: dict | None = None  # the _FAILED record of a failed attempt, kept when the trial is retried


@dataclass(frozen=True)
class TrialStatus:
    trial_id: str
    state: TrialState
    trained: bool  # the adapter and its _TRAINED marker are stored (trials that train)
    done: bool
    failure: Failure | None  # why the current attempt failed (state FAILED)
    attempts: tuple[Attempt, ...] = field(default=())
    # _DONE is there but was written for other evaluation settings than the ones asked about (read_status's
    # `evaluation`): the trial is trained, not done, and a submit evaluates it again (NextAction.EVALUATE).
    evaluation_stale: bool = False

    @property
    def attempt(self) -> int:
        """The current attempt's number (1 for the first run); 0 when the trial never started."""
        return self.attempts[-1].number if self.attempts else 0

    @property
    def failed_attempts(self) -> int:
        return sum(a.outcome == "failed" for a in self.attempts)

    @property
    def settled(self) -> bool:
        return self.state in SETTLED


def read_status(store: ArtifactStore, sweep: str, trial_id: str, evaluation: str | None = None) -> TrialStatus:
    """The one reading of a trial's state. _DONE wins; a _FAILED record counts only for the attempt it was
    written for, so a trial re-created after a failure is running, not failed (it is not finished, and a
    pipeline waiting on its sweep must not pick the best trial yet). With `evaluation` (TrialSpec.evaluation_id;
    status_of passes it), a _DONE written for other evaluation settings does not count: the trial is trained,
    its evaluation stale."""
    prefix = trial_prefix(sweep, trial_id)
    attempts = _read_attempts(store, prefix)
    marked = store.exists(f"{prefix}/{DONE}")
    recorded = evaluated_as(store, sweep, trial_id) if marked and evaluation is not None else None
    # A _DONE that names no evaluation (written by hand) is taken as it is; stores from before evaluations were
    # recorded hold other trial ids (SPEC_VERSION 3), so none of their markers is read here.
    stale = recorded is not None and recorded != evaluation
    done = marked and not stale
    trained = marked or store.exists(f"{prefix}/{TRAINED}")
    failure = None
    if not done and attempts and store.exists(f"{prefix}/{FAILED}"):
        failure = _failure_from(store.read_json(f"{prefix}/{FAILED}"))
        if failure.attempt != attempts[-1].number:  # an earlier attempt's, reported late: not this one's
            failure = None
    last = attempts[-1] if attempts else None
    if done:
        state = TrialState.DONE
    elif failure is not None:
        state = TrialState.FAILED
    elif last is not None and last.outcome == "stopped":
        state = TrialState.STOPPED
    elif last is not None and last.outcome == "pruned":
        state = TrialState.PRUNED
    elif last is not None and last.outcome is None:
        state = TrialState.RUNNING
    else:
        state = TrialState.TRAINED if trained else TrialState.PENDING
    return TrialStatus(trial_id, state, trained, done, failure, attempts, stale)


def status_of(store: ArtifactStore, spec: Any) -> TrialStatus:
    """read_status for a TrialSpec, with its evaluation settings: what every loop deciding what to run uses."""
    return read_status(store, spec.sweep, spec.trial_id, spec.evaluation_id)


def evaluated_as(store: ArtifactStore, sweep: str, trial_id: str) -> str | None:
    """The evaluation_id the trial's _DONE was written for (None: none recorded, or no _DONE)."""
    try:
        return store.read_json(f"{trial_prefix(sweep, trial_id)}/{DONE}").get("evaluation")
    except (StoreError, FileNotFoundError, ValueError, AttributeError):
        return None


def trial_state(store: ArtifactStore, sweep: str, trial_id: str) -> str:
    """read_status(...).state as a string ('pending', 'running', 'trained', 'done', 'failed', ...)."""
    return read_status(store, sweep, trial_id).state.value


class NextAction(str, Enum):
    """What a submit does with a trial (next_action): the one rule every loop applies."""

    RUN = "run"  # never started, or carried on as its current attempt (running, stopped, preempted, trained)
    RETRY = "retry"  # its current attempt failed, below the attempt limit: run again as attempt n+1
    EVALUATE = "evaluate"  # done under other evaluation settings: evaluated again (not trained) as attempt n+1
    SKIP = "skip"  # finished for good: done, or pruned by a search (a pruned trial is never run again)
    OVER_LIMIT = "over_limit"  # failed `max_attempts` times: left failed until a submit raises --max-attempts

    def __str__(self) -> str:
        return self.value


def next_action(status: TrialStatus, max_attempts: int) -> NextAction:
    """Whether a submit runs a trial, retries it, skips it, or leaves it failed at its attempt limit. The one rule
    for every loop (submitter/local.py run_sweep, the search loop's backends, the k8s submit): a copy per loop is
    how `--max-attempts` came to be ignored by search sweeps. start_attempt then numbers the attempt (n+1 after
    a failure, the same one otherwise)."""
    if status.state in (TrialState.DONE, TrialState.PRUNED):
        return NextAction.SKIP
    if status.state is TrialState.FAILED:
        return NextAction.OVER_LIMIT if status.failed_attempts >= max_attempts else NextAction.RETRY
    if status.evaluation_stale and status.attempts and status.attempts[-1].outcome == "done":
        return NextAction.EVALUATE  # (an evaluation under way, stopped or preempted carries on: RUN)
    return NextAction.RUN


# What every loop says of a NextAction.EVALUATE trial (local submit, search loop, k8s submit and controller).
EVALUATE_NOTE = "was evaluated under other eval settings; evaluating it again (not retraining)"


def over_limit_note(status: TrialStatus, max_attempts: int) -> str:
    """Why a trial at its attempt limit is not run, and how to run it again (for NextAction.OVER_LIMIT)."""
    last = f"{status.failure.phase}: {status.failure.reason}" if status.failure is not None else "unknown"
    return (f"failed {status.failed_attempts} attempt(s), the limit ({max_attempts}); not retried (last: {last}). "
            f"Fix the cause, then submit with --max-attempts {status.failed_attempts + 1}")


def start_attempt(store: ArtifactStore, sweep: str, trial_id: str, backend: str,
                  job: str | None = None) -> TrialStatus:
    """Record that the trial is (re)started and return its new status. After a failed attempt this is attempt
    n+1: the failure moves into that attempt's record and _FAILED is cleared; after a done one whose _DONE is
    there (evaluated again under new settings, NextAction.EVALUATE) too. Otherwise (preempted, stopped,
    interrupted, or a _DONE removed by hand) it carries on as the same attempt."""
    prefix = trial_prefix(sweep, trial_id)
    status = read_status(store, sweep, trial_id)
    attempts = list(status.attempts)
    if status.failure is not None:  # (read_status counts a failure only for the current attempt)
        failed = status.failure
        attempts[-1] = _replace(attempts[-1], outcome="failed", ended_at=attempts[-1].ended_at or failed.at,
                                failure=failed.as_dict())
    if not attempts:
        attempts.append(Attempt(1, backend, time.time(), job))
    elif attempts[-1].outcome == "failed" or (attempts[-1].outcome == "done" and store.exists(f"{prefix}/{DONE}")):
        # After a failure; or after a finished attempt whose _DONE is still there, i.e. an evaluation under new
        # settings (NextAction.EVALUATE): a new Job name on the cluster, the finished attempt's record kept.
        attempts.append(Attempt(attempts[-1].number + 1, backend, time.time(), job))
    else:
        attempts[-1] = _replace(attempts[-1], backend=backend, job=job, outcome=None, ended_at=None)
    _write_attempts(store, prefix, attempts)
    store.delete(f"{prefix}/{FAILED}")
    return read_status(store, sweep, trial_id)


def failure_line(lines: Iterable[str]) -> str:
    """The line of a failed process's output that says what went wrong, as a failure's reason: the last one
    naming an error (the trainer and evaluator log `... ERROR [...]` before Python's traceback, which ends with
    `SomeError: ...`), without the log line's time and label; else the last line; "" when there was none."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    line = next((ln for ln in reversed(lines) if " ERROR " in ln or "Error" in ln), lines[-1] if lines else "")
    return line.split("]: ", 1)[-1] if " ERROR [" in line else line


def record_failure(store: ArtifactStore, sweep: str, trial_id: str, phase: str, reason: str,
                   exit_code: int | None, job: str | None = None, attempt: int | None = None) -> Failure | None:
    """Record why the current attempt (or `attempt`, the one a Job was created for) failed. Exit 143 is a
    preemption, not a failure: the attempt ends as 'preempted' and the next run resumes it. A failure of an
    attempt older than the current one changes nothing. Returns the Failure written, if any."""
    prefix = trial_prefix(sweep, trial_id)
    status = read_status(store, sweep, trial_id)
    current = status.attempt
    if current == 0:  # every runner records the attempt before it starts anything that can fail
        raise RuntimeError(f"{prefix}: no attempt under way to record a failure for (start_attempt first)")
    if attempt is not None and attempt < current:
        return None
    if exit_code == PREEMPTED_EXIT:
        end_attempt(store, sweep, trial_id, "preempted")
        return None
    failure = Failure(phase, reason, exit_code, attempt or current, time.time(), job)
    store.write_json(f"{prefix}/{FAILED}", failure.as_dict())
    end_attempt(store, sweep, trial_id, "failed")
    return failure


def end_attempt(store: ArtifactStore, sweep: str, trial_id: str, outcome: str) -> None:
    """Close the current attempt: done | failed | preempted | stopped | pruned."""
    prefix = trial_prefix(sweep, trial_id)
    attempts = list(_read_attempts(store, prefix))
    if attempts:
        attempts[-1] = _replace(attempts[-1], outcome=outcome, ended_at=time.time())
        _write_attempts(store, prefix, attempts)


def _read_attempts(store: ArtifactStore, prefix: str) -> tuple[Attempt, ...]:
    if not store.exists(f"{prefix}/{ATTEMPTS}"):
        return ()
    return tuple(Attempt(**a) for a in store.read_json(f"{prefix}/{ATTEMPTS}")["attempts"])


def _write_attempts(store: ArtifactStore, prefix: str, attempts: list[Attempt]) -> None:
    store.write_json(f"{prefix}/{ATTEMPTS}", {"attempts": [asdict(a) for a in attempts]})


def _failure_from(record: dict) -> Failure:
    return Failure(phase=str(record.get("phase", "?")), reason=str(record.get("reason", "")),
                   exit_code=record.get("exit_code"), attempt=int(record.get("attempt") or 0),
                   at=float(record.get("at") or 0.0), job=record.get("job"))


def _replace(attempt: Attempt, **changes: Any) -> Attempt:
    return Attempt(**{**asdict(attempt), **changes})


def iter_trials(store: ArtifactStore, sweep: str) -> Iterator[tuple[str, dict]]:
    """(trial id, spec dict) for every trial of `sweep` that has a spec in the store."""
    for key in store.list(f"{sweep}/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "spec.json":
            yield parts[1], store.read_json(key)


# ------------------------------------------------------------------ a local submit running a sweep
# <sweep>/_LOCAL_RUN: the foreground `finesweep submit` running the sweep on some machine (host, pid), written
#   when it starts the sweep and removed when it ends, so `finesweep cancel` (local backend) can stop it as the
#   cluster's cancel stops a controller. A record left by a submit that died is harmless: cancel checks the pid.
LOCAL_RUN = "_LOCAL_RUN"


def record_local_run(store: ArtifactStore, sweep: str, host: str, pid: int) -> None:
    store.write_json(f"{sweep}/{LOCAL_RUN}", {"host": host, "pid": pid, "started_at": time.time()})


def read_local_run(store: ArtifactStore, sweep: str) -> dict | None:
    return _optional_json(store, f"{sweep}/{LOCAL_RUN}")


def clear_local_run(store: ArtifactStore, sweep: str, pid: int) -> None:
    """Remove the record if it is still this process's (a later submit may have taken the sweep over)."""
    record = read_local_run(store, sweep)
    if record is not None and record.get("pid") == pid:
        store.delete(f"{sweep}/{LOCAL_RUN}")


def stop_running_trials(store: ArtifactStore, sweep: str, trial_ids: Iterable[str]) -> list[str]:
    """Mark each of the trials with an attempt under way `stopped` (cancel, both backends: the caller names them,
    a search's suggested trials included, as a running trial has no spec.json in the store yet); returns their
    ids. Finished artifacts stay, and a later submit carries each on as the same attempt."""
    stopped = []
    for trial_id in trial_ids:
        if read_status(store, sweep, trial_id).state is TrialState.RUNNING:
            end_attempt(store, sweep, trial_id, "stopped")
            stopped.append(trial_id)
    return stopped


# ------------------------------------------------------------------ search: evaluation during training
# <trial>/monitor.json: when and what to evaluate during training (written by the search engine before the
#   trial starts, with what its trainer needs to rebuild the study and make the pruning decisions itself;
#   a trial without it trains as before)
# <trial>/progress.json: the held-out figures measured so far, written by the trainer as they are produced
# Pruning needs no request file: the trainer decides at each evaluation from the study records
# (finesweep.search.decide_at_evaluation) and stops itself, so it needs no signal from outside a pod.
MONITOR = "monitor.json"
PROGRESS = "progress.json"


def _optional_json(store: ArtifactStore, key: str) -> Any:
    try:
        return store.read_json(key) if store.exists(key) else None
    except StoreError:  # deleted between the two calls
        return None


def read_monitor(store: ArtifactStore, sweep: str, trial_id: str) -> dict | None:
    return _optional_json(store, f"{trial_prefix(sweep, trial_id)}/{MONITOR}")


def write_monitor(store: ArtifactStore, sweep: str, trial_id: str, plan: dict) -> None:
    store.write_json(f"{trial_prefix(sweep, trial_id)}/{MONITOR}", plan)


def read_progress(store: ArtifactStore, sweep: str, trial_id: str) -> dict | None:
    return _optional_json(store, f"{trial_prefix(sweep, trial_id)}/{PROGRESS}")


def write_progress(store: ArtifactStore, sweep: str, trial_id: str, progress: dict) -> None:
    store.write_json(f"{trial_prefix(sweep, trial_id)}/{PROGRESS}", progress)


# ------------------------------------------------------------------ sweep level: work every trial would repeat
# _shared/reference-logps/<key>.json: the per-row reference log-probs of a DPO trial's training pairs (the start
#   model's log p(chosen), log p(rejected)). Every trial with the same start weights, pairs, tokenization and
#   settings computes the same numbers, so the first writes them and the others read them (trainer.reference_logps).
#   <key> is the sha256 of the fields that determine the numbers (the file repeats them); the file is one header
#   line (JSON: format, key, fields, rows, sha256 of the rest, who wrote it and how long it took), a newline, and
#   the body (JSON: the two lists of floats). It is written in one write_bytes (a rename on a folder, one PUT on
#   S3), so a reader sees all of it or none; a file whose header, key, fields, row count or checksum does not match
#   is refused (SharedFileError) and the caller recomputes it.
SHARED = "_shared"
REFERENCE_LOGPS_FORMAT = "finesweep-reference-logps/1"


class SharedFileError(StoreError):
    """A shared file that is there but cannot be used: corrupt, cut short, or made for other inputs."""


def shared_key(fields: dict) -> str:
    """The sha256 of `fields` (JSON, sorted keys): the name of a shared file made from them."""
    return checksum(json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode())


@dataclass(frozen=True)
class ReferenceLogps:
    """The one shared file of reference log-probs for `fields` (what determines the numbers). Only this handle
    builds its store path."""

    store: ArtifactStore
    fields: dict

    @property
    def key(self) -> str:
        return shared_key(self.fields)

    @property
    def path(self) -> str:
        return f"{SHARED}/reference-logps/{self.key}.json"

    def exists(self) -> bool:
        return self.store.exists(self.path)

    def write(self, chosen: list[float], rejected: list[float], **info: Any) -> str:
        """Write the file (replacing any there); returns the body's sha256. `info`: who wrote it, the seconds
        the computation took, ... (kept in the header, not part of the key)."""
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected log-probs")
        body = json.dumps({"ref_chosen_logps": [float(v) for v in chosen],
                           "ref_rejected_logps": [float(v) for v in rejected]}).encode()
        digest = checksum(body)
        header = {**info, "format": REFERENCE_LOGPS_FORMAT, "key": self.key, "fields": self.fields,
                  "rows": len(chosen), "sha256": digest, "written_at": time.time()}
        self.store.write_bytes(self.path, json.dumps(header, sort_keys=True).encode() + b"\n" + body)
        return digest

    def read(self, rows: int) -> dict:
        """The file's header with `ref_chosen_logps` / `ref_rejected_logps` added, after checking format, key,
        fields, row count (`rows` expected) and checksum. Raises SharedFileError when it is there but unusable,
        StoreError when it is not there."""
        data = self.store.read_bytes(self.path)
        where = f"{self.store.url}/{self.path}"
        head, sep, body = data.partition(b"\n")
        try:
            header = json.loads(head) if sep else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != REFERENCE_LOGPS_FORMAT:
            raise SharedFileError(f"{where}: no {REFERENCE_LOGPS_FORMAT} header (corrupt or not such a file)")
        if header.get("key") != self.key or header.get("fields") != json.loads(json.dumps(self.fields, default=str)):
            raise SharedFileError(f"{where}: made for other inputs (its key or fields differ from this trial's)")
        if checksum(body) != header.get("sha256"):
            raise SharedFileError(f"{where}: checksum mismatch (corrupt or partial write)")
        try:
            values = json.loads(body)
            chosen, rejected = values["ref_chosen_logps"], values["ref_rejected_logps"]
        except (ValueError, KeyError, TypeError) as err:
            raise SharedFileError(f"{where}: unreadable body ({type(err).__name__})") from None
        if not (len(chosen) == len(rejected) == header.get("rows") == rows):
            raise SharedFileError(f"{where}: {len(chosen)}/{len(rejected)} rows (header says {header.get('rows')}), "
                                  f"this trial has {rows}")
        return {**header, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def reference_logps(store: ArtifactStore, fields: dict) -> ReferenceLogps:
    """The shared reference log-probs file for `fields` (trainer.reference_logps says which fields)."""
    return ReferenceLogps(store, dict(fields))
