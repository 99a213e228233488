"""The submitter's commands: submit, status, report, logs, for the local and Kubernetes backends."""

from __future__ import annotations

import logging
import sys
import time

from finesweep.spec import StartRef
from finesweep.store import FAILED, ArtifactStore, LocalStore, StoreError, trial_prefix, trial_state

from .plan import SweepPlan, load_plan, resolve_recorded_starts, resolve_start, select_best
from .plan import ROOT

log = logging.getLogger("finesweep")
UNRESOLVED = "unresolved"


def submit(args, store: ArtifactStore) -> int:
    dry_run = getattr(args, "dry_run", False)
    plans = load_plan(args.sweep, store, allow_unresolved=dry_run)
    if args.backend == "local":
        if dry_run:
            log.error("--dry-run applies to the k8s backend; the local backend has nothing to print")
            return 2
        return _submit_local(args, plans, store)
    return _submit_k8s(args, plans, store, dry_run)


def _submit_local(args, plans: list[SweepPlan], store: ArtifactStore) -> int:
    from evaluator.report import build_report

    from .local import run_sweep

    failed, started = 0, time.time()
    for plan in plans:
        if not plan.resolved:
            plan.start = resolve_start(plan.sweep, store)
        counts = run_sweep(plan, store, args.store)
        failed += counts["failed"]
        build_report(store, plan.sweep, plan.all_specs())
        log.info("sweep %s: %d ran, %d already done, %d failed", plan.sweep.name, counts["ran"],
                 counts["done_before"], counts["failed"])
    _print_reports(plans, store)
    log.info("finished in %.1f min%s", (time.time() - started) / 60, f"; {failed} trial(s) failed" if failed else "")
    return 1 if failed else 0


def _submit_k8s(args, plans: list[SweepPlan], store: ArtifactStore, dry_run: bool) -> int:
    from . import k8s_backend

    settings = k8s_backend.load_settings(k8s_overrides(args))
    for i, plan in enumerate(plans):
        if not plan.resolved:
            if dry_run:
                # The start point is only known once its SFT sweep has finished; show the Jobs anyway.
                print(f"# note: {plan.sweep.start_from} is not in the store yet; trial ids below are provisional",
                      file=sys.stderr)
                plan.start = StartRef(plan.sweep.start_sweep, UNRESOLVED)
            else:
                earlier = next(p for p in plans[:i] if p.sweep.name == plan.sweep.start_sweep)
                wait_for_sweep(earlier, store, on_poll=lambda p=earlier: record_cluster_failures(
                    p, store, k8s_backend.status(p.sweep.name, settings)))
                plan.start = resolve_start(plan.sweep, store)
        created = k8s_backend.submit(plan.sweep, plan.all_specs(), args.store, settings, dry_run=dry_run)
        if not dry_run:
            log.info("sweep %s: %d Job(s) created; follow with `make status SWEEP=%s BACKEND=k8s`",
                     plan.sweep.name, len(created), args.sweep)
    return 0


def k8s_overrides(args) -> dict:
    overrides = {}
    if getattr(args, "namespace", ""):
        overrides["namespace"] = args.namespace
    if getattr(args, "kube_context", ""):
        overrides["kube_context"] = args.kube_context
    return overrides


def record_cluster_failures(plan: SweepPlan, store: ArtifactStore, rows: list[dict]) -> int:
    """Write the _FAILED marker for trials whose Job the cluster gave up on (OOMKilled, exit 3, deadline): the
    pod could not write it itself, and status, report and a waiting pipeline read failures from the store.
    `rows` are the sweep's k8s_backend.status rows. Returns how many markers were written."""
    specs = {s.trial_id: s for s in plan.all_specs()}
    written = 0
    for row in rows:
        spec = specs.get(row["trial_id"])
        if row["phase"] != "Failed" or spec is None:
            continue
        prefix = trial_prefix(spec.sweep, spec.trial_id)
        if trial_state(store, spec.sweep, spec.trial_id) == "done" or store.exists(f"{prefix}/{FAILED}"):
            continue
        store.write_json(f"{prefix}/{FAILED}", {"phase": "job", "job": row["job"], "exit_code": row["exit_code"],
                                                "reason": row["reason"], "at": time.time()})
        log.warning("%s/%s (%s): job %s failed: %s", spec.sweep, spec.name, spec.trial_id, row["job"], row["reason"])
        written += 1
    return written


def wait_for_sweep(plan: SweepPlan, store: ArtifactStore, poll_s: float = 20.0, timeout_s: float = 7 * 24 * 3600,
                   on_poll=None):
    """Block until every trial of `plan` is done or failed (markers in the store), then record the best.
    `on_poll` runs before each check (the k8s backend records Jobs the cluster gave up on)."""
    deadline = time.time() + timeout_s
    specs = plan.all_specs()
    while True:
        if on_poll is not None:
            on_poll()
        states = [trial_state(store, s.sweep, s.trial_id) for s in specs]
        failed = sum(store.exists(f"{trial_prefix(s.sweep, s.trial_id)}/{FAILED}") for s in specs)
        done = states.count("done")
        log.info("waiting for sweep %s: %d/%d done, %d failed", plan.sweep.name, done, len(specs), failed)
        if done + failed >= len(specs):
            break
        if time.time() > deadline:
            raise TimeoutError(f"sweep {plan.sweep.name} did not finish in {timeout_s:.0f}s")
        time.sleep(poll_s)
    select_best(plan.sweep, store, plan.trials())


def status(args, store: ArtifactStore) -> int:
    plans = load_plan(args.sweep, store, allow_unresolved=True)
    resolve_recorded_starts(plans, store)
    phases = {}
    if args.backend == "k8s":
        from . import k8s_backend

        settings = k8s_backend.load_settings(k8s_overrides(args))
        for plan in plans:
            rows = k8s_backend.status(plan.sweep.name, settings)
            phases.update({row["trial_id"]: row for row in rows})
            if plan.resolved:
                record_cluster_failures(plan, store, rows)
    for plan in plans:
        metric = plan.sweep.select.metric
        print(f"\nsweep {plan.sweep.name} ({plan.sweep.stage})" +
              (f", from {plan.sweep.start_from}" + (f" = {plan.start.trial_id}" if plan.start else " (not resolved yet)")
               if plan.sweep.start_from else ""))
        if not plan.resolved:
            print("  trials appear once the start point is resolved")
            continue
        header = f"  {'trial':<16} {'id':<16} {'state':<9} {'job':<10} {'BLEU':>7} {metric:>20}  note"
        print(header)
        for spec in plan.all_specs():
            prefix = trial_prefix(spec.sweep, spec.trial_id)
            state = trial_state(store, spec.sweep, spec.trial_id)
            note, bleu, value = "", "", ""
            if state == "done":
                summary = store.read_json(f"{prefix}/eval.json")["summary"]
                bleu = f"{summary.get('bleu', 0):.2f}"
                value = f"{summary[metric]:.4g}" if summary.get(metric) is not None else "-"
            elif store.exists(f"{prefix}/{FAILED}"):
                failure = store.read_json(f"{prefix}/{FAILED}")
                state, note = "failed", f"{failure['phase']}: {failure['reason']}"
            job = phases.get(spec.trial_id, {}).get("phase", "") if phases else ""
            print(f"  {spec.name:<16} {spec.trial_id:<16} {state:<9} {job:<10} {bleu:>7} {value:>20}  {note}")
    return 0


def report(args, store: ArtifactStore) -> int:
    from evaluator.report import build_report

    plans = load_plan(args.sweep, store, allow_unresolved=True)
    resolve_recorded_starts(plans, store)
    for plan in plans:
        if not plan.resolved:
            log.info("sweep %s: start point not in the store yet; no report", plan.sweep.name)
            continue
        select_best(plan.sweep, store, plan.trials())
        build_report(store, plan.sweep, plan.all_specs())
    _print_reports([p for p in plans if p.resolved], store)
    return 0


def _print_reports(plans: list[SweepPlan], store: ArtifactStore) -> None:
    for plan in plans:
        key = f"{plan.sweep.name}/report"
        if isinstance(store, LocalStore):
            where = store.root / key / "report.md"
        else:  # bring S3 reports next to the user so they can be opened
            where = store.download_dir(key, ROOT / "build" / "reports" / plan.sweep.name) / "report.md"
        print(f"report for sweep {plan.sweep.name}: {where}")


def logs(args, store: ArtifactStore) -> int:
    plans = load_plan(args.sweep, store, allow_unresolved=True)
    resolve_recorded_starts(plans, store)
    if args.backend == "k8s":
        from . import k8s_backend

        settings = k8s_backend.load_settings(k8s_overrides(args))
        for plan in plans:
            trial = _match_trial(plan, args.trial) if args.trial else None
            if args.trial and trial is None:
                continue
            k8s_backend.follow_logs(plan.sweep.name, trial, settings)
        return 0
    shown = 0
    for plan in plans:
        if not plan.resolved:
            continue
        for spec in plan.all_specs():
            if args.trial and args.trial not in (spec.name, spec.trial_id):
                continue
            for phase in ("train", "eval"):
                key = f"{trial_prefix(spec.sweep, spec.trial_id)}/logs/{phase}.log"
                try:
                    text = store.read_bytes(key).decode(errors="replace")
                except StoreError:
                    continue
                shown += 1
                print(f"==> {spec.sweep}/{spec.name} ({spec.trial_id}) {phase} <==\n{text}")
    if not shown:
        log.error("no logs found for %r in sweep file %s", args.trial or "any trial", args.sweep)
        return 1
    return 0


def _match_trial(plan: SweepPlan, wanted: str) -> str | None:
    if not plan.resolved:
        return None
    return next((s.trial_id for s in plan.all_specs() if wanted in (s.name, s.trial_id)), None)

