"""Search and early stopping with Optuna, with the study kept in the artifact store (no torch, no database).

A search sweep's study is rebuilt from the store every time a decision is made: each trial of the study has a
record <sweep>/search/trials/<number>.json (its parameters, the sampler's and pruner's attributes, the
intermediate values reported so far, a pruning decision), and its state and final value come from the trial
itself (finesweep.store.read_status, eval.json). Nothing is kept only in memory, so a restart (a controller pod
rescheduled, a resubmit, a local re-run, a preempted trainer) loses nothing and re-runs nothing, and a decision
made after a restart is the decision an uninterrupted run would have made:

- samplers: a fresh sampler per trial number, seeded from (search.seed, number). A seeded sampler re-created
  over a rebuilt study would otherwise start its random stream from the beginning again and suggest what it
  suggested for the first trial; per-number seeds make the n-th suggestion depend only on the seed and the
  study's first n trials.
- pruners: successive halving records each trial's value at each rung as trial system attributes
  (completed_rung_<k>) and Hyperband assigns brackets by crc32(study name + trial number); the records keep
  those attributes, the study is named after the sweep, and numbers are assigned in record order, so both
  pruners see exactly the study they would have seen.

Who decides what, and who writes which record (one writer per record):

- the engine (`Search`, driven by submitter/engine.py) asks: `Search.ask()` creates trial n's record and,
  for a trial to be monitored, writes <trial>/monitor.json first. Once written, the engine never writes that
  record again; it reads records for the loop and the report.
- the trial's trainer prunes (Optuna's `report` + `should_prune` pattern, made at the evaluation itself):
  trainer/progress.py calls `decide_at_evaluation` in its main process right after each held-out evaluation.
  It rebuilds the study from the store (a `StoredStudy`, from the pieces monitor.json carries: no Sweep
  needed), reports the value at that step to trial n, asks the pruner, and writes trial n's record: the
  intermediate value, the pruner's system attributes and the decision. A pruned trial stops at that very
  evaluation, on every backend (local processes or pods), whatever the engine is doing. Points are fed in
  order, once each: a resumed trainer (preemption) that evaluates a step again keeps what was recorded the
  first time, and a point that reached progress.json but not the record (the trainer died in between) is fed
  before the next one. Once a decision is recorded it stands: the trainer stops at once on a restart.

What the pruner compares a trial with is the study as the store holds it at that evaluation: the trials that
have reported that step by then. With several trials in flight, that set depends on how fast they run
(asynchronous successive halving); with `parallel: 1` every decision is a function of the sweep alone.

Objective: the sweep's `select` metric and direction, from the evaluator's eval.json (all held-out rows) for a
finished trial, and from the trainer's eval loop (finesweep.spec.INTERMEDIATE_METRICS) during training. A trial
that breaks a `select` guardrail is told to Optuna as complete with the worst objective value of the study so
far (at least as bad as its own): the sampler learns to avoid its region, which a FAIL would hide from TPE. A
pruned trial is never eligible as best (finesweep.selection). A suggestion equal to an existing trial (same
resolved config, so same trial id) is recorded as an alias of that trial: it is not run again, and takes that
trial's state and value. A trial that had already trained when it was asked (a study started over in the same
store) gets the points of its progress.json as intermediate values when its record is created; no trainer
will report them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

from .spec import (INTERMEDIATE_METRICS, Guardrail, Hyper, Param, PruneSpec, SelectSpec, StartRef, Sweep, SweepError,
                   TrialSpec, tie_value, to_dict, trial_from_dict)
from .store import (ArtifactStore, SETTLED, StoreError, TrialState, read_monitor, read_progress, status_of,
                    trial_prefix, write_monitor)

log = logging.getLogger("finesweep")
RECORDS = "search/trials"
STUDY = "search/study.json"
# Intermediate values from the trainers' eval loop (TRL metric names), per objective.
EVAL_LOOP = {"heldout_loss": ("eval_loss", lambda v: v), "heldout_perplexity": ("eval_loss", math.exp),
             "heldout_dpo_loss": ("eval_loss", lambda v: v),
             "preference_accuracy": ("eval_rewards/accuracies", lambda v: v)}
assert all(m in EVAL_LOOP for ms in INTERMEDIATE_METRICS.values() for m in ms)


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def seed_for(seed: int, number: int) -> int:
    """The sampler seed for trial `number`: a function of the search seed and the number only."""
    return int.from_bytes(hashlib.sha256(f"finesweep-search:{seed}:{number}".encode()).digest()[:4], "big")


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars: a module set becomes 'q_proj+v_proj'."""
    return "+".join(value) if isinstance(value, (tuple, list)) else value


def distributions(sweep: Sweep) -> dict:
    optuna = _optuna()
    d = optuna.distributions
    out = {}
    for p in sweep.search.space:
        if p.kind == "float":
            out[p.key] = d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.kind == "int":
            out[p.key] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        elif p.kind == "choice":
            out[p.key] = d.CategoricalDistribution([_encode(c) for c in p.choices])
    return out


def hyper_from_params(sweep: Sweep, params: dict) -> Hyper:
    """defaults + the suggested values + ties (alpha = factor * r)."""
    values = {}
    for p in sweep.search.space:
        if p.kind == "choice":
            values[p.key] = p.choices[[_encode(c) for c in p.choices].index(params[p.key])]
        elif p.kind in ("int", "float"):
            values[p.key] = params[p.key]
    hyper = dataclasses.replace(sweep.search.base, **values)
    ties = {p.key: tie_value(p, getattr(hyper, p.times)) for p in sweep.search.space if p.kind == "tie"}
    return dataclasses.replace(hyper, **ties)


def fingerprint(sweep: Sweep, start: StartRef | None) -> str:
    """What the study's records depend on: a changed search (space, method, seed, defaults, fixed trials, prune,
    objective) is a different study."""
    body = {"search": to_dict(sweep.search), "prune": to_dict(sweep.prune), "select": to_dict(sweep.select),
            "fixed": [s.trial_id for s in sweep.trial_specs(start)]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Row:
    """One trial of the study as the engine and the report see it."""

    number: int
    name: str
    trial_id: str
    origin: str  # trials (the sweep's own list) | search (suggested)
    params: dict
    state: str  # Optuna's view: running | complete | pruned | fail
    value: float | None  # what Optuna was told (the worst value for a guardrail breaker)
    objective: float | None  # the trial's own objective value
    infeasible: str | None  # the broken guardrail
    intermediate: dict  # {examples: value} reported to the pruner
    alias_of: int | None
    pruned_at: int | None  # examples
    steps: int | None  # optimizer steps trained
    examples: int | None  # training examples seen


class StoredStudy:
    """The study as the store holds it: the records, each trial's Optuna state and value, the Optuna study they
    describe and its pruner. What the engine (`Search`) and the trainers (`decide_at_evaluation`) share; it
    needs no Sweep, so a trainer rebuilds it from the pieces its monitor.json carries (`plan()`)."""

    def __init__(self, store: ArtifactStore, name: str, select: SelectSpec, prune: PruneSpec | None,
                 references: list[TrialSpec], fingerprint: str, dists: dict | None = None):
        self.store, self.name, self.select, self.prune = store, name, select, prune
        self.references, self.fingerprint, self._dists = references, fingerprint, dists
        self.direction = "maximize" if select.mode == "max" else "minimize"

    # --------------------------------------------------------------------------- serialised for a trainer
    def distributions(self) -> dict:
        return self._dists

    def plan(self, number: int) -> dict:
        """What rebuilding this study needs, for trial `number`'s monitor.json (JSON)."""
        optuna = _optuna()
        return {"sweep": self.name, "number": number, "fingerprint": self.fingerprint,
                "select": to_dict(self.select), "prune": to_dict(self.prune),
                "distributions": {k: optuna.distributions.distribution_to_json(d)
                                  for k, d in sorted(self.distributions().items())},
                "references": [to_dict(s) for s in self.references]}

    @classmethod
    def from_plan(cls, store: ArtifactStore, plan: dict) -> "StoredStudy":
        optuna = _optuna()
        sel = plan["select"]
        select = SelectSpec(sel["metric"], sel["mode"], sel["tie_break"],
                            tuple(Guardrail(**g) for g in sel.get("guardrails") or ()))
        prune = PruneSpec(**plan["prune"]) if plan.get("prune") else None
        dists = {k: optuna.distributions.json_to_distribution(v) for k, v in plan["distributions"].items()}
        return cls(store, plan["sweep"], select, prune, [trial_from_dict(s) for s in plan["references"]],
                   plan["fingerprint"], dists)

    # ------------------------------------------------------------------------------------------ records
    def _key(self, number: int) -> str:
        return f"{self.name}/{RECORDS}/{number:05d}.json"

    def stored_fingerprint(self) -> str | None:
        key = f"{self.name}/{STUDY}"
        try:
            return self.store.read_json(key)["fingerprint"] if self.store.exists(key) else None
        except StoreError:
            return None

    def records(self) -> list[dict]:
        keys = [k for k in self.store.list(f"{self.name}/{RECORDS}/") if k.endswith(".json")]
        recs = [self.store.read_json(k) for k in keys]
        recs.sort(key=lambda r: r["number"])
        if [r["number"] for r in recs] != list(range(len(recs))):
            raise StoreError(f"{self.store.url}/{self.name}/{RECORDS}: trial records are not numbered 0..n-1")
        return recs

    def _write(self, rec: dict) -> None:
        self.store.write_json(self._key(rec["number"]), rec)

    def spec_of(self, rec: dict) -> TrialSpec:
        return trial_from_dict(rec["spec"])

    # --------------------------------------------------------------------------------------- the study
    def _objective(self, spec: TrialSpec, refs: dict) -> tuple[float | None, str | None]:
        """(objective value, broken guardrail or None) of a finished trial, from its eval.json."""
        from . import selection

        prefix = trial_prefix(spec.sweep, spec.trial_id)
        row = {"name": spec.name, "trial_id": spec.trial_id, "stage": spec.stage, "state": "done",
               "eval": self.store.read_json(f"{prefix}/eval.json")}
        value = selection.value_of(row, self.select.metric)
        if value is None or not math.isfinite(value):
            return None, None
        reason = selection._ineligible_reason(row, self.select, refs)  # the guardrails' one implementation
        return value, reason

    def _refs(self) -> dict:
        refs = {}
        for spec in self.references:
            if status_of(self.store, spec).done:
                refs[spec.name] = {"name": spec.name, "stage": "base", "state": "done",
                                   "eval": self.store.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/eval.json")}
        return refs

    def rows(self, records: list[dict] | None = None, spent: bool = True) -> list[Row]:
        """Each record with its Optuna state and value, derived from the store (number order). `spent`: also
        read the steps and examples each trial used (the report; a decision does not need them)."""
        records = self.records() if records is None else records
        refs = self._refs() if self.select.guardrails else {}
        rows: list[Row] = []
        worst = None
        for rec in records:
            spec = self.spec_of(rec)
            intermediate = {int(k): v for k, v in rec.get("intermediate", {}).items()}
            objective = infeasible = None
            steps = examples = None
            if rec.get("alias_of") is not None:
                src = rows[rec["alias_of"]]
                state, value, objective, infeasible = src.state, src.value, src.objective, src.infeasible
                intermediate, pruned_at = src.intermediate, src.pruned_at
            else:
                status = status_of(self.store, spec)
                pruned_at = (rec.get("decision") or {}).get("pruned_at")
                value = None
                if pruned_at is not None or status.state is TrialState.PRUNED:
                    state = "pruned"
                    pruned_at = pruned_at if pruned_at is not None else max(intermediate, default=None)
                elif status.done:
                    objective, infeasible = self._objective(spec, refs)
                    state = "complete" if objective is not None else "fail"
                elif status.state is TrialState.FAILED:
                    state = "fail"
                else:
                    state = "running"
                if objective is not None:
                    worst = objective if worst is None else (max if self.direction == "minimize" else min)(
                        worst, objective)
                    value = worst if infeasible else objective
                if spent:
                    steps, examples = self._spent(spec)
            rows.append(Row(rec["number"], spec.name, spec.trial_id, rec["origin"], rec["params"], state, value,
                            objective, infeasible, intermediate, rec.get("alias_of"), pruned_at, steps, examples))
        return rows

    def _spent(self, spec: TrialSpec) -> tuple[int | None, int | None]:
        """Optimizer steps and training examples a trial used (train.json, else its progress so far)."""
        prefix = trial_prefix(spec.sweep, spec.trial_id)
        try:
            if self.store.exists(f"{prefix}/train.json"):
                train = self.store.read_json(f"{prefix}/train.json")
                batch = train.get("global_batch") or spec.hyper.batch_size * spec.hyper.grad_accum
                return train["steps"], train["steps"] * batch
        except StoreError:
            pass
        progress = read_progress(self.store, spec.sweep, spec.trial_id) or {}
        points = progress.get("points") or []
        if points:
            return points[-1]["step"], points[-1]["examples_seen"]
        return None, None

    def study(self, records: list[dict] | None = None, number: int | None = None, rows: list[Row] | None = None,
              sampler=None):
        """The Optuna study the records describe (with `sampler`, else one that suggests nothing here)."""
        optuna = _optuna()
        records = self.records() if records is None else records
        rows = self.rows(records, spent=False) if rows is None else rows
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name=self.name,
                                    direction=self.direction,
                                    sampler=sampler or optuna.samplers.RandomSampler(seed=0),
                                    pruner=self._pruner())
        dists = self.distributions()
        states = {"running": optuna.trial.TrialState.RUNNING, "complete": optuna.trial.TrialState.COMPLETE,
                  "pruned": optuna.trial.TrialState.PRUNED, "fail": optuna.trial.TrialState.FAIL}
        for rec, row in zip(records, rows):
            trial = optuna.trial.create_trial(
                state=states[row.state], value=row.value if row.state == "complete" else None,
                params=rec["params"], distributions={k: dists[k] for k in rec["params"]},
                system_attrs=rec.get("system_attrs", {}), user_attrs={"trial_id": row.trial_id, "name": row.name},
                intermediate_values=row.intermediate)
            study.add_trial(trial)
        return study

    def _pruner(self):
        optuna = _optuna()
        p = self.prune
        if p is None:
            return optuna.pruners.NopPruner()
        if p.method == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=0, interval_steps=1)
        if p.method == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_examples,
                                                          reduction_factor=p.reduction_factor)
        return optuna.pruners.HyperbandPruner(min_resource=p.min_examples, max_resource=p.max_examples or "auto",
                                              reduction_factor=p.reduction_factor)

    # ------------------------------------------------------------------------- the decision of a trial
    def decide(self, number: int, trial_id: str, examples: int, value: float | None,
               earlier: list[tuple[int, float]] = ()) -> dict | None:
        """Report trial `number`'s value at `examples` (after any `earlier` points its record lacks) and ask
        the pruner; record value, pruner attributes and decision in the trial's record. Returns the decision
        ({"pruned_at": examples, "value": ...}) or None. Called only by that trial's trainer, the record's one
        writer after `Search.ask`. A decision already recorded stands; a step at or below the last one reported
        (a resumed trainer evaluating again) is not reported twice."""
        stored = self.stored_fingerprint()
        if stored != self.fingerprint:
            raise StoreError(f"{self.store.url}/{self.name}/{STUDY}: the study in the store ({stored}) is not the "
                             f"one trial {trial_id} was asked for ({self.fingerprint})")
        records = self.records()
        if number >= len(records) or self.spec_of(records[number]).trial_id != trial_id:
            raise StoreError(f"{self.store.url}/{self._key(number)}: not the record of trial {trial_id}")
        rec = records[number]
        if rec.get("decision"):
            return rec["decision"]
        optuna = _optuna()
        last = max((int(k) for k in rec.get("intermediate", {})), default=-1)
        todo = {e: v for e, v in earlier if v is not None and last < e < examples}
        if value is not None:
            todo[examples] = value
        for step in sorted(s for s in todo if s > last):
            rows = self.rows(records, spent=False)
            # It is reporting, so it is running, whatever a stale status may say.
            rows[number] = dataclasses.replace(rows[number], state="running", value=None)
            study = self.study(records, rows=rows)
            tid = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            trial = optuna.trial.Trial(study, tid)
            trial.report(todo[step], step)
            prune = trial.should_prune()
            rec["system_attrs"] = dict(study._storage.get_trial(tid).system_attrs)
            rec.setdefault("intermediate", {})[str(step)] = todo[step]
            if prune:
                rec["decision"] = {"pruned_at": step, "value": todo[step]}
            self._write(rec)
            if prune:
                break
        return rec.get("decision")

    def recorded_decision(self, number: int, trial_id: str) -> dict | None:
        """Trial `number`'s recorded pruning decision (None when it has none, or the record is not its own)."""
        try:
            rec = self.store.read_json(self._key(number))
        except StoreError:
            return None
        if self.spec_of(rec).trial_id != trial_id:
            return None
        return rec.get("decision")


def _point_value(point_metrics: dict, metric: str) -> float | None:
    name, transform = EVAL_LOOP[metric]
    raw = point_metrics.get(name)
    if raw is None or not math.isfinite(raw):
        return None
    return transform(raw)


def decide_at_evaluation(store: ArtifactStore, monitor: dict, trial_id: str, examples: int,
                         metrics: dict) -> dict | None:
    """The pruning decision at one held-out evaluation of a monitored trial, made by its trainer's main
    process: the study rebuilt from the store (monitor["study"]), the objective at `examples` reported to the
    trial, the pruner asked, and value, pruner attributes and decision recorded in the trial's record.
    `metrics` are the eval loop's figures at that point (TRL names). Points of progress.json the record lacks
    (the trainer died between writing the two) are reported first, in order. Returns the decision
    ({"pruned_at": examples, "value": objective}), also when recorded earlier, or None to train on. A monitor
    written before decisions moved to the trainer (no "study") decides nothing."""
    plan = monitor.get("study")
    if not plan or not plan.get("prune"):
        return None
    study = StoredStudy.from_plan(store, plan)
    progress = read_progress(store, plan["sweep"], trial_id) or {}
    earlier = [(p["examples"], _point_value(p.get("metrics") or {}, study.select.metric))
               for p in progress.get("points") or []]
    return study.decide(plan["number"], trial_id, examples, _point_value(metrics, study.select.metric), earlier)


def recorded_decision(store: ArtifactStore, monitor: dict, trial_id: str) -> dict | None:
    """The pruning decision already in the trial's record (a trainer restarted after it was pruned), or None."""
    plan = monitor.get("study")
    if not plan:
        return None
    return StoredStudy.from_plan(store, plan).recorded_decision(plan["number"], trial_id)


class Search(StoredStudy):
    """The engine's side of the study: asks for trials (the sweep's own first, then the sampler's), lists the
    ones to run and reports; the trainers make the pruning decisions (`decide_at_evaluation`)."""

    def __init__(self, sweep: Sweep, store: ArtifactStore, start: StartRef | None = None):
        if sweep.search is None:
            raise ValueError(f"sweep {sweep.name} has no search: block")
        super().__init__(store, sweep.name, sweep.select, sweep.prune, sweep.reference_specs(start),
                         fingerprint(sweep, start))
        self.sweep, self.start = sweep, start
        self.fixed = sweep.trial_specs(start)
        self._check_fingerprint()

    def distributions(self) -> dict:
        if self._dists is None:
            self._dists = distributions(self.sweep)
        return self._dists

    def _check_fingerprint(self) -> None:
        stored = self.stored_fingerprint()
        if stored is None:
            self.store.write_json(f"{self.name}/{STUDY}", {"fingerprint": self.fingerprint, "sweep": self.name})
        elif stored != self.fingerprint:
            raise SweepError(self.sweep.source, "search", f"differs from the search already in store {self.store.url} "
                             f"for sweep {self.name!r} (space, method, seed, defaults, trials, prune or select "
                             "changed), and its records would not fit the new one",
                             f"give the sweep a new `name:`, or delete {self.name}/search/ in the store to "
                             "start the study over (trained trials are kept and reused)")

    def trial_specs(self) -> list[TrialSpec]:
        """Every distinct trial of the study, in number order (the sweep's own trials first)."""
        seen, out = set(), []
        for spec in [*self.fixed, *(self.spec_of(r) for r in self.records() if r.get("alias_of") is None)]:
            if spec.trial_id not in seen:
                seen.add(spec.trial_id)
                out.append(spec)
        return out

    def study(self, records: list[dict] | None = None, number: int | None = None, rows: list[Row] | None = None,
              sampler=None):
        """The Optuna study the records describe, with the sampler trial `number` is suggested with."""
        records = self.records() if records is None else records
        if sampler is None:
            sampler = self._sampler(len(records) if number is None else number)
        return super().study(records, rows=rows, sampler=sampler)

    def _sampler(self, number: int):
        optuna = _optuna()
        s = self.sweep.search
        if s.method == "grid":
            # The grid's order is a shuffle by the seed, so every instance must use the same one; its only other
            # random choice (among unvisited points) starts from the same state in every fresh instance.
            space = {k: list(d.choices) for k, d in self.distributions().items()}
            return optuna.samplers.GridSampler(space, seed=s.seed)
        if s.method == "random":
            return optuna.samplers.RandomSampler(seed=seed_for(s.seed, number))
        return optuna.samplers.TPESampler(seed=seed_for(s.seed, number), n_startup_trials=s.startup_trials,
                                          constant_liar=s.parallel > 1)

    def budget(self) -> int:
        s = self.sweep.search
        if s.method == "grid":  # a grid has only so many points; beyond them it would repeat itself
            size = math.prod(len(p.choices) for p in s.space if p.kind == "choice")
            return min(s.budget, len(self.fixed) + size)
        return s.budget

    # -------------------------------------------------------------------------------------- decisions
    def monitor_of(self, number: int) -> dict:
        """Trial `number`'s monitor.json: when to evaluate, and the study its trainer decides in."""
        p = self.prune
        return {"every_examples": p.every_examples, "min_examples": p.min_examples,
                "objective": self.select.metric, "study": self.plan(number)}

    def ensure_monitor(self, spec: TrialSpec) -> None:
        """Rewrite an unsettled trial's monitor.json if it lacks what its trainer now decides with (a study
        asked by an engine from before decisions moved to the trainer), so that a trainer (re)started for it
        decides at its evaluations. A trial without a monitor was not to be monitored: left so."""
        current = read_monitor(self.store, spec.sweep, spec.trial_id)
        if self.prune is None or current is None:
            return
        number = next((r["number"] for r in self.records() if r.get("alias_of") is None and
                       self.spec_of(r).trial_id == spec.trial_id), None)
        if number is not None and current != self.monitor_of(number):
            write_monitor(self.store, spec.sweep, spec.trial_id, self.monitor_of(number))

    def ask(self) -> tuple[TrialSpec, bool] | None:
        """The next trial of the study: (spec, whether it needs running), or None when the budget is spent.
        The sweep's own trials come first, in file order; then the sampler's suggestions. Writes the trial's
        monitor.json (when the sweep prunes), then its record; after this the engine leaves the record to the
        trial's trainer."""
        records = self.records()
        number = len(records)
        if number >= self.budget():
            return None
        dists = self.distributions()
        if number < len(self.fixed):
            spec, origin, system_attrs = self.fixed[number], "trials", {}
            params = {}
            for key, dist in dists.items():  # the values the space can express (others stay out of the study)
                value = _encode(getattr(spec.hyper, key))
                try:
                    if dist._contains(dist.to_internal_repr(value)):
                        params[key] = value
                except (ValueError, TypeError):
                    pass
        else:
            study = self.study(records, number)
            trial = study.ask(fixed_distributions=dists)
            frozen = study._storage.get_trial(trial._trial_id)
            params, system_attrs, origin = dict(frozen.params), dict(frozen.system_attrs), "search"
            hyper = hyper_from_params(self.sweep, params)
            spec = TrialSpec(self.sweep.name, self.sweep.stage, f"s{number:03d}", self.sweep.model,
                             self.sweep.dataset, self.sweep.prompt_format, self.sweep.max_length, hyper,
                             self.sweep.eval, self.start)
        alias = next((r["number"] for r in records if r.get("alias_of") is None and
                      r["spec"] and self.spec_of(r).trial_id == spec.trial_id), None)
        rec = {"number": number, "origin": origin, "spec": to_dict(spec), "params": params,
               "system_attrs": system_attrs, "intermediate": {}, "decision": None, "alias_of": alias}
        status = status_of(self.store, spec)
        if alias is None and self.prune is not None:
            if status.trained or status.settled:
                # Trained before this study asked for it: no trainer will report its points, so the record
                # starts with them (the report's curves; a median pruner's comparison set).
                progress = read_progress(self.store, spec.sweep, spec.trial_id) or {}
                for point in sorted(progress.get("points") or [], key=lambda p: p["examples"]):
                    value = _point_value(point.get("metrics") or {}, self.select.metric)
                    if value is not None:
                        rec["intermediate"].setdefault(str(point["examples"]), value)
            else:
                write_monitor(self.store, spec.sweep, spec.trial_id, self.monitor_of(number))
        self._write(rec)
        if alias is not None:
            log.info("search %s: trial %d suggests the config of trial %d (%s): not run again", self.name,
                     number, alias, spec.trial_id)
        else:
            log.info("search %s: trial %d = %s (%s) %s", self.name, number, spec.name, spec.trial_id,
                     json.dumps(params, sort_keys=True, default=str))
        return spec, alias is None and not status.settled

    def decisions(self) -> list[tuple[TrialSpec, int, float]]:
        """[(spec, examples, value)] of every pruning decision the trainers have recorded, in number order."""
        return [(self.spec_of(r), r["decision"]["pruned_at"], r["decision"]["value"]) for r in self.records()
                if r.get("alias_of") is None and r.get("decision")]

    def unsettled(self) -> list[TrialSpec]:
        """Trials of the study not finished in the store (running, or to be started)."""
        out = []
        for rec in self.records():
            if rec.get("alias_of") is None:
                spec = self.spec_of(rec)
                if not status_of(self.store, spec).state in SETTLED:
                    out.append(spec)
        return out

    def best_so_far(self, rows: list[Row] | None = None) -> list[dict]:
        """Per trial in number order: examples and steps spent so far (every trial, pruned ones included) and
        the best objective of the complete, feasible trials so far."""
        rows = self.rows() if rows is None else rows
        better = max if self.direction == "maximize" else min
        best, steps, examples, out = None, 0, 0, []
        for row in rows:
            if row.alias_of is None:
                steps += row.steps or 0
                examples += row.examples or 0
            if row.state == "complete" and not row.infeasible and row.objective is not None:
                best = row.objective if best is None else better(best, row.objective)
            out.append({"number": row.number, "name": row.name, "steps": steps, "examples": examples, "best": best})
        return out
