"""The search loop: keep `search.parallel` trials in flight, ask for the next until the budget is spent, wait
for every trial to settle; then select the best and write the report.

Pruning is not the loop's business: each monitored trial's trainer decides at each of its held-out evaluations,
from the study in the store, whether it is pruned, records the decision in its study record and stops right
there (finesweep.search.decide_at_evaluation, trainer/progress.py). The loop only launches trials, waits, and
logs the decisions it finds recorded. It talks to a backend through `Backend` only (schedule a trial, wait),
and reads every state from the store, so the same loop runs locally (LocalBackend: child processes on this
machine) and inside a Kubernetes controller (a backend that creates Jobs, idempotently). All study state lives
in the store (finesweep.search), so the loop can be stopped and started again at any point.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from finesweep.search import Search
from finesweep.spec import StartRef, Sweep, TrialSpec
from finesweep.store import (DEFAULT_MAX_ATTEMPTS, SETTLED, ArtifactStore, TrialState, end_attempt, read_status,
                             start_attempt)

log = logging.getLogger("finesweep")


class Backend(Protocol):
    """What the search loop needs from a backend. States are read from the store (finesweep.store.read_status),
    which the trainer, the evaluator and the backend write; the backend only starts work. (A pruned trial stops
    by itself: its trainer makes the decision, so a backend has nothing to deliver.)"""

    name: str

    def schedule(self, spec: TrialSpec) -> None:
        """Train (unless trained) and evaluate the trial, or for a reference row only evaluate it. Idempotent: a
        trial already under way on this backend, or settled in the store, is left alone. A trial its trainer
        closed as pruned is not evaluated."""

    def wait(self, seconds: float) -> None:
        """Block until something may have changed (or `seconds` passed)."""


class LocalBackend:
    """Trials as child processes on this machine (submitter.local.run_phase), each trial in a thread of its own
    so `parallel` of them run at once; a trial the search pruned is not evaluated."""

    name = "local"

    def __init__(self, store: ArtifactStore, store_url: str, max_attempts: int = DEFAULT_MAX_ATTEMPTS):
        self.store, self.store_url, self.max_attempts = store, store_url, max_attempts
        self.threads: dict[str, threading.Thread] = {}
        self.changed = threading.Event()

    def schedule(self, spec: TrialSpec) -> None:
        thread = self.threads.get(spec.trial_id)
        if thread is not None and thread.is_alive():
            return
        thread = threading.Thread(target=self._run, args=(spec,), name=f"trial-{spec.name}", daemon=True)
        self.threads[spec.trial_id] = thread
        thread.start()

    def _run(self, spec: TrialSpec) -> None:
        from .local import run_phase

        try:
            status = read_status(self.store, spec.sweep, spec.trial_id)
            if status.state in SETTLED:
                return
            status = start_attempt(self.store, spec.sweep, spec.trial_id, self.name)
            code = 0
            if spec.trains and not status.trained:
                code = run_phase("trainer", spec, self.store, self.store_url)
            if read_status(self.store, spec.sweep, spec.trial_id).state is TrialState.PRUNED:
                return  # the trainer stopped it for the search: no evaluation, it is not a candidate for best
            if code == 0:
                code = run_phase("evaluator", spec, self.store, self.store_url)
            if code == 0:
                end_attempt(self.store, spec.sweep, spec.trial_id, "done")
            else:
                log.error("search %s: %s (%s) failed (exit %d)", spec.sweep, spec.name, spec.trial_id, code)
        except Exception as err:  # a thread's exception would vanish: record it as the trial's failure
            from finesweep.store import record_failure

            log.exception("search %s: %s: %s", spec.sweep, spec.name, err)
            record_failure(self.store, spec.sweep, spec.trial_id, "job", f"{type(err).__name__}: {err}", None)
        finally:
            self.changed.set()

    def wait(self, seconds: float) -> None:
        self.changed.wait(seconds)
        self.changed.clear()


def run_search(sweep: Sweep, store: ArtifactStore, backend: Backend, start: StartRef | None = None,
               poll_s: float = 1.0, max_new: int | None = None) -> dict:
    """Run the search sweep until its budget is spent and every trial has settled; returns counts. The
    reference rows (base model, DPO start) are evaluated first: guardrails and the report compare against them.
    `max_new` stops after asking for that many new trials and letting them settle (tests: an interrupted run)."""
    search = Search(sweep, store, start)
    refs = [s for s in sweep.reference_specs(start) if not read_status(store, s.sweep, s.trial_id).state in SETTLED]
    for spec in refs:
        backend.schedule(spec)
    while any(read_status(store, s.sweep, s.trial_id).state not in SETTLED for s in refs):
        backend.wait(poll_s)
    for spec in search.unsettled():  # left running or unstarted by an earlier run: carry on
        log.info("search %s: carrying on with %s (%s)", sweep.name, spec.name, spec.trial_id)
        search.ensure_monitor(spec)
        backend.schedule(spec)
    asked, exhausted = 0, False
    told: set[str] = set()
    while True:
        _log_decisions(search, told)
        active = search.unsettled()
        while len(active) < sweep.search.parallel and not exhausted and (max_new is None or asked < max_new):
            got = search.ask()
            if got is None:
                exhausted = True
                break
            asked += 1
            spec, needs_run = got
            if needs_run:
                backend.schedule(spec)
                active.append(spec)
        if not active and (exhausted or (max_new is not None and asked >= max_new)):
            break
        backend.wait(poll_s)
    _log_decisions(search, told)
    rows = search.rows()
    counts = {state: sum(r.state == state for r in rows) for state in ("complete", "pruned", "fail", "running")}
    counts["asked"] = asked
    log.info("search %s: %d trials in the study: %d complete, %d pruned, %d failed", sweep.name, len(rows),
             counts["complete"], counts["pruned"], counts["fail"])
    return counts


def _log_decisions(search: Search, told: set[str]) -> None:
    """Log each pruning decision a trainer recorded (once per trial); the loop itself decides nothing."""
    for spec, examples, value in search.decisions():
        if spec.trial_id not in told:
            told.add(spec.trial_id)
            log.info("search %s: pruning %s (%s) at %d examples: %s %.4g (decided by its trainer at that "
                     "evaluation)", search.name, spec.name, spec.trial_id, examples, search.select.metric, value)


def finish(sweep: Sweep, store: ArtifactStore, start: StartRef | None = None) -> list[TrialSpec]:
    """Select the best over every trial of the study and write the report; returns the specs reported."""
    from evaluator.report import build_report

    from .plan import select_best

    specs = Search(sweep, store, start).trial_specs()
    select_best(sweep, store, specs)
    build_report(store, sweep, [*sweep.reference_specs(start), *specs])
    return specs


def study_specs(plan, store: ArtifactStore) -> list[TrialSpec]:
    """Reference rows, then every trial of a search sweep's study (what status, logs and the report list)."""
    return [*plan.references(), *Search(plan.sweep, store, plan.start).trial_specs()]


def pruned_note(store: ArtifactStore, spec: TrialSpec) -> str:
    """Where a pruned trial stopped, for `make status`."""
    from finesweep.store import read_progress

    progress = read_progress(store, spec.sweep, spec.trial_id) or {}
    stopped, points = progress.get("stopped") or {}, progress.get("points") or []
    if stopped:
        return f"pruned by the search: stopped at step {stopped['step']} ({stopped['examples_seen']} examples)"
    return f"pruned by the search after {points[-1]['examples']} examples" if points else "pruned by the search"


def submit_local(plan, store: ArtifactStore, store_url: str, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> int:
    """`make submit` of a search sweep on this machine: the loop with LocalBackend, then best and report.
    Returns the number of failed trials."""
    if not plan.resolved:
        from .plan import resolve_start

        plan.start = resolve_start(plan.sweep, store)
    counts = run_search(plan.sweep, store, LocalBackend(store, store_url, max_attempts), plan.start)
    finish(plan.sweep, store, plan.start)
    return counts["fail"]
