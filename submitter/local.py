"""Local backend's trial runner: each trial's trainer and evaluator as child processes on this machine (the loop
that decides which trials run is submitter/engine.py's, with its LocalBackend).

Each phase is its own process (as in a pod), so memory is returned between trials and a crash fails one
trial, not the sweep. Output streams to the terminal and into the store (<trial>/logs/<phase>.log).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from finesweep.store import (PREEMPTED_EXIT, ArtifactStore, NextAction, TrialState,
                             TrialStatus, clear_local_run, end_attempt, failure_line, next_action, over_limit_note,
                             record_failure, record_local_run, start_attempt, status_of, trial_prefix)
from finesweep.spec import Sweep, TrialSpec

from .plan import write_spec

log = logging.getLogger("finesweep")
# The children import the code this process runs (a source checkout run without installing, or the installed
# package); they inherit the current directory, which the sweep's relative paths were checked against.
CODE_ROOT = Path(__file__).resolve().parent.parent


def run_phase(module: str, spec: TrialSpec, store: ArtifactStore, store_url: str,
              extra_env: dict[str, str] | None = None) -> int:
    """Run the trainer or evaluator for one trial as a child process; its log goes to the store, and a failure
    (not a preemption, exit 143) is recorded for the trial's current attempt. `extra_env`: the sweep's tracking
    settings (TrackingSpec.env), over this process's environment."""
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    phase = "train" if module == "trainer" else "eval"
    with tempfile.TemporaryDirectory(prefix="finesweep-") as tmp:
        spec_file = write_spec(spec, Path(tmp) / "spec.json")
        # An argument list, never a shell string: sweep values cannot reach a shell.
        cmd = [sys.executable, "-m", module, "--spec", str(spec_file), "--store", store_url]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p),
               **(extra_env or {})}
        lines = []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            with _children_lock:
                _children.add(proc)
            try:
                _relay(proc, lines)
            except KeyboardInterrupt:
                # Ctrl-C or `finesweep cancel`: stop the trial as a pod is stopped (SIGTERM: the trainer saves a
                # checkpoint and exits 143), keep its log, and let the caller mark it stopped.
                proc.terminate()
                _relay(proc, lines)
                proc.wait()
                raise
            finally:
                with _children_lock:
                    _children.discard(proc)
                store.write_bytes(f"{prefix}/logs/{phase}.log", "".join(lines).encode())
        if _stopping.is_set():
            raise Interrupted(f"{phase} stopped by an interrupted submit (exit {proc.returncode})")
        if proc.returncode != 0:
            reason = killed_reason(proc.returncode) or failure_line(lines) or "no output"
            record_failure(store, spec.sweep, spec.trial_id, phase, reason, proc.returncode)
        return proc.returncode


def _relay(proc: subprocess.Popen, lines: list[str]) -> None:
    """A child's output, line by line, to the terminal (less library noise) and into `lines`, until it closes."""
    for line in proc.stdout:
        lines.append(line)
        if not _noise(line):
            sys.stdout.write(line)
            sys.stdout.flush()


# The trial processes this submit has running (several with more than one local slot), so an interrupted submit
# stops them all, and run_phase knows its child ended because of that, not of a failure.
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping = threading.Event()


class Interrupted(Exception):
    """A trial process ended because the submit running it was interrupted: the attempt is stopped, not failed."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def running_here(store: ArtifactStore, sweep: str, stop_trials: Callable[[], object]) -> Iterator[None]:
    """While this process runs `sweep` on the local backend: its record in the store (host, pid), which
    `finesweep cancel` reads to stop it, and SIGTERM taken as Ctrl-C. Either one stops every trial process it
    started (SIGTERM, as a pod is stopped), then `stop_trials` marks the trials under way stopped (engine.stop_running,
    as the cluster's cancel does); a later submit carries them on."""
    pid = os.getpid()
    _stopping.clear()
    record_local_run(store, sweep, socket.gethostname(), pid)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        yield
    except KeyboardInterrupt:
        _stopping.set()
        with _children_lock:
            children = list(_children)
        for proc in children:
            proc.terminate()
        for proc in children:
            proc.wait()
        stop_trials()  # those whose run_phases did not get to it
        log.warning("sweep %s: interrupted; the trials under way are marked stopped, finished trials stay in %s, "
                    "and a later submit carries on", sweep, store.url)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        clear_local_run(store, sweep, pid)


def _noise(line: str) -> bool:
    return "Warning" in line and "finesweep" not in line


def tracking_env(sweep: Sweep) -> dict[str, str] | None:
    """The sweep's `tracking:` block as its trials' MLFLOW_* settings (TrackingSpec.env), for run_phase.
    engine.LocalBackend takes them from here for every sweep, so a list trial and a search trial of the same file
    are tracked alike."""
    return sweep.tracking.env(sweep.name) if sweep.tracking else None


# What became of a trial this time (run_trial, begin_trial, run_phases).
SKIPPED, OVER_LIMIT, DONE, PRUNED, FAILED, STOPPED = "skipped", "over_limit", "done", "pruned", "failed", "stopped"


def begin_trial(spec: TrialSpec, store: ArtifactStore, max_attempts: int,
                label: str) -> tuple[str | None, TrialStatus]:
    """The first half of run_trial: store.next_action decides whether the trial runs, is retried (attempt n+1),
    is skipped or is over its attempt limit, and a trial to run gets its attempt recorded. Returns (None, the
    started attempt's status) to run it, else (SKIPPED or OVER_LIMIT, its status). Split from run_phases so the
    search loop's backend records the attempt before it returns, as the loop reads what is under way from the
    store; the phases then run in a thread."""
    status = status_of(store, spec)
    action = next_action(status, max_attempts)
    if action is NextAction.SKIP:
        log.info("%s already %s; skipping", label, status.state.value)
        return SKIPPED, status
    if action is NextAction.OVER_LIMIT:
        log.error("%s %s", label, over_limit_note(status, max_attempts))
        return OVER_LIMIT, status
    return None, start_attempt(store, spec.sweep, spec.trial_id, "local")


def run_phases(spec: TrialSpec, status: TrialStatus, store: ArtifactStore, store_url: str,
               tracking: dict[str, str] | None, label: str) -> str:
    """The second half of run_trial, for the attempt begin_trial started: train (unless trained) and evaluate,
    with the sweep's `tracking` settings (tracking_env). A trial its trainer pruned for a search is not
    evaluated. Returns DONE, PRUNED, FAILED (failed, or preempted: the next submit resumes it) or STOPPED (the
    submit was interrupted while the trial ran in a slot's thread)."""
    train = spec.trains and not status.trained
    log.info("%s %s (attempt %d)", label, "training" if train else "evaluating", status.attempt)
    code = 0
    try:
        if train:
            code = run_phase("trainer", spec, store, store_url, tracking)
            if status_of(store, spec).state is TrialState.PRUNED:
                return PRUNED  # its trainer stopped it for the search: not evaluated, not a candidate for best
        if code == 0:
            code = run_phase("evaluator", spec, store, store_url, tracking)
    except KeyboardInterrupt:
        end_attempt(store, spec.sweep, spec.trial_id, "stopped")  # not failed: the next submit carries on
        raise
    except Interrupted as stop:  # in a slot's thread: the submit (main thread) was interrupted
        end_attempt(store, spec.sweep, spec.trial_id, "stopped")
        log.warning("%s: %s", label, stop)
        return STOPPED
    if code == 0:
        end_attempt(store, spec.sweep, spec.trial_id, "done")
        return DONE
    log.error("%s failed (exit %d)%s; going on with the rest", label, code,
              " after a preemption: the next submit resumes it" if code == PREEMPTED_EXIT else "")
    return FAILED


def run_trial(spec: TrialSpec, store: ArtifactStore, store_url: str, max_attempts: int,
              tracking: dict[str, str] | None, label: str) -> str:
    """Run one trial (or reference row) on this machine, the one way every local loop does (begin_trial, then
    run_phases). Returns SKIPPED, OVER_LIMIT, DONE, PRUNED or FAILED. `label` starts its log lines."""
    outcome, status = begin_trial(spec, store, max_attempts, label)
    return outcome or run_phases(spec, status, store, store_url, tracking, label)


def killed_reason(returncode: int) -> str | None:
    """Why a trial process that a signal ended stopped: its last log line would only say where it was. A SIGKILL
    nobody sent on purpose is the kernel's out-of-memory killer (seen: a DPO trial at 8 pairs a pass of 320 tokens
    on a 49,152-word vocabulary, 15.5 GB)."""
    if returncode >= 0:
        return None
    import signal

    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGKILL:
        return (f"killed by {name}, most likely out of memory (the kernel's OOM killer). Fix: lower the trial's "
                "batch_size (raise grad_accum to keep the step) or max_length")
    return f"killed by {name}"

