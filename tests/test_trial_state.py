"""The one trial state (finesweep.store.read_status) and the attempts the store records, with the local
backend's retries on resubmit (the trainer and evaluator replaced by stubs: the rules, not the training)."""

from __future__ import annotations

import dataclasses

import pytest

from finesweep import store as st
from finesweep.store import LocalStore, TrialState, read_status
from submitter import engine, local
from submitter.plan import SweepPlan, load_plan

from .conftest import ROOT

SWEEP, TRIAL = "sft", "sft-0123456789"
PREFIX = f"{SWEEP}/{TRIAL}"


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def status(store):
    return read_status(store, SWEEP, TRIAL)


def test_states_in_order_of_what_the_store_holds(store):
    assert (status(store).state, status(store).attempt) == (TrialState.PENDING, 0)
    st.start_attempt(store, SWEEP, TRIAL, "local")
    assert (status(store).state, status(store).attempt) == (TrialState.RUNNING, 1)
    store.write_marker(f"{PREFIX}/{st.TRAINED}", {})
    assert status(store).state is TrialState.RUNNING and status(store).trained
    st.record_failure(store, SWEEP, TRIAL, "eval", "adapter corrupt", 3)
    s = status(store)
    assert (s.state, s.failure.phase, s.failure.exit_code, s.failure.attempt, s.failed_attempts) == \
        (TrialState.FAILED, "eval", 3, 1, 1)
    store.write_marker(f"{PREFIX}/{st.DONE}", {})
    assert status(store).state is TrialState.DONE and status(store).failure is None  # _DONE wins


def test_a_trial_done_under_other_eval_settings_is_evaluated_again_as_its_next_attempt(store):
    """_DONE records the evaluation it was written for; asked about other settings, the trial is trained (not
    done), next_action says EVALUATE once the done attempt is over, and start_attempt makes that attempt n+1
    (a new Job name on the cluster) that failures do not count against."""
    st.start_attempt(store, SWEEP, TRIAL, "local")
    store.write_marker(f"{PREFIX}/{st.TRAINED}", {})
    store.write_marker(f"{PREFIX}/{st.DONE}", {}, evaluation="eval-aaaaaaaaaa")
    st.end_attempt(store, SWEEP, TRIAL, "done")
    same = read_status(store, SWEEP, TRIAL, "eval-aaaaaaaaaa")
    assert (same.state, same.evaluation_stale, st.next_action(same, 3)) == (TrialState.DONE, False, st.NextAction.SKIP)
    assert st.evaluated_as(store, SWEEP, TRIAL) == "eval-aaaaaaaaaa"
    other = read_status(store, SWEEP, TRIAL, "eval-bbbbbbbbbb")
    assert (other.state, other.trained, other.done, other.evaluation_stale) == (TrialState.TRAINED, True, False, True)
    assert st.next_action(other, 3) is st.NextAction.EVALUATE
    assert status(store).state is TrialState.DONE  # without settings to compare, _DONE counts
    again = st.start_attempt(store, SWEEP, TRIAL, "k8s", job="sft-sft-0123456789-a2")
    again = read_status(store, SWEEP, TRIAL, "eval-bbbbbbbbbb")
    assert (again.state, again.attempt, again.failed_attempts) == (TrialState.RUNNING, 2, 0)
    assert st.next_action(again, 3) is st.NextAction.RUN  # under way: carried on, not started a third time
    store.write_marker(f"{PREFIX}/{st.DONE}", {}, evaluation="eval-bbbbbbbbbb")
    st.end_attempt(store, SWEEP, TRIAL, "done")
    assert read_status(store, SWEEP, TRIAL, "eval-bbbbbbbbbb").state is TrialState.DONE


def test_a_recreated_trial_with_an_old_failure_is_not_settled(store):
    """The bug of issue 11: the old _FAILED made a re-created trial count as finished, so a pipeline waiting on
    its sweep picked the best trial before the retry ran."""
    st.start_attempt(store, SWEEP, TRIAL, "k8s", job="sft-sft-0123456789")
    st.record_failure(store, SWEEP, TRIAL, "job", "OOMKilled", 137)
    assert status(store).settled
    retry = st.start_attempt(store, SWEEP, TRIAL, "k8s", job="sft-sft-0123456789-a2")
    assert (retry.state, retry.attempt, retry.settled) == (TrialState.RUNNING, 2, False)
    assert not store.exists(f"{PREFIX}/{st.FAILED}")
    first = retry.attempts[0]
    assert (first.outcome, first.failure["reason"], first.job) == ("failed", "OOMKilled", "sft-sft-0123456789")
    # A late report of attempt 1's Job (another `status` racing the resubmit) cannot fail attempt 2 ...
    assert st.record_failure(store, SWEEP, TRIAL, "job", "OOMKilled", 137, attempt=1) is None
    assert status(store).state is TrialState.RUNNING
    # ... and neither can attempt 1's _FAILED landing after the retry started (a slow writer).
    store.write_json(f"{PREFIX}/{st.FAILED}", {"phase": "job", "reason": "old", "attempt": 1, "at": 1.0})
    assert status(store).state is TrialState.RUNNING and status(store).failure is None


def test_a_failure_belongs_to_an_attempt(store):
    """Every runner records the attempt before it starts anything that can fail, so a failure without one is a
    bug said at once (no 'attempt 0'), and a _FAILED file with no attempt behind it fails nothing."""
    with pytest.raises(RuntimeError, match="no attempt under way"):
        st.record_failure(store, SWEEP, TRIAL, "train", "x", 1)
    store.write_json(f"{PREFIX}/{st.FAILED}", {"phase": "train", "reason": "x", "exit_code": 1, "at": 5.0})
    assert (status(store).state, status(store).failed_attempts, status(store).failure) == (TrialState.PENDING, 0,
                                                                                            None)
    assert st.start_attempt(store, SWEEP, TRIAL, "local").attempt == 1


def test_preemption_and_cancel_are_not_failed_attempts(store):
    st.start_attempt(store, SWEEP, TRIAL, "local")
    assert st.record_failure(store, SWEEP, TRIAL, "train", "SIGTERM", st.PREEMPTED_EXIT) is None
    assert (status(store).state, status(store).failed_attempts) == (TrialState.PENDING, 0)
    assert st.start_attempt(store, SWEEP, TRIAL, "local").attempt == 1  # resumes the same attempt
    st.end_attempt(store, SWEEP, TRIAL, "stopped")
    assert status(store).state is TrialState.STOPPED and not status(store).settled
    assert st.start_attempt(store, SWEEP, TRIAL, "k8s").attempt == 1


# ------------------------------------------------------------------------------------------ local backend

@pytest.fixture
def smoke_sft(store):
    (plan, _) = load_plan(str(ROOT / "jobs" / "smoke.yaml"), store, allow_unresolved=True)
    return SweepPlan(dataclasses.replace(plan.sweep), None)


def test_local_resubmit_reruns_exactly_the_failed_trials_up_to_the_limit(store, smoke_sft, monkeypatch):
    """Stub phases: the 'flaky' trial fails training once per run; every other trial succeeds."""
    specs = smoke_sft.all_specs()
    flaky = smoke_sft.trials()[0]
    runs: list[tuple[str, str]] = []
    outcome = {"flaky_exit": 1}

    def fake_phase(module, spec, store_, url, extra_env=None):
        runs.append((module, spec.trial_id))
        prefix = st.trial_prefix(spec.sweep, spec.trial_id)
        if spec.trial_id == flaky.trial_id and module == "trainer" and outcome["flaky_exit"]:
            st.record_failure(store_, spec.sweep, spec.trial_id, "train", "boom", outcome["flaky_exit"])
            return outcome["flaky_exit"]
        if module == "trainer":
            store_.write_marker(f"{prefix}/{st.TRAINED}", {})
        else:
            store_.write_json(f"{prefix}/eval.json", {"summary": {}})
            store_.write_marker(f"{prefix}/{st.DONE}", {})
        return 0

    monkeypatch.setattr(local, "run_phase", fake_phase)
    monkeypatch.setattr(engine, "finish", lambda *a, **k: [])

    first = engine.submit_local(smoke_sft, store, str(store.root), max_attempts=2)
    assert (first["done_before"], first["ran"], first["failed"]) == (0, len(specs) - 1, 1)
    runs.clear()
    second = engine.submit_local(smoke_sft, store, str(store.root), max_attempts=2)
    assert runs == [("trainer", flaky.trial_id)]  # exactly the failed trial, nothing that finished
    assert (second["done_before"], second["ran"], second["failed"]) == (len(specs) - 1, 0, 1)
    assert status_of(store, flaky).failed_attempts == 2
    runs.clear()
    third = engine.submit_local(smoke_sft, store, str(store.root), max_attempts=2)
    assert runs == [] and third["failed"] == 1  # the limit: not run again
    outcome["flaky_exit"] = 0
    fourth = engine.submit_local(smoke_sft, store, str(store.root), max_attempts=3)
    assert runs == [("trainer", flaky.trial_id), ("evaluator", flaky.trial_id)] and fourth["ran"] == 1
    final = status_of(store, flaky)
    assert (final.state, final.attempt, [a.outcome for a in final.attempts]) == \
        (TrialState.DONE, 3, ["failed", "failed", "done"])


def status_of(store, spec):
    return read_status(store, spec.sweep, spec.trial_id)


class _HangingBackend:
    """Starts each trial's attempt and never finishes it (a Job that is still running); at its `stop_after`-th
    wait the trial `stop` is cancelled (its attempt marked stopped, as `cancel` does)."""

    name, max_attempts = "test", 3

    def __init__(self, store, stop=None, stop_after=3):
        self.store, self.stop, self.stop_after, self.waits, self.scheduled = store, stop, stop_after, 0, []

    def schedule(self, spec):
        self.scheduled.append(spec.trial_id)
        st.start_attempt(self.store, spec.sweep, spec.trial_id, self.name)

    def wait(self, seconds):
        self.waits += 1
        if self.stop is not None and self.waits == self.stop_after:
            st.end_attempt(self.store, self.stop.sweep, self.stop.trial_id, "stopped")


def test_the_engine_waits_on_a_retried_trial_and_ends_on_a_cancelled_one(store, smoke_sft):
    """A trial retried as attempt n+1 is running, not settled: the loop waits for it (instead of selecting a best
    without it); a trial cancelled meanwhile ends the run with SweepStopped (nothing would ever settle it)."""
    specs = smoke_sft.all_specs()
    for spec in specs[1:]:
        store.write_json(f"{spec.sweep}/{spec.trial_id}/eval.json", {"summary": {}})
        store.write_marker(f"{spec.sweep}/{spec.trial_id}/{st.DONE}", {})
    retried = specs[0]
    st.start_attempt(store, retried.sweep, retried.trial_id, "k8s")
    st.record_failure(store, retried.sweep, retried.trial_id, "job", "x", 1)
    backend = _HangingBackend(store, stop=retried, stop_after=3)
    with pytest.raises(engine.SweepStopped, match="cancelled"):
        engine.run_sweep(smoke_sft.sweep, store, backend, smoke_sft.start, poll_s=0)
    assert backend.scheduled == [retried.trial_id] and backend.waits == 3  # waited on it until the cancel
    status = status_of(store, retried)
    assert status.attempt == 2 and status.attempts[-1].outcome == "stopped"
    assert not store.exists(f"{smoke_sft.sweep.name}/best.json")


def test_the_evaluation_that_writes_done_closes_the_attempt(store, tiny_model):
    """Whoever runs the evaluator (a local subprocess, a cluster pod), the attempt that produced _DONE is
    recorded as done: the k8s backend never has to notice a success for `attempts` to say so."""
    import yaml

    from evaluator.evaluate import _write
    from finesweep.spec import parse_sweep

    raw = {"name": "closes", "stage": "sft", "model": str(tiny_model),
           "dataset": {"path": "tests/fixtures/datasets/databricks-dolly-15k", "format": "dolly"},
           "eval": {"set": "sft-open-questions"}, "trials": [{"name": "a", "lr": 1.0e-3}]}
    spec = parse_sweep(yaml.safe_load(yaml.safe_dump(raw)), "test.yaml", "", None).trial_specs(None)[0]
    st.start_attempt(store, spec.sweep, spec.trial_id, "k8s", job="closes-job")
    assert read_status(store, spec.sweep, spec.trial_id).attempts[-1].outcome is None
    _write(store, spec, {"summary": {}}, [])
    s = read_status(store, spec.sweep, spec.trial_id)
    assert s.state is TrialState.DONE and [(a.number, a.outcome) for a in s.attempts] == [(1, "done")]
    assert s.attempts[-1].ended_at is not None
