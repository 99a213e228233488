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
import time
from collections import Counter
from typing import Protocol

from finesweep.search import Search
from finesweep.spec import StartRef, Sweep, TrialSpec
from finesweep.store import (DEFAULT_MAX_ATTEMPTS, EVALUATE_NOTE, SETTLED, ArtifactStore, NextAction, TrialState,
                             TrialStatus, next_action, status_of)

from .plan import select_best

log = logging.getLogger("finesweep")


class Backend(Protocol):
    """What the search loop needs from a backend. States are read from the store (finesweep.store.read_status),
    which the trainer, the evaluator and the backend write; the backend only starts work. (A pruned trial stops
    by itself: its trainer makes the decision, so a backend has nothing to deliver.)"""

    name: str
    # submit --max-attempts: run_search retries a failed trial (store.next_action) until it has failed this often.
    max_attempts: int

    def schedule(self, spec: TrialSpec) -> None:
        """Train (unless trained) and evaluate the trial, or for a reference row only evaluate it, deciding by
        store.next_action: a trial whose last attempt failed below `max_attempts` is retried as its next attempt.
        Idempotent: a trial already under way on this backend, or done or pruned in the store, is left alone. A
        trial its trainer closed as pruned is not evaluated. The attempt is recorded in the store before it
        returns: the loop counts what is under way from the store."""

    def wait(self, seconds: float) -> None:
        """Block until something may have changed (or `seconds` passed)."""


class LocalBackend:
    """Trials as child processes on this machine, each trial in a thread of its own so `parallel` of them run at
    once. A trial runs exactly as the list loop runs it (submitter.local.begin_trial + run_phases: the attempt
    rule, the sweep's tracking settings); a trial the search pruned is not evaluated. `sweep`: the sweep the
    trials belong to, for its `tracking:` settings (local.tracking_env); without it they run untracked."""

    name = "local"

    def __init__(self, store: ArtifactStore, store_url: str, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 sweep: Sweep | None = None):
        from . import local

        self.store, self.store_url, self.max_attempts = store, store_url, max_attempts
        self.tracking = local.tracking_env(sweep) if sweep is not None else None
        self.threads: dict[str, threading.Thread] = {}
        self.changed = threading.Event()

    def schedule(self, spec: TrialSpec) -> None:
        from . import local

        thread = self.threads.get(spec.trial_id)
        if thread is not None and thread.is_alive():
            return
        label = f"search {spec.sweep}: {spec.name} ({spec.trial_id})"
        # Decided and recorded here, not in the thread: once this returns, the store shows the attempt under
        # way (a retried trial is no longer `failed`), so the loop neither stops early nor over-fills `parallel`.
        outcome, status = local.begin_trial(spec, self.store, self.max_attempts, label)
        if outcome is not None:
            return  # done, pruned, or over its attempt limit: the store already says so
        thread = threading.Thread(target=self._run, args=(spec, status, label), name=f"trial-{spec.name}",
                                  daemon=True)
        self.threads[spec.trial_id] = thread
        thread.start()

    def _run(self, spec: TrialSpec, status: TrialStatus, label: str) -> None:
        from . import local

        try:
            local.run_phases(spec, status, self.store, self.store_url, self.tracking, label)
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
    `max_new` stops after asking for that many new trials and letting them settle (tests: an interrupted run).

    Which trials run is the list loop's rule (store.next_action, with the backend's `max_attempts`): on a
    resubmit, a trial left running or unstarted carries on, and one that failed below the limit is retried as
    its next attempt, once per run (one that fails again waits for the next submit, as in the list loop)."""
    search = Search(sweep, store, start)
    limit = getattr(backend, "max_attempts", DEFAULT_MAX_ATTEMPTS)  # a backend without one: the default limit
    scheduled: set[str] = set()

    def due(spec: TrialSpec) -> NextAction | None:
        """What this run does with `spec`: RUN, RETRY or EVALUATE to schedule it, None to leave it."""
        if spec.trial_id in scheduled:
            return None
        action = next_action(status_of(store, spec), limit)
        return action if action in (NextAction.RUN, NextAction.RETRY, NextAction.EVALUATE) else None

    def schedule(spec: TrialSpec) -> None:
        scheduled.add(spec.trial_id)
        backend.schedule(spec)

    refs = [s for s in sweep.reference_specs(start) if due(s)]
    for spec in refs:
        schedule(spec)
    while any(status_of(store, s).state not in SETTLED for s in refs):
        backend.wait(poll_s)
    for rec in search.records():  # left running, unstarted or failed by an earlier run: carry on, or retry
        spec = search.spec_of(rec)
        action = due(spec) if rec.get("alias_of") is None else None
        if action is not None:
            if action is NextAction.EVALUATE:
                log.info("search %s: %s (%s) %s", sweep.name, spec.name, spec.trial_id, EVALUATE_NOTE)
            else:
                log.info("search %s: %s %s (%s)", sweep.name,
                         "retrying" if action is NextAction.RETRY else "carrying on with", spec.name, spec.trial_id)
            search.ensure_monitor(spec)
            schedule(spec)
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
            # needs_run: new and unsettled. A trial that failed in an earlier study of this store is asked
            # again as a settled one; the attempt rule retries it like any other failed trial.
            if needs_run or due(spec):
                schedule(spec)
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
    counts = run_search(plan.sweep, store, LocalBackend(store, store_url, max_attempts, sweep=plan.sweep), plan.start)
    finish(plan.sweep, store, plan.start)
    return counts["fail"]


# ------------------------------------------------------------------------- list and grid sweeps on a cluster

def record_cluster_failures(plan, store: ArtifactStore, rows: list[dict]) -> int:
    """k8s_backend.record_job_failures for the trials of one plan (status rows of its sweep), a search sweep's
    suggested trials included."""
    from .k8s_backend import record_job_failures

    return record_job_failures(store, sweep_specs(plan, store), rows)


def wait_for_sweep(plan, store: ArtifactStore, poll_s: float = 20.0, timeout_s: float = 7 * 24 * 3600,
                   on_poll=None):
    """Block until every trial of `plan` has settled (done or failed in the store: finesweep.store.SETTLED),
    then record the best. A trial re-created after a failure is running again, not settled. `on_poll` runs
    before each check (the k8s backend records Jobs the cluster gave up on). A cancelled trial ends the wait
    with an error: nothing will run it until the sweep is submitted again."""
    deadline = time.time() + timeout_s
    specs = plan.all_specs()
    while True:
        if on_poll is not None:
            on_poll()
        statuses = [status_of(store, s) for s in specs]
        counts = Counter(st.state for st in statuses)
        log.info("waiting for sweep %s: %d/%d done, %d failed, %d running", plan.sweep.name,
                 counts[TrialState.DONE], len(specs), counts[TrialState.FAILED], counts[TrialState.RUNNING])
        if counts[TrialState.STOPPED]:
            raise SweepStopped(f"sweep {plan.sweep.name} was cancelled ({counts[TrialState.STOPPED]} trial(s) "
                               f"stopped); submit it again to carry on")
        if all(st.settled for st in statuses):
            break
        if time.time() > deadline:
            raise TimeoutError(f"sweep {plan.sweep.name} did not finish in {timeout_s:.0f}s")
        time.sleep(poll_s)
    select_best(plan.sweep, store, plan.trials())


class SweepStopped(RuntimeError):
    pass


def sweep_specs(plan, store: ArtifactStore) -> list:
    """The plan's rows, and for a search sweep every trial its study holds (finesweep.search). Every command
    that looks trials up (status, cancel, logs) goes through here: plan.all_specs() alone misses the trials a
    search suggested."""
    if plan.sweep.search is None:
        return plan.all_specs()
    return study_specs(plan, store)
