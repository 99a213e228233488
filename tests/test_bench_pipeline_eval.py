"""bench/pipeline_eval.py, the evaluation part of `make bench --model real`: the trimmed sweep is the shipped one
with one trial per stage (still valid), and the summary's medians and goal verdict follow the runs."""

from __future__ import annotations

from bench import pipeline_eval
from finesweep.spec import load_sweeps

from .conftest import ROOT


def test_first_trials_keeps_the_shipped_pipeline_with_one_trial_per_stage(tmp_path):
    shipped = load_sweeps(ROOT / "jobs" / "real.yaml")
    trimmed = load_sweeps(pipeline_eval.first_trials(ROOT / "jobs" / "real.yaml", tmp_path / "sweep.yaml"))
    assert [s.name for s in trimmed] == [s.name for s in shipped]
    for before, after in zip(shipped, trimmed):
        assert len(before.trials) > 1 and after.trials == before.trials[:1]
        assert after.eval == before.eval and after.dataset == before.dataset and after.max_length == before.max_length


def test_summary_takes_medians_and_judges_the_goal():
    runs = [{"stage": "sft", "trial": "a", "training_s": t, "evaluation_s": e, "ratio": e / t,
             "timings_s": {"model": 1.0, "heldout": e - 1.0}} for t, e in ((100, 10), (100, 30), (100, 15))]
    runs += [{"stage": "dpo", "trial": "b", "training_s": 50, "evaluation_s": 40, "ratio": 0.8,
              "timings_s": {"model": 2.0}}]
    sft, dpo = pipeline_eval.summarize(runs)
    assert sft["repeats"] == 3 and sft["ratio"] == 0.15 and sft["met"] and sft["parts_s"]["heldout"] == 14.0
    assert dpo["ratio"] == 0.8 and not dpo["met"]
    table = pipeline_eval.markdown([sft, dpo])
    assert "**15%** (10%, 30%, 15%) | met" in table and "**80%** (80%) | NOT met" in table
