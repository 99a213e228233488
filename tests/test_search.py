"""Search and early stopping (finesweep.search, submitter/search_loop.py, trainer/progress.py).

The engine tests drive the real loop, Optuna samplers and pruners against a simulated backend (held-out curves
computed from the hyperparameters, written to the store point by point, honouring stop requests), so they take
seconds; one test runs a real local search of tiny trials end to end.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import yaml

from finesweep.search import Search
from finesweep.spec import SweepError, parse_sweep
from finesweep.store import (DONE, LocalStore, TrialState, end_attempt, read_progress, read_status, start_attempt,
                             stop_request, trial_prefix, write_progress)
from submitter.search_loop import run_search

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
    """Trials whose held-out loss is a function of lr and r: one evaluation point per wait() tick, a stop request
    honoured at the next point, then eval.json and _DONE (or the attempt closed as pruned)."""

    name = "sim"

    def __init__(self, store, points: int = 4, every: int = 16):
        self.store, self.points, self.every = store, points, every
        self.running: dict[str, tuple] = {}
        self.scheduled: list[str] = []

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

    def request_stop(self, spec, examples, value):
        from submitter.search_loop import request_stop_in_store

        request_stop_in_store(self.store, spec, examples, value)

    def wait(self, seconds):
        for tid, (spec, points) in list(self.running.items()):
            examples = self.every * (len(points) + 1)
            points.append({"examples": examples, "examples_seen": examples, "step": examples // 4,
                           "metrics": {"eval_loss": self.loss(spec.hyper, examples)}})
            write_progress(self.store, spec.sweep, tid, {"points": points})
            if stop_request(self.store, spec.sweep, tid) is not None:
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
    run_search(sweep, whole, SimulatedBackend(whole), poll_s=0)
    uninterrupted = _history(whole, sweep)
    assert len(uninterrupted) == 9 and uninterrupted[0][1] == sweep.trial_specs()[0].trial_id
    states = {h[2] for h in uninterrupted}
    assert {"complete", "pruned"} <= states, "the simulated search must exercise the pruner"
    assert len({h[3] for h in uninterrupted}) > 5, "suggestions must differ from one another"

    parts = LocalStore(tmp_path / "parts")
    for k in (3, 2):  # interrupt after 3 trials, then after 2 more, each time a fresh engine over the store
        run_search(sweep, parts, SimulatedBackend(parts), poll_s=0, max_new=k)
    assert _history(parts, sweep)[:5] == uninterrupted[:5]
    run_search(sweep, parts, SimulatedBackend(parts), poll_s=0)
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
    run_search(sweep, store, backend, poll_s=0)
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
    run_search(sweep, store, SimulatedBackend(store), poll_s=0)
    rows = [r for r in Search(sweep, store).rows() if r.state == "complete"]
    worst = max(r.objective for r in rows)
    for r in rows:
        assert (r.value == worst) if r.objective > 3.0 else (r.value == r.objective)
        assert bool(r.infeasible) == (r.objective > 3.0)


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
    """A real local search: tiny trials, two at a time, successive halving prunes the lr 1e-6 trial (the third:
    at the first rung it must beat the two trials before it), which ends pruned in status, selection and report."""
    from submitter.plan import SweepPlan
    from submitter.search_loop import submit_local

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
          parallel: 2
          space: {{lr: {{low: 1.0e-3, high: 5.0e-2, log: true}}}}
        prune: {{method: asha, every_examples: 2, min_examples: 2, reduction_factor: 3}}
    """))
    sweep = parse_sweep(raw, "test.yaml", "", "srch-e2e")
    store = LocalStore(tmp_path)
    assert submit_local(SweepPlan(sweep, None), store, str(tmp_path)) == 0
    stuck = sweep.trial_specs()[2]
    status = read_status(store, sweep.name, stuck.trial_id)
    assert status.state is TrialState.PRUNED and status.trained, "pruned: adapter saved, attempt closed as pruned"
    progress = read_progress(store, sweep.name, stuck.trial_id)
    assert progress["stopped"]["reason"] == "pruned" and progress["stopped"]["step"] < 4
    assert all("eval_loss" in p["metrics"] for p in progress["points"])
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
