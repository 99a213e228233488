"""Search and early stopping with Optuna, with the study kept in the artifact store (no torch, no database).

A search sweep's study is rebuilt from the store every time a decision is made: each trial of the study has a
record <sweep>/search/trials/<number>.json (its parameters, the distributions they came from, the sampler's and
pruner's attributes, the intermediate values the engine has consumed, a pruning decision), and its state and
final value come from the trial itself (finesweep.store.read_status, eval.json, progress.json). Nothing is kept
only in memory, so a restart (a controller pod rescheduled, a resubmit, a local re-run) loses nothing and re-runs
nothing, and a decision made after a restart is the decision an uninterrupted engine would have made:

- samplers: a fresh sampler per trial number, seeded from (search.seed, number). A seeded sampler re-created
  over a rebuilt study would otherwise start its random stream from the beginning again and suggest what it
  suggested for the first trial; per-number seeds make the n-th suggestion depend only on the seed and the
  study's first n trials.
- pruners: successive halving records each trial's value at each rung as trial system attributes
  (completed_rung_<k>) and Hyperband assigns brackets by crc32(study name + trial number); the records keep
  those attributes, the study is named after the sweep, and numbers are assigned in record order, so both
  pruners see exactly the study they would have seen. Intermediate values are fed to the pruner one evaluation
  point at a time, in order, so a decision does not depend on how often the engine looked.

Objective: the sweep's `select` metric and direction, from the evaluator's eval.json (all held-out rows) for a
finished trial, and from the trainer's eval loop (finesweep.spec.INTERMEDIATE_METRICS) during training. A trial
that breaks a `select` guardrail is told to Optuna as complete with the worst objective value of the study so
far (at least as bad as its own): the sampler learns to avoid its region, which a FAIL would hide from TPE. A
pruned trial is never eligible as best (finesweep.selection). A suggestion equal to an existing trial (same
resolved config, so same trial id) is recorded as an alias of that trial: it is not run again, and takes that
trial's state and value.

The engine is backend-agnostic: `Search.ask()` hands out the next trial spec to run, `Search.sync()` reads the
progress of running trials and returns the ones to stop (the caller writes the request through its backend),
`Search.unsettled()` lists the trials still to finish. submitter/search_loop.py drives it.
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

from .spec import (INTERMEDIATE_METRICS, Hyper, Param, StartRef, Sweep, SweepError, TrialSpec, tie_value, to_dict,
                   trial_from_dict)
from .store import (ArtifactStore, SETTLED, StoreError, TrialState, read_progress, read_status, trial_prefix,
                    write_monitor)

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
    intermediate: dict  # {examples: value} the engine consumed
    alias_of: int | None
    pruned_at: int | None  # examples
    steps: int | None  # optimizer steps trained
    examples: int | None  # training examples seen


class Search:
    def __init__(self, sweep: Sweep, store: ArtifactStore, start: StartRef | None = None):
        if sweep.search is None:
            raise ValueError(f"sweep {sweep.name} has no search: block")
        self.sweep, self.store, self.start = sweep, store, start
        self.fixed = sweep.trial_specs(start)
        self.select = sweep.select
        self.direction = "maximize" if self.select.mode == "max" else "minimize"
        self._check_fingerprint()

    # ------------------------------------------------------------------------------------------ records
    def _key(self, number: int) -> str:
        return f"{self.sweep.name}/{RECORDS}/{number:05d}.json"

    def _check_fingerprint(self) -> None:
        key = f"{self.sweep.name}/{STUDY}"
        mine = fingerprint(self.sweep, self.start)
        try:
            stored = self.store.read_json(key)["fingerprint"] if self.store.exists(key) else None
        except StoreError:
            stored = None
        if stored is None:
            self.store.write_json(key, {"fingerprint": mine, "sweep": self.sweep.name})
        elif stored != mine:
            raise SweepError(self.sweep.source, "search", f"differs from the search already in store {self.store.url} "
                             f"for sweep {self.sweep.name!r} (space, method, seed, defaults, trials, prune or select "
                             "changed), and its records would not fit the new one",
                             f"give the sweep a new `name:`, or delete {self.sweep.name}/search/ in the store to "
                             "start the study over (trained trials are kept and reused)")

    def records(self) -> list[dict]:
        keys = [k for k in self.store.list(f"{self.sweep.name}/{RECORDS}/") if k.endswith(".json")]
        recs = [self.store.read_json(k) for k in keys]
        recs.sort(key=lambda r: r["number"])
        if [r["number"] for r in recs] != list(range(len(recs))):
            raise StoreError(f"{self.store.url}/{self.sweep.name}/{RECORDS}: trial records are not numbered 0..n-1")
        return recs

    def _write(self, rec: dict) -> None:
        self.store.write_json(self._key(rec["number"]), rec)

    def spec_of(self, rec: dict) -> TrialSpec:
        return trial_from_dict(rec["spec"])

    def trial_specs(self) -> list[TrialSpec]:
        """Every distinct trial of the study, in number order (the sweep's own trials first)."""
        seen, out = set(), []
        for spec in [*self.fixed, *(self.spec_of(r) for r in self.records() if r.get("alias_of") is None)]:
            if spec.trial_id not in seen:
                seen.add(spec.trial_id)
                out.append(spec)
        return out

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
        for spec in self.sweep.reference_specs(self.start):
            if read_status(self.store, spec.sweep, spec.trial_id).done:
                refs[spec.name] = {"name": spec.name, "stage": "base", "state": "done",
                                   "eval": self.store.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/eval.json")}
        return refs

    def rows(self, records: list[dict] | None = None) -> list[Row]:
        """Each record with its Optuna state and value, derived from the store (number order)."""
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
                status = read_status(self.store, spec.sweep, spec.trial_id)
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

    def study(self, records: list[dict] | None = None, number: int | None = None, rows: list[Row] | None = None):
        """The Optuna study the records describe, with the sampler trial `number` is suggested with."""
        optuna = _optuna()
        records = self.records() if records is None else records
        rows = self.rows(records) if rows is None else rows
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name=self.sweep.name,
                                    direction=self.direction, sampler=self._sampler(len(records) if number is None
                                                                                    else number),
                                    pruner=self._pruner())
        dists = distributions(self.sweep)
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

    def _sampler(self, number: int):
        optuna = _optuna()
        s = self.sweep.search
        if s.method == "grid":
            # The grid's order is a shuffle by the seed, so every instance must use the same one; its only other
            # random choice (among unvisited points) starts from the same state in every fresh instance.
            space = {k: list(d.choices) for k, d in distributions(self.sweep).items()}
            return optuna.samplers.GridSampler(space, seed=s.seed)
        if s.method == "random":
            return optuna.samplers.RandomSampler(seed=seed_for(s.seed, number))
        return optuna.samplers.TPESampler(seed=seed_for(s.seed, number), n_startup_trials=s.startup_trials,
                                          constant_liar=s.parallel > 1)

    def _pruner(self):
        optuna = _optuna()
        p = self.sweep.prune
        if p is None:
            return optuna.pruners.NopPruner()
        if p.method == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=0, interval_steps=1)
        if p.method == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_examples,
                                                          reduction_factor=p.reduction_factor)
        return optuna.pruners.HyperbandPruner(min_resource=p.min_examples, max_resource=p.max_examples or "auto",
                                              reduction_factor=p.reduction_factor)

    def budget(self) -> int:
        s = self.sweep.search
        if s.method == "grid":  # a grid has only so many points; beyond them it would repeat itself
            size = math.prod(len(p.choices) for p in s.space if p.kind == "choice")
            return min(s.budget, len(self.fixed) + size)
        return s.budget

    # -------------------------------------------------------------------------------------- decisions
    def ask(self) -> tuple[TrialSpec, bool] | None:
        """The next trial of the study: (spec, whether it needs running), or None when the budget is spent.
        The sweep's own trials come first, in file order; then the sampler's suggestions."""
        records = self.records()
        number = len(records)
        if number >= self.budget():
            return None
        dists = distributions(self.sweep)
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
        if alias is None and self.sweep.prune is not None:
            write_monitor(self.store, spec.sweep, spec.trial_id, {"every_examples": self.sweep.prune.every_examples,
                                                                  "min_examples": self.sweep.prune.min_examples,
                                                                  "objective": self.select.metric})
        self._write(rec)
        if alias is not None:
            log.info("search %s: trial %d suggests the config of trial %d (%s): not run again", self.sweep.name,
                     number, alias, spec.trial_id)
        else:
            log.info("search %s: trial %d = %s (%s) %s", self.sweep.name, number, spec.name, spec.trial_id,
                     json.dumps(params, sort_keys=True, default=str))
        return spec, alias is None and not read_status(self.store, spec.sweep, spec.trial_id).settled

    def sync(self) -> list[tuple[TrialSpec, int, float]]:
        """Feed new evaluation points of running trials to the pruner, one point at a time in order. Returns
        [(spec, examples, value)] of the trials it decided to prune (still to be asked to stop)."""
        if self.sweep.prune is None:
            return []
        metric, transform = EVAL_LOOP[self.select.metric]
        optuna = _optuna()
        decisions = []
        records = self.records()
        for rec in records:
            if rec.get("alias_of") is not None or rec.get("decision"):
                continue
            spec = self.spec_of(rec)
            progress = read_progress(self.store, spec.sweep, spec.trial_id) or {}
            consumed = {int(k) for k in rec.get("intermediate", {})}
            fresh = [p for p in progress.get("points", []) if p["examples"] not in consumed and metric in p["metrics"]]
            for point in sorted(fresh, key=lambda p: p["examples"]):
                value = transform(point["metrics"][metric])
                rows = self.rows(records)
                row = rows[rec["number"]]
                # The pruner decides on a trial that is still running; a finished one's points are only recorded.
                live = row.state == "running"
                if live:
                    study = self.study(records, rows=rows)
                    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, rec["number"])
                    trial = optuna.trial.Trial(study, trial_id)
                    trial.report(value, point["examples"])
                    prune = trial.should_prune()
                    rec["system_attrs"] = dict(study._storage.get_trial(trial_id).system_attrs)
                else:
                    prune = False
                rec["intermediate"][str(point["examples"])] = value
                status = read_status(self.store, spec.sweep, spec.trial_id)
                if prune and not status.settled:
                    rec["decision"] = {"pruned_at": point["examples"], "value": value}
                    decisions.append((spec, point["examples"], value))
                self._write(rec)
                if rec["decision"]:
                    break
        return decisions

    def unsettled(self) -> list[TrialSpec]:
        """Trials of the study not finished in the store (running, to be started, or asked to stop)."""
        out = []
        for rec in self.records():
            if rec.get("alias_of") is None:
                spec = self.spec_of(rec)
                if not read_status(self.store, spec.sweep, spec.trial_id).state in SETTLED:
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
