"""Evaluation against training for the shipped real pipeline's trials (issue 20's goal: evaluation at most 20% of
training), the evaluation part of `make bench BENCH_ARGS="--model real"`.

    python -m bench.pipeline_eval [--sweep jobs/real.yaml] [--repeats 3] [--out DIR]

Each repeat runs the first trial of every stage of the shipped pipeline (jobs/real.yaml: one SFT trial, then one
DPO trial from it) in a fresh store with the project's own local runner (submitter.local.run_trial: the trainer
and the evaluator as child processes, exactly as `make submit SWEEP=real` runs them), then reads what the trials
recorded: training = train.json `wall_time_s` + the DPO reference pass (`reference_logps.seconds`), evaluation =
eval.json `wall_time_s`, split by its `timings_s` (model build, each generation set, held-out rows, benchmark).
The base and start-model rows are not run: the goal is about trials. Medians over the repeats; every run in
pipeline_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

GOAL = 0.20  # evaluation / training, issue 20


def first_trials(sweep_file: Path, dest: Path) -> Path:
    """The sweep file with each stage's `trials:` cut to its first entry (written to dest)."""
    import yaml

    data = yaml.safe_load(sweep_file.read_text())
    for sweep in data.get("pipeline", [data]):
        if sweep.get("trials"):
            sweep["trials"] = sweep["trials"][:1]
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def run_once(sweep_file: Path, workdir: Path) -> list[dict]:
    """One repeat: every stage's first trial trained and evaluated in a fresh store; one record per trial."""
    from finesweep.store import open_store, trial_prefix
    from submitter.local import DONE, run_trial, tracking_env
    from submitter.plan import load_plan, resolve_start, select_best

    store_dir = workdir / "store"
    store = open_store(store_dir)
    trimmed = first_trials(sweep_file, workdir / "sweep.yaml")
    records = []
    for plan in load_plan(str(trimmed), store):
        if not plan.resolved:
            plan.start = resolve_start(plan.sweep, store)
        for spec in plan.trials():
            label = f"bench {plan.sweep.name}/{spec.name}"
            outcome = run_trial(spec, store, str(store_dir), 1, tracking_env(plan.sweep), label)
            if outcome != DONE:
                raise RuntimeError(f"{label}: {outcome}; its logs: {store_dir}/{trial_prefix(spec.sweep, spec.trial_id)}")
            prefix = trial_prefix(spec.sweep, spec.trial_id)
            train, ev = store.read_json(f"{prefix}/train.json"), store.read_json(f"{prefix}/eval.json")
            reference = float((train.get("reference_logps") or {}).get("seconds") or 0.0)
            training = float(train["wall_time_s"]) + reference
            records.append({"sweep": plan.sweep.name, "stage": spec.stage, "trial": spec.name,
                            "steps": train.get("steps") or train.get("global_step"),
                            "training_s": round(training, 2), "reference_s": round(reference, 2),
                            "evaluation_s": float(ev["wall_time_s"]), "timings_s": ev.get("timings_s", {}),
                            "ratio": round(float(ev["wall_time_s"]) / training, 4)})
        select_best(plan.sweep, store, plan.trials())
    return records


def summarize(runs: list[dict]) -> list[dict]:
    """Per stage: medians of training, evaluation, each evaluation part and the ratio, against the goal."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in runs):
        rows = [r for r in runs if r["stage"] == stage]
        parts = sorted({p for r in rows for p in r["timings_s"]})
        ratio = statistics.median(r["ratio"] for r in rows)
        out.append({"stage": stage, "trial": rows[0]["trial"], "repeats": len(rows),
                    "training_s": statistics.median(r["training_s"] for r in rows),
                    "evaluation_s": statistics.median(r["evaluation_s"] for r in rows),
                    "parts_s": {p: statistics.median(r["timings_s"].get(p, 0.0) for r in rows) for p in parts},
                    "ratio": ratio, "ratios": [r["ratio"] for r in rows], "goal": GOAL, "met": ratio <= GOAL})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| stage | trial | repeats | training (s, median) | evaluation (s, median) | evaluation / training "
             "(median; per repeat) | goal <= 20% | where the evaluation's time goes (s, medians) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        parts = ", ".join(f"{p} {v:.0f}" for p, v in sorted(s["parts_s"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {s['stage']} | {s['trial']} | {s['repeats']} | {s['training_s']:.0f} | "
                     f"{s['evaluation_s']:.0f} | **{s['ratio']:.0%}** ({', '.join(f'{r:.0%}' for r in s['ratios'])})"
                     f" | {'met' if s['met'] else 'NOT met'} | {parts} |")
    return "\n".join(lines)


def run(out_dir: Path, repeats: int, sweep_file: Path = Path("jobs/real.yaml")) -> dict:
    """Every repeat, then pipeline_eval.json in out_dir: {"sweep", "runs", "summary"}; returns it."""
    from .report import meta

    out_dir.mkdir(parents=True, exist_ok=True)
    info = meta(f"python -m bench.pipeline_eval --sweep {sweep_file} --repeats {repeats}")
    runs: list[dict] = []
    for repeat in range(repeats):
        started = time.time()
        with tempfile.TemporaryDirectory(prefix="finesweep-bench-", dir=os.environ.get("TMPDIR")) as tmp:
            for record in run_once(sweep_file, Path(tmp)):
                runs.append({**record, "repeat": repeat})
        print(f"bench: pipeline evaluation repeat {repeat + 1}/{repeats} in {time.time() - started:.0f} s", flush=True)
        info["load_average_end"] = os.getloadavg()
        result = {"sweep": str(sweep_file), "measured": info, "runs": runs, "summary": summarize(runs)}
        (out_dir / "pipeline_eval.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=Path("jobs/real.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/cpu-smollm2"))
    args = parser.parse_args()
    result = run(args.out, args.repeats, args.sweep)
    print(markdown(result["summary"]))


if __name__ == "__main__":
    main()
