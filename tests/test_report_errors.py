"""An evaluation whose benchmark, held-out rows or an extra eval set failed keeps its other figures (eval.json
`errors`: part, error, reason; the trial is done). The report says so: one warning per error naming the trial, the
part and the reason, and the leaderboard shows `failed` for the figures that part would have measured, not "-"
(no figure) or "n/a" (does not apply). Pure Python: hand-written eval.json files in a local store, no torch."""

from __future__ import annotations

import yaml

from evaluator import metrics
from evaluator.report import NOT_APPLICABLE, build_report, find_warnings, leaderboard_md
from finesweep.spec import parse_sweep
from finesweep.store import DONE, LocalStore, trial_prefix

SFT_SWEEP = """
name: errs-sft
stage: sft
model: build/tiny-llama
dataset: {path: tests/fixtures/datasets/instructions-local/train.jsonl, format: instruction}
eval: {set: sft-open-questions, extra_sets: [math-word-problems], bootstrap_samples: 50,
       benchmark: {path: tests/fixtures/datasets/gsm8k-local}}
select: {metric: heldout_perplexity}
trials:
  - {name: bench-failed, lr: 1.0e-4}
  - {name: heldout-failed, lr: 2.0e-4}
  - {name: all-measured, lr: 3.0e-4}
"""
FAILED = "failed"  # evaluator.report.FAILED, spelled out: what a reader of the report sees
BENCH_REASON = ("local benchmark folder 'tests/fixtures/datasets/gsm8k-local' has no split 'validation' (it has: "
                "train, test). Fix: set eval.benchmark.split to one of them")


def _binary(set_name: str, values: list[int]) -> dict:
    return {"set": set_name, "kind": "binary", "ids": [f"{set_name}:{i}" for i in range(len(values))],
            "values": values}


def _per_row(lost: set[str]) -> dict:
    per_row = {"heldout_perplexity": {"set": "heldout", "kind": "logprob", "ids": ["heldout:0", "heldout:1"],
                                      "values": [[-4.0, 4], [-6.0, 5]]},
               "math_accuracy": _binary("math-word-problems", [1, 0, 1]),
               "gsm8k_accuracy": _binary("gsm8k", [1, 1, 0, 0])}
    if "heldout" in lost:
        del per_row["heldout_perplexity"]
    if "set:math-word-problems" in lost:
        del per_row["math_accuracy"]
    if "benchmark" in lost:
        del per_row["gsm8k_accuracy"]
    return per_row


def _write(store: LocalStore, spec, errors: list[dict]) -> None:
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    per_row = _per_row({e["part"] for e in errors})
    summary = {"bleu": 2.0, "eval_rows": 3}
    sets = {"sft-open-questions": {"rows": 3, "fingerprint": metrics.output_fingerprint([spec.name]),
                                   "generation": {"max_new_tokens": 8, "batch_size": 4}}}
    if "set:math-word-problems" not in {e["part"] for e in errors}:
        sets["math-word-problems"] = {"rows": 3, "fingerprint": metrics.output_fingerprint([spec.name, "m"]),
                                      "generation": {"max_new_tokens": 8, "batch_size": 4}, "math_accuracy": 0.67}
    ev = {"trial_id": spec.trial_id, "name": spec.name, "stage": spec.stage, "summary": summary, "sets": sets,
          "per_row": per_row}
    if "heldout_perplexity" in per_row:
        ev["heldout"] = {"split": "train (seeded 20% hold-out, seed 42)", "rows": 2, "dropped": 0}
    if errors:
        ev["errors"] = errors
    if spec.trains:
        ev["trust"] = {"adapter_changes_outputs": True}
        store.write_json(f"{prefix}/train.json", {"wall_time_s": 10.0, "final_loss": 0.5,
                                                  "log_history": [{"step": 1, "loss": 0.7}]})
    store.write_json(f"{prefix}/eval.json", ev)
    store.write_bytes(f"{prefix}/samples.jsonl", b"")
    store.write_marker(f"{prefix}/{DONE}", {})


def _cells(table: str) -> dict[str, dict[str, str]]:
    """{row name: {column header: cell}} of a leaderboard in markdown."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0][1:-1].split("|")]
    rows = [[c.strip() for c in line[1:-1].split("|")] for line in lines[1:]]
    return {cells[1]: dict(zip(head, cells)) for cells in rows}


def _column(cells: dict[str, dict[str, str]], label: str) -> str:
    """The header of the column `label` (headers carry row counts: "GSM8K acc (4 rows)")."""
    (header,) = [h for h in next(iter(cells.values())) if h.split(" (")[0] == label]
    return header


def test_report_warns_of_each_failed_part_and_marks_its_figures_failed(tmp_path):
    store = LocalStore(tmp_path)
    sweep = parse_sweep(yaml.safe_load(SFT_SWEEP), "t.yaml", "", None)
    specs = sweep.reference_specs() + sweep.trial_specs()
    errors = {"bench-failed": [{"part": "benchmark", "error": "DatasetError", "reason": BENCH_REASON},
                               {"part": "set:math-word-problems", "error": "RuntimeError",
                                "reason": "CUDA error: device-side assert triggered"}],
              "heldout-failed": [{"part": "heldout", "error": "ValueError", "reason": "held-out split is empty"}]}
    for spec in specs:
        _write(store, spec, errors.get(spec.name, []))
    report = store.read_bytes(build_report(store, sweep, specs)).decode()

    cells = _cells(report.split("## Leaderboard")[1].split("## ")[0])
    gsm8k, math, held = (_column(cells, label) for label in ("GSM8K acc", "math acc", "held-out ppl"))
    assert cells["bench-failed"][gsm8k] == FAILED and cells["bench-failed"][math] == FAILED
    assert cells["bench-failed"][held].startswith("3.04 [")  # its held-out figures stand (exp(10/9))
    assert cells["heldout-failed"][held] == FAILED
    assert cells["heldout-failed"][gsm8k].startswith("0.500 [") and cells["heldout-failed"][math].startswith("0.667")
    for name in ("base", "all-measured"):
        assert FAILED not in cells[name].values(), cells[name]
    assert sum(FAILED in row.values() for row in cells.values()) == 2
    assert f"`{FAILED}`: not measured because that part" in report  # the legend tells it from n/a and "-"

    warnings = report.split("## Warnings")[1].split("## ")[0]
    assert ("bench-failed: the `benchmark` part of its evaluation failed (DatasetError: " + BENCH_REASON) in warnings
    assert "not measured (shown as `failed`): gsm8k_accuracy; its other figures stand" in warnings
    assert ("bench-failed: the `set:math-word-problems` part of its evaluation failed (RuntimeError: CUDA error: "
            "device-side assert triggered); not measured (shown as `failed`): math_accuracy") in warnings
    assert ("heldout-failed: the `heldout` part of its evaluation failed (ValueError: held-out split is empty); not "
            "measured (shown as `failed`): heldout_loss, heldout_perplexity") in warnings
    assert warnings.count("part of its evaluation failed") == 3

    board = {r["name"]: r for r in store.read_json("errs-sft/report/leaderboard.json")["rows"]}
    assert board["bench-failed"]["failed_metrics"] == {"gsm8k_accuracy": "benchmark",
                                                       "math_accuracy": "set:math-word-problems"}
    assert board["heldout-failed"]["eval_errors"] == errors["heldout-failed"]
    assert "failed_metrics" not in board["all-measured"]


def _row(name: str, stage: str, errors: list[dict] | None = None) -> dict:
    ev = {"sets": {}, "per_row": {}, "summary": {}, **({"errors": errors} if errors else {})}
    return {"name": name, "trial_id": f"{stage}-{name}", "stage": stage, "state": "done", "hyper": None, "eval": ev}


def test_a_part_that_failed_everywhere_still_gets_its_column_and_base_keeps_na():
    """No row has a GSM8K figure (the benchmark failed on every row): the column is there, all `failed`. On a DPO
    base row a failed held-out part loses only what a base row measures (log-prob preference accuracies); its
    figures against the start model stay n/a."""
    from evaluator.report import failed_metrics

    bench = [{"part": "benchmark", "error": "DatasetError", "reason": "no such folder"}]
    rows = [_row("base", "base", bench + [{"part": "heldout", "error": "OSError", "reason": "disk"}]),
            _row("beta-0.1", "dpo", bench)]
    figures = {"base": {}, "beta-0.1": {"preference_accuracy": {"value": 0.5, "ci": [0.2, 0.8], "rows": 6}}}
    cells = _cells(leaderboard_md(rows, figures, None))
    gsm8k, pref, logp = (_column(cells, label) for label in ("GSM8K acc", "pref acc", "logp pref acc"))
    assert cells["base"][gsm8k] == cells["beta-0.1"][gsm8k] == FAILED
    assert cells["base"][logp] == FAILED and cells["beta-0.1"][logp] == "-"  # failed vs not measured at all
    assert cells["base"][pref] == NOT_APPLICABLE  # preference accuracy vs the start model: does not apply
    assert cells["beta-0.1"][pref] == "0.500 [0.200, 0.800]" and pref == "pref acc (6 rows)"
    lost = failed_metrics(rows[0], rows)
    assert lost["gsm8k_accuracy"] == "benchmark" and lost["logp_preference_accuracy"] == "heldout"
    assert "preference_accuracy" not in lost and "reward_margin" not in lost
    assert sum("part of its evaluation failed" in w for w in find_warnings(rows, "s")) == 3
