"""Regressions of the loops that drove sweeps drifting apart (the list/grid loop and the search loop, one engine
now: submitter/engine.py run_sweep): list and search trials must run the same way (tracking settings, retries),
the commands must see a search's trials wherever they see a list's (status, cancel, logs), and a search space
must vary only what the stage's trainer reads. The trainer and evaluator are stubs here: the rules, not the
training."""

from __future__ import annotations

import argparse
import textwrap

import pytest
import yaml

from finesweep import store as st
from finesweep.search import Search
from finesweep.spec import SweepError, load_sweeps, parse_sweep
from finesweep.store import LocalStore, TrialState, read_status
from submitter import commands, local, engine
from submitter.plan import SweepPlan

from .conftest import FIXTURES, ROOT

BASE = f"""
name: drift
stage: sft
model: build/tiny-llama
dataset: {{path: {FIXTURES}/datasets/databricks-dolly-15k, format: dolly, test_fraction: 0.2}}
eval: {{set: sft-open-questions, heldout_rows: 8}}
select: {{metric: heldout_loss}}
defaults: {{r: 4, alpha: 8, batch_size: 4, max_steps: 4}}
trials:
  - {{name: one, lr: 1.0e-3}}
  - {{name: two, lr: 2.0e-3}}
"""
TRACKING = "tracking: {mlflow_uri: 'http://127.0.0.1:5999', experiment: drift-exp}\n"
SEARCH = """
search:
  method: random
  seed: 3
  budget: BUDGET
  space:
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
"""


def sweep_from(text: str, name: str | None = None):
    raw = yaml.safe_load(textwrap.dedent(text))
    if name is not None:  # a sweep of its own in the same store: other trial ids, another study
        raw["name"] = name
    return parse_sweep(raw, "drift.yaml", "", None)


def search_text(budget: int = 2, extra: str = "") -> str:
    return BASE + extra + SEARCH.replace("BUDGET", str(budget))


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


class FakePhases:
    """Stands in for local.run_phase: records (module, trial id, the env it was given); a trial in `failing`
    fails its training (recorded as run_phase records it); every other phase succeeds."""

    def __init__(self):
        self.calls: list[tuple[str, str, dict | None]] = []
        self.failing: set[str] = set()

    def __call__(self, module, spec, store_, url, extra_env=None):
        self.calls.append((module, spec.trial_id, extra_env))
        prefix = st.trial_prefix(spec.sweep, spec.trial_id)
        if module == "trainer" and spec.trial_id in self.failing:
            st.record_failure(store_, spec.sweep, spec.trial_id, "train", "boom", 1)
            return 1
        if module == "trainer":
            store_.write_marker(f"{prefix}/{st.TRAINED}", {})
        else:
            store_.write_json(f"{prefix}/eval.json", {"summary": {"heldout_loss": 2.0}})
            store_.write_marker(f"{prefix}/{st.DONE}", {})
        return 0

    def trained(self) -> list[str]:
        return [tid for module, tid, _ in self.calls if module == "trainer"]


@pytest.fixture
def phases(monkeypatch):
    fake = FakePhases()
    monkeypatch.setattr(local, "run_phase", fake)
    # Selection and the report read real evaluator output; they are not what these tests are about.
    monkeypatch.setattr(engine, "finish", lambda *a, **k: [])
    return fake


# ------------------------------------------------------------------------- 1. tracking settings, both loops

def test_search_trials_get_the_same_tracking_settings_as_list_trials(store, phases):
    """Bug: a local search sweep's trials ran without the sweep's MLFLOW_* settings (engine.LocalBackend
    called run_phase without them), while the list/grid loop passed them."""
    listed = sweep_from(BASE + TRACKING)
    engine.submit_local(SweepPlan(listed, None), store, str(store.root))
    list_envs = {env and tuple(sorted(env.items())) for _, _, env in phases.calls}
    assert list_envs == {tuple(sorted(listed.tracking.env(listed.name).items()))}

    phases.calls.clear()
    searched = sweep_from(search_text(budget=3, extra=TRACKING), name="drift-search")
    assert engine.submit_local(SweepPlan(searched, None), store, str(store.root))["failed"] == 0
    assert phases.trained(), "the search ran its trials"
    expected = searched.tracking.env(searched.name)
    assert expected["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    for module, trial_id, env in phases.calls:  # the reference row's evaluation too: it is a run like the others
        assert env == expected, (module, trial_id, env)


def test_the_tracking_env_comes_from_one_function(monkeypatch, store, phases):
    """Both loops take a sweep's trial env from local.tracking_env, so a change there reaches both."""
    marker = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "FINESWEEP_MARK": "shared"}
    monkeypatch.setattr(local, "tracking_env", lambda sweep: marker)
    engine.submit_local(SweepPlan(sweep_from(BASE), None), store, str(store.root))
    engine.submit_local(SweepPlan(sweep_from(search_text(), name="drift-search"), None), store,
                             str(store.root))
    assert phases.calls and all(env == marker for _, _, env in phases.calls)


# --------------------------------------------------------------------- 2. retries: one rule in the store

def test_the_retry_rule(store):
    sweep, trial = "s", "sft-0123456789"

    NextAction = st.NextAction

    def action(limit=2):
        return st.next_action(read_status(store, sweep, trial), limit)

    assert action() is NextAction.RUN  # never started
    st.start_attempt(store, sweep, trial, "local")
    assert action() is NextAction.RUN  # under way (or left running by a killed submit): carried on
    st.end_attempt(store, sweep, trial, "stopped")
    assert action() is NextAction.RUN  # cancelled: the same attempt carries on
    st.start_attempt(store, sweep, trial, "local")
    st.record_failure(store, sweep, trial, "train", "boom", 1)
    assert action() is NextAction.RETRY and action(limit=1) is NextAction.OVER_LIMIT
    st.start_attempt(store, sweep, trial, "local")
    st.record_failure(store, sweep, trial, "train", "boom", 1)
    assert action() is NextAction.OVER_LIMIT and action(limit=3) is NextAction.RETRY
    status = read_status(store, sweep, trial)
    note = st.over_limit_note(status, 2)
    assert "failed 2 attempt(s)" in note and "--max-attempts 3" in note and "boom" in note
    st.end_attempt(store, sweep, trial, "pruned")
    store.delete(f"{sweep}/{trial}/{st.FAILED}")
    assert read_status(store, sweep, trial).state is TrialState.PRUNED and action() is NextAction.SKIP
    store.write_marker(f"{sweep}/{trial}/{st.DONE}", {})
    assert action() is NextAction.SKIP


def test_a_failed_search_trial_is_retried_on_resubmit_up_to_max_attempts(store, phases):
    """Bug: --max-attempts was stored in LocalBackend and never read; a failed search trial was settled for good,
    so a resubmit never retried it. Now the search loop applies the list loop's rule (store.next_action)."""
    sweep = sweep_from(search_text(budget=2))
    plan = SweepPlan(sweep, None)
    flaky = sweep.trial_specs()[0]
    phases.failing.add(flaky.trial_id)

    assert engine.submit_local(plan, store, str(store.root), max_attempts=2)["failed"] == 1
    assert phases.trained().count(flaky.trial_id) == 1
    phases.calls.clear()
    assert engine.submit_local(plan, store, str(store.root), max_attempts=2)["failed"] == 1
    assert phases.trained() == [flaky.trial_id], "a resubmit retries exactly the failed trial"
    assert read_status(store, flaky.sweep, flaky.trial_id).failed_attempts == 2
    phases.calls.clear()
    assert engine.submit_local(plan, store, str(store.root), max_attempts=2)["failed"] == 1
    assert phases.trained() == [], "at the limit: not run again"
    phases.failing.clear()
    assert engine.submit_local(plan, store, str(store.root), max_attempts=3)["failed"] == 0
    assert phases.trained() == [flaky.trial_id]
    final = read_status(store, flaky.sweep, flaky.trial_id)
    assert (final.state, final.attempt, [a.outcome for a in final.attempts]) == \
        (TrialState.DONE, 3, ["failed", "failed", "done"])


def test_list_and_engines_retry_alike(store, phases):
    """The same failing trial under the same limit, run by each loop: the same attempts, the same end state."""
    outcomes = {}
    for kind, text in (("list", BASE), ("search", search_text(budget=2))):
        sweep = sweep_from(text, name=f"drift-{kind}")
        flaky = sweep.trial_specs()[0]
        phases.failing = {flaky.trial_id}
        for _ in range(3):
            if kind == "list":
                engine.submit_local(SweepPlan(sweep, None), store, str(store.root), max_attempts=2)
            else:
                engine.submit_local(SweepPlan(sweep, None), store, str(store.root), max_attempts=2)
        status = read_status(store, flaky.sweep, flaky.trial_id)
        outcomes[kind] = (status.state, status.attempt, [a.outcome for a in status.attempts])
    assert outcomes["list"] == outcomes["search"] == (TrialState.FAILED, 2, ["failed", "failed"])


# ----------------------------------------------------------------- 3. cancel and logs see a search's trials

class FakeK8s:
    def __init__(self):
        self.followed: list[tuple[str, str | None]] = []
        self.cancelled: list[str] = []

    def install(self, monkeypatch):
        from submitter import k8s_backend

        monkeypatch.setattr(k8s_backend, "load_settings", lambda overrides=None: object())
        monkeypatch.setattr(k8s_backend, "cancel_controller", lambda pipeline, settings: False)
        monkeypatch.setattr(k8s_backend, "cancel", lambda name, settings: self.cancelled.append(name) or [])
        monkeypatch.setattr(k8s_backend, "follow_logs",
                            lambda name, trial, settings: self.followed.append((name, trial)))
        return self


@pytest.fixture
def asked_search(store, monkeypatch):
    """A search sweep whose study holds its listed trials and one suggestion (s002), every one running."""
    sweep = sweep_from(search_text(budget=4))
    search = Search(sweep, store)
    specs = [search.ask()[0] for _ in range(3)]
    assert specs[2].name == "s002", "the third trial is the sampler's, not in the file"
    for spec in specs:
        st.start_attempt(store, spec.sweep, spec.trial_id, "k8s")
    plan = SweepPlan(sweep, None)
    monkeypatch.setattr(commands, "load_plan", lambda *a, **k: [plan])
    return plan, specs


def args_for(**kw):
    return argparse.Namespace(sweep="jobs/drift.yaml", store="s3://bucket/x", backend="k8s", namespace="",
                              kube_context="", **kw)


def test_cancel_marks_a_searchs_unfinished_trials_stopped(store, monkeypatch, asked_search):
    """Bug: cancel looked trials up in plan.all_specs() (the file's trials), so a suggested trial left running
    stayed `running` in the store after its Job was deleted."""
    _, specs = asked_search
    FakeK8s().install(monkeypatch)
    assert commands.cancel(args_for(), store) == 0
    states = {s.name: read_status(store, s.sweep, s.trial_id).state for s in specs}
    assert states == {"one": TrialState.STOPPED, "two": TrialState.STOPPED, "s002": TrialState.STOPPED}


def test_logs_find_a_suggested_trial(store, monkeypatch, asked_search, capsys):
    """Bug: `logs --trial s002 --backend k8s` matched against plan.all_specs() and silently followed nothing."""
    _, specs = asked_search
    k8s = FakeK8s().install(monkeypatch)
    for wanted in ("s002", specs[2].trial_id):
        k8s.followed.clear()
        assert commands.logs(args_for(trial=wanted), store) == 0
        assert k8s.followed == [("drift", specs[2].trial_id)]
    # The local backend reads the logs from the store, by name too.
    key = f"{st.trial_prefix(specs[2].sweep, specs[2].trial_id)}/logs/train.log"
    store.write_bytes(key, b"suggested trial's log\n")
    local_args = args_for(trial="s002")
    local_args.backend = "local"
    assert commands.logs(local_args, store) == 0
    assert "suggested trial's log" in capsys.readouterr().out


# --------------------------------------------------------- 4. only what the stage reads may vary or be set

@pytest.mark.parametrize("space, field", [
    ("beta: {choices: [0.1, 0.2]}", "search.space.beta"),
    ("beta: {low: 0.05, high: 0.5}", "search.space.beta"),
    ("beta: {choices: [0.1]}", "search.space.beta"),  # one choice is still a searched key the trainer ignores
    ("beta: {times: lr, factor: 100}", "search.space.beta"),
])
def test_a_search_space_may_not_vary_what_sft_ignores(space, field):
    """Bug: an SFT search varying beta was accepted; every beta trained the same model under another trial id."""
    lr = "    lr: {low: 1.0e-4, high: 1.0e-2, log: true}"
    text = BASE + SEARCH.replace("BUDGET", "6").replace(lr, f"{lr}\n    {space}")
    with pytest.raises(SweepError) as err:
        sweep_from(text)
    assert (err.value.source, err.value.field_path) == ("drift.yaml", field), str(err.value)
    assert "SFT" in err.value.problem and "beta" in err.value.fix and "remove" in err.value.fix


@pytest.mark.parametrize("edit, field", [
    (("  - {name: two, lr: 2.0e-3}", "  - {name: two, lr: 2.0e-3, beta: 0.3}"), "trials[1].beta"),
    (("trials:", "grid: {beta: [0.1, 0.3]}\ntrials:"), "grid (point 2: {'beta': 0.3}).beta"),
    (("defaults: {r: 4,", "defaults: {beta: 0.2, r: 4,"), "trials[0].beta"),
])
def test_a_hand_written_sft_trial_may_not_set_beta(edit, field):
    with pytest.raises(SweepError) as err:
        sweep_from(BASE.replace(*edit))
    assert err.value.field_path == field, str(err.value)
    assert "beta" in err.value.problem and "remove" in err.value.fix
    sweep_from(BASE.replace("lr: 2.0e-3}", "lr: 2.0e-3, beta: 0.1}"))  # the default: the same trial, no harm


def test_search_defaults_name_their_own_field():
    """A search-only sweep (no trials) whose defaults set beta: the error names defaults, not the space."""
    text = BASE.replace("defaults: {r: 4,", "defaults: {beta: 0.2, r: 4,").split("trials:")[0] + SEARCH.replace(
        "BUDGET", "3")
    with pytest.raises(SweepError) as err:
        sweep_from(text)
    assert err.value.field_path == "defaults.beta", str(err.value)


def test_dpo_may_still_search_beta_and_shipped_sweeps_load():
    dpo = yaml.safe_load((ROOT / "jobs" / "dpo.yaml").read_text())
    dpo["search"] = {"method": "random", "budget": len(dpo["trials"]) + 2,
                     "space": {"beta": {"choices": [0.05, 0.1, 0.3]}}}
    sweep = parse_sweep(dpo, "dpo.yaml", "", "dpo")
    assert [p.key for p in sweep.search.space] == ["beta"]
    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        assert load_sweeps(path)


def test_a_trial_killed_by_the_oom_killer_says_so(tmp_path):
    """A process ended by SIGKILL (the kernel's OOM killer) is recorded with that reason and the fix, not with the
    last line it logged ("training 6 steps"), which says nothing about why it stopped."""
    import signal

    from submitter.local import killed_reason

    assert "out of memory" in killed_reason(-signal.SIGKILL) and "batch_size" in killed_reason(-signal.SIGKILL)
    assert killed_reason(-signal.SIGTERM) == "killed by SIGTERM"
    assert killed_reason(3) is None and killed_reason(0) is None


# ------------------------------------------------------------------- the local backend's slots (one engine)

def test_local_slots_one_on_cpu_one_per_gpu_or_as_set(monkeypatch):
    monkeypatch.delenv(engine.LOCAL_PARALLEL_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert engine.local_slots() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert engine.local_slots() == 2
    monkeypatch.setenv(engine.LOCAL_PARALLEL_ENV, "3")
    assert engine.local_slots() == 3
    monkeypatch.setenv(engine.LOCAL_PARALLEL_ENV, "0")
    with pytest.raises(SweepError, match=engine.LOCAL_PARALLEL_ENV):
        engine.local_slots()


def test_a_local_sweep_with_two_gpus_runs_two_trials_at_once_each_on_its_own(store, monkeypatch):
    """max_parallel 2 on a machine with two GPUs: the engine keeps two trials in flight, and each trial's
    processes see only the GPU it was given (CUDA_VISIBLE_DEVICES), never one another's."""
    import threading
    import time

    monkeypatch.delenv(engine.LOCAL_PARALLEL_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    lock, running, seen = threading.Lock(), set(), []

    def fake_phase(module, spec, store_, url, extra_env=None):
        device = (extra_env or {}).get("CUDA_VISIBLE_DEVICES")
        with lock:
            assert device not in running, f"GPU {device} given to two trials at once"
            running.add(device)
            seen.append((spec.name, module, device, len(running)))
        time.sleep(0.3)
        prefix = st.trial_prefix(spec.sweep, spec.trial_id)
        if module == "trainer":
            store_.write_marker(f"{prefix}/{st.TRAINED}", {})
        else:
            store_.write_json(f"{prefix}/eval.json", {"summary": {"heldout_loss": 2.0}})
            store_.write_marker(f"{prefix}/{st.DONE}", {"evaluation": spec.evaluation_id})
        with lock:
            running.discard(device)
        return 0

    monkeypatch.setattr(local, "run_phase", fake_phase)
    monkeypatch.setattr(engine, "finish", lambda *a, **k: [])
    sweep = sweep_from(BASE.replace("trials:", "max_parallel: 2\ntrials:") + "  - {name: three, lr: 3.0e-3}\n")
    counts = engine.submit_local(SweepPlan(sweep, None), store, str(store.root))
    assert counts["failed"] == 0 and counts["complete"] == 3
    assert {device for *_, device, _ in seen} == {"0", "1"}
    assert max(n for *_, n in seen) == 2, "two trials ran at once"

