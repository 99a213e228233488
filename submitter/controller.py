"""`finesweep controller`: the pipeline loop of one sweep file, run inside the cluster as a Job.

    finesweep controller --sweep-file /etc/finesweep/sweep.yaml --store s3://bucket/runs --namespace ns

For each sweep of the file, in order: resolve its start point from the store once the previous sweep has
settled (plan.resolve_start), then run it with the engine, list, grid and search sweeps alike
(engine.run_sweep with K8sBackend: a trial is scheduled by creating its current attempt's Job, idempotently,
at most max_parallel or search.parallel at a time; the loop's wait records Jobs the cluster gave up on and logs
each trial's state changes), then select the best and write the report (engine.finish; evaluator.report: no
torch). Pruning is decided by each trial's trainer at its evaluation from the study in the store
(finesweep.search.decide_at_evaluation).

Takeover: everything the loop decides comes from the store and the API. Trial Jobs have deterministic names
per trial and attempt and are created with a 409 meaning "exists", and the store records an attempt's Job
name before the Job is created, so a replacement pod (its Job's podReplacementPolicy: Failed starts it only
once the old pod is gone) finds what its predecessor made and never creates a trial's Job twice.
"""

from __future__ import annotations

import logging
import time

from finesweep.store import ArtifactStore, status_of

from .plan import BEST, SweepPlan, load_plan, resolve_start

log = logging.getLogger("finesweep")


def controller(args, store: ArtifactStore) -> int:
    """The command: 0 when every trial of every sweep is done, 1 when some failed or the sweep was cancelled."""
    from . import k8s_backend

    settings = k8s_backend.load_settings(k8s_backend.overrides_from(args))
    k8s_backend.check_store_url(args.store, dry_run=False)
    started = time.time()
    plans = load_plan(args.sweep_file, store, allow_unresolved=True)
    log.info("controller: pipeline %s, %d sweep(s): %s; store %s, namespace %s", args.sweep_file, len(plans),
             ", ".join(f"{p.sweep.name} ({p.sweep.stage})" for p in plans), args.store, settings.namespace)
    failed = 0
    for i, plan in enumerate(plans, 1):
        stage = f"[{i}/{len(plans)}] sweep {plan.sweep.name} ({plan.sweep.stage})"
        outage_since = None
        while True:
            try:
                result = _run_sweep(stage, plan, store, args, settings)
                break
            except Exception as err:  # noqa: BLE001 - only a store or API outage is waited out, see _transient
                if not _transient(err):
                    raise
                # Every step is idempotent (Jobs by name, state in the store): start the sweep's step again.
                outage_since = outage_since or time.time()
                if time.time() - outage_since > OUTAGE_LIMIT_S:
                    raise
                log.warning("%s: store or API unreachable (%s: %s); retrying in %.0fs", stage, type(err).__name__,
                            str(err)[:200], settings.poll_seconds)
                time.sleep(settings.poll_seconds)
        if result is None:
            return 1
        failed += result
    log.info("controller: pipeline finished in %.1f min%s", (time.time() - started) / 60,
             f"; {failed} trial(s) failed (resubmit to retry them)" if failed else "; every trial done")
    return 1 if failed else 0


# A store or API server down for longer than this ends the controller (exit 2 via the CLI); its Job's next
# pod, or a resubmit, carries on from the store.
OUTAGE_LIMIT_S = 3600.0


def _transient(err: Exception) -> bool:
    from finesweep.store import StoreError

    module = type(err).__module__
    if module.startswith("kubernetes.client"):  # the API answered: only overload and server errors pass
        status = getattr(err, "status", 0) or 0
        return status == 0 or status == 429 or status >= 500
    return isinstance(err, (StoreError, ConnectionError, TimeoutError)) or module.startswith(
        ("botocore", "boto3", "urllib3"))


def _run_sweep(stage: str, plan: SweepPlan, store: ArtifactStore, args, settings) -> int | None:
    """One sweep to its end through the engine (list, grid or search alike: engine.run_sweep with K8sBackend),
    then best and report (engine.finish): the number of failed trials, or None when it was cancelled."""
    from . import k8s_backend
    from .engine import SweepStopped, finish, record_cluster_failures, run_sweep

    if not plan.resolved:
        # The previous sweep settled and recorded its best (the loop below waited for it).
        plan.start = resolve_start(plan.sweep, store)
        log.info("%s: starts from %s = trial %s", stage, plan.sweep.start_from, plan.start.trial_id)
    # Jobs the cluster gave up on while no controller watched: their failures go in the store first, so the retry
    # rule sees them (a replacement pod, or a resubmit after the previous controller ended).
    record_cluster_failures(plan, store, k8s_backend.status(plan.sweep.name, settings))
    backend = K8sBackend(store, args.store, settings, args.max_attempts, stage, plan.sweep)
    try:
        counts = run_sweep(plan.sweep, store, backend, plan.start, poll_s=settings.poll_seconds)
    except SweepStopped as exc:
        log.error("%s: %s", stage, exc)
        return None
    backend.log_changes()
    finish(plan.sweep, store, plan.start)
    _log_selection(stage, plan, store)
    log.info("%s: settled (%d complete, %d pruned, %d failed); report at %s/%s/report/report.md", stage,
             counts["complete"], counts["pruned"], counts["failed"], args.store, plan.sweep.name)
    return counts["failed"]


class K8sBackend:
    """engine.Backend on Kubernetes: one Job per trial and attempt, created only once (its name is
    deterministic and the store records the attempt's Job name before the Job exists, so a replacement
    controller creates the Job its predecessor may not have, and never a second one)."""

    name = "k8s"

    def __init__(self, store: ArtifactStore, store_url: str, settings, max_attempts: int, stage: str = "",
                 sweep=None):
        from . import k8s_backend

        self.store, self.store_url, self.max_attempts, self.stage = store, store_url, max_attempts, stage
        self.batch, self.core = k8s_backend._clients(settings)
        self.settings = k8s_backend.effective_settings(settings, sweep, self.core)
        self.scheduled: dict[str, object] = {}
        self.seen: dict[str, str] = {}

    def schedule(self, spec) -> None:
        from finesweep.store import NextAction, next_action, over_limit_note, start_attempt

        from . import k8s_backend
        from .k8s_manifests import job_name, trial_objects

        self.scheduled[spec.trial_id] = spec
        status = status_of(self.store, spec)
        action = next_action(status, self.max_attempts)  # the store's one rule, as every other loop applies it
        if action is NextAction.SKIP:
            return
        if action is NextAction.OVER_LIMIT:
            log.warning("%s: trial %s (%s): %s", self.stage, spec.name, spec.trial_id,
                        over_limit_note(status, self.max_attempts))
            return
        if action in (NextAction.RETRY, NextAction.EVALUATE):
            # The failed attempt's Job and ConfigMap go first (or the finished one's, for an evaluation under new
            # settings: its init container finds the adapter trained and the evaluator runs); the new attempt's
            # Job name is recorded before the Job exists, so a replacement controller creates it at most once.
            k8s_backend._delete_trial_objects(self.batch, self.core, self.settings, job_name(spec, status.attempt))
            status = start_attempt(self.store, spec.sweep, spec.trial_id, self.name,
                                   job=job_name(spec, status.attempt + 1))
        else:
            # New (attempt 1), or carried on as the same attempt: under way on a Job that may exist (a replacement
            # controller), or stopped by a cancel or preempted (its outcome is cleared: running again). The Job name
            # is recorded before the Job exists, so a replacement controller creates it at most once.
            status = start_attempt(self.store, spec.sweep, spec.trial_id, self.name,
                                   job=job_name(spec, max(status.attempt, 1)))
        attempt = max(status.attempt, 1)
        name = job_name(spec, attempt)
        created = k8s_backend.create_trial_objects(self.batch, self.core,
                                                   trial_objects(spec, self.settings, self.store_url, attempt))
        log.info("%s: trial %s (%s): %s job %s", self.stage, spec.name, spec.trial_id,
                 "created" if created else "exists,", name)

    def wait(self, seconds: float) -> None:
        from . import k8s_backend

        time.sleep(seconds)
        if self.scheduled:  # Jobs the cluster gave up on: their failure settles the trial for the loop
            sweep = next(iter(self.scheduled.values())).sweep
            k8s_backend.record_job_failures(self.store, list(self.scheduled.values()),
                                            k8s_backend.status(sweep, self.settings))
        self.log_changes()

    def log_changes(self) -> None:
        """Each scheduled trial's state changes as the store records them (new -> running -> done/failed), in
        `kubectl logs` of the controller."""
        for spec in self.scheduled.values():
            st = status_of(self.store, spec)
            state = st.state.value + (f" (attempt {st.attempt})" if st.attempt and st.attempt > 1 else "")
            if self.seen.get(spec.trial_id) != state:
                note = f": {st.failure.phase}: {st.failure.reason}" if st.failure is not None else ""
                log.info("%s: trial %s (%s) %s -> %s%s", self.stage, spec.name, spec.trial_id,
                         self.seen.get(spec.trial_id, "new"), state, note)
                self.seen[spec.trial_id] = state


def _log_selection(stage: str, plan: SweepPlan, store: ArtifactStore) -> None:
    """Which trial is best and why, from best.json (select_best already logged the figures)."""
    from finesweep.store import StoreError

    try:
        best = store.read_json(f"{plan.sweep.name}/{BEST}")
    except StoreError:
        log.warning("%s: no best trial recorded (no eligible trial)", stage)
        return
    tie = best.get("tie_break") or {}
    why = (f"tied with {', '.join(t for t in best.get('tied', []) if t != best.get('name'))}; "
           f"tie broken by {tie['decided_by']}" if tie.get("decided_by") else "no tie")
    log.info("%s: selected %s (%s): %s = %s (%s)", stage, best.get("name"), best.get("trial_id"),
             best.get("metric"), best.get("value"), why)
