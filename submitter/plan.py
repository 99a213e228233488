"""From a sweep file to the trials to run: validate everything first, resolve start points, pick the best.

Nothing here runs a trial or talks to a cluster; backends (local.py, k8s_backend.py) take the plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from finesweep.evalsets import EvalSetError, load_evalset
from finesweep.spec import Sweep, SweepError, StartRef, TrialSpec, load_sweeps, resolve_sweep_path
from finesweep.store import ArtifactStore, StoreError, read_status, trial_prefix, trial_state

log = logging.getLogger("finesweep")
BEST = "best.json"


def project_dir() -> Path:
    """Where sweep names (jobs/<name>.yaml) and relative paths in sweep files (model, data, eval sets) are
    looked up, and where the local backend runs trials: the current directory, as for any installed command
    (the repository root under make). Not the code's location: an installed package lives in site-packages."""
    return Path.cwd()


@dataclass
class SweepPlan:
    sweep: Sweep
    start: StartRef | None  # None for SFT, and for a DPO sweep whose SFT sweep runs earlier in this pipeline
    # What the preflight found of the sweep's model and dataset in the store (plan.sources), read once.
    sources: tuple = ()

    @property
    def resolved(self) -> bool:
        return self.sweep.stage != "dpo" or self.start is not None

    def trials(self) -> list[TrialSpec]:
        return self.sweep.trial_specs(self.start)

    def references(self) -> list[TrialSpec]:
        return self.sweep.reference_specs(self.start)

    def all_specs(self) -> list[TrialSpec]:
        """Reference rows first (cheap, evaluation only), then the trials."""
        return self.references() + self.trials()


def load_plan(sweep_arg: str, store: ArtifactStore, jobs_dir: Path | None = None,
              allow_unresolved: bool = False, check_data: bool = True) -> list[SweepPlan]:
    """Validate the whole file (every sweep, every trial, local paths, eval sets, start points) before
    anything runs; raises SweepError naming the file, the field and the fix. With `allow_unresolved`
    (dry runs, status), a start point missing from the store leaves the plan unresolved instead.
    `check_data=False` is for the commands that only read the store (status, report, logs, cancel): the
    dataset references are checked as paths only, without reading them through `datasets` (whose import alone
    takes seconds); submit, its dry run and the controller keep the full check (preflight's `read_data`)."""
    jobs_dir = project_dir() / "jobs" if jobs_dir is None else jobs_dir
    path = resolve_sweep_path(sweep_arg, jobs_dir)
    if not _exists(path):
        known = ", ".join(sorted(p.stem for p in jobs_dir.glob("*.yaml")))
        raise SweepError(str(path), "(file)", "no such sweep file", f"use one of: {known}, or a path to a YAML file")
    sweeps = load_sweeps(path)
    plans = []
    in_file = {s.name for s in sweeps}
    for i, sweep in enumerate(sweeps):
        where = f"pipeline[{i}]." if len(sweeps) > 1 else ""
        found = preflight(sweep, where, store, read_data=check_data)
        start = None
        if sweep.stage == "dpo" and sweep.start_sweep not in in_file:
            try:
                start = resolve_start(sweep, store, where)
            except SweepError:
                if not allow_unresolved:
                    raise
        plans.append(SweepPlan(sweep, start, tuple(found)))
    return plans


def resolve_recorded_starts(plans: list[SweepPlan], store: ArtifactStore) -> None:
    """For reading commands (status, report, logs): fill in start points already recorded in the store."""
    for plan in plans:
        if not plan.resolved:
            try:
                plan.start = resolve_start(plan.sweep, store)
            except SweepError:
                pass


def sources(sweep: Sweep, store: ArtifactStore | None) -> list[tuple[str, str, dict | None]]:
    """(kind, name, its _STAGED record or None) for the model, the dataset and the benchmark (eval.benchmark, when
    set) a sweep loads. A store this machine cannot read (no credentials here: a detached k8s submit) counts as
    holding nothing: {"unreadable": why}."""
    from finesweep import staging

    rows = []
    for kind, name in _loaded(sweep):
        record = None
        if store is not None:
            try:
                record = staging.marker(store, kind, name)
            except Exception as err:  # noqa: BLE001 - StoreError, botocore's: the store is not readable from here
                rows.append((kind, name, {"unreadable": f"{type(err).__name__}: {str(err)[:120]}"}))
                continue
        rows.append((kind, name, record))
    return rows


def _loaded(sweep: Sweep) -> list[tuple[str, str]]:
    """(staging kind, name) of what a sweep's trials load: model, dataset, then the benchmark's dataset."""
    loaded = [("models", sweep.model), ("datasets", sweep.dataset.path)]
    if sweep.eval.benchmark is not None and sweep.eval.benchmark.path != sweep.dataset.path:
        loaded.append(("datasets", sweep.eval.benchmark.path))
    return loaded


def describe_sources(plan: SweepPlan, store: ArtifactStore) -> list[str]:
    """The preflight's account of what a sweep loads and where from, one line each."""
    lines = []
    for i, (kind, name, record) in enumerate(plan.sources):
        if record is not None and "unreadable" in record:
            where = f"cannot tell whether it is staged: the store is not readable here ({record['unreadable']})"
        elif record is not None:
            where = f"staged in {store.url} ({len(record['files'])} files, {record.get('bytes', 0) / 1e6:.1f} MB" + \
                (f", revision {record['revision']}" if record.get("revision") else "") + ")"
        elif _looks_local(name):
            where = "not staged: a local path, which trial pods must see (a volume), or `finesweep stage` it"
        else:
            where = "not staged: trial pods download it from the Hub (`finesweep stage` it for HF_HUB_OFFLINE=1)"
        what = "benchmark" if i == 2 else kind[:-1]  # _loaded's order: model, dataset, benchmark
        lines.append(f"sweep {plan.sweep.name}: {what} {name}: {where}")
    return lines


def preflight(sweep: Sweep, where: str = "", store: ArtifactStore | None = None, read_data: bool = True) -> list:
    """Checks that need the file system: the local model (unless staged in the store), every dataset reference
    (dataset:, eval.benchmark:) resolved and, when local, loaded by the trainer's and evaluator's own loader
    (check_data), and the eval sets by the evaluator's own lookup. Returns what `sources` found in the store.
    With `read_data=False` (the read-only commands: load_plan's check_data) the dataset references are checked
    as paths only (a local one must exist), the check of earlier versions, and `datasets` is not imported."""
    src = sweep.source
    found = sources(sweep, store)
    staged = {(kind, name) for kind, name, record in found if record is not None and "unreadable" not in record}
    if _looks_local(sweep.model) and ("models", sweep.model) not in staged and not _exists(sweep.model):
        raise SweepError(src, f"{where}model", f"local model folder {sweep.model!r} does not exist",
                         "build it (make tiny-model for build/tiny-llama), stage it (finesweep stage), or name a "
                         "Hub model id")
    if read_data:
        check_data(sweep, where, staged)
    else:
        for field, spec in (("dataset", sweep.dataset), ("eval.benchmark", sweep.eval.benchmark)):
            if spec is not None and not (("datasets", spec.path) in staged and not _exists(spec.path)):
                _check_paths(sweep, where, field, spec)
    sets = [("eval.set", sweep.eval.set), *((f"eval.extra_sets[{i}]", n) for i, n in enumerate(sweep.eval.extra_sets))]
    for field, name in sets:
        try:
            load_evalset(name)  # the evaluator's own lookup and row checks, so it cannot fail on them later
        except EvalSetError as err:
            raise SweepError(src, f"{where}{field}", err.problem, err.fix) from None
    return found


def check_data(sweep: Sweep, where: str = "", staged: set = frozenset()) -> None:
    """Every dataset reference of `sweep` resolved as the loader resolves it (trainer.data.resolve_source: the
    one resolution both use) and, for a local file or folder, loaded now by the loader itself: the trainer's
    load_splits for `dataset:`, the evaluator's load_benchmark for `eval.benchmark:`. What the loader would refuse
    (a missing file or folder, a split or config it does not have, a slice past the end, columns the format needs)
    is a SweepError naming the field and the fix. Hub ids are not looked up (no network here: HF_HUB_OFFLINE);
    a name staged in the store and absent here is what trial pods load, so it is not checked here."""
    checks = [("dataset", sweep.dataset.path, "check_dataset", sweep.dataset)]
    if sweep.eval.benchmark is not None:
        checks.append(("eval.benchmark", sweep.eval.benchmark.path, "check_benchmark", sweep.eval.benchmark))
    try:
        from trainer import data
    except ImportError as err:  # an install without the trainer's libraries: only what the file system says
        log.debug("dataset checks limited to paths: %s", err)
        data = None
    for field, name, check, spec in checks:
        if ("datasets", name) in staged and not _exists(name):
            continue
        if data is None:
            _check_paths(sweep, where, field, spec)
            continue
        try:
            result = getattr(data, check)(spec)
        except ImportError as err:  # datasets is not installed here (the controller image): paths only
            log.info("%s: %s%s: checked as a path only (%s is not installed here)", sweep.source, where, field,
                     getattr(err, "name", None) or err)
            _check_paths(sweep, where, field, spec)
            continue
        except data.DatasetError as err:
            at = f"{where}{field}" + ("" if err.field == "" else f".{err.field or 'path'}")
            raise SweepError(sweep.source, at, _one_line(err.problem),
                             _one_line(err.fix or "fix the data or the setting named")) from None
        except (ConnectionError, TimeoutError) as err:
            raise SweepError(sweep.source, f"{where}{field}.path", f"{_one_line(repr(name), 120)} could not be "
                             f"reached ({type(err).__name__}: {_one_line(err, 200)})",
                             "check the network, or stage it (finesweep stage)") from None
        except Exception as err:  # noqa: BLE001 - whatever else the data does to the loader: an error, no traceback
            log.debug("checking %s%s of %s", where, field, sweep.source, exc_info=True)
            raise SweepError(sweep.source, f"{where}{field}.path", f"{_one_line(repr(name), 120)} could not be "
                             f"read ({type(err).__name__}: {_one_line(err, 300)})",
                             "fix the data, or point `path` at data the loader can read") from None
        if result and result.get("ignored_name"):
            log.info("%s: %s%s.name: %r is openai/gsm8k's config; the local %s has none, so it is read as it is",
                     sweep.source, where, field, result["ignored_name"], name)


def _check_paths(sweep: Sweep, where: str, field: str, spec) -> None:
    """Without `datasets` to read them: local paths must exist (the check of earlier versions)."""
    paths = [spec.path] if _looks_local(spec.path) else []
    paths += list(getattr(spec, "data_files", None) or [])
    for p in paths:
        if not _exists(p):
            raise SweepError(sweep.source, f"{where}{field}", f"local data {p!r} does not exist",
                             "fix the path (relative to the project root) or use a Hub dataset id")


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _exists(path: str | Path) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte, exists nowhere
        return False


def _looks_local(path: str) -> bool:
    from trainer.data import looks_local  # the loader's own rule (no torch, no datasets: a plain function)

    return looks_local(path)


def resolve_start(sweep: Sweep, store: ArtifactStore, where: str = "") -> StartRef:
    """`from: sft:best` -> the SFT sweep's recorded best trial; `from: sft:<id>` -> that trained trial."""
    name, which = sweep.start_from.split(":", 1)
    if which == "best":
        try:
            best = store.read_json(f"{name}/{BEST}")
        except StoreError:
            raise SweepError(sweep.source, f"{where}from",
                             f"sweep {name!r} has no finished best trial in store {store.url}",
                             f"run `make submit SWEEP={name}` with the same STORE first, or name a trained "
                             "trial as `<sweep>:<trial id>`") from None
        return _checked_start(sweep, store, StartRef(name, best["trial_id"]), where)
    if not read_status(store, name, which).trained:
        raise SweepError(sweep.source, f"{where}from", f"trial {name}/{which} has no trained adapter in {store.url}",
                         f"check `make status SWEEP={name}` for trained trial ids")
    return _checked_start(sweep, store, StartRef(name, which), where)


def _checked_start(sweep: Sweep, store: ArtifactStore, start: StartRef, where: str) -> StartRef:
    """The start point, after checking the DPO sweep matches what it was trained with (spec.check_start_compatible)."""
    from finesweep.spec import check_start_compatible, trial_from_dict

    try:
        parent = trial_from_dict(store.read_json(f"{trial_prefix(start.sweep, start.trial_id)}/spec.json"))
    except StoreError:
        raise SweepError(sweep.source, f"{where}from", f"trial {start.sweep}/{start.trial_id} has no spec.json in "
                         f"{store.url}", f"re-run `make submit SWEEP={start.sweep}` with the same STORE") from None
    check_start_compatible(sweep, parent, where)
    return start


def select_best(sweep: Sweep, store: ArtifactStore, specs: list[TrialSpec]) -> dict | None:
    """Choose the best finished trial and record it as <sweep>/best.json (rules in finesweep.selection:
    guardrails, validation rows to choose, a paired test against the top trial with Holm, the stated
    tie-break, the winner's figure on the test rows). None when no trial is eligible; best.json is then left
    as it was, and the reasons are logged."""
    from finesweep import selection

    start = next((s.start for s in specs if s.start is not None), None)
    rows = [_selection_row(store, spec) for spec in [*sweep.reference_specs(start), *specs]]
    best = selection.choose(rows, sweep.select, n_boot=sweep.eval.bootstrap_samples)
    for item in best["ineligible"]:
        log.info("sweep %s: %s is not eligible for best: %s", sweep.name, item["name"], item["reason"])
    if best["trial_id"] is None:
        log.warning("sweep %s: no eligible trial by %s; best.json not written", sweep.name, sweep.select.metric)
        return None
    store.write_json(f"{sweep.name}/{BEST}", best)
    log.info("sweep %s: best trial %s (%s) with %s = %s on the %s; tied set: %s%s", sweep.name, best["name"],
             best["trial_id"], best["metric"], best["value"], best["value_part"], ", ".join(best["tied"]),
             f" (tie broken by {best['tie_break']['decided_by']})" if best["tie_break"]["decided_by"] else "")
    return best


def _selection_row(store: ArtifactStore, spec: TrialSpec) -> dict:
    """What selection reads of one trial: its state, eval.json, and train.json for the cost tie-break."""
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    row = {"name": spec.name, "trial_id": spec.trial_id, "stage": spec.stage,
           "state": trial_state(store, spec.sweep, spec.trial_id)}
    if row["state"] == "done":
        row["eval"] = store.read_json(f"{prefix}/eval.json")
        if spec.trains and store.exists(f"{prefix}/train.json"):
            row["train"] = store.read_json(f"{prefix}/train.json")
    return row


def write_spec(spec: TrialSpec, path: Path) -> Path:
    from finesweep.spec import to_dict

    path.write_text(json.dumps(to_dict(spec), indent=2))
    return path
