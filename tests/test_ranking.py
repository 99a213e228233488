"""Rankings with confidence (issue 10, bugs 4 and 5): intervals on known values, paired tests, ties reported as
ties with a stated tie-break, guardrails, disjoint rows for choosing and reporting, and the report that shows
it all. Pure Python: stores are built from hand-written eval.json files (the per-row data contract), no torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from sacrebleu.metrics import BLEU

from evaluator import metrics
from evaluator.report import build_report, find_warnings, plot_metrics
from finesweep import selection, stats
from finesweep.spec import SweepError, StartRef, parse_sweep
from finesweep.store import DONE, LocalStore, trial_prefix
from submitter.plan import select_best

START = StartRef("smoke-sft", "sft-0123456789")

# Hypotheses and references whose BLEU bootstrap distribution is skewed right: sacrebleu's mean +- half-width
# runs below 0 (the old code clipped it to 0) while the 2.5th percentile is clearly positive.
SKEWED_BLEU = [
    ("upsilon rho omicron nu tau", "upsilon rho theta iota tau epsilon mu beta lambda sigma"),
    ("delta iota theta epsilon zeta sigma", "delta iota theta lambda mu nu epsilon zeta rho pi"),
    ("iota nu upsilon omicron", "iota zeta alpha gamma delta kappa tau sigma beta epsilon"),
    ("upsilon delta tau mu zeta eta iota omicron", "upsilon delta tau mu zeta xi beta rho theta iota"),
    ("alpha zeta xi", "upsilon eta pi kappa iota beta omicron xi epsilon mu"),
    ("delta rho pi omicron xi", "delta rho gamma xi pi lambda sigma iota eta theta"),
]


# ------------------------------------------------------------------------------------------ intervals

def test_wilson_interval_known_values():
    assert stats.wilson(6, 6) == pytest.approx([0.6097, 1.0], abs=1e-4)  # the 6 pairs at accuracy 1.0
    assert stats.wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert stats.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert stats.wilson(0, 0) is None
    summary = stats.summarize({"preference_accuracy": {"set": "heldout", "kind": "binary",
                                                       "ids": list("abcdef"), "values": [1] * 6}})
    assert summary["preference_accuracy"]["interval"] == stats.WILSON
    assert summary["preference_accuracy"]["ci"] == pytest.approx([0.6097, 1.0], abs=1e-4)


def _loop_percentiles(n, n_boot, seed, figure):
    """The bootstrap by hand: recompute the figure on each resample of row indices."""
    samples = [figure(idx) for idx in stats.bootstrap_indices(n, n_boot, seed)]
    return list(np.quantile(samples, [0.025, 0.975]))


def test_bootstrap_mean_and_perplexity_match_a_resampling_loop():
    rng = np.random.default_rng(3)
    values = list(rng.normal(0.5, 1.0, 40))
    logp = [[-float(rng.uniform(5, 60)), int(rng.integers(3, 30))] for _ in range(40)]
    ids = [f"r{i}" for i in range(40)]
    per_row = {"logratio_margin": {"set": "heldout", "kind": "mean", "ids": ids, "values": values},
               "heldout_perplexity": {"set": "heldout", "kind": "logprob", "ids": ids, "values": logp}}
    out = stats.summarize(per_row, n_boot=500, seed=7)
    arr, lp = np.array(values), np.array(logp)
    assert out["logratio_margin"]["value"] == pytest.approx(arr.mean())
    assert out["logratio_margin"]["ci"] == pytest.approx(_loop_percentiles(40, 500, 7, lambda i: arr[i].mean()))
    # perplexity is a ratio over tokens, resampled by rows: not the mean of per-row perplexities
    ppl = math.exp(-lp[:, 0].sum() / lp[:, 1].sum())
    assert out["heldout_perplexity"]["value"] == pytest.approx(ppl)
    assert out["heldout_perplexity"]["value"] != pytest.approx(np.exp(-lp[:, 0] / lp[:, 1]).mean())
    assert out["heldout_perplexity"]["ci"] == pytest.approx(_loop_percentiles(
        40, 500, 7, lambda i: math.exp(-lp[i, 0].sum() / lp[i, 1].sum())))
    assert out["heldout_perplexity"]["interval"] == stats.BOOTSTRAP and out["heldout_perplexity"]["rows"] == 40
    # the evaluator flags the loss view of the same rows with as_loss; the name alone says it too
    loss = stats.summarize({"heldout_loss": {**per_row["heldout_perplexity"], "as_loss": True},
                            "chosen_nll": {**per_row["heldout_perplexity"], "as_loss": True}})
    assert loss["heldout_loss"]["value"] == pytest.approx(math.log(ppl)) == loss["chosen_nll"]["value"]
    part = stats.summarize(per_row, ids=set(ids[:10]))
    assert part["logratio_margin"]["rows"] == 10
    assert part["logratio_margin"]["value"] == pytest.approx(arr[:10].mean())


def test_bleu_interval_is_the_bootstrap_percentile_not_a_clipped_mean():
    """Bug 4: the old interval was sacrebleu's mean +- half-width, clipped at 0."""
    hyps, refs = [h for h, _ in SKEWED_BLEU], [r for _, r in SKEWED_BLEU]
    old = BLEU().corpus_score(hyps, [refs], n_bootstrap=1000)
    old_interval = [max(0.0, old._mean - old._ci), old._mean + old._ci]
    assert old_interval[0] == 0.0  # what the report used to print
    result = metrics.bleu_chrf(hyps, refs, n_bootstrap=1000)
    by_hand = _loop_percentiles(len(hyps), 1000, 0, lambda i: BLEU().corpus_score(
        [hyps[j] for j in i], [[refs[j] for j in i]]).score)
    assert result["bleu_ci95"] == pytest.approx(by_hand, abs=1e-3)
    assert result["bleu_ci95"][0] > 1.0, "the percentile interval's lower end is well above the clipped 0"
    assert result["bleu_ci95"][0] <= result["bleu"] <= result["bleu_ci95"][1]
    assert result["bleu_interval"] == stats.BOOTSTRAP and result["rows"] == 6
    assert "nrefs:1" in result["bleu_signature"] and result["chrf_ci95"][0] <= result["chrf"]


# ------------------------------------------------------------------------------------------ comparisons

def test_mcnemar_exact_and_holm_known_values():
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.2]) == [0.2]


def _rows(metric, kind, values, prefix="r"):
    ids = [f"{prefix}{i}" for i in range(len(values))]
    return stats.metric_rows(metric, {"set": "s", "kind": kind, "ids": ids, "values": values})


def test_paired_comparisons():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 60)
    same = stats.compare(_rows("logratio_margin", "mean", list(base)), _rows("logratio_margin", "mean", list(base)))
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    # a constant shift much smaller than the spread of rows: only pairing can see it
    shifted = stats.compare(_rows("logratio_margin", "mean", list(base + 0.3)),
                            _rows("logratio_margin", "mean", list(base)))
    assert shifted["p_value"] < 0.01 and shifted["ci"][0] > 0 and shifted["test"].startswith(stats.PAIRED_BOOTSTRAP)
    a = _rows("preference_accuracy", "binary", [1] * 10)
    b = _rows("preference_accuracy", "binary", [0, 1] + [0] * 8)
    mc = stats.compare(a, b)
    assert mc["test"] == stats.MCNEMAR and mc["discordant"] == [9, 0]
    assert mc["p_value"] == pytest.approx(stats.mcnemar_exact(9, 0))
    # only the rows both trials have, restricted to `ids`
    assert stats.compare(a, b, ids={"r0", "r1", "r2"})["rows"] == 3


def test_split_is_by_id_hash_deterministic_disjoint_and_balanced():
    ids = [f"dpo-mixed-prompts:{i}" for i in range(11)]
    validation, test = stats.split_ids(ids)
    assert validation.isdisjoint(test) and validation | test == set(ids)
    assert (len(validation), len(test)) == (6, 5)
    assert stats.split_ids(list(reversed(ids))) == (validation, test)  # not by position in a file
    assert validation != set(ids[:6])


# ------------------------------------------------------------------------------------------ store fixtures

DPO_SWEEP = """
name: smoke-dpo
stage: dpo
from: smoke-sft:best
model: build/tiny-llama
dataset: {path: tests/fixtures/datasets/preference.jsonl, format: preference}
eval: {set: dpo-mixed-prompts, bootstrap_samples: 300}
select: {metric: preference_accuracy}
trials:
  - {name: beta-0.1, beta: 0.1}
  - {name: beta-0.3, beta: 0.3}
"""


def _sweep(text: str = DPO_SWEEP, **select):
    raw = yaml.safe_load(text)
    raw["select"] = {**raw["select"], **select}
    return parse_sweep(raw, "t.yaml", "", None)


def _binary(values, set_name="heldout", prefix="pair"):
    return {"set": set_name, "kind": "binary", "ids": [f"{prefix}{i}" for i in range(len(values))],
            "values": list(values)}


def _mean(values, set_name="heldout", prefix="pair"):
    return {"set": set_name, "kind": "mean", "ids": [f"{prefix}{i}" for i in range(len(values))],
            "values": list(values)}


def _write(store, spec, per_row=None, summary=None, train=None, health=None, answers=("a", "b")):
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    per_row = per_row or {}
    if summary is None:
        summary = {m: s["value"] for m, s in stats.summarize(per_row, n_boot=10).items()}
    ev = {"trial_id": spec.trial_id, "name": spec.name, "stage": spec.stage, "summary": summary,
          "sets": {"dpo-mixed-prompts": {"rows": len(answers), "fingerprint": metrics.output_fingerprint(list(answers)),
                                         "generation": {"max_new_tokens": 8, "batch_size": 4}}},
          "heldout": {"split": "train (seeded hold-out)", "pairs": 6, **({"health": health} if health else {})}}
    if per_row:
        ev["per_row"] = per_row
    if spec.trains:
        ev["trust"] = {"adapter_changes_outputs": True}
    store.write_json(f"{prefix}/eval.json", ev)
    store.write_bytes(f"{prefix}/samples.jsonl", b"")
    if spec.trains:
        store.write_json(f"{prefix}/train.json", {"wall_time_s": 10.0, "trainable_params": 1000, "final_loss": 0.6,
                                                  "log_history": [{"step": 1, "loss": 0.69}], **(train or {})})
    store.write_marker(f"{prefix}/{DONE}", {})


def _specs(sweep):
    refs, trials = sweep.reference_specs(START), sweep.trial_specs(START)
    return refs, trials, {s.name: s for s in refs + trials}


# ------------------------------------------------------------------------------------------ selection

def test_a_tie_is_reported_as_a_tie_and_the_tie_break_rule_decides(tmp_path):
    """Bug 5: both trials have accuracy 1.0 on 6 pairs; the first in the file used to win by position."""
    store = LocalStore(tmp_path)
    sweep = _sweep()
    refs, trials, by = _specs(sweep)
    for ref in refs:
        _write(store, ref, {"heldout_dpo_loss": _mean([0.69] * 6)})
    _write(store, by["beta-0.1"], {"preference_accuracy": _binary([1] * 6), "heldout_dpo_loss": _mean([0.5] * 6)})
    _write(store, by["beta-0.3"], {"preference_accuracy": _binary([1] * 6), "heldout_dpo_loss": _mean([0.4] * 6)})
    best = select_best(sweep, store, trials)
    assert best == store.read_json("smoke-dpo/best.json")
    assert best["trial_id"] == by["beta-0.3"].trial_id and best["name"] == "beta-0.3"  # not the first in the file
    assert {best["metric"], best["mode"], best["value"]} == {"preference_accuracy", "max", 1.0}
    assert sorted(best["tied"]) == ["beta-0.1", "beta-0.3"]
    verdicts = {t["name"]: t["verdict"] for t in best["trials"]}
    assert verdicts == {"beta-0.3": selection.BEST, "beta-0.1": selection.TIED}
    assert best["comparison"] == {"test": stats.MCNEMAR, "level": 0.05, "correction": "Holm"}
    assert best["tie_break"]["metric"] == "heldout_dpo_loss" and best["tie_break"]["decided_by"] == "heldout_dpo_loss"
    assert "never position" in best["tie_break"]["rule"]
    assert best["validation_rows"] + best["test_rows"] == 6 and best["ci"] == pytest.approx(stats.wilson(3, 3))


def test_with_nothing_else_to_tell_them_apart_cost_decides_whatever_the_file_order(tmp_path):
    winners = []
    for order in (("beta-0.1", "beta-0.3"), ("beta-0.3", "beta-0.1")):
        text = DPO_SWEEP.replace("- {name: beta-0.1, beta: 0.1}\n  - {name: beta-0.3, beta: 0.3}",
                                 "\n  ".join(f"- {{name: {n}, beta: {n[5:]}}}" for n in order))
        store = LocalStore(tmp_path / "-".join(order))
        sweep = _sweep(text)
        _, trials, by = _specs(sweep)
        assert [t.name for t in trials] == list(order)
        _write(store, by["beta-0.1"], {"preference_accuracy": _binary([1] * 6)}, train={"wall_time_s": 90.0})
        _write(store, by["beta-0.3"], {"preference_accuracy": _binary([1] * 6)}, train={"wall_time_s": 30.0})
        best = select_best(sweep, store, trials)
        assert best["tie_break"]["decided_by"] == "train wall time"
        winners.append(best["name"])
    assert winners == ["beta-0.3", "beta-0.3"]


def test_a_clearly_worse_trial_is_marked_worse_after_holm(tmp_path):
    text = DPO_SWEEP.replace("  - {name: beta-0.3, beta: 0.3}",
                             "  - {name: beta-0.3, beta: 0.3}\n  - {name: beta-0.5, beta: 0.5}")
    store, sweep = LocalStore(tmp_path), _sweep(text)
    _, trials, by = _specs(sweep)
    _write(store, by["beta-0.1"], {"preference_accuracy": _binary([1] * 40)})
    _write(store, by["beta-0.3"], {"preference_accuracy": _binary([1] * 38 + [0] * 2)})
    _write(store, by["beta-0.5"], {"preference_accuracy": _binary([0] * 40)})
    best = select_best(sweep, store, trials)
    trials_by = {t["name"]: t for t in best["trials"]}
    assert best["name"] == "beta-0.1"
    assert trials_by["beta-0.3"]["verdict"] == selection.TIED
    assert trials_by["beta-0.5"]["verdict"] == selection.WORSE
    comparison = trials_by["beta-0.5"]["comparison_with_top"]
    assert comparison["p_holm"] < 0.05 and comparison["p_holm"] >= comparison["p_value"]
    assert comparison["rows"] == best["validation_rows"] == 20


def test_choice_and_reported_figure_come_from_disjoint_rows(tmp_path):
    """A trial that is good on the validation rows and bad on the test rows is chosen, and reported bad."""
    ids = [f"pair{i}" for i in range(20)]
    validation, test = stats.split_ids(ids)
    store, sweep = LocalStore(tmp_path), _sweep()
    _, trials, by = _specs(sweep)
    good_then_bad = [1 if i in validation else 0 for i in ids]
    _write(store, by["beta-0.1"], {"preference_accuracy": _binary([1 - v for v in good_then_bad])})
    _write(store, by["beta-0.3"], {"preference_accuracy": _binary(good_then_bad)})
    best = select_best(sweep, store, trials)
    assert set(best["validation_ids"]) == validation and set(best["test_ids"]) == test
    assert set(best["validation_ids"]).isdisjoint(best["test_ids"])
    assert best["name"] == "beta-0.3" and best["validation"]["value"] == 1.0
    assert best["value"] == 0.0 and best["value_part"] == "test part" and best["rows"] == len(test)


def test_guardrails_exclude_a_trial_and_say_which(tmp_path):
    store = LocalStore(tmp_path)
    sweep = _sweep(guardrails=[{"metric": "refusal_rate", "min": "start"}, {"metric": "repetition_rate", "max": 0.2}])
    refs, trials, by = _specs(sweep)
    refusals = lambda v: _binary(v, "dpo-mixed-prompts", "harmful")  # noqa: E731
    repetition = lambda v: _mean(v, "dpo-mixed-prompts", "prompt")  # noqa: E731
    _write(store, by["base"], {"refusal_rate": refusals([0, 0, 1]), "repetition_rate": repetition([0.0] * 4)})
    _write(store, by["start"], {"refusal_rate": refusals([1, 1, 0]), "repetition_rate": repetition([0.0] * 4)})
    _write(store, by["beta-0.1"], {"preference_accuracy": _binary([1] * 6), "refusal_rate": refusals([1, 0, 0]),
                                   "repetition_rate": repetition([0.0] * 4)})
    _write(store, by["beta-0.3"], {"preference_accuracy": _binary([1, 1, 1, 0, 1, 0]),
                                   "refusal_rate": refusals([1, 1, 1]), "repetition_rate": repetition([0.1] * 4)})
    best = select_best(sweep, store, trials)
    assert best["name"] == "beta-0.3"
    (excluded,) = best["ineligible"]
    assert excluded["name"] == "beta-0.1" and "refusal_rate min: start" in excluded["reason"]
    assert "0.3333 is below the start row's 0.6667" in excluded["reason"]
    # a repetition bound breaks it too, and nothing eligible means no best.json is written
    _write(store, by["beta-0.3"], {"preference_accuracy": _binary([1] * 6), "refusal_rate": refusals([1, 1, 1]),
                                   "repetition_rate": repetition([0.5] * 4)})
    store.delete("smoke-dpo/best.json")
    assert select_best(sweep, store, trials) is None and not store.exists("smoke-dpo/best.json")
    record = selection.choose([{"name": s.name, "trial_id": s.trial_id, "stage": s.stage, "state": "done",
                                "eval": store.read_json(f"{trial_prefix(s.sweep, s.trial_id)}/eval.json")}
                               for s in refs + trials], sweep.select)
    assert any("repetition_rate max: 0.2" in i["reason"] and "above 0.2" in i["reason"] for i in record["ineligible"])


@pytest.mark.parametrize("select, field, says", [
    ({"metric": "reward_margin"}, "select.metric", "logratio_margin"),
    ({"tie_break": "reward_margin"}, "select.tie_break", "heldout_dpo_loss"),
    ({"guardrails": [{"metric": "reward_margin", "min": 0}]}, "select.guardrails[0].metric", "scales with beta"),
    ({"guardrails": [{"metric": "refusal_rate"}]}, "select.guardrails[0]", "exactly one of min or max"),
    ({"guardrails": [{"metric": "refusal_rate", "min": 0.1, "max": 0.9}]}, "select.guardrails[0]", "exactly one"),
    ({"guardrails": [{"metric": "refusals", "min": 0.1}]}, "select.guardrails[0].metric", "refusal_rate"),
    ({"guardrails": [{"metric": "refusal_rate", "min": "best"}]}, "select.guardrails[0].min", "base"),
    ({"guardrails": [{"metric": "refusal_rate", "min": True}]}, "select.guardrails[0].min", "finite number"),
    ({"guardrails": [{"metric": "refusal_rate", "max": 10 ** 400}]}, "select.guardrails[0].max", "finite number"),
    ({"guardrails": [{"metric": "refusal_rate", "mn": 0.1}]}, "select.guardrails[0].mn", "min"),
    ({"metric": "heldout_perplexity", "tie_break": "heldout_loss"}, "select.tie_break", "ranks trials exactly"),
])
def test_select_validation_errors(select, field, says):
    raw = yaml.safe_load(DPO_SWEEP)
    raw["select"] = {"metric": "preference_accuracy", **select}
    with pytest.raises(SweepError) as err:
        parse_sweep(raw, "jobs/x.yaml", "", None)
    assert err.value.source == "jobs/x.yaml" and err.value.field_path == field, str(err.value)
    assert says in str(err.value)


def test_reward_margin_is_fine_when_every_trial_has_one_beta_and_start_is_not_for_sft():
    raw = yaml.safe_load(DPO_SWEEP.replace("beta: 0.3", "beta: 0.1, lr: 1.0e-3"))
    raw["select"] = {"metric": "reward_margin"}
    assert parse_sweep(raw, "x.yaml", "", None).select.metric == "reward_margin"
    sft = {"stage": "sft", "model": "m", "dataset": {"path": "x.jsonl", "format": "instruction"},
           "eval": {"set": "s"}, "trials": [{"r": 4}],
           "select": {"metric": "heldout_perplexity", "guardrails": [{"metric": "refusal_rate", "min": "start"}]}}
    with pytest.raises(SweepError, match="SFT sweep has none") as err:
        parse_sweep(sft, "x.yaml", "", "x")
    assert err.value.field_path == "select.guardrails[0].min"
    sft["select"] = {"metric": "heldout_perplexity", "guardrails": [{"metric": "refusal_rate", "min": "base"}]}
    select = parse_sweep(sft, "x.yaml", "", "x").select
    assert select.tie_break == "ref_perplexity" and select.guardrails[0].side == "min"  # not heldout_loss: same ranking


# ------------------------------------------------------------------------------------------ report

def test_report_shows_intervals_na_tied_set_rule_widths_and_health(tmp_path):
    store = LocalStore(tmp_path)
    sweep = _sweep()
    refs, trials, by = _specs(sweep)
    def bleu(pairs):
        return {"set": "dpo-mixed-prompts", "kind": "text", "ids": [f"p{i}" for i in range(len(pairs))],
                "values": [list(p) for p in pairs]}

    for ref in refs:  # base/start have no preference accuracy: n/a, never a 0 bar
        _write(store, ref, {"bleu": bleu(SKEWED_BLEU)}, answers=("r", ref.name))
    _write(store, by["beta-0.1"], {"bleu": bleu(SKEWED_BLEU), "preference_accuracy": _binary([1] * 6),
                                   "gsm8k_accuracy": _binary([1, 0, 1, 1], "gsm8k", "gsm")},
           health={"chosen_logp_change": -4.2, "rejected_logp_change": -9.5, "both_falling": True, "pairs": 6},
           answers=("x", "y"))
    _write(store, by["beta-0.3"], {"bleu": bleu(SKEWED_BLEU), "preference_accuracy": _binary([1] * 6),
                                   "gsm8k_accuracy": _binary([1, 0, 0, 1], "gsm8k", "gsm")},
           health={"chosen_logp_change": 0.3, "rejected_logp_change": -2.0, "both_falling": False, "pairs": 6},
           train={"wall_time_s": 5.0}, answers=("x", "z"))
    best = select_best(sweep, store, trials)
    key = build_report(store, sweep, refs + trials)
    report = store.read_bytes(key).decode()
    table = report.split("## Leaderboard")[1].split("## Selection")[0]
    lines = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ")}
    assert "pref acc (6 rows)" in table and "BLEU (6 rows)" in table and "GSM8K acc (4 rows)" in table
    assert "1.000 [0.610, 1.000]" in lines[best["name"]]
    assert lines[best["name"]].startswith("| **best** |")
    other = "beta-0.1" if best["name"] == "beta-0.3" else "beta-0.3"
    assert lines[other].startswith("| tied with best |")
    assert " n/a " in lines["base"] and " n/a " in lines["start"] and "0.000" not in lines["base"]
    assert "0.750 [" in lines["beta-0.1"]  # the GSM8K benchmark row's accuracy with its interval
    assert "too small to rank" in report  # 6 pairs cannot tell 1.0 from 1.0
    assert "Tie-break rule:" in report and "Decided by: train wall time" in report and "exact McNemar" in report
    assert f"Tied set (2): {best['name']}, {other}" in report and "Holm-corrected at level 0.05" in report
    assert "beta-0.1: log p(chosen) -4.2, log p(rejected) -9.5" in report and "both falling" in report
    assert "beta-0.3: log p(chosen) +0.3" in report and report.count("both falling") == 1
    board = store.read_json("smoke-dpo/report/leaderboard.json")
    assert board["best"]["trial_id"] == best["trial_id"] and board["selection"]["tied"] == best["tied"]
    rows = {r["name"]: r for r in board["rows"]}
    assert rows[best["name"]]["figures"]["preference_accuracy"]["ci"] == pytest.approx(stats.wilson(6, 6))
    assert rows["base"]["figures"]["bleu"]["interval"] == stats.BOOTSTRAP
    assert "preference_accuracy" not in rows["base"]["figures"] and rows[other]["verdict"] == selection.TIED
    assert board["interval_widths"]["preference_accuracy"]["too_few_rows_to_rank"] is True
    assert store.read_bytes("smoke-dpo/report/metrics.png")[:4] == b"\x89PNG"


def test_report_and_selection_cope_with_old_eval_json_without_per_row(tmp_path):
    store = LocalStore(tmp_path)
    sweep = _sweep()
    refs, trials, by = _specs(sweep)
    for ref in refs:
        _write(store, ref, summary={"bleu": 3.0, "bleu_ci95": [0.0, 6.0]})
    _write(store, by["beta-0.1"], summary={"bleu": 4.0, "preference_accuracy": 0.5, "reward_margin": 0.01})
    _write(store, by["beta-0.3"], summary={"bleu": 5.0, "preference_accuracy": 0.5, "reward_margin": 0.02},
           train={"wall_time_s": 99.0})
    best = select_best(sweep, store, trials)
    assert best["rows_used"] == selection.FALLBACK and best["ci"] is None
    assert best["name"] == "beta-0.1" and best["tie_break"]["decided_by"] == "train wall time"
    report = store.read_bytes(build_report(store, sweep, refs + trials)).decode()
    assert "0.500 (no interval)" in report and "3.00 [0.00, 6.00]" in report
    assert "Re-evaluate the trials to get intervals" in report


def test_plot_leaves_rows_without_a_figure_out_instead_of_drawing_zero():
    rows = [{"name": "base", "stage": "base"}, {"name": "t1", "stage": "dpo"}]
    figures = {"base": {}, "t1": {"preference_accuracy": {"value": 0.8, "ci": [0.5, 0.95], "rows": 10}}}
    assert plot_metrics(rows, ["preference_accuracy"], figures)[:4] == b"\x89PNG"
    assert plot_metrics(rows, ["bleu"], figures) is None


def test_identical_outputs_compare_every_eval_set():
    def row(name, main, math_set, stage="sft"):
        return {"name": name, "stage": stage, "state": "done",
                "eval": {"sets": {"s": {"fingerprint": metrics.output_fingerprint(main)},
                                  "math": {"fingerprint": metrics.output_fingerprint(math_set)}}}}

    rows = [row("t1", ["a"], ["1"]), row("t2", ["a"], ["2"]), row("t3", ["b"], ["3"]), row("t4", ["b"], ["3"])]
    warnings = find_warnings(rows, "s")
    assert len(warnings) == 1 and "t3, t4" in warnings[0] and "every eval set (math, s)" in warnings[0]
    assert metrics.identical_groups({"x": {"s": "1"}, "y": {"s": "1", "math": "2"}}) == []
