"""Local backend: run each trial's trainer and evaluator as child processes on this machine.

Each phase is its own process (as in a pod), so memory is returned between trials and a crash fails one
trial, not the sweep. Output streams to the terminal and into the store (<trial>/logs/<phase>.log).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from finesweep.store import (DEFAULT_MAX_ATTEMPTS, PREEMPTED_EXIT, ArtifactStore, TrialState, end_attempt,
                             failure_line, read_status, record_failure, start_attempt, trial_prefix)
from finesweep.spec import TrialSpec

from .plan import SweepPlan, select_best, write_spec

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
            for line in proc.stdout:
                lines.append(line)
                if not _noise(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()
        store.write_bytes(f"{prefix}/logs/{phase}.log", "".join(lines).encode())
        if proc.returncode != 0:
            record_failure(store, spec.sweep, spec.trial_id, phase, failure_line(lines) or "no output",
                           proc.returncode)
        return proc.returncode


def _noise(line: str) -> bool:
    return "Warning" in line and "finesweep" not in line


def run_sweep(plan: SweepPlan, store: ArtifactStore, store_url: str,
              max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict:
    """Run every unfinished trial of one sweep; returns counts. Finished trials are skipped; a failed one runs
    again as its next attempt until it has failed `max_attempts` times (then it is counted failed, not run)."""
    sweep = plan.sweep
    specs = plan.all_specs()
    counts = {"done_before": 0, "ran": 0, "failed": 0}
    log.info("sweep %s (%s): %d trials + %d reference rows -> %s", sweep.name, sweep.stage, len(plan.trials()),
             len(plan.references()), store.url)
    for i, spec in enumerate(specs, 1):
        status = read_status(store, spec.sweep, spec.trial_id)
        tag = f"[{i}/{len(specs)}] {spec.name} ({spec.trial_id})"
        if status.done:
            counts["done_before"] += 1
            log.info("sweep %s: %s already done; skipping", sweep.name, tag)
            continue
        if status.state is TrialState.FAILED and status.failed_attempts >= max_attempts:
            counts["failed"] += 1
            log.error("sweep %s: %s failed %d attempt(s), the limit (%d); not retried (last: %s: %s). Fix the "
                      "cause, then submit with --max-attempts %d", sweep.name, tag, status.failed_attempts,
                      max_attempts, status.failure.phase, status.failure.reason, status.failed_attempts + 1)
            continue
        status = start_attempt(store, spec.sweep, spec.trial_id, "local")
        train = spec.trains and not status.trained
        log.info("sweep %s: %s %s (attempt %d)", sweep.name, tag, "training" if train else "evaluating",
                 status.attempt)
        code = 0
        tracking = sweep.tracking.env(sweep.name) if sweep.tracking else None
        try:
            if train:
                code = run_phase("trainer", spec, store, store_url, tracking)
            if code == 0:
                code = run_phase("evaluator", spec, store, store_url, tracking)
        except KeyboardInterrupt:
            end_attempt(store, spec.sweep, spec.trial_id, "stopped")  # not failed: the next submit carries on
            raise
        if code == 0:
            end_attempt(store, spec.sweep, spec.trial_id, "done")
            counts["ran"] += 1
        else:
            counts["failed"] += 1
            log.error("sweep %s: %s failed (exit %d)%s; going on with the rest", sweep.name, tag, code,
                      " after a preemption: the next submit resumes it" if code == PREEMPTED_EXIT else "")
    select_best(sweep, store, plan.trials())
    return counts
