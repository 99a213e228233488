"""Choosing a sweep's best trial from evaluation data (no torch): eligibility, a paired test against the top
trial, a stated tie-break, and the winner's figure on rows the choice did not see.

The rules, in order:
1. Eligible: the trial finished, has the selection metric, and meets every guardrail of `select:`. Guardrails
   are checked on all of the metric's rows (they are pass/fail floors, not what is being maximised).
2. The selection metric's rows (ids every eligible trial shares) are split by finesweep.stats.split_ids into a
   validation part, used for everything that chooses, and a test part, used only for the winner's figure.
3. The top trial by value on the validation part is compared with each other eligible trial on the same rows
   (exact McNemar for 0/1 metrics, paired bootstrap otherwise), Holm-corrected at LEVEL. A trial whose
   adjusted p-value is below LEVEL is "worse"; the rest are "not distinguishable from best" and form the
   tied set with the top trial.
4. Within the tied set the tie-break rule decides: `select.tie_break` (better first, validation part), then
   the selection metric's own value, then training cost (train wall time, then trainable parameters), then
   the trial name. Position in the sweep file never decides.

Old eval.json files without per-row data fall back to their summary values: no interval, no split, no test;
the tied set is then the trials with exactly the top value, and the record says so.
"""

from __future__ import annotations

import math

from . import stats
from .spec import SELECTABLE_METRICS, SelectSpec

LEVEL = 0.05  # family-wise error rate of the comparisons with the top trial (Holm)
CONFIDENCE = 0.95  # intervals reported with each figure
BEST, TIED, WORSE, NOT_TESTED = "best", "not distinguishable from best", "worse", "not tested"
FALLBACK = "summary value (no per-row data in eval.json: no interval, no split, no test)"


def tie_break_rule(select: SelectSpec) -> str:
    return (f"among the tied set: {_better_word(select.tie_break)} {select.tie_break} on the validation rows, then "
            f"{_better_word(select.metric, select.mode)} {select.metric}, then lower training cost (train wall "
            "time, then trainable parameters), then trial name; never position in the sweep file")


def choose(rows: list[dict], select: SelectSpec, n_boot: int = 1000, seed: int = 0) -> dict:
    """The selection record (what best.json holds) from leaderboard rows: dicts with "name", "trial_id",
    "stage" (sft | dpo | base; base-stage rows are the references "base" and "start"), "state", and for finished
    trials "eval" (eval.json) and optionally "train" (train.json). `trial_id` is None when no trial is
    eligible."""
    metric = select.metric
    refs = {r["name"]: r for r in rows if r.get("stage") == "base" and "eval" in r}
    record = {"trial_id": None, "name": None, "metric": metric, "mode": select.mode, "value": None,
              "level": CONFIDENCE, "comparison": {"level": LEVEL, "correction": "Holm", "test": None},
              "tie_break": {"rule": tie_break_rule(select), "metric": select.tie_break, "decided_by": None},
              "guardrails": [{"metric": g.metric, g.side: g.bound} for g in select.guardrails],
              "split": stats.SPLIT_RULE, "ineligible": [], "trials": []}
    eligible = []
    for row in rows:
        if row.get("stage") == "base":
            continue
        reason = _ineligible_reason(row, select, refs)
        if reason:
            record["ineligible"].append({"name": row["name"], "trial_id": row["trial_id"], "reason": reason})
        else:
            eligible.append(row)
    if not eligible:
        return record

    per_row = all(metric in _per_row(r) for r in eligible)
    figures: dict[str, dict] = {}
    if per_row:
        metric_rows = {r["name"]: stats.metric_rows(metric, _per_row(r)[metric]) for r in eligible}
        shared = set.intersection(*(set(m.ids) for m in metric_rows.values()))
        per_row = bool(shared)  # trials scored on disjoint rows cannot be paired (the evaluator prevents it)
    if per_row:
        validation, test = stats.split_ids(shared)
        for r in eligible:
            figures[r["name"]] = _figure(metric_rows[r["name"]].subset(validation), n_boot, seed)
        record.update(validation_rows=len(validation), test_rows=len(test), rows_used="validation part",
                      validation_ids=sorted(validation), test_ids=sorted(test))
    else:
        for r in eligible:
            figures[r["name"]] = {"value": r["eval"]["summary"][metric], "ci": None, "rows": _summary_rows(r, metric),
                                  "interval": None}
        record.update(validation_rows=None, test_rows=None, rows_used=FALLBACK)

    sign = -1.0 if select.mode == "max" else 1.0
    tie_values = _tie_break_values(eligible, select.tie_break, n_boot, seed)
    def order_key(r):  # the tie-break rule as a sort key: smaller is better
        tb = tie_values.get(r["name"])
        tb_sign = -1.0 if SELECTABLE_METRICS[select.tie_break] == "max" else 1.0
        train = r.get("train") or {}
        return (tb is None, tb_sign * tb if tb is not None else 0.0, sign * figures[r["name"]]["value"],
                _missing_last(train.get("wall_time_s")), _missing_last(train.get("trainable_params")), r["name"])

    # The top trial by value; among exactly equal values the tie-break order, not the file order, decides.
    top = min(eligible, key=lambda r: (sign * figures[r["name"]]["value"], order_key(r)))
    verdicts: dict[str, dict] = {top["name"]: {}}
    others = [r for r in eligible if r is not top]
    if per_row:
        results = [stats.compare(metric_rows[top["name"]], metric_rows[r["name"]], ids=validation, level=CONFIDENCE,
                                 n_boot=n_boot, seed=seed) for r in others]
        adjusted = stats.holm([c["p_value"] for c in results])
        for r, c, p_holm in zip(others, results, adjusted):
            c["p_holm"] = p_holm
            c["verdict"] = WORSE if p_holm < LEVEL else TIED
            verdicts[r["name"]] = c
        record["comparison"]["test"] = (stats.MCNEMAR if metric_rows[top["name"]].kind == "binary"
                                        else f"{stats.PAIRED_BOOTSTRAP} ({n_boot} resamples)")
    else:
        for r in others:
            equal = figures[r["name"]]["value"] == figures[top["name"]]["value"]
            verdicts[r["name"]] = {"verdict": TIED if equal else NOT_TESTED}
        record["comparison"]["test"] = "none: " + FALLBACK
    tied = [top] + [r for r in others if verdicts[r["name"]]["verdict"] == TIED]
    ranked = sorted(tied, key=order_key)
    winner = ranked[0]
    record["tie_break"]["decided_by"] = _decided_by(ranked, order_key, select) if len(ranked) > 1 else None
    record["top_by_value"] = top["name"]
    record["tied"] = [r["name"] for r in ranked]

    if per_row:
        reported = _figure(metric_rows[winner["name"]].subset(test), n_boot, seed)
        part = "test part"
        if not reported["rows"]:  # too few rows to hold any out: say so rather than show nothing
            reported, part = figures[winner["name"]], "validation part (no test rows)"
    else:
        summary = winner["eval"]["summary"]
        reported = {"value": summary[metric], "ci": summary.get(f"{metric}_ci95"),
                    "rows": _summary_rows(winner, metric),
                    "interval": "as recorded in eval.json" if summary.get(f"{metric}_ci95") else None}
        part = FALLBACK
    record.update(trial_id=winner["trial_id"], name=winner["name"], value=reported["value"], ci=reported["ci"],
                  rows=reported["rows"], interval=reported["interval"], value_part=part,
                  validation=figures[winner["name"]], test=reported)
    for r in eligible:
        name = r["name"]
        verdict = BEST if r is winner else (TIED if any(t is r for t in tied) else verdicts[name]["verdict"])
        entry = {"name": name, "trial_id": r["trial_id"], "verdict": verdict, "validation": figures[name],
                 "tie_break_value": tie_values.get(name)}
        if r is not top:
            entry["comparison_with_top"] = {k: v for k, v in verdicts[name].items() if k != "verdict"}
        record["trials"].append(entry)
    return record


def _per_row(row: dict) -> dict:
    return (row.get("eval") or {}).get("per_row") or {}


def _summary_rows(row: dict, metric: str):
    """Rows behind a summary value: `<metric>_rows`, or in older files the held-out / eval set row count."""
    summary = row["eval"].get("summary", {})
    return summary.get(f"{metric}_rows") or summary.get("heldout_rows") or summary.get("eval_rows")


def _figure(rows: stats.MetricRows, n_boot: int, seed: int) -> dict:
    ci, method = stats.interval(rows, CONFIDENCE, n_boot, seed)
    return {"value": rows.value(), "ci": ci, "rows": len(rows.ids), "interval": method}


def _missing_last(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def value_of(row: dict, metric: str, ids: set | None = None) -> float | None:
    """A row's value of `metric`: from per-row data (over `ids` when given), else its summary value."""
    per_row = _per_row(row)
    if metric in per_row:
        return stats.metric_rows(metric, per_row[metric]).subset(ids).value()
    value = ((row.get("eval") or {}).get("summary") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _ineligible_reason(row: dict, select: SelectSpec, refs: dict[str, dict]) -> str | None:
    if row.get("state") == "pruned":  # finesweep.search stopped it part way: not comparable with finished trials
        return "pruned by the search (stopped early, before the end of its training)"
    if row.get("state") != "done" or "eval" not in row:
        return f"not finished ({row.get('state', 'unknown')})"
    if value_of(row, select.metric) is None:
        return f"its evaluation has no {select.metric}"
    for rail in select.guardrails:
        bound, what = rail.bound, f"{rail.bound:g}" if isinstance(rail.bound, (int, float)) else None
        ids = None
        if isinstance(bound, str):
            ref = refs.get(bound)
            if ref is None or value_of(ref, rail.metric) is None:
                return f"guardrail {rail.metric} {rail.side}: {bound} cannot be checked: the {bound} row has no " \
                       f"{rail.metric}"
            # Compare on the rows both have, so a bound from a reference row is over the same rows.
            if rail.metric in _per_row(row) and rail.metric in _per_row(ref):
                ids = set(_per_row(row)[rail.metric]["ids"]) & set(_per_row(ref)[rail.metric]["ids"])
            bound = value_of(ref, rail.metric, ids)
            what = f"the {rail.bound} row's {bound:.4g}"
        value = value_of(row, rail.metric, ids)
        if value is None:
            return f"guardrail {rail.metric} {rail.side}: {rail.bound} cannot be checked: its evaluation has no " \
                   f"{rail.metric}"
        broken = value < bound if rail.side == "min" else value > bound
        if broken:
            return (f"breaks guardrail {rail.metric} {rail.side}: {rail.bound} ({rail.metric} {value:.4g} is "
                    f"{'below' if rail.side == 'min' else 'above'} {what})")
    return None


def _tie_break_values(rows: list[dict], metric: str, n_boot: int, seed: int) -> dict[str, float | None]:
    """Each trial's tie-break metric on the validation part of that metric's shared rows."""
    if all(metric in _per_row(r) for r in rows):
        shared = set.intersection(*(set(_per_row(r)[metric]["ids"]) for r in rows))
        validation, _ = stats.split_ids(shared)
        return {r["name"]: value_of(r, metric, validation) for r in rows}
    return {r["name"]: value_of(r, metric) for r in rows}


def _decided_by(ranked: list[dict], order_key, select: SelectSpec) -> str:
    """Which part of the rule separated the winner from the runner-up."""
    first, second = order_key(ranked[0]), order_key(ranked[1])
    labels = [select.tie_break, select.tie_break, select.metric, "train wall time", "trainable parameters", "name"]
    for label, a, b in zip(labels, first, second):
        if a != b:
            return label
    return "name"


def _better_word(metric: str, mode: str | None = None) -> str:
    return "higher" if (mode or SELECTABLE_METRICS.get(metric, "max")) == "max" else "lower"
