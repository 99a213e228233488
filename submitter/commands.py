"""The submitter's commands: submit, status, report, logs, for the local and Kubernetes backends."""

from __future__ import annotations

import logging
import sys
import time

from finesweep.spec import StartRef, resolve_sweep_path
from finesweep.store import (DEFAULT_MAX_ATTEMPTS, ArtifactStore, LocalStore, StoreError, TrialState, clear_local_run,
                             read_local_run, status_of, trial_prefix)

from .engine import record_cluster_failures, stop_running, sweep_specs
from .plan import SweepPlan, load_plan, resolve_recorded_starts, select_best
from .plan import project_dir

log = logging.getLogger("finesweep")
UNRESOLVED = "unresolved"
NOTE_REASON_CHARS = 100  # per eval.json error in the note column of `status`


def submit(args, store: ArtifactStore) -> int:
    dry_run = getattr(args, "dry_run", False)
    if args.backend == "local" and dry_run:
        log.error("--dry-run applies to the k8s backend; the local backend has nothing to print")
        return 2
    settings = None
    if args.backend == "k8s":  # settings first: a wrong flag is reported before the sweep file is even read
        from . import k8s_backend

        settings = k8s_backend.load_settings(k8s_backend.overrides_from(args))
        k8s_backend.check_store_url(args.store, dry_run)
    # k8s: the controller resolves start points as earlier sweeps finish, so they may be missing now.
    plans = load_plan(args.sweep, store, allow_unresolved=dry_run or args.backend == "k8s")
    from .plan import describe_sources

    for plan in plans:
        for line in describe_sources(plan, store):
            log.info("%s", line)
    if args.backend == "local":
        return _submit_local(args, plans, store)
    return _submit_k8s(args, plans, store, dry_run, settings)


def _submit_local(args, plans: list[SweepPlan], store: ArtifactStore) -> int:
    from .engine import submit_local

    failed, started = 0, time.time()
    for plan in plans:
        counts = submit_local(plan, store, args.store, _max_attempts(args))
        failed += counts["failed"]
    _print_reports(plans, store)
    log.info("finished in %.1f min%s", (time.time() - started) / 60, f"; {failed} trial(s) failed" if failed else "")
    return 1 if failed else 0


def _submit_k8s(args, plans: list[SweepPlan], store: ArtifactStore, dry_run: bool, settings) -> int:
    """A real submit hands the pipeline to its controller Job (submitter/controller.py) and returns; a dry run
    prints the controller's manifests, then the trial manifests it would create first."""
    from . import k8s_backend
    from .k8s_manifests import controller_manifests

    path = resolve_sweep_path(args.sweep, project_dir() / "jobs")
    pipeline, text = path.stem, path.read_text(encoding="utf-8")
    if not dry_run:
        started = time.time()
        name, action = k8s_backend.submit_controller(pipeline, text, args.store, settings, _max_attempts(args))
        what = {"created": "created", "replaced": "replaced (the previous run had finished)",
                "exists": "exists (still running; left alone)"}[action]
        print(f"controller job {name} {what} in namespace {settings.namespace} ({time.time() - started:.1f}s)")
        print(f"follow it with: kubectl logs -f job/{name} -n {settings.namespace}")
        print(f"trials: finesweep status {args.sweep} --backend k8s --store {args.store} "
              f"--namespace {settings.namespace}")
        if getattr(args, "wait", False):
            return 0 if k8s_backend.follow_controller(pipeline, settings) else 1
        return 0
    import yaml

    # The objects a submit creates, from the same functions with the same settings (the cluster's defaults read
    # where a kubeconfig reaches one): what is printed is what a submit would create.
    core = k8s_backend.dry_run_core(settings)
    sys.stdout.write(f"# finesweep dry run: the controller Job of pipeline {pipeline}, which creates the trial "
                     f"Jobs below in the cluster\n")
    yaml.safe_dump_all(controller_manifests(pipeline, text, k8s_backend.effective_settings(settings, None, core),
                                            args.store, _max_attempts(args)), sys.stdout,
                       sort_keys=False, explicit_start=True, width=120)
    for plan in plans:
        if not plan.resolved:
            # The start point is only known once its SFT sweep has finished; show the Jobs anyway.
            print(f"# note: {plan.sweep.start_from} is not in the store yet; trial ids below are provisional",
                  file=sys.stderr)
            plan.start = StartRef(plan.sweep.start_sweep, UNRESOLVED)
        k8s_backend.dry_run(plan.sweep, plan.all_specs(), args.store, settings, max_attempts=_max_attempts(args),
                            core=core)
    return 0


def _max_attempts(args) -> int:
    return getattr(args, "max_attempts", None) or DEFAULT_MAX_ATTEMPTS


def cancel(args, store: ArtifactStore) -> int:
    """Stop a sweep file's running sweeps and mark their unfinished trials stopped in the store (a search sweep's:
    every trial of its study, as `status` lists them); finished artifacts stay, and a later submit carries on
    (each stopped trial as the same attempt). k8s: delete the pipeline's controller Job and ConfigMap, then the
    sweep's Jobs (pods by propagation) and ConfigMaps. Local: SIGTERM to the `finesweep submit` running the
    sweep on this machine (its record in the store), which stops its trial processes as pods are stopped."""
    plans = load_plan(args.sweep, store, allow_unresolved=True, check_data=False)
    resolve_recorded_starts(plans, store)
    if args.backend != "k8s":
        return _cancel_local(plans, store)
    from . import k8s_backend

    settings = k8s_backend.load_settings(k8s_backend.overrides_from(args))
    # The controller first: once it is gone nothing creates more trial Jobs.
    pipeline = resolve_sweep_path(args.sweep, project_dir() / "jobs").stem
    if k8s_backend.cancel_controller(pipeline, settings):
        log.info("pipeline %s: controller job and its ConfigMap deleted", pipeline)
    for plan in plans:
        deleted = k8s_backend.cancel(plan.sweep.name, settings)
        stopped = stop_running(plan, store)
        log.info("sweep %s: %d Job(s) deleted, %d trial(s) marked stopped; finished trials stay in %s",
                 plan.sweep.name, len(deleted), len(stopped), store.url)
    return 0


LOCAL_CANCEL_WAIT_S = 600  # the running trial saves a checkpoint first (one training step, then the upload)


def _cancel_local(plans: list[SweepPlan], store: ArtifactStore) -> int:
    import os
    import signal
    import socket

    code = 0
    for plan in plans:
        name = plan.sweep.name
        record = read_local_run(store, name)
        if record is None:
            log.info("sweep %s: no local submit is running it; nothing to stop", name)
            continue
        host, pid = record.get("host"), int(record.get("pid") or 0)
        if host != socket.gethostname():
            log.error("sweep %s is run by a local submit on host %s (pid %d), not on this one (%s). Fix: run "
                      "`finesweep cancel` there", name, host, pid, socket.gethostname())
            code = 1
            continue
        if _submit_alive(pid):
            log.info("sweep %s: stopping the local submit running it (pid %d); its trial saves a checkpoint first",
                     name, pid)
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + LOCAL_CANCEL_WAIT_S
            while _submit_alive(pid) and time.time() < deadline:
                time.sleep(0.5)
            if _submit_alive(pid):
                log.error("sweep %s: the local submit (pid %d) is still running after %d s. Fix: stop it with "
                          "`kill %d`, then cancel again", name, pid, LOCAL_CANCEL_WAIT_S, pid)
                code = 1
                continue
        stopped = stop_running(plan, store)  # what a submit that died could not mark itself
        clear_local_run(store, name, pid)
        log.info("sweep %s: local submit (pid %d) stopped, %d more trial(s) marked stopped; finished trials stay "
                 "in %s", name, pid, len(stopped), store.url)
    return code


def _submit_alive(pid: int) -> bool:
    """A live `finesweep submit` process with this pid (a stale record's pid may belong to another program)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(b"submitter" in a or b"finesweep" in a for a in argv) and b"submit" in argv


def status(args, store: ArtifactStore) -> int:
    plans = load_plan(args.sweep, store, allow_unresolved=True, check_data=False)
    resolve_recorded_starts(plans, store)
    phases = {}
    if args.backend == "k8s":
        from . import k8s_backend

        settings = k8s_backend.load_settings(k8s_backend.overrides_from(args))
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
        header = f"  {'trial':<16} {'id':<16} {'state':<9} {'tries':>5} {'job':<10} {'BLEU':>7} {metric:>20}  note"
        print(header)
        for spec in sweep_specs(plan, store):
            prefix = trial_prefix(spec.sweep, spec.trial_id)
            st = status_of(store, spec)
            note, bleu, value = "", "", ""
            if st.done:
                ev = store.read_json(f"{prefix}/eval.json")
                summary = ev["summary"]
                bleu = f"{summary.get('bleu', 0):.2f}"
                value = f"{summary[metric]:.4g}" if summary.get(metric) is not None else "-"
                note = eval_errors_note(ev.get("errors"))
            elif st.failure is not None:
                note = f"{st.failure.phase}: {st.failure.reason}"
            elif st.state is TrialState.PRUNED:
                from .engine import pruned_note

                note = pruned_note(store, spec)
            job = phases.get(spec.trial_id, {}).get("phase", "") if phases else ""
            print(f"  {spec.name:<16} {spec.trial_id:<16} {st.state.value:<9} {st.attempt or '':>5} {job:<10} "
                  f"{bleu:>7} {value:>20}  {note}")
    return 0


def eval_errors_note(errors: list[dict] | None) -> str:
    """status's note for a done trial whose evaluation lost a part (eval.json `errors`, each {part, error,
    reason}): `eval errors: benchmark: DatasetError: ...; heldout: ...`, each reason on one line and cut to
    NOTE_REASON_CHARS (the whole reasons are in eval.json and in the report's warnings)."""
    parts = []
    for e in errors or []:
        reason = " ".join(str(e.get("reason") or "").split())
        if len(reason) > NOTE_REASON_CHARS:
            reason = reason[:NOTE_REASON_CHARS - 3].rstrip() + "..."
        parts.append(": ".join(str(x) for x in (e.get("part") or "?", e.get("error"), reason) if x))
    return "eval errors: " + "; ".join(parts) if parts else ""


def report(args, store: ArtifactStore) -> int:
    from evaluator.report import build_report

    plans = load_plan(args.sweep, store, allow_unresolved=True, check_data=False)
    resolve_recorded_starts(plans, store)
    for plan in plans:
        if not plan.resolved:
            log.info("sweep %s: start point not in the store yet; no report", plan.sweep.name)
            continue
        if plan.sweep.search is not None:
            from .engine import finish

            finish(plan.sweep, store, plan.start)
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
            where = store.download_dir(key, project_dir() / "build" / "reports" / plan.sweep.name) / "report.md"
        print(f"report for sweep {plan.sweep.name}: {where}")


def logs(args, store: ArtifactStore) -> int:
    plans = load_plan(args.sweep, store, allow_unresolved=True, check_data=False)
    resolve_recorded_starts(plans, store)
    if args.backend == "k8s":
        from . import k8s_backend

        settings = k8s_backend.load_settings(k8s_backend.overrides_from(args))
        for plan in plans:
            trial = _match_trial(plan, store, args.trial) if args.trial else None
            if args.trial and trial is None:
                continue
            k8s_backend.follow_logs(plan.sweep.name, trial, settings)
        return 0
    shown = 0
    for plan in plans:
        if not plan.resolved:
            continue
        for spec in sweep_specs(plan, store):
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


def _match_trial(plan: SweepPlan, store: ArtifactStore, wanted: str) -> str | None:
    if not plan.resolved:
        return None
    return next((s.trial_id for s in sweep_specs(plan, store) if wanted in (s.name, s.trial_id)), None)

