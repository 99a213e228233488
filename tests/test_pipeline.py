"""End to end on the embedded default: the smoke pipeline (SFT sweep -> best -> DPO sweep -> evaluation ->
report) through the submitter CLI, a resubmit that re-runs nothing, and a broken sweep that runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finesweep.spec import StartRef, load_sweeps
from finesweep.store import LocalStore, read_status, trial_state

from .conftest import ROOT

pytestmark = pytest.mark.slow


def submitter(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "submitter", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)


@pytest.fixture(scope="module")
def smoke_run(tiny_model, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("smoke-store")
    run = submitter("submit", "smoke", "--store", str(store_dir))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return store_dir, run


def test_pipeline_trains_selects_and_reports(smoke_run):
    store_dir, run = smoke_run
    store = LocalStore(store_dir)
    sft, dpo = load_sweeps(ROOT / "jobs" / "smoke.yaml")
    sft_specs = sft.trial_specs() + sft.reference_specs()
    assert all(trial_state(store, s.sweep, s.trial_id) == "done" for s in sft_specs)
    best = store.read_json("smoke-sft/best.json")
    assert best["trial_id"] in {s.trial_id for s in sft.trial_specs()} and best["metric"] == "heldout_perplexity"
    # the best really is the lowest held-out perplexity among the trials
    ppl = {s.trial_id: store.read_json(f"smoke-sft/{s.trial_id}/eval.json")["summary"]["heldout_perplexity"]
           for s in sft.trial_specs()}
    assert ppl[best["trial_id"]] == min(ppl.values())
    # DPO trials started from that trial, and their adapters sit on top of it
    start = StartRef("smoke-sft", best["trial_id"])
    for spec in dpo.trial_specs(start) + dpo.reference_specs(start):
        assert trial_state(store, spec.sweep, spec.trial_id) == "done", spec.name
        ev = store.read_json(f"smoke-dpo/{spec.trial_id}/eval.json")
        if spec.trains:
            assert ev["model"]["chain"][0]["trial"] == best["trial_id"]
            assert ev["trust"]["adapter_changes_outputs"] and ev["model"]["own"]["missing_keys"] == []
            assert ev["summary"]["heldout_rows"] > 0 and ev["summary"]["preference_accuracy"] is not None
            # where the evaluation's time went, part by part (make bench's evaluation part reads it)
            parts = ev["timings_s"]
            assert set(parts) == {"model", "heldout", *(f"set:{n}" for n in (spec.eval.set, *spec.eval.extra_sets))}
            assert all(v >= 0 for v in parts.values()) and sum(parts.values()) <= ev["wall_time_s"] + 0.05
    for sweep in ("smoke-sft", "smoke-dpo"):
        report = (store_dir / sweep / "report" / "report.md").read_text()
        assert "| **best** |" in report and "## Answers side by side" in report
        assert (store_dir / sweep / "report" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
        assert (store_dir / sweep / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
        board = json.loads((store_dir / sweep / "report" / "leaderboard.json").read_text())
        assert board["rows"][0]["name"] == "base"
    assert "report for sweep smoke-dpo:" in run.stdout
    # progress lines a person can follow
    assert " step " in run.stdout and " tok/s " in run.stdout and " eta " in run.stdout


def test_resubmit_reruns_nothing(smoke_run):
    store_dir, _ = smoke_run
    logs = sorted(store_dir.rglob("logs/*.log"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    again = submitter("submit", "smoke", "--store", str(store_dir))
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("already done; skipping") == 7  # 2 + 2 trials, base x2, DPO start row
    assert " training" not in again.stdout and "evaluating" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == before


def test_status_and_logs_commands(smoke_run):
    store_dir, _ = smoke_run
    status = submitter("status", "smoke", "--store", str(store_dir))
    assert status.returncode == 0
    assert status.stdout.count(" done ") == 7 and "heldout_perplexity" in status.stdout
    logs = submitter("logs", "smoke", "--trial", "lr-high", "--store", str(store_dir))
    assert logs.returncode == 0 and "==> smoke-sft/lr-high" in logs.stdout and " step " in logs.stdout


def test_broken_sweep_runs_nothing(tmp_path):
    text = (ROOT / "jobs" / "smoke.yaml").read_text().replace("beta: 0.3", "beta: -0.3")
    bad = tmp_path / "bad-smoke.yaml"
    bad.write_text(text)
    store_dir = tmp_path / "store"
    run = submitter("submit", str(bad), "--store", str(store_dir))
    assert run.returncode == 2
    assert "pipeline[1].trials[1].beta" in run.stdout and "Fix:" in run.stdout
    assert not store_dir.exists() or not any(store_dir.rglob("*")), "a broken sweep must not start any trial"


def test_a_broken_trial_fails_with_a_reason_and_the_rest_go_on(smoke_run, tmp_path):
    """An adapter corrupted in the store: that trial fails with its reason in status and report; the sweep
    goes on and the summary counts the failure."""
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(smoke_run[0], store_dir)
    store = LocalStore(store_dir)
    sft, _ = load_sweeps(ROOT / "jobs" / "smoke.yaml")
    best = store.read_json("smoke-sft/best.json")["trial_id"]
    victim = next(s for s in sft.trial_specs() if s.trial_id != best)
    prefix = f"smoke-sft/{victim.trial_id}"
    store.delete(f"{prefix}/_DONE")
    weights = store_dir / prefix / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a half-written upload

    run = submitter("submit", "smoke", "--store", str(store_dir))
    assert run.returncode == 1
    assert f"{victim.name} ({victim.trial_id}) failed (exit 3); going on with the rest" in run.stdout
    assert "1 trial(s) failed" in run.stdout
    assert run.stdout.count("already done; skipping") == 6
    failure = store.read_json(f"{prefix}/_FAILED")
    assert failure["phase"] == "eval" and "checksum" in failure["reason"]
    status = submitter("status", "smoke", "--store", str(store_dir))
    assert "failed" in status.stdout and "checksum" in status.stdout
    report = (store_dir / "smoke-sft" / "report" / "report.md").read_text()
    assert f"{victim.name}: failed in eval (exit 3)" in report and "1 failed" in report

    # The cause fixed (the adapter restored), a resubmit re-runs exactly that trial, as its second attempt.
    shutil.copyfile(smoke_run[0] / prefix / "adapter" / "adapter_model.safetensors", weights)
    again = submitter("submit", "smoke", "--store", str(store_dir))
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("already done; skipping") == 6
    assert f"{victim.name} ({victim.trial_id}) evaluating (attempt 2)" in again.stdout
    status_ = read_status(store, "smoke-sft", victim.trial_id)
    assert (status_.state.value, status_.attempt, [a.outcome for a in status_.attempts]) == ("done", 2,
                                                                                           ["failed", "done"])
    assert "checksum" in status_.attempts[0].failure["reason"] and not store.exists(f"{prefix}/_FAILED")


def test_a_changed_eval_section_reevaluates_every_row_and_trains_nothing(smoke_run, tmp_path):
    """A trial's id is its training: the smoke pipeline resubmitted with more generated tokens and another eval
    set keeps every trial id, trains nothing, evaluates every trial and reference row again (as attempt 2), and
    records the new evaluation in eval.json and _DONE; the adapters are the same files."""
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(smoke_run[0], store_dir)
    store = LocalStore(store_dir)
    text = (ROOT / "jobs" / "smoke.yaml").read_text()
    changed = text.replace("eval: {set: dpo-mixed-prompts, max_new_tokens: 24",
                           "eval: {set: dpo-mixed-prompts, extra_sets: [sft-open-questions], max_new_tokens: 16")
    changed = changed.replace("extra_sets: [math-word-problems], max_new_tokens: 24", "max_new_tokens: 16")
    assert changed.count("max_new_tokens: 16") == 2
    path = tmp_path / "smoke.yaml"
    path.write_text(changed)
    old_sft, old_dpo = load_sweeps(ROOT / "jobs" / "smoke.yaml")
    new_sft, new_dpo = load_sweeps(path)
    start = StartRef("smoke-sft", store.read_json("smoke-sft/best.json")["trial_id"])
    old = old_sft.trial_specs() + old_sft.reference_specs() + old_dpo.trial_specs(start) + old_dpo.reference_specs(start)
    new = new_sft.trial_specs() + new_sft.reference_specs() + new_dpo.trial_specs(start) + new_dpo.reference_specs(start)
    assert [s.trial_id for s in new] == [s.trial_id for s in old] and len({s.trial_id for s in new}) == 7
    adapters = {p: p.read_bytes() for p in store_dir.rglob("adapter/adapter_model.safetensors")}
    assert len(adapters) == 4

    run = submitter("submit", str(path), "--store", str(store_dir))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " training" not in run.stdout and "already done; skipping" not in run.stdout
    assert run.stdout.count("evaluating it again (not retraining)") == 7
    assert {p: p.read_bytes() for p in store_dir.rglob("adapter/adapter_model.safetensors")} == adapters
    for spec in new:
        status_ = read_status(store, spec.sweep, spec.trial_id, spec.evaluation_id)
        assert (status_.state.value, [a.outcome for a in status_.attempts]) == ("done", ["done", "done"]), spec.name
        ev = store.read_json(f"{spec.sweep}/{spec.trial_id}/eval.json")
        assert ev["evaluation"]["id"] == spec.evaluation_id != old[new.index(spec)].evaluation_id
        assert store.read_json(f"{spec.sweep}/{spec.trial_id}/_DONE")["evaluation"] == spec.evaluation_id
        sets = set(ev["sets"])
        assert sets == ({"sft-open-questions"} if spec.sweep == "smoke-sft" else {"dpo-mixed-prompts",
                                                                               "sft-open-questions"}), spec.name
    # The old sweep file's evaluation is now the stale one: its status says trained, not done.
    assert read_status(store, old[0].sweep, old[0].trial_id, old[0].evaluation_id).state.value == "trained"
