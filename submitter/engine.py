"""The sweep engine: one loop (run_sweep) drives every sweep, list, grid or search, on every backend.

A sweep's trials come from a suggester (Katib's suggestion services): FixedTrials for `trials:`/`grid:` (every
suggestion known in advance, in file order) or finesweep.search.Search (the sweep's own trials first, then
Optuna's sampler). The loop evaluates the reference rows first, carries on with what an earlier run left, then
keeps up to `parallel` trials in flight (the sweep's max_parallel or search.parallel, at most the backend's
slots), asks for the next until the suggester has none, waits for every trial to settle, and returns counts;
finish() then selects the best and writes the report. Whether a trial runs, is retried, is evaluated again, is
skipped or is over its attempt limit is store.next_action's (one rule, every backend).

Pruning is not the loop's business: each monitored trial's trainer decides at each of its held-out evaluations,
from the study in the store, whether it is pruned, records the decision in its study record and stops right
there (finesweep.search.decide_at_evaluation, trainer/progress.py). The loop only launches trials, waits, and
logs the decisions it finds recorded. It talks to a backend through `Backend` only (schedule a trial, wait),
and reads every state from the store, so the same loop runs locally (LocalBackend: child processes on this
machine) and inside the Kubernetes controller (controller.K8sBackend: Jobs, created idempotently). All state
lives in the store, so the loop can be stopped and started again at any point.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Protocol

from finesweep.search import Search
from finesweep.spec import StartRef, Sweep, TrialSpec
from finesweep.store import (DEFAULT_MAX_ATTEMPTS, EVALUATE_NOTE, SETTLED, ArtifactStore, NextAction, TrialState,
                             TrialStatus, next_action, over_limit_note, status_of, stop_running_trials)

from .plan import select_best

log = logging.getLogger("finesweep")
LOCAL_PARALLEL_ENV = "FINESWEEP_LOCAL_PARALLEL"  # trials at once on this machine (default: one per GPU, 1 on CPU)


class Backend(Protocol):
    """What the loop needs from a backend. States are read from the store (finesweep.store.read_status),
    which the trainer, the evaluator and the backend write; the backend only starts work. (A pruned trial stops
    by itself: its trainer makes the decision, so a backend has nothing to deliver.) A backend may also have
    `slots`: how many trials it can run at once (None or absent: as many as the sweep asks)."""

    name: str
    # submit --max-attempts: the loop retries a failed trial (store.next_action) until it has failed this often.
    max_attempts: int

    def schedule(self, spec: TrialSpec) -> None:
        """Train (unless trained) and evaluate the trial, or for a reference row only evaluate it, deciding by
        store.next_action: a trial whose last attempt failed below `max_attempts` is retried as its next attempt.
        Idempotent: a trial already under way on this backend, or done or pruned in the store, is left alone. A
        trial its trainer closed as pruned is not evaluated. The attempt is recorded in the store before it
        returns: the loop counts what is under way from the store."""

    def wait(self, seconds: float) -> None:
        """Block until something may have changed (or `seconds` passed)."""


def local_slots(devices: list[str] | None = None) -> int:
    """Trials this machine runs at once: FINESWEEP_LOCAL_PARALLEL, else one per visible GPU (`devices`, default
    _cuda_devices(); each trial gets its own through CUDA_VISIBLE_DEVICES, as on a workstation with several), else 1
    (on CPU, trials at once would share the same cores and memory)."""
    raw = os.environ.get(LOCAL_PARALLEL_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            from finesweep.spec import SweepError

            raise SweepError(LOCAL_PARALLEL_ENV, "(environment)", f"{raw!r} is not a whole number >= 1",
                             f"unset it, or set e.g. {LOCAL_PARALLEL_ENV}=2")
        return value
    return max(1, len(_cuda_devices() if devices is None else devices))


def _cuda_devices() -> list[str]:
    """The GPUs a child process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists (no torch here)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class LocalBackend:
    """Trials as child processes on this machine, exactly as `make submit` runs them (submitter.local.begin_trial
    + run_phases: the attempt rule, the sweep's tracking settings); a trial the search pruned is not evaluated.
    With one slot (the default on CPU) a trial runs in the calling thread, so Ctrl-C stops it as `stopped` (the
    next submit carries on); with more (FINESWEEP_LOCAL_PARALLEL, or one per GPU) each trial runs in a thread of
    its own, on a GPU of its own where there are GPUs. `sweep`: the sweep the trials belong to, for its
    `tracking:` settings (local.tracking_env); without it they run untracked."""

    name = "local"

    def __init__(self, store: ArtifactStore, store_url: str, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 sweep: Sweep | None = None, slots: int | None = None):
        from . import local

        self.store, self.store_url, self.max_attempts = store, store_url, max_attempts
        self.tracking = local.tracking_env(sweep) if sweep is not None else None
        devices = _cuda_devices()
        self.slots = slots or local_slots(devices)
        self.devices = devices if self.slots > 1 else []
        self.free_devices = list(self.devices)
        self.lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}
        self.changed = threading.Event()

    def schedule(self, spec: TrialSpec) -> None:
        from . import local

        thread = self.threads.get(spec.trial_id)
        if thread is not None and thread.is_alive():
            return
        label = f"sweep {spec.sweep}: {spec.name} ({spec.trial_id})"
        # Decided and recorded here, not in the thread: once this returns, the store shows the attempt under
        # way (a retried trial is no longer `failed`), so the loop neither stops early nor over-fills `parallel`.
        outcome, status = local.begin_trial(spec, self.store, self.max_attempts, label)
        if outcome is not None:
            return  # done, pruned, or over its attempt limit: the store already says so
        if self.slots == 1:
            try:
                local.run_phases(spec, status, self.store, self.store_url, self.tracking, label)
            finally:
                self.changed.set()
            return
        thread = threading.Thread(target=self._run, args=(spec, status, label), name=f"trial-{spec.name}",
                                  daemon=True)
        self.threads[spec.trial_id] = thread
        thread.start()

    def _run(self, spec: TrialSpec, status: TrialStatus, label: str) -> None:
        from . import local

        device = None
        try:
            env = dict(self.tracking or {})
            if self.devices:
                with self.lock:
                    device = self.free_devices.pop(0) if self.free_devices else None
                if device is not None:
                    env["CUDA_VISIBLE_DEVICES"] = device
                    log.info("%s: on GPU %s", label, device)
            local.run_phases(spec, status, self.store, self.store_url, env or None, label)
        except Exception as err:  # a thread's exception would vanish: record it as the trial's failure
            from finesweep.store import record_failure

            log.exception("sweep %s: %s: %s", spec.sweep, spec.name, err)
            record_failure(self.store, spec.sweep, spec.trial_id, "job", f"{type(err).__name__}: {err}", None)
        finally:
            if device is not None:
                with self.lock:
                    self.free_devices.append(device)
            self.changed.set()

    def wait(self, seconds: float) -> None:
        self.changed.wait(seconds)
        self.changed.clear()


class FixedTrials:
    """A list or grid sweep as a suggester whose suggestions are all known in advance: its trials in file order.
    Nothing is recorded beyond each trial's own state in the store (where the loop's `due` reads it)."""

    def __init__(self, sweep: Sweep, store: ArtifactStore, start: StartRef | None = None):
        self.sweep, self.store, self.name = sweep, store, sweep.name
        self.fixed = sweep.trial_specs(start)
        self.asked = 0
        self.parallel = sweep.max_parallel

    def trial_specs(self) -> list[TrialSpec]:
        return list(self.fixed)

    def carry_on(self) -> list[TrialSpec]:
        return []  # every trial is asked again, in order

    def ask(self) -> tuple[TrialSpec, bool] | None:
        if self.asked >= len(self.fixed):
            return None
        self.asked += 1
        return self.fixed[self.asked - 1], False  # whether it runs: store.next_action (the loop's `due`)

    def asked_specs(self) -> list[TrialSpec]:
        return self.fixed[:self.asked]

    def decisions(self) -> list[tuple[TrialSpec, int, float]]:
        return []


class SearchTrials(Search):
    """finesweep.search.Search as the loop's suggester: `parallel` from `search:`, and the trials an earlier run
    of the study left unsettled (or failed) to carry on with first."""

    @property
    def parallel(self) -> int:
        return self.sweep.search.parallel

    def asked_specs(self) -> list[TrialSpec]:
        """Every trial the study has asked for (aliases of an earlier config left out), in number order."""
        return [self.spec_of(rec) for rec in self.records() if rec.get("alias_of") is None]

    def carry_on(self) -> list[TrialSpec]:
        specs = self.asked_specs()
        for spec in specs:
            self.ensure_monitor(spec)
        return specs


def suggester_for(sweep: Sweep, store: ArtifactStore, start: StartRef | None = None) -> FixedTrials | SearchTrials:
    """The suggester of a sweep: a search's study, or its fixed list of trials."""
    return SearchTrials(sweep, store, start) if sweep.search is not None else FixedTrials(sweep, store, start)


class SweepStopped(RuntimeError):
    pass


def run_sweep(sweep: Sweep, store: ArtifactStore, backend: Backend, start: StartRef | None = None,
              poll_s: float = 1.0, max_new: int | None = None) -> dict:
    """Run one sweep until its suggester has no more trials and every trial has settled; returns counts
    (done_before, ran, failed over the reference rows and trials; complete, pruned and asked over the trials).
    The reference rows (base model, DPO start) are evaluated first: guardrails and the report compare against
    them. `max_new` stops after asking for that many new trials and letting them settle (tests, and the search
    benchmark's one-trial-at-a-time runs). A trial found stopped (cancelled) ends the run with SweepStopped:
    nothing runs it until the sweep is submitted again.

    Which trials run is store.next_action's rule, with the backend's `max_attempts`: a trial left running or
    unstarted carries on, one that failed below the limit is retried as its next attempt, once per run (one that
    fails again waits for the next submit), one finished under other evaluation settings is evaluated again."""
    run = _SweepRun(sweep, store, backend, start, poll_s)
    log.info("sweep %s (%s): %s, %d trial(s) at a time -> %s", sweep.name, sweep.stage,
             f"search ({sweep.search.method}, budget {sweep.search.budget})" if sweep.search else
             f"{len(run.suggester.trial_specs())} trial(s) + {len(run.refs)} reference row(s)", run.parallel,
             store.url)
    run.references()
    run.carry_on()
    run.trials(max_new)
    return run.summary()


class _SweepRun:
    """One run_sweep: its steps, and what this run has scheduled (each trial at most once per run)."""

    def __init__(self, sweep: Sweep, store: ArtifactStore, backend: Backend, start: StartRef | None, poll_s: float):
        self.sweep, self.store, self.backend, self.poll_s = sweep, store, backend, poll_s
        self.suggester = suggester_for(sweep, store, start)
        self.refs = sweep.reference_specs(start)
        self.limit = getattr(backend, "max_attempts", DEFAULT_MAX_ATTEMPTS)  # without one: the default limit
        slots = getattr(backend, "slots", None)
        self.parallel = min(self.suggester.parallel, slots) if slots else self.suggester.parallel
        self.scheduled: set[str] = set()
        self.done_before, self.asked = 0, 0
        self.told: set[str] = set()

    def due(self, spec: TrialSpec) -> NextAction | None:
        """What this run does with `spec`: RUN, RETRY or EVALUATE to schedule it, None to leave it (logged)."""
        if spec.trial_id in self.scheduled:
            return None
        status = status_of(self.store, spec)
        action = next_action(status, self.limit)
        if action is NextAction.SKIP:
            self.done_before += 1
            log.info("sweep %s: %s (%s) already %s; skipping", self.sweep.name, spec.name, spec.trial_id,
                     status.state.value)
        elif action is NextAction.OVER_LIMIT:
            log.error("sweep %s: %s (%s) %s", self.sweep.name, spec.name, spec.trial_id,
                      over_limit_note(status, self.limit))
        return action if action in (NextAction.RUN, NextAction.RETRY, NextAction.EVALUATE) else None

    def schedule(self, spec: TrialSpec, action: NextAction) -> None:
        if action is NextAction.EVALUATE:
            log.info("sweep %s: %s (%s) %s", self.sweep.name, spec.name, spec.trial_id, EVALUATE_NOTE)
        elif action is NextAction.RETRY:
            log.info("sweep %s: retrying %s (%s)", self.sweep.name, spec.name, spec.trial_id)
        self.scheduled.add(spec.trial_id)
        self.backend.schedule(spec)

    def unsettled(self, specs: list[TrialSpec]) -> list[TrialSpec]:
        """The ones of `specs` not settled in the store (one read each); a cancelled one this run scheduled ends the
        run (SweepStopped)."""
        states = {s.trial_id: status_of(self.store, s).state for s in specs}
        stopped = [s for s in specs if s.trial_id in self.scheduled and states[s.trial_id] is TrialState.STOPPED]
        if stopped:
            raise SweepStopped(f"sweep {self.sweep.name} was cancelled ({len(stopped)} trial(s) stopped: "
                               f"{', '.join(s.name for s in stopped[:5])}); submit it again to carry on")
        return [s for s in specs if states[s.trial_id] not in SETTLED]

    def references(self) -> None:
        """The reference rows first, waited for: guardrails and the report compare every trial against them."""
        for spec in self.refs:
            action = self.due(spec)
            if action is not None:
                self.schedule(spec, action)
        while self.unsettled([s for s in self.refs if s.trial_id in self.scheduled]):
            self.backend.wait(self.poll_s)

    def carry_on(self) -> None:
        """What an earlier run of a search left running, unstarted or failed: carried on, or retried."""
        for spec in self.suggester.carry_on():
            action = self.due(spec)
            if action is NextAction.RUN:
                log.info("sweep %s: carrying on with %s (%s)", self.sweep.name, spec.name, spec.trial_id)
            if action is not None:
                self.schedule(spec, action)

    def trials(self, max_new: int | None) -> None:
        """Keep `parallel` trials in flight, asking for the next until the suggester has none (or `max_new` were
        asked), then wait until every one has settled."""
        exhausted = False
        while True:
            _log_decisions(self.suggester, self.told)
            active = self.unsettled(self.suggester.asked_specs())
            while len(active) < self.parallel and not exhausted and (max_new is None or self.asked < max_new):
                got = self.suggester.ask()
                if got is None:
                    exhausted = True
                    break
                self.asked += 1
                spec, needs_run = got
                # needs_run: new and unsettled. A trial that failed in an earlier study of this store is asked
                # again as a settled one; the attempt rule retries it like any other failed trial.
                action = NextAction.RUN if needs_run else self.due(spec)
                if action is not None:
                    self.schedule(spec, action)
                    active.append(spec)
            active = [s for s in active if status_of(self.store, s).state not in SETTLED]
            if not active and (exhausted or (max_new is not None and self.asked >= max_new)):
                break
            self.backend.wait(self.poll_s)
        _log_decisions(self.suggester, self.told)

    def summary(self) -> dict:
        trials = self.suggester.trial_specs()
        states = {s.trial_id: status_of(self.store, s).state for s in [*self.refs, *trials]}
        count = Counter(states[s.trial_id] for s in trials)
        failed = sum(state is TrialState.FAILED for state in states.values())
        ran = sum(1 for tid, state in states.items()
                  if tid in self.scheduled and state in (TrialState.DONE, TrialState.PRUNED))
        result = {"done_before": self.done_before, "ran": ran, "failed": failed, "complete": count[TrialState.DONE],
                  "pruned": count[TrialState.PRUNED], "asked": self.asked}
        log.info("sweep %s: %d trial(s): %d complete, %d pruned, %d failed (reference rows included: %d ran, %d "
                 "already done)", self.sweep.name, len(trials), result["complete"], result["pruned"], failed, ran,
                 self.done_before)
        return result


def _log_decisions(search: Search, told: set[str]) -> None:
    """Log each pruning decision a trainer recorded (once per trial); the loop itself decides nothing."""
    for spec, examples, value in search.decisions():
        if spec.trial_id not in told:
            told.add(spec.trial_id)
            log.info("search %s: pruning %s (%s) at %d examples: %s %.4g (decided by its trainer at that "
                     "evaluation)", search.name, spec.name, spec.trial_id, examples, search.select.metric, value)


def finish(sweep: Sweep, store: ArtifactStore, start: StartRef | None = None) -> list[TrialSpec]:
    """Select the best over every trial of the sweep (a search's whole study) and write the report; returns the
    specs reported."""
    from evaluator.report import build_report

    specs = suggester_for(sweep, store, start).trial_specs()
    select_best(sweep, store, specs)
    build_report(store, sweep, [*sweep.reference_specs(start), *specs])
    return specs


def pruned_note(store: ArtifactStore, spec: TrialSpec) -> str:
    """Where a pruned trial stopped, for `make status`."""
    from finesweep.store import read_progress

    progress = read_progress(store, spec.sweep, spec.trial_id) or {}
    stopped, points = progress.get("stopped") or {}, progress.get("points") or []
    if stopped:
        return f"pruned by the search: stopped at step {stopped['step']} ({stopped['examples_seen']} examples)"
    return f"pruned by the search after {points[-1]['examples']} examples" if points else "pruned by the search"


def submit_local(plan, store: ArtifactStore, store_url: str, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict:
    """`make submit` of one sweep (list, grid or search) on this machine: run_sweep with the LocalBackend, then
    best and report (finish). Returns run_sweep's counts. Ctrl-C, SIGTERM or `finesweep cancel` stops it
    (local.running_here)."""
    if not plan.resolved:
        from .plan import resolve_start

        plan.start = resolve_start(plan.sweep, store)
    from .local import running_here

    with running_here(store, plan.sweep.name, lambda: stop_running(plan, store)):
        counts = run_sweep(plan.sweep, store, LocalBackend(store, store_url, max_attempts, sweep=plan.sweep),
                           plan.start)
    finish(plan.sweep, store, plan.start)
    return counts


# ------------------------------------------------------------------------- a sweep's trials, for the commands

def record_cluster_failures(plan, store: ArtifactStore, rows: list[dict]) -> int:
    """k8s_backend.record_job_failures for the trials of one plan (status rows of its sweep), a search sweep's
    suggested trials included."""
    from .k8s_backend import record_job_failures

    return record_job_failures(store, sweep_specs(plan, store), rows)


def stop_running(plan, store: ArtifactStore) -> list[str]:
    """Mark the plan's trials with an attempt under way `stopped` (cancel on either backend, an interrupted local
    submit); returns their ids. A plan whose start is not resolved has no trial that could have run."""
    trial_ids = [spec.trial_id for spec in sweep_specs(plan, store)] if plan.resolved else []
    return stop_running_trials(store, plan.sweep.name, trial_ids)


def sweep_specs(plan, store: ArtifactStore) -> list:
    """The plan's reference rows, then its trials as its suggester knows them (a search: every trial its study
    holds). Every command that looks trials up (status, cancel, logs) goes through here: plan.all_specs() alone
    misses the trials a search suggested."""
    return [*plan.references(), *suggester_for(plan.sweep, store, plan.start).trial_specs()]
