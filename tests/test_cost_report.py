"""Issue 20: the report states what a sweep cost in device-hours (wall seconds x devices used, from train.json and
eval.json) per trial (training, evaluation) and per sweep, and what the shared DPO reference log-probs saved; the
figures add up. Pure Python: hand-written records in a local store, no torch."""

from __future__ import annotations

import pytest
import yaml

from evaluator import metrics
from evaluator.cost import CPU, GPU, sweep_cost, trial_cost
from evaluator.report import build_report
from finesweep.spec import StartRef, parse_sweep
from finesweep.store import DONE, TRAINED, LocalStore, trial_prefix

DPO_SWEEP = """
name: cost-dpo
stage: dpo
from: "cost-sft:best"
model: build/tiny-llama
dataset: {path: tests/fixtures/datasets/preferences-local/train.jsonl, format: preference}
eval: {set: sft-open-questions, bootstrap_samples: 50}
select: {metric: bleu}
trials:
  - {name: computes, lr: 1.0e-4}
  - {name: reuses, lr: 2.0e-4}
  - {name: reuses-unevaluated, lr: 3.0e-4}
"""
CUDA = {"device": "cuda", "name": "NVIDIA H100", "precision": "bf16", "attn_implementation": "sdpa",
        "gpu_memory_gb": 80.0, "num_gpus": 2}
# name: (training wall s, reference pass s, processes, reference record, evaluation wall s or None)
TRAINING = {
    "computes": (100.0, 20.0, 2, {"source": "computed", "seconds": 20.0, "overhead_s": 0.5}, 40.0),
    "reuses": (90.0, 0.0, 2, {"source": "reused", "seconds": 0.0, "overhead_s": 0.4, "computed_s_by_writer": 20.0,
                              "saved_s": 18.0}, 40.0),
    "reuses-unevaluated": (80.0, 0.0, 1, {"source": "reused", "seconds": 0.0, "saved_s": 17.0}, None),
}
REFERENCE_EVAL = {"base": 30.0, "start": 30.0}


def _write(store: LocalStore, spec) -> None:
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    store.write_json(f"{prefix}/spec.json", {"trial_id": spec.trial_id})
    eval_wall = REFERENCE_EVAL.get(spec.name)
    if spec.trains:
        wall, _, processes, ref, eval_wall = TRAINING[spec.name]
        store.write_json(f"{prefix}/train.json", {"wall_time_s": wall, "processes": processes, "hardware": CUDA,
                                                  "reference_logps": ref, "final_loss": 0.6,
                                                  "log_history": [{"step": 1, "loss": 0.69}]})
        store.write_marker(f"{prefix}/{TRAINED}", {})
    if eval_wall is None:
        return
    ev = {"trial_id": spec.trial_id, "name": spec.name, "stage": spec.stage, "wall_time_s": eval_wall,
          "hardware": {**CUDA, "num_gpus": 1}, "summary": {"bleu": 1.0 + len(spec.name) / 10, "eval_rows": 3},
          "sets": {"sft-open-questions": {"rows": 3, "fingerprint": metrics.output_fingerprint([spec.name]),
                                          "generation": {"max_new_tokens": 8, "batch_size": 4}}}}
    if spec.trains:
        ev["trust"] = {"adapter_changes_outputs": True}
    store.write_json(f"{prefix}/eval.json", ev)
    store.write_bytes(f"{prefix}/samples.jsonl", b"")
    store.write_marker(f"{prefix}/{DONE}", {})


def test_report_states_device_hours_per_trial_and_sweep_and_the_saving(tmp_path):
    store = LocalStore(tmp_path)
    sweep = parse_sweep(yaml.safe_load(DPO_SWEEP), "t.yaml", "", None)
    start = StartRef("cost-sft", "s-0123456789")
    specs = sweep.reference_specs(start) + sweep.trial_specs(start)
    for spec in specs:
        _write(store, spec)
    report = store.read_bytes(build_report(store, sweep, specs)).decode()
    board = store.read_json("cost-dpo/report/leaderboard.json")
    rows = {r["name"]: r["cost"] for r in board["rows"]}

    # Per trial: (training wall + reference pass) x processes; evaluation wall x 1; saved = saved_s x processes.
    for name, (wall, ref_s, processes, ref, eval_wall) in TRAINING.items():
        cost = rows[name]
        assert cost["training"] == {"unit": GPU, "hours": pytest.approx((wall + ref_s) * processes / 3600, abs=1e-6),
                                    "wall_s": wall, "reference_s": ref_s, "devices": processes}
        assert cost["reference_logps"] == ref["source"]
        assert cost["saved"] == ({GPU: pytest.approx(ref["saved_s"] * processes / 3600, abs=1e-6)}
                                 if ref["source"] == "reused" else {})
        evaluation = cost["evaluation"]["hours"] if eval_wall is not None else 0.0
        assert (eval_wall is None) == ("evaluation" not in cost)
        assert cost["total"][GPU] == pytest.approx(cost["training"]["hours"] + evaluation, abs=1e-6)
    for name, eval_wall in REFERENCE_EVAL.items():
        assert "training" not in rows[name] and rows[name]["total"] == {GPU: pytest.approx(eval_wall / 3600, abs=1e-6)}

    # Per sweep: the rows' figures add up (640 device-seconds in all, 53 saved).
    total = board["cost"]
    assert total["trials"] == 5
    assert total["training"][GPU] == pytest.approx((240 + 180 + 80) / 3600, abs=1e-5)
    assert total["evaluation"][GPU] == pytest.approx((40 + 40 + 30 + 30) / 3600, abs=1e-5)
    assert total["total"][GPU] == pytest.approx(sum(c["total"][GPU] for c in rows.values()), abs=1e-5)
    assert total["total"][GPU] == pytest.approx(total["training"][GPU] + total["evaluation"][GPU], abs=1e-5)
    assert total["total"][GPU] == pytest.approx(640 / 3600, abs=1e-5)
    assert total["saved"][GPU] == pytest.approx(53 / 3600, abs=1e-5)
    assert total["without_sharing"][GPU] == pytest.approx(693 / 3600, abs=1e-5)
    assert total["reference_logps"] == {"computed": 1, "reused": 2, "recomputed": 0}
    assert CPU not in total["total"]

    # report.md: the headline, one line per row, the sweep's sums and the saving.
    assert f"Cost: {640 / 3600:.4g} {GPU}, {53 / 3600:.4g} {GPU} saved by shared reference log-probs" in report
    section = report.split("## Cost")[1].split("\n## ")[0]
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in section.splitlines() if line.startswith("| ") and not line.startswith("| trial")}
    assert set(lines) == {"base", "start", *TRAINING}
    assert lines["computes"] == ["computes", "100s", "20.0s", "2", f"{240 / 3600:.4g} {GPU}", "40s",
                                 f"{40 / 3600:.4g} {GPU}", f"{280 / 3600:.4g} {GPU}", "computed"]
    assert lines["reuses"][-1] == f"reused (saved {36 / 3600:.4g} {GPU})"
    assert lines["reuses-unevaluated"][5:7] == ["", ""]
    assert lines["base"][1:5] == ["", "", "", ""] and lines["base"][6] == f"{30 / 3600:.4g} {GPU}"
    assert (f"Sweep total: {640 / 3600:.4g} {GPU} (training {500 / 3600:.4g} {GPU}; evaluation "
            f"{140 / 3600:.4g} {GPU}) over 5 rows.") in section
    assert (f"Shared reference log-probs: computed by 1 trial(s), reused by 2; saved {53 / 3600:.4g} {GPU} (the sweep "
            f"would have taken {693 / 3600:.4g} {GPU} without sharing).") in section


def test_cpu_and_gpu_hours_are_kept_apart_and_unrecorded_parts_count_nothing():
    rows = [{"name": "cpu", "train": {"wall_time_s": 36.0, "processes": 2, "hardware": {"device": "cpu"}},
             "eval": {"wall_time_s": 72.0, "hardware": {"device": "cuda"}}},
            {"name": "old", "train": {"wall_time_s": 360.0}},  # before processes / hardware were recorded
            {"name": "pending"}]
    costs = {r["name"]: trial_cost(r) for r in rows}
    assert costs["cpu"]["total"] == {CPU: 0.02, GPU: 0.02}
    assert costs["old"]["total"] == {CPU: 0.1} and "reference_logps" not in costs["old"]
    assert costs["pending"] == {"total": {}, "saved": {}}
    total = sweep_cost(costs)
    assert total["total"] == {CPU: pytest.approx(0.12), GPU: pytest.approx(0.02)}
    assert total["saved"] == {} and total["without_sharing"] == total["total"]
