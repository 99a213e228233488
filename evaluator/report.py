"""Sweep report from the artifact store (no torch): leaderboard, warnings, plots, side-by-side answers.

Writes <sweep>/report/{report.md, leaderboard.json, metrics.png, loss.png} into the store.
"""

from __future__ import annotations

import io
import json
import logging
from collections import OrderedDict

from finesweep.spec import SELECTABLE_METRICS, TrialSpec
from finesweep.store import FAILED, ArtifactStore, StoreError, trial_prefix, trial_state

from .metrics import identical_groups

log = logging.getLogger("finesweep")

# (column, summary key, format); shown when any row has a value.
COLUMNS = [
    ("BLEU", "bleu", "{:.2f}"), ("chrF", "chrf", "{:.2f}"), ("ref ppl", "ref_perplexity", "{:.2f}"),
    ("held-out ppl", "heldout_perplexity", "{:.2f}"), ("pref acc", "preference_accuracy", "{:.3f}"),
    ("reward margin", "reward_margin", "{:.4f}"), ("logp pref acc", "logp_preference_accuracy", "{:.3f}"),
    ("refusals", "refusal_rate", "{:.2f}"), ("repetition", "repetition_rate", "{:.3f}"),
    ("math acc", "math_accuracy", "{:.3f}"),
]


def collect_rows(store: ArtifactStore, specs: list[TrialSpec]) -> list[dict]:
    rows = []
    for spec in specs:
        prefix = trial_prefix(spec.sweep, spec.trial_id)
        row = {"name": spec.name, "trial_id": spec.trial_id, "stage": spec.stage,
               "state": trial_state(store, spec.sweep, spec.trial_id), "hyper": spec.hyper if spec.trains else None}
        if store.exists(f"{prefix}/{FAILED}") and row["state"] != "done":
            row["state"], row["failure"] = "failed", store.read_json(f"{prefix}/{FAILED}")
        if row["state"] == "done":
            row["eval"] = store.read_json(f"{prefix}/eval.json")
            row["summary"] = row["eval"]["summary"]
            row["samples"] = [json.loads(line) for line in store.read_bytes(f"{prefix}/samples.jsonl").decode()
                              .splitlines() if line.strip()]
        if spec.trains and row["state"] in ("done", "trained"):
            row["train"] = store.read_json(f"{prefix}/train.json")
        rows.append(row)
    return rows


def find_warnings(rows: list[dict], primary_set: str) -> list[str]:
    """The failure modes the users hit: trials with identical outputs, trials that equal the base model,
    adapters that change nothing."""
    warnings = []
    prints = {r["name"]: r["eval"]["sets"][primary_set]["fingerprint"] for r in rows if "eval" in r}
    for group in identical_groups(prints):
        names = ", ".join(group)
        if any(n in ("base", "start") for n in group):
            warnings.append(f"identical outputs: {names} generate exactly the same answers on {primary_set}; "
                            "a trial that matches its base/start model did not change its answers "
                            "(adapter not loaded, or too little training)")
        else:
            warnings.append(f"identical outputs: {names} generate exactly the same answers on {primary_set}; "
                            "their BLEU and perplexity cannot tell them apart")
    for r in rows:
        trust = r.get("eval", {}).get("trust")
        if trust is not None and not trust["adapter_changes_outputs"]:
            warnings.append(f"{r['name']}: its adapter changes no logit (max diff 0): it behaves like its start "
                            "model")
        if r["state"] == "failed":
            failure = r["failure"]
            warnings.append(f"{r['name']}: failed in {failure['phase']} (exit {failure.get('exit_code', '?')}): "
                            f"{failure['reason']}")
    return warnings


def leaderboard_md(rows: list[dict], select_metric: str, best_id: str | None) -> str:
    shown = [c for c in COLUMNS if any(r.get("summary", {}).get(c[1]) is not None for r in rows)]
    head = ["", "trial", "id", "r", "alpha", "targets", "lr", "batch", "epochs", "beta"] + [c[0] for c in shown] + \
        ["BLEU 95% CI", "final loss", "train time", "tok/s", "peak GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        h, s, t = r["hyper"], r.get("summary", {}), r.get("train", {})
        hp = [str(h.r), str(h.alpha), ",".join(m.replace("_proj", "") for m in h.target_modules), f"{h.lr:g}",
              f"{h.batch_size}x{h.grad_accum}", f"{h.epochs:g}", f"{h.beta:g}" if r["stage"] == "dpo" else ""] \
            if h else ["", "", "", "", "", "", ""]
        cells = [("**best**" if r["trial_id"] == best_id else ""), r["name"], f"`{r['trial_id']}`", *hp]
        for _, key, fmt in shown:
            v = s.get(key)
            cells.append(fmt.format(v) if v is not None else ("-" if r["state"] == "done" else r["state"]))
        ci = s.get("bleu_ci95")
        cells.append(f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        cells.append(f"{t['final_loss']:.4f}" if t.get("final_loss") is not None else "")
        cells.append(f"{t['wall_time_s']:.0f}s" if t.get("wall_time_s") else "")
        cells.append(f"{t['tokens_per_s']:.0f}" if t.get("tokens_per_s") else "")
        cells.append(f"{t['peak_memory_gb']:.2f}" if t.get("peak_memory_gb") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metrics(rows: list[dict], metrics: list[str]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "summary" in r]
    metrics = [m for m in metrics if any(r["summary"].get(m) is not None for r in done)]
    if not done or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        names = [r["name"] for r in done]
        values = [r["summary"].get(metric) or 0.0 for r in done]
        colors = ["#999999" if r["stage"] == "base" else "#3b75af" for r in done]
        ax.bar(names, values, color=colors)
        ax.set_title(f"{metric} ({SELECTABLE_METRICS.get(metric, 'max')} is better)", fontsize=10)
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
    warnings = find_warnings(rows, primary)
    trials = [r for r in rows if r["stage"] != "base"]
    counts = {s: sum(r["state"] == s for r in trials) for s in ("done", "trained", "pending", "failed")}
    first = next((r for r in rows if "eval" in r), None)
    prefix = f"{sweep.name}/report"
    md = [f"# Sweep `{sweep.name}` ({sweep.stage})", ""]
    md.append(f"Model `{sweep.model}`; data `{sweep.dataset.path}` ({sweep.dataset.format}, split "
              f"`{sweep.dataset.split}`); prompt format `{sweep.prompt_format}`; max length {sweep.max_length}.")
    if sweep.start_from:
        md.append(f"Started from `{sweep.start_from}`" + (f" = `{specs[-1].start.trial_id}`." if specs and
                                                           specs[-1].start else "."))
    md.append(f"Trials: {counts['done']} done, {counts['failed']} failed, {counts['trained'] + counts['pending']} "
              f"not finished, of {len(trials)}.")
    if best:
        md.append(f"Best by `{best['metric']}` ({best['mode']}): **{best['name']}** (`{best['trial_id']}`) = "
                  f"{best['value']:.4g}.")
    md += ["", "## What was measured", ""]
    if first:
        for set_name, s in first["eval"]["sets"].items():
            md.append(f"- `{set_name}`: {s['rows']} prompts, greedy generation "
                      f"(max_new_tokens {s['generation'].get('max_new_tokens')}, batch {s['generation']['batch_size']}); "
                      f"BLEU/chrF vs the reference answers (`{s.get('bleu_signature', '')}`), BLEU 95% bootstrap "
                      f"interval over prompts; perplexity of the reference answer given the prompt"
                      + (f"; refusal rate over its {s['refusal_rows']} harmful prompts" if "refusal_rows" in s else "")
                      + ("; exact match of the final number" if "math_accuracy" in s else "") + ".")
        held = first["eval"].get("heldout")
        if held:
            n = held.get("rows", held.get("pairs"))
            md.append(f"- held-out: {n} rows of `{held['split']}`" + (
                ": preference accuracy and mean reward margin of the DPO implicit reward "
                "beta*(log pi - log pi_start), and how often log p(chosen) > log p(rejected)" if "pairs" in held
                else ": perplexity of the reference responses given their prompts") + ".")
        md.append("- repetition: share of repeated word 4-grams within an answer, averaged over answers.")
    md += ["", "## Leaderboard", "", leaderboard_md(rows, sweep.select.metric, best and best["trial_id"]), ""]
    if warnings:
        md += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    for name, data in (("metrics.png", plot_metrics(rows, [sweep.select.metric, "bleu", "chrf"])),
                       ("loss.png", plot_losses(rows))):
        if data:
            store.write_bytes(f"{prefix}/{name}", data)
            md.append(f"![{name}]({name})")
    md += ["", "## Answers side by side", "", side_by_side(rows, primary)]
    store.write_bytes(f"{prefix}/report.md", "\n".join(md).encode())
    board = [{k: v for k, v in r.items() if k in ("name", "trial_id", "stage", "state", "summary", "failure")}
             for r in rows]
    store.write_json(f"{prefix}/leaderboard.json", {"sweep": sweep.name, "best": best, "rows": board,
                                                    "warnings": warnings})
    log.info("report: %s/%s/report.md (%d rows, %d warnings)", store.url, prefix, len(rows), len(warnings))
    return f"{prefix}/report.md"
