"""Search benchmark (issue 13): the users' five-trial list vs a grid, random search, TPE and TPE + ASHA, at the
same total budget of optimizer steps, 3 seeds each, on CPU with the tiny random-init model and real GSM8K rows.

    nice -n 19 .venv/bin/python -m bench.search_compare --out docs/search [--work DIR] [--jobs 2]

Every (strategy, seed) is a sweep YAML written into WORK (default: a new temp folder) and run into its own store
folder WORK/<strategy>-s<seed>/store by the project's own code path:
- list, grid, random, tpe: `python -m submitter submit FILE --store DIR` (the local search loop for search
  sweeps, the plain local runner for the list), exactly what `make submit` runs;
- tpe+asha: submitter.engine.run_sweep with the LocalBackend, asking one trial at a time (`max_new=1`, the
  interrupted-run mode the resume test uses) for as long as one more full trial fits the step budget, then
  submitter.engine.finish (best + report). The study is resumed from the store between asks.

What the trials are, all read from jobs/gsm8k-sft-search.yaml (the production search), not restated here:
- list: its five `trials:` t1..t5, with lr / r / alpha / target_modules / batch_size / dropout as written and
  `epochs` replaced by `max_steps: STEPS` (short runs);
- random, tpe, tpe+asha: its `search.space` minus `epochs` (replaced by max_steps), its `prune:` method (ASHA)
  rescaled to the short runs (--min-examples, --every-examples, its reduction factor);
- grid: --grid-points learning rates log-spaced over the space's lr range, every other key at the value most of
  the five users' trials use (a tie goes to the earlier trial), alpha from the space's tie.
The search strategies do not run the list's trials first: they start from nothing and are compared with it.

Budget: the list spends 5 x STEPS optimizer steps; grid / random / tpe are 5 trials of STEPS steps; tpe+asha asks
a new trial while one more full trial (STEPS) still fits into 5 x STEPS, pruned trials counting the steps they
ran (train.json). Trials run one at a time (`parallel: 1`), so trial order is time order. Seeds: `search.seed`
(sampler, grid order) and the training seed (`defaults.seed`: LoRA init, data order). The held-out rows are the
same in every run: the last --heldout rows of GSM8K's train.jsonl, never trained on.

Outputs (OUT): results.json (every trial of every run: state, steps, held-out loss, parameters; the summary) and
search-benchmark.png (best-so-far held-out loss vs cumulative steps, mean over seeds with min-max band). The
Markdown table is printed and stored in results.json ("table_md") for docs/search.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROD = ROOT / "jobs" / "gsm8k-sft-search.yaml"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
STRATEGIES = ("list", "grid", "random", "tpe", "tpe+asha")
SEEDS = (0, 1, 2)
LIST_KEYS = ("lr", "r", "alpha", "target_modules", "batch_size", "dropout")


def slug(strategy: str, seed: int) -> str:
    return f"{strategy.replace('+', '-')}-s{seed}"


# ------------------------------------------------------------------------------------------ sweep files
def sweep_yaml(strategy: str, seed: int, a) -> dict:
    prod = yaml.safe_load(PROD.read_text())
    users = [{k: t[k] for k in ("name", *LIST_KEYS) if k in t} for t in prod["trials"]]
    if not GSM8K.exists():
        sys.exit(f"{GSM8K} is missing: the benchmark needs the shared GSM8K rows (../shared/data/README.md)")
    total = sum(1 for line in GSM8K.open() if line.strip())
    doc = {
        "name": f"bench-{slug(strategy, seed)}",
        "stage": "sft",
        "model": str(a.model),
        "dataset": {"path": str(GSM8K), "format": "gsm8k", "split": f"train[:{a.rows}]",
                    "test_split": f"train[{total - a.heldout}:{total}]"},
        "prompt_format": prod.get("prompt_format", "instruction"),
        "max_length": a.max_length,
        # Generation is not the objective: one new token on the 12-row set keeps the evaluator's cost down.
        "eval": {"set": prod["eval"]["set"], "max_new_tokens": 1, "batch_size": 12, "heldout_rows": a.heldout,
                 "bootstrap_samples": 20},
        "select": {"metric": "heldout_loss"},
        "defaults": {**prod.get("defaults", {}), "max_steps": a.steps, "seed": seed},
    }
    space = {k: v for k, v in prod["search"]["space"].items() if k != "epochs"}
    search = {"seed": seed, "parallel": 1}
    if strategy == "list":
        doc["trials"] = users
        return doc
    if strategy == "grid":
        lo, hi = space["lr"]["low"], space["lr"]["high"]
        n = a.grid_points
        lrs = [float(f"{math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (n - 1)):.2g}") for i in range(n)]
        grid = {"lr": {"choices": lrs}}
        for key, dist in space.items():
            if key == "lr":
                continue
            if "choices" in dist:  # the value most of the users' trials use; a tie goes to the earlier trial
                counts = collections.Counter(json.dumps(t[key]) for t in users if key in t)
                top = max(counts.values())
                pick = next(json.dumps(t[key]) for t in users if counts[json.dumps(t[key])] == top)
                grid[key] = {"choices": [json.loads(pick)]}
            else:
                grid[key] = dist  # a tie (alpha = 2 r)
        doc["search"] = {**search, "method": "grid", "budget": n, "space": grid}
        return doc
    if strategy in ("random", "tpe"):
        doc["search"] = {**search, "method": strategy, "budget": 5, "space": space}
        if strategy == "tpe":
            doc["search"]["startup_trials"] = a.startup
        return doc
    # tpe+asha: the trial budget is only a cap; the step budget decides when to stop asking (run_tpe_asha).
    doc["search"] = {**search, "method": "tpe", "budget": a.max_trials, "startup_trials": a.startup, "space": space}
    doc["prune"] = {"method": prod["prune"]["method"], "every_examples": a.every_examples,
                    "min_examples": a.min_examples, "reduction_factor": prod["prune"]["reduction_factor"]}
    return doc


# --------------------------------------------------------------------------------------------- running
def run_job(strategy: str, seed: int, a) -> None:
    """One (strategy, seed): write the sweep file and run it (in this process: `--job`)."""
    os.chdir(ROOT)
    job = a.work / slug(strategy, seed)
    job.mkdir(parents=True, exist_ok=True)
    path = job / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_yaml(strategy, seed, a), sort_keys=False))
    store_dir = job / "store"
    if strategy != "tpe+asha":
        code = subprocess.call([sys.executable, "-m", "submitter", "submit", str(path), "--store", str(store_dir)])
        if code != 0:
            sys.exit(f"{strategy} seed {seed}: submit exited {code}")
        return
    import logging

    from finesweep.search import Search
    from finesweep.store import LocalStore
    from submitter.plan import load_plan
    from submitter.engine import LocalBackend, finish, run_sweep

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    store = LocalStore(store_dir)
    (plan,) = load_plan(str(path), store)
    budget = 5 * a.steps
    while True:
        search = Search(plan.sweep, store)
        rows = search.rows()
        spent = sum(r.steps or 0 for r in rows if r.alias_of is None)
        if search.unsettled():  # left over by an interrupted run: let it settle first
            run_sweep(plan.sweep, store, LocalBackend(store, str(store_dir)), poll_s=1.0, max_new=0)
            continue
        if spent + a.steps > budget or len(rows) >= search.budget():
            break
        run_sweep(plan.sweep, store, LocalBackend(store, str(store_dir)), poll_s=1.0, max_new=1)
    finish(plan.sweep, store)


# ------------------------------------------------------------------------------------------- reading
def read_run(strategy: str, seed: int, a) -> dict:
    """Every trial of one run, in the order it ran, from the store: state, steps, held-out loss."""
    from finesweep.search import Search
    from finesweep.store import LocalStore, read_status, trial_prefix
    from submitter.plan import load_plan

    os.chdir(ROOT)
    job = a.work / slug(strategy, seed)
    store = LocalStore(job / "store")
    (plan,) = load_plan(str(job / "sweep.yaml"), store)
    sweep = plan.sweep
    trials = []

    def eval_of(spec):
        key = f"{trial_prefix(sweep.name, spec.trial_id)}/eval.json"
        return store.read_json(key)["summary"] if store.exists(key) else {}

    def train_of(spec):
        key = f"{trial_prefix(sweep.name, spec.trial_id)}/train.json"
        return store.read_json(key) if store.exists(key) else {}

    if sweep.search is None:
        specs = [(s, None) for s in plan.trials()]
    else:
        search = Search(sweep, store)
        by_id = {s.trial_id: s for s in search.trial_specs()}
        specs = [(by_id[r.trial_id], r) for r in search.rows()]
    for spec, row in specs:
        status = read_status(store, sweep.name, spec.trial_id)
        summary = eval_of(spec)
        alias = row.alias_of if row is not None else None
        steps = 0 if alias is not None else train_of(spec).get("steps")
        state = row.state if row is not None else ("complete" if status.done else status.state.value)
        h = spec.hyper
        trials.append({
            "number": row.number if row is not None else len(trials), "name": spec.name, "trial_id": spec.trial_id,
            "state": state, "alias_of": alias, "steps": steps,
            "examples": (steps or 0) * h.batch_size * h.grad_accum,
            "heldout_loss": summary.get("heldout_loss") if state == "complete" else None,
            "heldout_rows": summary.get("heldout_loss_rows"),
            "pruned_at_examples": row.pruned_at if row is not None else None,
            "params": {"lr": h.lr, "r": h.r, "alpha": h.alpha, "target_modules": list(h.target_modules),
                       "batch_size": h.batch_size, "dropout": h.dropout, "seed": h.seed, "max_steps": h.max_steps}})
    curve, best, spent = [], None, 0
    for t in trials:
        spent += t["steps"] or 0
        if t["heldout_loss"] is not None:
            best = t["heldout_loss"] if best is None else min(best, t["heldout_loss"])
        curve.append({"steps": spent, "best": best})
    return {"strategy": strategy, "seed": seed, "sweep": sweep.name, "trials": trials, "curve": curve,
            "best": best, "steps": spent, "budget": 5 * a.steps,
            "sweep_yaml": (job / "sweep.yaml").read_text()}


def test_split(a) -> str:
    """Rows never used for choosing: the --test rows just before the held-out (choosing) rows of train.jsonl."""
    total = sum(1 for line in GSM8K.open() if line.strip())
    return f"train[{total - a.heldout - a.test}:{total - a.heldout}]"


def score_on_test(run: dict, a) -> dict | None:
    """The run's chosen trial (lowest held-out loss among complete trials: what the search chose on its rows)
    scored on the test rows by the evaluator's own held-out step (same tokenization, drop rules and scoring), its
    per-row figures kept for paired comparisons. Cached in the run's folder: a rerun does not score again."""
    import dataclasses

    complete = [t for t in run["trials"] if t["heldout_loss"] is not None]
    if not complete:
        return None
    chosen = min(complete, key=lambda t: t["heldout_loss"])
    cache = a.work / slug(run["strategy"], run["seed"]) / f"test-{chosen['trial_id']}-{a.test}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from evaluator import evaluate, scoring
    from finesweep.search import Search
    from finesweep.store import LocalStore
    from submitter.plan import load_plan
    from trainer.modeling import fetch_adapter, load_adapter_checked, load_base_model, load_tokenizer, scratch_dir
    from trainer.runtime import detect_hardware

    job = a.work / slug(run["strategy"], run["seed"])
    store = LocalStore(job / "store")
    (plan,) = load_plan(str(job / "sweep.yaml"), store)
    specs = list(plan.trials()) if plan.sweep.search is None else Search(plan.sweep, store).trial_specs()
    spec = next(s for s in specs if s.trial_id == chosen["trial_id"])
    hw = detect_hardware()
    workdir = scratch_dir("bench-test")
    model, own = load_adapter_checked(load_base_model(spec.model, hw), fetch_adapter(store, spec, workdir))
    model.eval()
    on_test = dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, test_split=test_split(a)),
                                  eval=dataclasses.replace(spec.eval, heldout_rows=a.test))
    ev = evaluate._Evaluation(on_test, f"[test {run['sweep']}/{spec.name}]", model, load_tokenizer(spec.model),
                              {}, True, model.disable_adapter, scoring, {})
    evaluate._heldout(ev)
    out = {"trial": chosen["name"], "trial_id": chosen["trial_id"], "split": test_split(a),
           "loss": ev.result["heldout"]["loss"], "rows": ev.result["heldout"]["rows"],
           "per_row": ev.per_row["heldout_loss"]}
    cache.write_text(json.dumps(out))
    return out


def steps_to_reach(run: dict, target: float) -> int | None:
    """Cumulative steps at the end of the first trial that brings best-so-far to `target` or below."""
    return next((c["steps"] for c in run["curve"] if c["best"] is not None and c["best"] <= target), None)


def summarize(runs: dict, a) -> dict:
    list_best = {seed: runs[("list", seed)]["best"] for seed in SEEDS}
    list_steps = {seed: runs[("list", seed)]["steps"] for seed in SEEDS}
    # A loss within the list best's own spread across seeds is a tie with it, not a miss (the project's rule).
    list_noise = max(list_best.values()) - min(list_best.values())
    out = {}
    for strategy in STRATEGIES:
        rs = [runs[(strategy, seed)] for seed in SEEDS]
        bests = [r["best"] for r in rs]
        diffs = [r["best"] - list_best[r["seed"]] for r in rs]
        out[strategy] = {
            "best": bests, "best_mean": sum(bests) / len(bests), "best_min": min(bests), "best_max": max(bests),
            "steps": [r["steps"] for r in rs],
            "steps_to_list_best": [steps_to_reach(r, list_best[r["seed"]]) for r in rs],
            "steps_to_tie_list_best": [steps_to_reach(r, list_best[r["seed"]] + list_noise) for r in rs],
            "trials": [len(r["trials"]) for r in rs],
            "complete": [sum(t["state"] == "complete" for t in r["trials"]) for r in rs],
            "pruned": [sum(t["state"] == "pruned" for t in r["trials"]) for r in rs],
            "aliases": [sum(t["alias_of"] is not None for t in r["trials"]) for r in rs],
            "heldout_rows": sorted({t["heldout_rows"] for r in rs for t in r["trials"] if t["heldout_rows"]}),
            "diff_vs_list": diffs, "diff_vs_list_mean": sum(diffs) / len(diffs),
            "examples": [sum(t["examples"] for t in r["trials"]) for r in rs],
        }
        tests = [r.get("test") for r in rs]
        if all(tests):
            from finesweep.stats import compare, metric_rows

            vs = [compare(metric_rows("heldout_loss", t["per_row"]),
                          metric_rows("heldout_loss", runs[("list", r["seed"])]["test"]["per_row"]), n_boot=2000)
                  for t, r in zip(tests, rs)]
            out[strategy]["test"] = {"chosen": [t["trial"] for t in tests], "loss": [t["loss"] for t in tests],
                                     "rows": [t["rows"] for t in tests], "minus_list": vs}
    spread = {s: out[s]["best_max"] - out[s]["best_min"] for s in STRATEGIES}
    for strategy in STRATEGIES:
        o = out[strategy]
        noise = max(spread[strategy], spread["list"])
        o["verdict_vs_list"] = ("-" if strategy == "list" else "tie" if abs(o["diff_vs_list_mean"]) <= noise
                                else "better" if o["diff_vs_list_mean"] < 0 else "worse")
        o["noise"] = noise
    half = {seed: list_steps[seed] / 2 for seed in SEEDS}
    asha = out["tpe+asha"]["steps_to_list_best"]
    target = {"rule": "tpe+asha reaches the same seed's list best held-out loss with at most half of the list's "
                      "training steps", "half_list_steps": [half[s] for s in SEEDS], "tpe+asha_steps": asha,
              "met": [x is not None and x <= half[s] for x, s in zip(asha, SEEDS)]}
    target["tpe+asha_steps_to_tie"] = out["tpe+asha"]["steps_to_tie_list_best"]
    target["met_as_tie"] = [x is not None and x <= half[s] for x, s in zip(target["tpe+asha_steps_to_tie"], SEEDS)]
    return {"per_strategy": out, "list_best": [list_best[s] for s in SEEDS], "list_noise": list_noise,
            "target": target, "model": str(a.model)}


def test_cell(strategy: str, o: dict) -> str:
    t = o.get("test")
    if not t:
        return "not scored"
    if strategy == "list":
        return " / ".join(f"{v:.4f} ({n} rows)" for v, n in zip(t["loss"], t["rows"]))
    return " / ".join(f"{v:.4f}, {c['difference']:+.4f} [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]"
                      for v, c in zip(t["loss"], t["minus_list"]))


def table_md(summary: dict) -> str:
    f = lambda v: f"{v:.4f}"  # noqa: E731
    lines = ["| strategy | best held-out loss, mean (min-max over 3 seeds) | vs list: mean per-seed difference "
             "(verdict) | steps spent (seeds 0/1/2) | steps to reach the same seed's list best (0/1/2) | steps to within "
             f"{summary['list_noise']:.4f} of it (a tie; 0/1/2) | trials run (0/1/2) | pruned (0/1/2) | held-out rows |"
             " examples trained (0/1/2) | chosen trial on the test rows: loss, minus the list's [95% interval] (0/1/2) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in STRATEGIES:
        o = summary["per_strategy"][s]
        reach = " / ".join("not reached" if x is None else str(x) for x in o["steps_to_list_best"])
        tie = " / ".join("not reached" if x is None else str(x) for x in o["steps_to_tie_list_best"])
        vs = "-" if s == "list" else f"{o['diff_vs_list_mean']:+.4f} ({o['verdict_vs_list']})"
        lines.append(f"| {s} | {f(o['best_mean'])} ({f(o['best_min'])}-{f(o['best_max'])}) | {vs} | "
                     f"{' / '.join(map(str, o['steps']))} | {reach} | {tie} | {' / '.join(map(str, o['trials']))} | "
                     f"{' / '.join(map(str, o['pruned']))} | {', '.join(map(str, o['heldout_rows']))} | "
                     f"{' / '.join(map(str, o['examples']))} | {test_cell(s, o)} |")
    return "\n".join(lines)


def model_label(model: str) -> str:
    """What the plot calls the model: the real model by its name, a tiny fixture as what it is."""
    name = Path(model).name
    return {"tiny-llama": "tiny random-init Llama", "smollm2-135m-instruct": "SmolLM2-135M-Instruct (real)"}.get(
        name, name)


def plot(runs: dict, summary: dict, path: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = list(range(budget + 1))
    for strategy in STRATEGIES:
        per_seed = []
        for seed in SEEDS:
            curve = runs[(strategy, seed)]["curve"]
            per_seed.append([next((c["best"] for c in reversed(curve) if c["steps"] <= x and c["best"] is not None),
                                  None) for x in xs])
        pts = [(x, [v[i] for v in per_seed]) for i, x in enumerate(xs) if all(v[i] is not None for v in per_seed)]
        if not pts:
            continue
        x = [p[0] for p in pts]
        line, = ax.step(x, [sum(p[1]) / len(p[1]) for p in pts], where="post", label=strategy)
        ax.fill_between(x, [min(p[1]) for p in pts], [max(p[1]) for p in pts], step="post", alpha=0.15,
                        color=line.get_color())
    lb = summary["list_best"]
    ax.axhline(sum(lb) / len(lb), color="black", ls="--", lw=1, label="list best (mean of 3 seeds)")
    ax.axvline(budget / 2, color="grey", ls=":", lw=1, label="half the list's steps")
    ax.set_xlabel("optimizer steps spent (all trials, pruned ones included)")
    ax.set_ylabel("best-so-far held-out loss (complete trials)")
    rows = sorted({r for o in summary["per_strategy"].values() for r in o["heldout_rows"]})
    ax.set_title(f"Search at equal step budget, {model_label(summary['model'])}, GSM8K\n"
                 f"mean over seeds 0-2, band min-max; held-out rows: {', '.join(map(str, rows))}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "search")
    p.add_argument("--work", type=Path, help="run folder (default: a new temp folder); a rerun resumes from it")
    p.add_argument("--jobs", type=int, default=2, help="(strategy, seed) runs at once; each runs its trials one "
                   "at a time, so this changes wall time only")
    p.add_argument("--model", type=Path, default=ROOT / "build" / "tiny-llama")
    p.add_argument("--steps", type=int, default=12, help="max_steps of one full trial")
    p.add_argument("--rows", type=int, default=64, help="GSM8K training rows")
    p.add_argument("--heldout", type=int, default=16, help="held-out rows (the objective)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--test", type=int, default=0, help="rows never used for choosing (before the held-out rows): "
                   "each run's chosen trial is scored on them; 0: not scored")
    p.add_argument("--grid-points", type=int, default=5)
    p.add_argument("--startup", type=int, default=3, help="TPE random startup trials")
    p.add_argument("--min-examples", type=int, default=4, help="ASHA's first rung, in training examples")
    p.add_argument("--every-examples", type=int, default=4, help="held-out evaluation interval during training")
    p.add_argument("--max-trials", type=int, default=40, help="tpe+asha's trial cap (the step budget binds first)")
    p.add_argument("--only", nargs="*", default=None, help="strategy[:seed] runs to (re)run; default all")
    p.add_argument("--job", nargs=2, metavar=("STRATEGY", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.job:
        a.work = a.work.resolve()
        run_job(a.job[0], int(a.job[1]), a)
        return
    a.work = (a.work or Path(tempfile.mkdtemp(prefix="finesweep-search-bench-"))).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {a.work}", flush=True)
    todo = [(s, seed) for seed in SEEDS for s in STRATEGIES]
    if a.only is not None:
        todo = [(s, seed) for s, seed in todo if s in a.only or f"{s}:{seed}" in a.only]
    passthrough = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
                   ("model", "steps", "rows", "heldout", "max_length", "grid_points", "startup", "min_examples",
                    "every_examples", "max_trials")]
    started = time.time()
    walls = {}

    def launch(job):
        strategy, seed = job
        log = a.work / f"{slug(strategy, seed)}.log"
        t0 = time.time()
        with log.open("a") as fh:
            code = subprocess.call([sys.executable, "-m", "bench.search_compare", "--work", str(a.work),
                                    *passthrough, "--job", strategy, str(seed)], stdout=fh, stderr=subprocess.STDOUT,
                                   cwd=ROOT)
        walls[slug(strategy, seed)] = round(time.time() - t0, 1)
        print(f"{time.strftime('%H:%M:%S')} {strategy} seed {seed}: exit {code} after {walls[slug(strategy, seed)]:.0f} s "
              f"(log {log})", flush=True)
        return code

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        codes = list(pool.map(launch, todo))
    wall = time.time() - started
    if any(codes):
        sys.exit("some runs failed: see their logs; rerun with --work to resume")
    runs = {(s, seed): read_run(s, seed, a) for seed in SEEDS for s in STRATEGIES}
    if a.test:
        for run in runs.values():
            run["test"] = score_on_test(run, a)
    summary = summarize(runs, a)
    table = table_md(summary)
    plot(runs, summary, a.out / "search-benchmark.png", 5 * a.steps)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in ("job", "only")}
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_time_s": round(wall, 1),
               "run_wall_s": walls, "settings": settings, "command": " ".join(["python", "-m", "bench.search_compare",
                                                                              *sys.argv[1:]]),
               "summary": summary, "table_md": table,
               "runs": [runs[(s, seed)] for seed in SEEDS for s in STRATEGIES]}
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(table)
    print(json.dumps(summary["target"]))
    print(f"wall time {wall / 60:.1f} min; results in {a.out}")


if __name__ == "__main__":
    main()
