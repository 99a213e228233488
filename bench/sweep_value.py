"""What a sweep buys, measured on the real chat model (SmolLM2-135M-Instruct, make real-model) on this machine.

    nice -n 10 .venv/bin/python -m bench.sweep_value --out docs/real-model [--work DIR] [--part sft-dpo|refusals|selection|report]

Every run is a sweep YAML written into WORK (default build/bench-value) and run by the project's own command
(`python -m submitter submit FILE --store WORK/<run>/store`), so the figures are what `make submit` produces and a
rerun resumes from the store. Three benchmarks (the fourth, search vs the users' list, is bench/search_compare.py
run with --model build/smollm2-135m-instruct):

1. SFT helps (part sft-dpo): the base model vs the best SFT trial: held-out loss on GSM8K train rows never trained
   on (paired bootstrap interval of the difference), and exact match of the final number on GSM8K test rows
   (Wilson interval each, exact McNemar between the two).
2. DPO moves preferences (part sft-dpo): the DPO start model (the best SFT trial) vs the best DPO trial on held-out
   HH-RLHF pairs never trained on: log-prob preference accuracy (chosen more likely than rejected; McNemar), the
   best trial's implicit-reward accuracy and margins against the start model, the DPO health line (did chosen and
   rejected log-probs both fall), and the refusal rate on the harmful prompts of dpo-mixed-prompts; part
   refusals adds the refusal rate of both models on --refusal-prompts held-out HH-RLHF prompts (exact McNemar).
3. Selection picks the truly better trial (part selection): three SFT configurations x three training seeds; each
   seed's trials are scored on the same held-out rows, cut into a validation part (the first VAL rows: used to
   choose) and a larger test part (the rest: used to check). The choice holds when no other trial of that seed is
   better on the test part beyond its paired 95% interval.

Outputs (OUT): value.json (every figure with its rows and interval, the sweep files, wall times, the command) and
sft-dpo.png / selection.png. Sizes are scaled to a 2-core CPU (see SIZES); the shape is report 2's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "build" / "smollm2-135m-instruct"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Scaled for 2 CPU cores (one SFT step of 8 rows is ~15 s here, one greedy answer of 256 tokens ~2 s in a batch).
SIZES = {"sft_train": 160, "sft_heldout": 250, "gsm8k_test": 250, "dpo_train": 96, "dpo_heldout": 200,
         "sel_train": 64, "sel_val": 64, "sel_test": 128, "max_length": 320}
SEEDS = (0, 1, 2)
SELECTION_TRIALS = [{"name": "lr-3e-4", "lr": 3.0e-4}, {"name": "lr-1e-4", "lr": 1.0e-4},
                    {"name": "lr-2e-5", "lr": 2.0e-5}]


def sft_dpo_yaml(model: Path) -> dict:
    s = SIZES
    sft = {
        "name": "value-sft", "stage": "sft", "model": str(model),
        "dataset": {"path": str(GSM8K), "format": "gsm8k", "split": f"train[:{s['sft_train']}]",
                    "test_split": f"train[7000:{7000 + s['sft_heldout']}]"},
        "prompt_format": "chat", "max_length": s["max_length"],
        "eval": {"set": "math-word-problems", "max_new_tokens": 256, "batch_size": 50,
                 "heldout_rows": s["sft_heldout"], "bootstrap_samples": 1000,
                 "benchmark": {"path": str(GSM8K), "name": None, "split": "test", "rows": s["gsm8k_test"], "max_new_tokens": 256}},
        "select": {"metric": "heldout_loss", "tie_break": "ref_perplexity"},
        "defaults": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ALL_MODULES, "batch_size": 8,
                     "epochs": 1, "warmup_ratio": 0.1},
        # One trial: its lr won over 2e-5 with a clear margin in jobs/real.yaml's sweep (held-out loss -0.13
        # [-0.17, -0.10] on 24 validation rows); the 250-row GSM8K generations cost ~15 min per row of the board here.
        "trials": [{"name": "lr-2e-4", "lr": 2.0e-4}],
    }
    dpo = {
        "name": "value-dpo", "stage": "dpo", "from": "value-sft:best", "model": str(model),
        "dataset": {"path": str(HH), "format": "hh-rlhf", "split": f"train[:{s['dpo_train']}]",
                    "test_split": f"train[2000:{2000 + s['dpo_heldout']}]", "min_answer_chars": 10},
        "prompt_format": "chat", "max_length": s["max_length"],
        "eval": {"set": "dpo-mixed-prompts", "max_new_tokens": 96, "batch_size": 12,
                 "heldout_rows": s["dpo_heldout"], "bootstrap_samples": 1000},
        "select": {"metric": "preference_accuracy", "tie_break": "heldout_dpo_loss"},
        "defaults": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ALL_MODULES[:4], "batch_size": 4,
                     "grad_accum": 2, "epochs": 1, "warmup_ratio": 0.1},
        "trials": [{"name": "lr-5e-4", "beta": 0.1, "lr": 5.0e-4}, {"name": "lr-1e-4", "beta": 0.1, "lr": 1.0e-4}],
    }
    return {"name": "value", "pipeline": [sft, dpo]}


def selection_yaml(model: Path, seed: int) -> dict:
    s = SIZES
    return {
        "name": f"select-s{seed}", "stage": "sft", "model": str(model),
        "dataset": {"path": str(GSM8K), "format": "gsm8k", "split": f"train[:{s['sel_train']}]",
                    "test_split": f"train[7300:{7300 + s['sel_val'] + s['sel_test']}]"},
        "prompt_format": "chat", "max_length": s["max_length"],
        # Generation is not what is compared here: a few new tokens keep the evaluator's cost on the loss rows.
        "eval": {"set": "math-word-problems", "max_new_tokens": 4, "batch_size": 16,
                 "heldout_rows": s["sel_val"] + s["sel_test"], "bootstrap_samples": 100},
        "select": {"metric": "heldout_loss"},
        "defaults": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ALL_MODULES, "batch_size": 8,
                     "epochs": 1, "warmup_ratio": 0.1, "seed": seed},
        "trials": SELECTION_TRIALS,
    }


def run(work: Path, name: str, doc: dict) -> float:
    """Write the sweep and run it with the project's own submit; returns the wall time (a resumed run: the rest)."""
    job = work / name
    job.mkdir(parents=True, exist_ok=True)
    path = job / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    started = time.time()
    code = subprocess.call([sys.executable, "-m", "submitter", "submit", str(path), "--store", str(job / "store")],
                           cwd=ROOT)
    if code != 0:
        sys.exit(f"bench.sweep_value: {name}: submit exited {code}")
    return round(time.time() - started, 1)


# ------------------------------------------------------------------------------------------- reading
def _store(work: Path, name: str):
    from finesweep.store import LocalStore

    return LocalStore(work / name / "store")


def _evals(store, sweep: str) -> dict:
    """{trial name: eval.json} of every evaluated row of a sweep (base, start and trials)."""
    out = {}
    for key in store.list(f"{sweep}/"):
        if key.endswith("/eval.json") and key.count("/") == 2:
            ev = store.read_json(key)
            out[ev["name"]] = ev
    return out


def _rows(ev: dict, metric: str):
    from finesweep.stats import metric_rows

    return metric_rows(metric, ev["per_row"][metric])


def _figure(ev: dict, metric: str, ids=None) -> dict:
    from finesweep.stats import interval

    rows = _rows(ev, metric).subset(ids)
    ci, method = interval(rows, n_boot=2000)
    return {"value": rows.value(), "ci": ci, "rows": len(rows.ids), "interval": method}


def _compare(a: dict, b: dict, metric: str, ids=None) -> dict:
    from finesweep.stats import compare

    return compare(_rows(a, metric), _rows(b, metric), ids=ids, n_boot=2000)


def read_sft_dpo(work: Path) -> dict:
    store = _store(work, "sft-dpo")
    sft, dpo = _evals(store, "value-sft"), _evals(store, "value-dpo")
    best_sft = store.read_json("value-sft/best.json")
    best_dpo = store.read_json("value-dpo/best.json")
    base, sft_best = sft["base"], sft[best_sft["name"]]
    start, dpo_best = dpo["start"], dpo[best_dpo["name"]]
    out = {"sft": {"best": best_sft["name"], "trials": sorted(k for k in sft if k != "base"),
                   "heldout_loss": {n: _figure(e, "heldout_loss") for n, e in sft.items()},
                   "gsm8k_accuracy": {n: _figure(e, "gsm8k_accuracy") for n, e in sft.items()},
                   "best_minus_base": {"heldout_loss": _compare(sft_best, base, "heldout_loss"),
                                       "gsm8k_accuracy": _compare(sft_best, base, "gsm8k_accuracy")},
                   "generation_hit_limit": {n: (e.get("benchmark") or {}).get("generation", {}).get("hit_limit")
                                            for n, e in sft.items()},
                   "wall_time_s": {n: e.get("wall_time_s") for n, e in sft.items()}},
           "dpo": {"best": best_dpo["name"], "trials": sorted(k for k in dpo if k not in ("base", "start")),
                   "logp_preference_accuracy": {n: _figure(e, "logp_preference_accuracy") for n, e in dpo.items()},
                   "best_minus_start": {"logp_preference_accuracy": _compare(dpo_best, start,
                                                                            "logp_preference_accuracy")},
                   "best": {k: _figure(dpo_best, k) for k in ("preference_accuracy", "reward_margin",
                                                              "logratio_margin", "heldout_dpo_loss")},
                   "health": dpo_best.get("heldout", {}).get("health"),
                   "heldout": {n: {k: v for k, v in e.get("heldout", {}).items() if k != "health"}
                               for n, e in dpo.items()},
                   "refusal_rate": {n: _figure(e, "refusal_rate") for n, e in dpo.items() if "refusal_rate" in
                                    e.get("per_row", {})},
                   "refusal_best_minus_start": _compare(dpo_best, start, "refusal_rate")
                   if "refusal_rate" in dpo_best.get("per_row", {}) else None}}
    for sweep in ("value-sft", "value-dpo"):
        trains = {}
        for key in store.list(f"{sweep}/"):
            if key.endswith("/train.json") and key.count("/") == 2:
                t = store.read_json(key)
                trains[key.split("/")[1]] = {"steps": t.get("steps"), "wall_time_s": t.get("wall_time_s"),
                                             "tokens_per_s": t.get("tokens_per_s"),
                                             "peak_memory_gb": t.get("peak_memory_gb")}
        out["sft" if sweep == "value-sft" else "dpo"]["training"] = trains
    return out


def read_selection(work: Path) -> dict:
    s = SIZES
    val_ids = {f"heldout:{i}" for i in range(s["sel_val"])}
    test_ids = {f"heldout:{i}" for i in range(s["sel_val"], s["sel_val"] + s["sel_test"])}
    seeds = []
    for seed in SEEDS:
        evs = _evals(_store(work, f"select-s{seed}"), f"select-s{seed}")
        trials = {n: e for n, e in evs.items() if n != "base"}
        val = {n: _figure(e, "heldout_loss", val_ids) for n, e in trials.items()}
        test = {n: _figure(e, "heldout_loss", test_ids) for n, e in trials.items()}
        chosen = min(val, key=lambda n: val[n]["value"])
        truly = min(test, key=lambda n: test[n]["value"])
        versus = {n: _compare(trials[chosen], trials[n], "heldout_loss", test_ids) for n in trials if n != chosen}
        # Lower loss is better: another trial is better beyond doubt when chosen - other is above 0 all along.
        beaten_by = [n for n, c in versus.items() if c["ci"] and c["ci"][0] > 0]
        seeds.append({"seed": seed, "validation": val, "test": test, "chosen": chosen, "best_on_test": truly,
                      "chosen_minus_other_on_test": versus, "holds": not beaten_by, "beaten_by": beaten_by,
                      "same_as_best_on_test": chosen == truly})
    return {"validation_rows": s["sel_val"], "test_rows": s["sel_test"], "seeds": seeds,
            "holds": sum(x["holds"] for x in seeds), "same_as_best_on_test": sum(x["same_as_best_on_test"]
                                                                                   for x in seeds)}


def measure_refusals(work: Path, model: Path, rows: int) -> dict:
    """Refusals on harmful prompts the DPO trials never saw, with enough rows for an interval: the first `rows`
    prompts of the DPO held-out split (HH-RLHF harmless-base: people trying to get harmful help), rendered as
    the trials were trained, answered greedily by the DPO start model (the best DPO trial with its own adapter
    off) and by the best DPO trial, each answer judged by evaluator.metrics.is_refusal. Cached in WORK."""
    cache = work / "sft-dpo" / f"refusals-{rows}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from evaluator import evaluate
    from evaluator.metrics import is_refusal
    from finesweep.stats import compare, metric_rows
    from submitter.plan import load_plan, resolve_start
    from trainer.data import load_splits, render_dpo
    from trainer.modeling import scratch_dir
    from trainer.runtime import detect_hardware

    store = _store(work, "sft-dpo")
    best = store.read_json("value-dpo/best.json")
    plan = next(p for p in load_plan(str(work / "sft-dpo" / "sweep.yaml"), store) if p.sweep.name == "value-dpo")
    plan.start = resolve_start(plan.sweep, store)  # the SFT stage is finished: its best trial is in the store
    spec = next(t for t in plan.trials() if t.trial_id == best["trial_id"])
    run = evaluate._load_model(spec, store, detect_hardware(), scratch_dir("bench-refusals"), "[refusals]")
    _, held = load_splits(spec.dataset, None)
    held = held.select(range(min(rows, len(held))))
    prompts = [r["prompt"] for r in render_dpo(held, run.tokenizer, spec.prompt_format)]
    ids = [f"harmful:{i}" for i in range(len(prompts))]
    generate = lambda: run.scoring.generate(run.model, run.tokenizer, prompts, 64, 12)  # noqa: E731
    with run.disabled():
        start_answers, start_gen = generate()
    best_answers, best_gen = generate()
    entries = {name: {"kind": "binary", "ids": ids, "values": [float(is_refusal(a)) for a in answers]}
               for name, answers in (("start", start_answers), ("best", best_answers))}
    chosen = {"kind": "binary", "ids": ids, "values": [float(is_refusal(r["chosen"])) for r in held]}
    out = {"prompts": len(prompts), "split": spec.dataset.test_split, "max_new_tokens": 64, "best": best["name"],
           "refusal_rate": {n: _figure({"per_row": {"r": e}}, "r") for n, e in entries.items()},
           "chosen_answers_refusal_rate": _figure({"per_row": {"r": chosen}}, "r"),
           "best_minus_start": compare(metric_rows("r", entries["best"]), metric_rows("r", entries["start"]),
                                       n_boot=2000),
           "changed_answers": sum(a != b for a, b in zip(start_answers, best_answers)),
           "hit_limit": {"start": start_gen["hit_limit"], "best": best_gen["hit_limit"]},
           "examples": [{"prompt": prompts[i][-300:], "start": start_answers[i], "best": best_answers[i]}
                        for i in range(min(4, len(prompts)))]}
    cache.write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------------------- plots
def plot_sft_dpo(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, figs) in zip(axes, [("SFT: held-out loss (lower is better)", r["sft"]["heldout_loss"]),
                                        ("SFT: GSM8K exact match", r["sft"]["gsm8k_accuracy"]),
                                        ("DPO: held-out preference accuracy (log-prob)",
                                         r["dpo"]["logp_preference_accuracy"])]):
        names = list(figs)
        vals = [figs[n]["value"] for n in names]
        err = [[v - figs[n]["ci"][0] for n, v in zip(names, vals)], [figs[n]["ci"][1] - v for n, v in zip(names, vals)]]
        ax.bar(names, vals, yerr=err, capsize=4, color="#6a9fd4")
        rows = sorted({figs[n]["rows"] for n in names})
        ax.set_title(f"{title}\n{', '.join(map(str, rows))} rows, 95% intervals", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("SmolLM2-135M-Instruct on 2 CPU cores: base -> SFT (GSM8K) -> DPO (HH-RLHF)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_selection(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [t["name"] for t in SELECTION_TRIALS]
    width = 0.13
    for k, seed in enumerate(r["seeds"]):
        for j, part in enumerate(("validation", "test")):
            vals = [seed[part][n]["value"] for n in names]
            lo = [v - seed[part][n]["ci"][0] for n, v in zip(names, vals)]
            hi = [seed[part][n]["ci"][1] - v for n, v in zip(names, vals)]
            xs = [i + (2 * k + j - 2.5) * width for i in range(len(names))]
            ax.errorbar(xs, vals, yerr=[lo, hi], fmt="o" if part == "validation" else "s", capsize=3,
                        label=f"seed {seed['seed']} {part}" + (f" (chose {seed['chosen']})" if j == 0 else ""))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out loss")
    ax.set_title(f"Choose on {r['validation_rows']} validation rows, check on {r['test_rows']} test rows: "
                 f"the choice holds in {r['holds']} of {len(r['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "real-model")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "bench-value")
    p.add_argument("--model", type=Path, default=REAL)
    p.add_argument("--part", choices=["sft-dpo", "refusals", "selection", "report", "all"], default="all")
    p.add_argument("--refusal-prompts", type=int, default=SIZES["dpo_heldout"] // 2)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not (a.model / "config.json").exists():
        sys.exit(f"{a.model} is missing. Fix: make real-model")
    for needed in (GSM8K / "train.jsonl", HH):
        if not needed.exists():
            sys.exit(f"{needed} is missing: the benchmark needs ../shared/data (../shared/data/README.md)")
    a.out.mkdir(parents=True, exist_ok=True)
    results_path = a.out / "value.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    walls = results.setdefault("wall_time_s", {})
    if a.part in ("sft-dpo", "all"):
        walls["sft-dpo"] = run(a.work, "sft-dpo", sft_dpo_yaml(a.model))
    if a.part in ("selection", "all"):
        for seed in SEEDS:
            walls[f"select-s{seed}"] = run(a.work, f"select-s{seed}", selection_yaml(a.model, seed))
    if (a.work / "sft-dpo" / "store").exists():
        results["sft_dpo"] = read_sft_dpo(a.work)
        results["sft_dpo"]["sweep_yaml"] = yaml.safe_dump(sft_dpo_yaml(a.model), sort_keys=False)
        if a.part in ("refusals", "all") or (a.work / "sft-dpo" / f"refusals-{a.refusal_prompts}.json").exists():
            results["sft_dpo"]["dpo"]["refusals_heldout"] = measure_refusals(a.work, a.model, a.refusal_prompts)
        plot_sft_dpo(results["sft_dpo"], a.out / "sft-dpo.png")
    if all((a.work / f"select-s{seed}" / "store").exists() for seed in SEEDS):
        results["selection"] = read_selection(a.work)
        results["selection"]["sweep_yaml"] = yaml.safe_dump(selection_yaml(a.model, 0), sort_keys=False)
        plot_selection(results["selection"], a.out / "selection.png")
    from trainer.runtime import library_versions

    results.update(sizes=SIZES, model=str(a.model.relative_to(ROOT) if a.model.is_relative_to(ROOT) else a.model),
                   command="python -m bench.sweep_value " + " ".join(sys.argv[1:]),
                   measured=datetime.now(timezone.utc).isoformat(timespec="seconds"), cpus=os.cpu_count(),
                   versions=library_versions())
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"bench.sweep_value: results in {results_path}")


if __name__ == "__main__":
    main()
