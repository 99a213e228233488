"""Search and early stopping (finesweep.search, submitter/engine.py, trainer/progress.py).

The engine tests drive the real loop, Optuna samplers and pruners against a simulated backend (held-out curves
computed from the hyperparameters, written to the store point by point, each point followed by the pruning
decision the real trainer makes there, finesweep.search.decide_at_evaluation), so they take seconds; the
decision tests call that function directly; one test runs a real local search of tiny trials end to end.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import yaml

from finesweep.search import Search, decide_at_evaluation
from finesweep.spec import SweepError, parse_sweep
from finesweep.store import (DONE, LocalStore, TrialState, end_attempt, read_monitor, read_progress, read_status,
                             start_attempt, trial_prefix, write_progress)
from submitter.engine import run_sweep

from .conftest import FIXTURES, ROOT

BASE = f"""
stage: sft
model: build/tiny-llama
dataset: {{path: {FIXTURES}/datasets/databricks-dolly-15k, format: dolly, test_fraction: 0.2}}
eval: {{set: sft-open-questions, heldout_rows: 8}}
select: {{metric: heldout_loss}}
defaults: {{r: 4, alpha: 8, batch_size: 4, max_steps: 16}}
"""


def sweep_from(extra: str, name: str = "srch"):
    raw = yaml.safe_load(BASE + textwrap.dedent(extra))
    return parse_sweep(raw, "test.yaml", "", name)


class SimulatedBackend:
    """Trials whose held-out loss is a function of lr and r: one evaluation point per wait() tick, each followed by
    the trainer's pruning decision at that point (a pruned trial stops there: the attempt closed as pruned),
    then eval.json and _DONE."""

    name = "sim"

    def __init__(self, store, points: int = 4, every: int = 16):
        self.store, self.points, self.every = store, points, every
        self.running: dict[str, tuple] = {}
        self.scheduled: list[str] = []
        self.stopped_at: dict[str, int] = {}  # trial id -> examples of the evaluation it stopped at

    @staticmethod
    def loss(h, examples: int) -> float:
        return 2.0 + (math.log10(h.lr) + 3.0) ** 2 + 0.05 * h.r ** 0.5 + 1.5 / (1 + examples / 16)

    def schedule(self, spec):
        if spec.trial_id in self.running or read_status(self.store, spec.sweep, spec.trial_id).settled:
            return
        self.scheduled.append(spec.trial_id)
        start_attempt(self.store, spec.sweep, spec.trial_id, self.name)
        if not spec.trains:
            self._finish(spec, 5.0)
            return
        self.running[spec.trial_id] = (spec, [])

    def wait(self, seconds):
        for tid, (spec, points) in list(self.running.items()):
            examples = self.every * (len(points) + 1)
            point = {"examples": examples, "examples_seen": examples, "step": examples // 4,
                     "metrics": {"eval_loss": self.loss(spec.hyper, examples)}}
            points.append(point)
            write_progress(self.store, spec.sweep, tid, {"points": points})
            monitor = read_monitor(self.store, spec.sweep, tid)  # None: not monitored (no prune:), no callback
            if monitor and decide_at_evaluation(self.store, monitor, tid, examples, point["metrics"]) is not None:
                self.stopped_at[tid] = examples
                end_attempt(self.store, spec.sweep, tid, "pruned")
                del self.running[tid]
            elif len(points) == self.points:
                self._finish(spec, self.loss(spec.hyper, examples) - 0.01)
                del self.running[tid]

    def _finish(self, spec, value):
        prefix = trial_prefix(spec.sweep, spec.trial_id)
        self.store.write_json(f"{prefix}/eval.json", {"summary": {"heldout_loss": value}})
        self.store.write_json(f"{prefix}/{DONE}", {"files": {}})
        end_attempt(self.store, spec.sweep, spec.trial_id, "done")


SEARCH = """
trials:
  - {name: mine, lr: 1.0e-3}
search:
  method: tpe
  seed: 7
  budget: 9
  startup_trials: 3
  space:
    lr: {low: 1.0e-5, high: 1.0e-1, log: true}
    r: {choices: [2, 4, 8, 16]}
    alpha: {times: r, factor: 2}
prune: {method: asha, every_examples: 16, min_examples: 16, reduction_factor: 2}
"""


def _history(store, sweep):
    return [(r.number, r.trial_id, r.state, json.dumps(r.params, sort_keys=True)) for r in Search(sweep, store).rows()]


def test_resumed_search_suggests_what_an_uninterrupted_one_does(tmp_path):
    sweep = sweep_from(SEARCH)
    whole = LocalStore(tmp_path / "whole")
    run_sweep(sweep, whole, SimulatedBackend(whole), poll_s=0)
    uninterrupted = _history(whole, sweep)
    assert len(uninterrupted) == 9 and uninterrupted[0][1] == sweep.trial_specs()[0].trial_id
    states = {h[2] for h in uninterrupted}
    assert {"complete", "pruned"} <= states, "the simulated search must exercise the pruner"
    assert len({h[3] for h in uninterrupted}) > 5, "suggestions must differ from one another"

    parts = LocalStore(tmp_path / "parts")
    for k in (3, 2):  # interrupt after 3 trials, then after 2 more, each time a fresh engine over the store
        run_sweep(sweep, parts, SimulatedBackend(parts), poll_s=0, max_new=k)
    assert _history(parts, sweep)[:5] == uninterrupted[:5]
    run_sweep(sweep, parts, SimulatedBackend(parts), poll_s=0)
    assert _history(parts, sweep) == uninterrupted
    # the pruner's own state (successive halving rungs) was rebuilt, not recomputed differently
    rungs = lambda store: [r["system_attrs"] for r in Search(sweep, store).records()]  # noqa: E731
    assert rungs(parts) == rungs(whole)
    assert any("completed_rung_0" in attrs for attrs in rungs(whole))


def test_a_suggestion_equal_to_an_existing_trial_maps_to_it(tmp_path):
    sweep = sweep_from("""
        trials:
          - {name: mine, lr: 1.0e-3, r: 4}
        search:
          method: grid
          budget: 4
          space:
            lr: {choices: [1.0e-3, 1.0e-2]}
            r: {choices: [4]}
            alpha: {times: r, factor: 2}
    """)
    store = LocalStore(tmp_path)
    backend = SimulatedBackend(store)
    run_sweep(sweep, store, backend, poll_s=0)
    rows = Search(sweep, store).rows()
    assert len(rows) == 3, "1 listed trial + a grid of 2 (the budget of 4 is capped at the grid's size)"
    aliases = [r for r in rows if r.alias_of is not None]
    assert len(aliases) == 1 and aliases[0].alias_of == 0 and aliases[0].trial_id == rows[0].trial_id
    assert aliases[0].state == rows[0].state == "complete"
    trials = [t for t in backend.scheduled if t.startswith("sft-")]
    assert len(trials) == len(set(trials)) == 2, "the duplicate config is not run again"


def test_guardrail_breakers_are_told_the_worst_value(tmp_path):
    sweep = sweep_from(SEARCH.replace("budget: 9", "budget: 4").replace(
        "prune:", "select: {metric: heldout_loss, guardrails: [{metric: heldout_loss, max: 3.0}]}\nprune:"))
    store = LocalStore(tmp_path)
    run_sweep(sweep, store, SimulatedBackend(store), poll_s=0)
    rows = [r for r in Search(sweep, store).rows() if r.state == "complete"]
    worst = max(r.objective for r in rows)
    for r in rows:
        assert (r.value == worst) if r.objective > 3.0 else (r.value == r.objective)
        assert bool(r.infeasible) == (r.objective > 3.0)


def test_pruned_trials_stop_at_the_evaluation_that_decides(tmp_path):
    """Two trials in flight: every pruned trial stopped at the evaluation its decision was made at (a rung of
    successive halving), with no point after it, and its record holds that decision and the values up to it."""
    sweep = sweep_from(SEARCH.replace("startup_trials: 3", "startup_trials: 3\n  parallel: 2"))
    store = LocalStore(tmp_path)
    backend = SimulatedBackend(store)
    run_sweep(sweep, store, backend, poll_s=0)
    rows = {r.trial_id: r for r in Search(sweep, store).rows()}
    pruned = [r for r in rows.values() if r.state == "pruned"]
    assert pruned and set(backend.stopped_at) == {r.trial_id for r in pruned}
    for row in pruned:
        rungs = [16 * 2 ** k for k in range(3)]  # min_examples 16, reduction factor 2
        assert row.pruned_at == backend.stopped_at[row.trial_id] and row.pruned_at in rungs
        points = read_progress(store, sweep.name, row.trial_id)["points"]
        assert points[-1]["examples"] == row.pruned_at, "nothing is evaluated after the deciding evaluation"
        assert max(row.intermediate) == row.pruned_at
        assert read_status(store, sweep.name, row.trial_id).state is TrialState.PRUNED


DECIDE = """
trials:
  - {name: a, lr: 1.0e-3}
  - {name: b, lr: 2.0e-3}
  - {name: c, lr: 3.0e-3}
search:
  method: random
  budget: 3
  space:
    lr: {low: 1.0e-5, high: 1.0e-1, log: true}
prune: {method: asha, every_examples: 8, min_examples: 16, reduction_factor: 2}
"""


def _replay(store, sweep, curves: dict[int, dict[int, float]]) -> tuple[list, list]:
    """Ask for every trial, then feed each its curve {examples: eval_loss} point by point through the trainer's
    decision, trial after trial (a finished trial gets eval.json and _DONE). Returns ([(number, examples,
    decision)], records)."""
    search = Search(sweep, store)
    specs = [search.ask()[0] for _ in curves]
    decisions = []
    for number, curve in curves.items():
        spec = specs[number]
        start_attempt(store, sweep.name, spec.trial_id, "sim")
        monitor = read_monitor(store, sweep.name, spec.trial_id)
        points, decision = [], None
        for examples, loss in sorted(curve.items()):
            points.append({"examples": examples, "examples_seen": examples, "step": examples // 4,
                           "metrics": {"eval_loss": loss}})
            write_progress(store, sweep.name, spec.trial_id, {"points": points})
            decision = decide_at_evaluation(store, monitor, spec.trial_id, examples, {"eval_loss": loss})
            decisions.append((number, examples, decision))
            if decision is not None:
                end_attempt(store, sweep.name, spec.trial_id, "pruned")
                break
        if decision is None:
            prefix = trial_prefix(sweep.name, spec.trial_id)
            store.write_json(f"{prefix}/eval.json", {"summary": {"heldout_loss": curve[max(curve)]}})
            store.write_json(f"{prefix}/{DONE}", {"files": {}})
            end_attempt(store, sweep.name, spec.trial_id, "done")
    return decisions, Search(sweep, store).records()


GOOD = {16: 3.0, 24: 2.8, 32: 2.6, 40: 2.5}


def test_the_same_progress_gives_the_same_decision_at_the_same_step(tmp_path):
    sweep = sweep_from(DECIDE)
    curves = {0: GOOD, 1: {e: v - 0.05 for e, v in GOOD.items()}, 2: {16: 3.5, 24: 3.4, 32: 3.3, 40: 3.2}}
    first = _replay(LocalStore(tmp_path / "one"), sweep, curves)
    second = _replay(LocalStore(tmp_path / "two"), sweep, curves)
    assert first == second, "same data, fresh store: same decisions at the same steps, same records"
    decisions, records = first
    assert [d for d in decisions if d[2] is not None] == [(2, 16, {"pruned_at": 16, "value": 3.5})]
    assert records[2]["decision"] == {"pruned_at": 16, "value": 3.5} and records[2]["intermediate"] == {"16": 3.5}
    assert records[0]["system_attrs"] == {"completed_rung_0": 3.0, "completed_rung_1": 2.6}
    assert records[2]["system_attrs"] == {"completed_rung_0": 3.5}


def test_the_decision_is_taken_at_the_evaluation_where_the_value_crosses(tmp_path):
    """Trial c is the best at the first rung (16) and falls behind at 24 (not a rung: successive halving looks
    at rungs only) and at the second rung (32): it is pruned by the call for 32, not at a later one."""
    sweep = sweep_from(DECIDE)
    curves = {0: GOOD, 1: {e: v - 0.05 for e, v in GOOD.items()}, 2: {16: 2.9, 24: 2.95, 32: 3.0, 40: 3.1}}
    decisions, records = _replay(LocalStore(tmp_path), sweep, curves)
    assert [(e, d) for n, e, d in decisions if n == 2] == [(16, None), (24, None), (32, {"pruned_at": 32,
                                                                                         "value": 3.0})]
    assert records[2]["intermediate"] == {"16": 2.9, "24": 2.95, "32": 3.0}
    assert records[2]["system_attrs"] == {"completed_rung_0": 2.9, "completed_rung_1": 3.0}


def test_a_resumed_trainer_neither_reports_a_step_twice_nor_loses_one(tmp_path):
    """Preemption: the trainer restarts from a checkpoint and evaluates steps it already reported; the first
    report and decision stand. A point that reached progress.json but not the record is reported, in order,
    before the next one."""
    sweep = sweep_from(DECIDE)
    store = LocalStore(tmp_path)
    search = Search(sweep, store)
    spec = search.ask()[0]
    start_attempt(store, sweep.name, spec.trial_id, "sim")
    monitor = read_monitor(store, sweep.name, spec.trial_id)
    point = lambda e, v: {"examples": e, "examples_seen": e, "step": e // 4, "metrics": {"eval_loss": v}}  # noqa: E731
    write_progress(store, sweep.name, spec.trial_id, {"points": [point(16, 3.0)]})
    assert decide_at_evaluation(store, monitor, spec.trial_id, 16, {"eval_loss": 3.0}) is None
    before = Search(sweep, store).records()[0]
    # restarted before the checkpoint after 16: evaluates 16 again (another value: not reported again)
    assert decide_at_evaluation(store, monitor, spec.trial_id, 16, {"eval_loss": 9.0}) is None
    assert Search(sweep, store).records()[0] == before
    # 24 measured and written to progress.json, then the trainer died before recording it; it resumes after
    # the checkpoint at 24 and evaluates 32 next: 24 is reported first, then 32
    write_progress(store, sweep.name, spec.trial_id, {"points": [point(16, 3.0), point(24, 2.8)]})
    assert decide_at_evaluation(store, monitor, spec.trial_id, 32, {"eval_loss": 2.6}) is None
    rec = Search(sweep, store).records()[0]
    assert rec["intermediate"] == {"16": 3.0, "24": 2.8, "32": 2.6}
    assert rec["system_attrs"] == {"completed_rung_0": 3.0, "completed_rung_1": 2.6}
    # a recorded decision stands, whatever is reported after it
    rec["decision"] = {"pruned_at": 32, "value": 2.6}
    store.write_json(f"{sweep.name}/search/trials/00000.json", rec)
    assert decide_at_evaluation(store, monitor, spec.trial_id, 40, {"eval_loss": 1.0}) == rec["decision"]
    assert Search(sweep, store).records()[0] == rec


def test_a_monitor_carries_the_study_and_each_record_has_one_writer(tmp_path, monkeypatch):
    """What the trainer decides with comes from monitor.json and the store (no Sweep); after `ask` creates a
    record, only that trial's decisions write it (the loop writes no intermediate values)."""
    import finesweep.search as search_mod

    sweep = sweep_from(DECIDE)
    store = LocalStore(tmp_path / "ask")
    spec = Search(sweep, store).ask()[0]
    monitor = read_monitor(store, sweep.name, spec.trial_id)
    assert monitor["every_examples"] == 8 and monitor["min_examples"] == 16
    assert monitor["study"]["number"] == 0 and monitor["study"]["sweep"] == sweep.name
    assert monitor["study"]["prune"]["method"] == "asha" and "lr" in monitor["study"]["distributions"]
    assert json.loads(json.dumps(monitor)) == monitor

    writes, deciding = [], []
    real_write, real_decide = search_mod.StoredStudy._write, search_mod.StoredStudy.decide

    def write(self, rec):
        writes.append((rec["number"], bool(deciding), dict(rec.get("intermediate") or {})))
        return real_write(self, rec)

    def decide(self, *args, **kwargs):
        deciding.append(1)
        try:
            return real_decide(self, *args, **kwargs)
        finally:
            deciding.pop()

    monkeypatch.setattr(search_mod.StoredStudy, "_write", write)
    monkeypatch.setattr(search_mod.StoredStudy, "decide", decide)
    loop_store = LocalStore(tmp_path / "loop")
    run_sweep(sweep, loop_store, SimulatedBackend(loop_store), poll_s=0)
    for number in range(3):
        mine = [w for w in writes if w[0] == number]
        assert mine[0][1:] == (False, {}), "created empty by ask"
        assert mine[1:] and all(by_decision for _, by_decision, _ in mine[1:]), "then written by decisions only"


def test_a_trial_asked_by_an_older_engine_gets_a_monitor_its_trainer_decides_with(tmp_path):
    """A trial left unsettled with a monitor.json from before decisions moved to the trainer (no "study"): the
    loop that carries on rewrites it, so the restarted trainer decides at its evaluations."""
    sweep = sweep_from(DECIDE)
    store = LocalStore(tmp_path)
    search = Search(sweep, store)
    specs = [search.ask()[0] for _ in range(3)]
    for spec in specs:
        old = {k: v for k, v in read_monitor(store, sweep.name, spec.trial_id).items() if k != "study"}
        store.write_json(f"{trial_prefix(sweep.name, spec.trial_id)}/monitor.json", old)
    run_sweep(sweep, store, SimulatedBackend(store, every=8), poll_s=0)
    assert all(read_monitor(store, sweep.name, s.trial_id)["study"]["number"] == n for n, s in enumerate(specs))
    assert all(rec["intermediate"] for rec in Search(sweep, store).records()), "every trainer reported"


BAD = [
    ("search: {method: bayes, budget: 3, space: {lr: {low: 1.0e-5, high: 1.0e-3}}}", "search.method"),
    ("search: {budget: 0, space: {lr: {low: 1.0e-5, high: 1.0e-3}}}", "search.budget"),
    ("search: {budget: 3, space: {lr: {low: 1.0e-3, high: 1.0e-5}}}", "search.space.lr"),
    ("search: {budget: 3, space: {lr: {low: 1.0e-3, high: 1.0e-3}}}", "search.space.lr"),
    ("search: {budget: 3, space: {lr: {low: 0.0, high: 1.0e-3, log: true}}}", "search.space.lr.low"),
    ("search: {budget: 3, space: {lr: {low: 1.0e-5, high: 2.0}}}", "search.space.lr"),  # lr must stay below 1
    ("search: {budget: 3, space: {dropout: {choices: [0.0, 1.5]}}}", "search.space.dropout"),
    ("search: {budget: 3, space: {target_modules: {choices: [[q_proj], [qq_proj]]}}}", "search.space.target_modules"),
    ("search: {budget: 3, space: {r: {low: 0, high: 8}}}", "search.space.r"),
    ("search: {budget: 3, space: {lrr: {low: 1.0e-5, high: 1.0e-3}}}", "search.space.lrr"),
    ("search: {budget: 3, space: {alpha: {times: r, factor: 2}}}", "search.space"),
    ("search: {budget: 3, space: {lr: {choices: [1.0e-4]}, alpha: {times: rr}}}", "search.space.alpha.times"),
    ("search: {method: grid, budget: 3, space: {lr: {low: 1.0e-5, high: 1.0e-3}}}", "search.space.lr"),
    ("search: {budget: 3, space: {lr: {choices: [1.0e-4, 2.0e-4]}}}\nprune: {method: successive, every_examples: 8}",
     "prune.method"),
    ("search: {budget: 3, space: {lr: {choices: [1.0e-4, 2.0e-4]}}}\nprune: {method: asha}", "prune.every_examples"),
    ("search: {budget: 3, space: {lr: {choices: [1.0e-4, 2.0e-4]}}}\nprune: {method: asha, every_examples: 0}",
     "prune.every_examples"),
    ("trials: [{lr: 1.0e-4}]\nprune: {method: asha, every_examples: 8}", "prune"),
    ("trials: [{lr: 1.0e-4}, {lr: 2.0e-4}]\nsearch: {budget: 1, space: {lr: {choices: [1.0e-4, 3.0e-4]}}}",
     "search.budget"),
]


@pytest.mark.parametrize("extra,field", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_search_and_prune_values_fail_cleanly(extra, field):
    with pytest.raises(SweepError) as err:
        sweep_from(extra)
    assert err.value.field_path == field, str(err.value)
    assert err.value.fix and "Traceback" not in str(err.value)


def test_an_objective_not_measured_during_training_cannot_prune():
    with pytest.raises(SweepError) as err:
        sweep_from("select: {metric: bleu}\nsearch: {budget: 3, space: {lr: {choices: [1.0e-4, 2.0e-4]}}}\n"
                   "prune: {method: median, every_examples: 8}")
    assert err.value.field_path == "prune" and "not measured during training" in err.value.problem
    sweep_from("select: {metric: bleu}\nsearch: {budget: 3, space: {lr: {choices: [1.0e-4, 2.0e-4]}}}")  # no prune: fine


def test_local_search_prunes_and_reports(tmp_path, tiny_model, monkeypatch):
    """A real local search: tiny trials one at a time, successive halving prunes the lr 1e-6 trial (the third:
    at the first rung it must beat the two trials before it) at that very evaluation, and it ends pruned in
    status, selection and report. One at a time, because with two in flight the set a trial is compared with at
    a rung is whichever trials have reached it by then (asynchronous successive halving): whether `faster` is
    pruned by `fast` would depend on which reports first. Sequential, every decision is a function of the data."""
    from submitter.plan import SweepPlan
    from submitter.engine import submit_local

    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(textwrap.dedent(f"""
        stage: sft
        model: {tiny_model}
        dataset: {{path: {FIXTURES}/datasets/databricks-dolly-15k, format: dolly, test_fraction: 0.2}}
        max_length: 96
        eval: {{set: sft-open-questions, max_new_tokens: 2, batch_size: 12, heldout_rows: 4, bootstrap_samples: 20}}
        select: {{metric: heldout_loss}}
        defaults: {{r: 4, alpha: 8, dropout: 0.0, batch_size: 2, max_steps: 4, warmup_ratio: 0.0}}
        trials:
          - {{name: fast, lr: 2.0e-2}}
          - {{name: faster, lr: 3.0e-2}}
          - {{name: stuck, lr: 1.0e-6}}
        search:
          method: random
          budget: 3
          parallel: 1
          space: {{lr: {{low: 1.0e-3, high: 5.0e-2, log: true}}}}
        prune: {{method: asha, every_examples: 2, min_examples: 2, reduction_factor: 3}}
    """))
    sweep = parse_sweep(raw, "test.yaml", "", "srch-e2e")
    store = LocalStore(tmp_path)
    assert submit_local(SweepPlan(sweep, None), store, str(tmp_path))["failed"] == 0
    stuck = sweep.trial_specs()[2]
    status = read_status(store, sweep.name, stuck.trial_id)
    assert status.state is TrialState.PRUNED and status.trained, "pruned: adapter saved, attempt closed as pruned"
    progress = read_progress(store, sweep.name, stuck.trial_id)
    # decided at its first evaluation (2 examples = step 1 at batch 2, the first rung) and stopped right there
    assert progress["stopped"]["reason"] == "pruned" and progress["stopped"]["step"] == 1, progress["stopped"]
    assert progress["stopped"]["pruned_at"] == 2 and [p["step"] for p in progress["points"]] == [1]
    assert all("eval_loss" in p["metrics"] for p in progress["points"])
    records = Search(sweep, store).records()
    assert records[2]["decision"]["pruned_at"] == 2 and list(records[2]["intermediate"]) == ["2"]
    assert "completed_rung_0" in records[2]["system_attrs"]
    for rec in records[:2]:  # the trials before it reported the rung the stuck trial was compared at
        assert "completed_rung_0" in rec["system_attrs"]
        assert rec["system_attrs"]["completed_rung_0"] < records[2]["system_attrs"]["completed_rung_0"]
    assert Search(sweep, store).rows()[0].state == "complete", "the first trial has nothing to lose to at a rung"
    assert not store.exists(f"{trial_prefix(sweep.name, stuck.trial_id)}/eval.json"), "a pruned trial is not evaluated"
    best = store.read_json(f"{sweep.name}/best.json")
    assert best["trial_id"] != stuck.trial_id
    assert any(i["trial_id"] == stuck.trial_id and "pruned" in i["reason"] for i in best["ineligible"])
    board = store.read_json(f"{sweep.name}/report/leaderboard.json")
    row = next(r for r in board["rows"] if r["trial_id"] == stuck.trial_id)
    assert row["state"] == "pruned" and row["verdict"].startswith("ineligible: pruned")
    report = store.read_bytes(f"{sweep.name}/report/report.md").decode()
    assert "pruned (ineligible) | stuck" in report and "## Search" in report
    assert store.exists(f"{sweep.name}/report/heldout.png")
