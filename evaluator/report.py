"""Sweep report from the artifact store (no torch): leaderboard with intervals, the selection and its test,
the cost in GPU/CPU-hours per trial and sweep with what shared reference log-probs saved (evaluator/cost.py),
warnings, plots, side-by-side answers.

Writes <sweep>/report/{report.md, leaderboard.json, metrics.png, loss.png} into the store. Intervals and
comparisons come from finesweep.stats, the choice of best from finesweep.selection: the report restates them.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
from collections import OrderedDict

from finesweep import selection, stats
from finesweep.spec import SELECTABLE_METRICS, TrialSpec
from finesweep.store import ArtifactStore, StoreError, status_of, trial_prefix

from .cost import cost_md, format_hours, sweep_cost, trial_cost
from .metrics import identical_groups

log = logging.getLogger("finesweep")

# (column, metric, format); shown when any row has a value.
COLUMNS = [
    ("BLEU", "bleu", "{:.2f}"), ("chrF", "chrf", "{:.2f}"), ("ref ppl", "ref_perplexity", "{:.2f}"),
    ("held-out ppl", "heldout_perplexity", "{:.2f}"), ("pref acc", "preference_accuracy", "{:.3f}"),
    ("logp pref acc", "logp_preference_accuracy", "{:.3f}"),
    ("len-norm pref acc", "lennorm_preference_accuracy", "{:.3f}"),
    ("log-ratio margin", "logratio_margin", "{:.4f}"), ("reward margin", "reward_margin", "{:.4f}"),
    ("held-out DPO loss", "heldout_dpo_loss", "{:.4f}"),
    ("refusals", "refusal_rate", "{:.2f}"), ("repetition", "repetition_rate", "{:.3f}"),
    ("math acc", "math_accuracy", "{:.3f}"), ("GSM8K acc", "gsm8k_accuracy", "{:.3f}"),
]
MARKS = {selection.BEST: "**best**", selection.TIED: "tied with best", selection.WORSE: "worse",
         selection.NOT_TESTED: "not tested"}
NOT_APPLICABLE = "n/a"  # a figure that does not apply to a base/start row (e.g. preference accuracy): never a 0
FAILED = "failed"  # a figure not measured because its part of the evaluation failed (eval.json `errors`)
# What the held-out part of an evaluation (eval.json errors[].part "heldout") measures, by the sweep's stage; the
# benchmark ("benchmark") measures gsm8k_accuracy, an extra eval set ("set:<name>") what other rows took from it.
HELDOUT_METRICS = {"sft": ("heldout_perplexity", "heldout_loss"),
                   "dpo": ("preference_accuracy", "logp_preference_accuracy", "lennorm_preference_accuracy",
                           "logratio_margin", "reward_margin", "heldout_dpo_loss")}
# Held-out figures against the start model: only a row with its own adapter has them (never base/start).
VS_START = frozenset({"preference_accuracy", "logratio_margin", "reward_margin", "heldout_dpo_loss"})


def collect_rows(store: ArtifactStore, specs: list[TrialSpec]) -> list[dict]:
    rows = []
    for spec in specs:
        prefix = trial_prefix(spec.sweep, spec.trial_id)
        status = status_of(store, spec)  # the store's one reading of a trial's state
        row = {"name": spec.name, "trial_id": spec.trial_id, "stage": spec.stage, "state": status.state.value,
               "attempts": status.attempt, "hyper": spec.hyper if spec.trains else None}
        if status.failure is not None:
            row["failure"] = status.failure.as_dict()
        if status.done:
            row["eval"] = store.read_json(f"{prefix}/eval.json")
            row["summary"] = row["eval"]["summary"]
            row["samples"] = [json.loads(line) for line in store.read_bytes(f"{prefix}/samples.jsonl").decode()
                              .splitlines() if line.strip()]
        if spec.trains and status.trained:
            row["train"] = store.read_json(f"{prefix}/train.json")
        rows.append(row)
    return rows


def row_figures(row: dict, n_boot: int = 1000) -> dict[str, dict]:
    """{metric: {"value", "ci", "rows", "interval"}} for one finished row: from per-row data (every row of a
    leaderboard is scored on the same ids, so intervals are comparable), else the summary value with what
    interval eval.json recorded (none for most old files)."""
    ev = row.get("eval") or {}
    per_row = ev.get("per_row") or {}
    figures = {m: {k: f[k] for k in ("value", "ci", "rows", "interval")}
               for m, f in stats.summarize(per_row, selection.CONFIDENCE, n_boot).items()}
    summary = ev.get("summary") or row.get("summary") or {}
    for _, metric, _ in COLUMNS:
        if metric in figures or not isinstance(summary.get(metric), (int, float)):
            continue
        ci = summary.get(f"{metric}_ci95")
        figures[metric] = {"value": summary[metric], "ci": ci, "rows": summary.get(f"{metric}_rows"),
                           "interval": "as recorded in eval.json" if ci else None}
    return figures


def eval_errors(row: dict) -> list[dict]:
    """The parts of a finished row's evaluation that failed (eval.json `errors`: part, error, reason)."""
    return list((row.get("eval") or {}).get("errors") or [])


def failed_metrics(row: dict, rows: list[dict]) -> dict[str, str]:
    """{metric: the failed part} for the figures `row` lacks because a part of its evaluation failed: the
    benchmark's gsm8k_accuracy, the held-out rows' figures (HELDOUT_METRICS for the sweep's stage; on a base/start
    row only those it would have had), and for an extra eval set ("set:<name>") the metrics the other rows took
    from that set. The leaderboard shows these as FAILED, not as "-" (no figure) or n/a (does not apply)."""
    errors = eval_errors(row)
    if not errors:
        return {}
    stage = "dpo" if any(r.get("stage") == "dpo" for r in rows) else "sft"  # the sweep's (base rows say "base")
    ev = row["eval"]
    out: dict[str, str] = {}
    for error in errors:
        part = str(error.get("part") or "")
        if part == "benchmark":
            metrics = {"gsm8k_accuracy"}
        elif part == "heldout":
            metrics = set(HELDOUT_METRICS[stage]) - (VS_START if row.get("stage") == "base" else set())
        elif part.startswith("set:"):
            name = part[len("set:"):]
            metrics = {m for r in rows if r is not row for m, d in ((r.get("eval") or {}).get("per_row") or {}).items()
                       if isinstance(d, dict) and d.get("set") == name}
        else:
            metrics = set()
        for metric in sorted(metrics):
            if metric not in (ev.get("per_row") or {}) and (ev.get("summary") or {}).get(metric) is None:
                out.setdefault(metric, part)
    return out


def _error_warning(row: dict, error: dict, metrics: list[str]) -> str:
    reason = " ".join(str(error.get("reason") or "").split())
    reason = reason if len(reason) <= 500 else reason[:497] + "..."
    what = f"{error.get('error')}: {reason}" if error.get("error") else reason
    lost = f"; not measured (shown as `{FAILED}`): {', '.join(metrics)}" if metrics else ""
    return (f"{row['name']}: the `{error.get('part', '?')}` part of its evaluation failed ({what}){lost}; its "
            "other figures stand")


def find_warnings(rows: list[dict], primary_set: str) -> list[str]:
    """The failure modes the users hit: trials with identical outputs (on every eval set), trials that equal
    the base model, adapters that change nothing, failed trials, and each part of an evaluation that failed
    (eval.json `errors`: the trial is done with its other figures)."""
    warnings = []
    prints = {r["name"]: {name: s.get("fingerprint") for name, s in r["eval"]["sets"].items()}
              for r in rows if "eval" in r}
    for group in identical_groups(prints):
        names = ", ".join(group)
        sets = ", ".join(sorted(prints[group[0]])) or primary_set
        if any(n in ("base", "start") for n in group):
            warnings.append(f"identical outputs: {names} generate exactly the same answers on every eval set "
                            f"({sets}); a trial that matches its base/start model did not change its answers "
                            "(adapter not loaded, or too little training)")
        else:
            warnings.append(f"identical outputs: {names} generate exactly the same answers on every eval set "
                            f"({sets}); their BLEU and perplexity cannot tell them apart")
    for r in rows:
        trust = r.get("eval", {}).get("trust")
        if trust is not None and not trust["adapter_changes_outputs"]:
            diff, threshold = trust.get("max_logit_diff_vs_start"), trust.get("threshold")
            by = f" by more than {threshold:g}" if isinstance(threshold, (int, float)) else ""
            seen = f"max diff {diff:.3g}" if isinstance(diff, (int, float)) else "max diff 0"
            warnings.append(f"{r['name']}: its adapter changes no logit{by} ({seen}): it behaves like its start "
                            "model")
        if r["state"] == "failed":
            failure = r["failure"]
            warnings.append(f"{r['name']}: failed in {failure['phase']} (exit {failure.get('exit_code', '?')}): "
                            f"{failure['reason']}")
        lost = failed_metrics(r, rows)
        for error in eval_errors(r):
            shown = [m for m, part in lost.items() if part == error.get("part")]
            warnings.append(_error_warning(r, error, shown))
    return warnings


def _cell(figure: dict | None, fmt: str, row: dict, with_rows: bool, failed: bool = False) -> str:
    if figure is None or figure.get("value") is None:
        if failed:  # not measured because its part of the evaluation failed: not "-" (none) or n/a
            return FAILED
        if row["stage"] == "base":
            return NOT_APPLICABLE
        return "-" if row["state"] == "done" else row["state"]
    text = fmt.format(figure["value"])
    ci = figure.get("ci")
    text += f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else " (no interval)"
    if with_rows and figure.get("rows") is not None:
        text += f" ({figure['rows']})"
    return text


def _shown_columns(figures: dict[str, dict], failed: dict[str, dict] | None = None) -> list[tuple[str, str, str]]:
    """The columns some row has a value for, or (given `failed`: {row name: failed_metrics}) failed to measure."""
    lost = {m for f in (failed or {}).values() for m in f}
    return [c for c in COLUMNS if c[1] in lost or any(f.get(c[1], {}).get("value") is not None
                                                      for f in figures.values())]


def _column_rows(figures: dict[str, dict], metric: str) -> int | None:
    """The row count of a metric when every leaderboard row has the same one (then the header states it)."""
    counts = {f[metric].get("rows") for f in figures.values() if metric in f}
    return counts.pop() if len(counts) == 1 else None


def leaderboard_md(rows: list[dict], figures: dict[str, dict], record: dict | None) -> str:
    """One line per row: hyperparameters, each metric as `value [lo, hi]` (95%), the selection verdict."""
    verdicts = {t["name"]: t["verdict"] for t in (record or {}).get("trials", [])}
    ineligible = {t["name"] for t in (record or {}).get("ineligible", [])}
    failed = {r["name"]: failed_metrics(r, rows) for r in rows}
    shown = _shown_columns(figures, failed)
    head = ["", "trial", "id", "r", "alpha", "targets", "lr", "batch", "epochs", "beta"]
    with_rows = {}
    for label, metric, _ in shown:
        n = _column_rows(figures, metric)
        with_rows[metric] = n is None
        head.append(f"{label} ({n} rows)" if n is not None else f"{label} (rows)")
    head += ["final loss", "train time", "tok/s", "peak GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        h, t = r["hyper"], r.get("train", {})
        hp = [str(h.r), str(h.alpha), ",".join(m.replace("_proj", "") for m in h.target_modules), f"{h.lr:g}",
              f"{h.batch_size}x{h.grad_accum}", f"{h.epochs:g}", f"{h.beta:g}" if r["stage"] == "dpo" else ""] \
            if h else ["", "", "", "", "", "", ""]
        mark = MARKS.get(verdicts.get(r["name"]), "ineligible" if r["name"] in ineligible and r["stage"] != "base"
                         and r["state"] == "done" else "pruned (ineligible)" if r["state"] == "pruned" else "")
        cells = [mark, r["name"], f"`{r['trial_id']}`", *hp]
        row_figs = figures.get(r["name"], {})
        for _, metric, fmt in shown:
            cells.append(_cell(row_figs.get(metric), fmt, r, with_rows[metric], metric in failed[r["name"]]))
        cells.append(f"{t['final_loss']:.4f}" if t.get("final_loss") is not None else "")
        cells.append(f"{t['wall_time_s']:.0f}s" if t.get("wall_time_s") else "")
        cells.append(f"{t['tokens_per_s']:.0f}" if t.get("tokens_per_s") else "")
        cells.append(f"{t['peak_memory_gb']:.2f}" if t.get("peak_memory_gb") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_widths(rows: list[dict], figures: dict[str, dict]) -> dict[str, dict]:
    """Per metric: rows, the median 95% interval width over trials, the spread of trial values, and whether
    the intervals are wider than the differences they would have to resolve."""
    trials = [r["name"] for r in rows if r["stage"] != "base"]
    out = {}
    for _, metric, _ in _shown_columns(figures):
        figs = [figures[n][metric] for n in trials if metric in figures.get(n, {})]
        widths = [f["ci"][1] - f["ci"][0] for f in figs if f.get("ci")]
        values = [f["value"] for f in figs if f.get("value") is not None]
        if not widths:
            continue
        width, spread = statistics.median(widths), (max(values) - min(values) if values else 0.0)
        out[metric] = {"rows": _column_rows(figures, metric), "median_width": width, "spread": spread,
                       "too_few_rows_to_rank": len(values) > 1 and width > spread}
    return out


def _fmt(value, ci=None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def selection_md(record: dict) -> list[str]:
    """How the best was chosen, in words a reviewer can check: rows, test, level, tied set, tie-break rule,
    guardrails and who they excluded."""
    md = ["## Selection", ""]
    metric = record["metric"]
    if record.get("guardrails"):
        rails = ", ".join(f"{g['metric']} {'>=' if 'min' in g else '<='} {g.get('min', g.get('max'))}"
                          for g in record["guardrails"])
        md.append(f"Guardrails (checked on all of each metric's rows): {rails}.")
    for item in record["ineligible"]:
        md.append(f"- not eligible: **{item['name']}**: {item['reason']}")
    if record["trial_id"] is None:
        md += ["", f"No trial is eligible by `{metric}`: no best.", ""]
        return md
    if record["rows_used"] == selection.FALLBACK:
        md.append(f"Chosen by `{metric}` ({record['mode']}) from each trial's {selection.FALLBACK}: ties are exact "
                  "equality only. Re-evaluate the trials to get intervals and a paired test.")
    else:
        md.append(f"Chosen by `{metric}` ({record['mode']}) on the validation part of its rows "
                  f"({record['validation_rows']} rows) and reported on the test part ({record['test_rows']} rows), "
                  f"so the reported figure is not inflated by the choice. Split: {record['split']}.")
        md.append(f"Test: the top trial on the validation rows (`{record['top_by_value']}`) against each other "
                  f"eligible trial on the same rows, {record['comparison']['test']}, two-sided, "
                  f"{record['comparison']['correction']}-corrected at level {record['comparison']['level']:g}; "
                  f"intervals are {record['level']:.0%}.")
        md += ["", "| trial | verdict | validation value [95%] | rows | difference vs top [95%] | p | p (Holm) |",
               "|---|---|---|---|---|---|---|"]
        for t in record["trials"]:
            c = t.get("comparison_with_top")
            test = [_fmt(c["difference"], c["ci"]), f"{c['p_value']:.3g}", f"{c['p_holm']:.3g}"] if c else ["", "", ""]
            md.append(f"| {t['name']} | {t['verdict']} | {_fmt(t['validation']['value'], t['validation']['ci'])} | "
                      f"{t['validation']['rows']} | " + " | ".join(test) + " |")
        md.append("")
    md.append(f"Tied set ({len(record['tied'])}): {', '.join(record['tied'])}. Tie-break rule: "
              f"{record['tie_break']['rule']}." + (f" Decided by: {record['tie_break']['decided_by']}."
                                                   if record["tie_break"]["decided_by"] else ""))
    md.append(f"**Best: {record['name']}** (`{record['trial_id']}`): {metric} = {_fmt(record['value'], record['ci'])}"
              f" over {record['rows']} rows of the {record['value_part']}"
              + (f" ({record['interval']} interval)." if record.get("interval") else "."))
    md.append("")
    return md


def health_md(rows: list[dict]) -> list[str]:
    """DPO health per trial: DPO can raise the preference margin while pushing both answers' log-probs down
    (the model unlearns the chosen answers too); that is a failure the accuracy alone hides."""
    lines = []
    for r in rows:
        h = ((r.get("eval") or {}).get("heldout") or {}).get("health")
        if r["stage"] != "dpo" or not h or h.get("chosen_logp_change") is None:
            continue
        verdict = ("both falling: chosen and rejected answers both lost probability vs the start model (a known "
                   "DPO failure: the margin grows by unlearning)" if h.get("both_falling") else "ok")
        lines.append(f"- {r['name']}: log p(chosen) {h['chosen_logp_change']:+.4g}, log p(rejected) "
                     f"{h['rejected_logp_change']:+.4g} vs the start model over {h.get('pairs', '?')} pairs: "
                     f"{verdict}")
    return ["## DPO health", ""] + lines + [""] if lines else []


def plot_metrics(rows: list[dict], metrics: list[str], figures: dict[str, dict]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["name"] in figures]
    metrics = list(dict.fromkeys(m for m in metrics if any(figures[r["name"]].get(m, {}).get("value") is not None
                                                           for r in done)))
    if not done or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        # Bars only where the figure exists, with asymmetric error bars from its interval; a row without the
        # figure gets an "n/a" label at its place instead of a zero bar.
        present = [(x, r, figures[r["name"]][metric]) for x, r in enumerate(done)
                   if figures[r["name"]].get(metric, {}).get("value") is not None]
        low = [f["value"] - f["ci"][0] if f.get("ci") else 0.0 for _, _, f in present]
        high = [f["ci"][1] - f["value"] if f.get("ci") else 0.0 for _, _, f in present]
        ax.bar([x for x, _, _ in present], [f["value"] for _, _, f in present], yerr=[low, high], capsize=3,
               ecolor="#333333", color=["#999999" if r["stage"] == "base" else "#3b75af" for _, r, _ in present])
        shown = {x for x, _, _ in present}
        for x, r in enumerate(done):
            if x not in shown:
                label = FAILED if metric in failed_metrics(r, rows) else NOT_APPLICABLE
                ax.annotate(label, (x, 0), ha="center", va="bottom", fontsize=8, color="#666666")
        ax.set_xticks(range(len(done)), [r["name"] for r in done])
        ax.set_xlim(-0.6, len(done) - 0.4)
        ax.set_title(f"{metric} ({SELECTABLE_METRICS.get(metric, 'max')} is better; 95% interval)", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_losses(rows: list[dict]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r["name"], [(e["step"], e["loss"]) for e in r["train"]["log_history"] if "loss" in e])
              for r in rows if "train" in r]
    curves = [(n, c) for n, c in curves if c]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss per trial")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def side_by_side(rows: list[dict], primary_set: str, max_chars: int = 400) -> str:
    done = [r for r in rows if "samples" in r]
    if not done:
        return ""
    questions: OrderedDict = OrderedDict()
    for r in done:
        for s in r["samples"]:
            if s["set"] == primary_set:
                questions.setdefault(s["prompt"], {"reference": s["reference"], "answers": {}})["answers"][
                    r["name"]] = s["answer"]
    out = []
    for i, (prompt, q) in enumerate(questions.items(), 1):
        out.append(f"### Q{i}. {_clip(prompt, max_chars)}\n\n*reference:* {_clip(q['reference'], max_chars)}\n")
        out += [f"- **{name}**: {_clip(answer, max_chars) or '(empty)'}" for name, answer in q["answers"].items()]
        out.append("")
    return "\n".join(out)


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= n else text[:n] + " ..."


def build_report(store: ArtifactStore, sweep, specs: list[TrialSpec]) -> str:
    """Write the sweep's report into the store; returns the report key."""
    primary = sweep.eval.set
    rows = collect_rows(store, specs)
    try:
        best = store.read_json(f"{sweep.name}/best.json")
    except StoreError:
        best = None
    n_boot = sweep.eval.bootstrap_samples
    # The same rule select_best applied, on the same store contents: the report shows who was excluded and
    # why even when no trial is eligible (and so no best.json was written).
    record = selection.choose(rows, sweep.select, n_boot=n_boot)
    if best and record["trial_id"] and best.get("trial_id") != record["trial_id"]:
        log.warning("sweep %s: best.json names %s but the store now selects %s; run make report to rewrite it",
                    sweep.name, best.get("name"), record["name"])
    figures = {r["name"]: row_figures(r, n_boot) for r in rows if "eval" in r}
    widths = interval_widths(rows, figures)
    warnings = find_warnings(rows, primary)
    trials = [r for r in rows if r["stage"] != "base"]
    counts = {s: sum(r["state"] == s for r in trials) for s in ("done", "trained", "pending", "failed", "pruned")}
    first = next((r for r in rows if "eval" in r), None)
    costs = {r["name"]: trial_cost(r) for r in rows}
    cost = sweep_cost(costs)
    prefix = f"{sweep.name}/report"
    md = [f"# Sweep `{sweep.name}` ({sweep.stage})", ""]
    md.append(f"Model `{sweep.model}`; data `{sweep.dataset.path}` ({sweep.dataset.format}, split "
              f"`{sweep.dataset.split}`); prompt format `{sweep.prompt_format}`; max length {sweep.max_length}.")
    if sweep.start_from:
        md.append(f"Started from `{sweep.start_from}`" + (f" = `{specs[-1].start.trial_id}`." if specs and
                                                           specs[-1].start else "."))
    md.append(f"Trials: {counts['done']} done, {counts['failed']} failed, " + (f"{counts['pruned']} pruned, " if
              counts["pruned"] else "") + f"{counts['trained'] + counts['pending']} not finished, of {len(trials)}.")
    saved = f", {format_hours(cost['saved'])} saved by shared reference log-probs" if cost["saved"] else ""
    md.append(f"Cost: {format_hours(cost['total'], '0 device-hours')}{saved} (see Cost).")
    if record["trial_id"]:
        md.append(f"Best by `{record['metric']}` ({record['mode']}): **{record['name']}** (`{record['trial_id']}`) = "
                  f"{_fmt(record['value'], record['ci'])} on the {record['value_part']}; tied set: "
                  f"{', '.join(record['tied'])} (see Selection).")
    md += ["", "## What was measured", ""]
    if first:
        for set_name, s in first["eval"]["sets"].items():
            gen = s["generation"]
            md.append(f"- `{set_name}`: {s['rows']} prompts, greedy generation "
                      f"(max_new_tokens {gen.get('max_new_tokens')}, batch {gen['batch_size']}); "
                      f"BLEU/chrF vs the reference answers (`{s.get('bleu_signature', '')}`), 95% bootstrap "
                      f"percentile interval over prompts (corpus score recomputed on each resample); perplexity of "
                      f"the reference answer given the prompt"
                      + (f"; refusal rate over its {s['refusal_rows']} harmful prompts" if "refusal_rows" in s else "")
                      + ("; exact match of the final number" if "math_accuracy" in s else "") + ".")
        held = next((r["eval"]["heldout"] for r in rows if (r.get("eval") or {}).get("heldout")), None)
        if held:
            n = held.get("rows", held.get("pairs"))
            md.append(f"- held-out: {n} rows of `{held['split']}`" + (
                ": preference accuracy, log-ratio margin and held-out DPO loss of the implicit reward against the "
                "start model, and how often log p(chosen) > log p(rejected)" if "pairs" in held
                else ": perplexity of the reference responses given their prompts") + ".")
        gsm8k = next((r["eval"]["per_row"]["gsm8k_accuracy"] for r in rows if "gsm8k_accuracy" in
                      ((r.get("eval") or {}).get("per_row") or {})), None)  # the first row's may have failed
        if gsm8k:
            md.append(f"- GSM8K benchmark: exact match of the final number on {len(gsm8k['ids'])} rows of GSM8K's "
                      "test split, with its Wilson interval.")
        md.append("- repetition: share of repeated word 4-grams within an answer, averaged over answers.")
        md.append(f"- intervals: {selection.CONFIDENCE:.0%}, Wilson for proportions, bootstrap percentile "
                  f"({n_boot} resamples of rows) for means, perplexities and BLEU/chrF; `{NOT_APPLICABLE}`: the "
                  f"figure does not apply to that row; `{FAILED}`: not measured because that part of the row's "
                  "evaluation failed (see Warnings); `(no interval)`: an older eval.json without per-row data.")
    md += ["", "## Leaderboard", "", leaderboard_md(rows, figures, record), ""]
    if widths:
        md.append("Interval widths (median over trials, 95%):")
        for metric, w in widths.items():
            md.append(f"- `{metric}`: {w['median_width']:.4g} over {w['rows'] if w['rows'] is not None else 'varying'}"
                      f" rows; trials span {w['spread']:.4g}" + (
                          ": the intervals are wider than the differences, so this eval set is too small to rank the "
                          "trials by it" if w["too_few_rows_to_rank"] else ""))
        md.append("")
    md += selection_md(record)
    md += health_md(rows)
    md += cost_md(rows, costs, cost)
    if warnings:
        md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    for name, data in (("metrics.png", plot_metrics(rows, [sweep.select.metric, "bleu", "chrf"], figures)),
                       ("loss.png", plot_losses(rows))):
        if data:
            store.write_bytes(f"{prefix}/{name}", data)
            md.append(f"![{name}]({name})")
    from .search_report import search_md  # held-out curves; a search sweep's study (evaluator/search_report.py)

    md += search_md(store, sweep, specs, rows)
    from trainer.tracking import describe_store, log_report  # no torch at import

    md += ["", describe_store(store, sweep.name) + ".", "", "## Answers side by side", "", side_by_side(rows, primary)]
    store.write_bytes(f"{prefix}/report.md", "\n".join(md).encode())
    verdicts = {t["name"]: t["verdict"] for t in record["trials"]}
    verdicts.update({t["name"]: "ineligible: " + t["reason"] for t in record["ineligible"]})
    board = [{**{k: v for k, v in r.items() if k in ("name", "trial_id", "stage", "state", "summary", "failure")},
              "figures": figures.get(r["name"], {}), "verdict": verdicts.get(r["name"]), "cost": costs[r["name"]],
              **({"eval_errors": eval_errors(r), "failed_metrics": failed_metrics(r, rows)} if eval_errors(r) else {})}
             for r in rows]
    store.write_json(f"{prefix}/leaderboard.json", {"sweep": sweep.name, "best": best, "selection": record,
                                                    "interval_widths": widths, "rows": board, "cost": cost,
                                                    "warnings": warnings})
    log_report(store, sweep, specs, prefix)  # to each trial's MLflow run, when tracking is configured
    log.info("report: %s/%s/report.md (%d rows, %d warnings)", store.url, prefix, len(rows), len(warnings))
    return f"{prefix}/report.md"
