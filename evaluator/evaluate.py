"""The evaluation of one trial: what is measured, on which rows, and the checks that make it trustworthy."""

from __future__ import annotations

import contextlib
import json
import math
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from finesweep.prompts import render_prompt, user_turn
from finesweep.spec import TrialSpec, to_dict
from finesweep.store import DONE, ArtifactStore, checksum, end_attempt, trial_prefix

from . import metrics

log = logging.getLogger("finesweep")
EVALSETS = Path(__file__).resolve().parent / "evalsets"


from finesweep.evalsets import load_evalset  # noqa: E402 - the one lookup, shared with the submitter's preflight


# A max |logit change| vs the start model below this (fp32) counts as "the adapter changes nothing": float noise
# of an unchanged model is ~1e-6, a LoRA step that moved anything at all moves logits by far more.
ADAPTER_EFFECT_THRESHOLD = 1e-3


def row_id(set_name: str, index: int, row: dict) -> str:
    """A row's id for paired comparisons: every leaderboard row is scored on the same ids."""
    return f"{set_name}:{row['id']}" if row.get("id") is not None else f"{set_name}:{index}"


@dataclass
class _Evaluation:
    """What the steps of one evaluation share: the model as it was trained, and the figures so far. Each step
    computes its figures first and adds them to `result`, `per_row` and `samples` only once all of them are there,
    so a step that fails leaves nothing half-written."""

    spec: TrialSpec
    label: str
    model: object
    tokenizer: object
    loaded: dict
    own_adapter: bool
    disabled: object  # a context manager: the start model (the trial's own adapter off)
    scoring: object  # evaluator.scoring (torch), imported by evaluate_trial
    result: dict
    per_row: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def evaluate_trial(spec: TrialSpec, store: ArtifactStore) -> dict:
    """Evaluate one trial in named steps: the generation sets (eval.set first, then eval.extra_sets), the held-out
    rows, the benchmark, then write eval.json, samples.jsonl and _DONE. A step that fails is recorded in eval.json's
    `errors` (part, error, reason) and the others still run and are written: the trial is done with the figures it
    has, and the failed part's figures are missing (selection treats a missing select metric as not eligible). Only
    a failure of eval.set (no summary without it) or an interruption (preemption, a connection or store error: the
    Job retries) ends the evaluation: eval.json is still written with what there is, without _DONE, and the error
    is raised (a configuration error exits 3)."""
    from trainer.modeling import scratch_dir
    from trainer.runtime import detect_hardware

    label = f"[{spec.sweep}/{spec.name} {spec.trial_id}]"
    started = time.time()
    hw = detect_hardware()
    workdir = scratch_dir(f"eval-{spec.trial_id}")
    try:
        run = _load_model(spec, store, hw, workdir, label)
        run.result["timings_s"] = {"model": round(time.time() - started, 2)}
        ev = spec.eval
        for set_name in set_names(ev):
            _step(run, store, f"set:{set_name}", lambda: _generation_set(run, set_name), required=set_name == ev.set)
        _step(run, store, "heldout", lambda: _heldout(run))
        if ev.benchmark is not None:
            _step(run, store, "benchmark", lambda: _benchmark(run))
        return _finish(run, store, hw, started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def set_names(ev) -> list[str]:
    """The generation sets of an evaluation, eval.set first, each once: a set named again in eval.extra_sets (or
    twice there) would be generated and scored again for the same figures, and its samples written twice."""
    return list(dict.fromkeys((ev.set, *ev.extra_sets)))


def _load_model(spec: TrialSpec, store: ArtifactStore, hw, workdir, label: str) -> _Evaluation:
    """The model exactly as trained (trainer.modeling.build_model checks the adapters), and eval.json's header."""
    from trainer.modeling import build_model, load_tokenizer
    from trainer.runtime import library_versions

    from . import scoring

    tokenizer = load_tokenizer(spec.model)
    model, loaded = build_model(spec, store, hw, workdir, with_own_adapter=spec.trains)
    model.eval()
    if hw.device == "cuda":
        model.to("cuda")
    own_adapter = spec.trains
    # With its own adapter, disabling it gives the start model: the baseline for trust checks and rewards.
    disabled = model.disable_adapter if own_adapter else contextlib.nullcontext
    log.info("%s: evaluating %s%s", label, loaded["base"],
             "".join(f" + {c['trial']} (merged)" for c in loaded["chain"]) + (" + own adapter" if own_adapter
                                                                               else ""))
    result: dict = {"trial_id": spec.trial_id, "name": spec.name, "stage": spec.stage, "sweep": spec.sweep,
                    "model": loaded, "sets": {}, "hardware": hw.__dict__, "versions": library_versions()}
    return _Evaluation(spec, label, model, tokenizer, loaded, own_adapter, disabled, scoring, result)


# Errors that end an evaluation rather than one part of it: a preemption (the checkpoint logic handles it), and what
# a retry of the Job may not meet again (the network, the store).
def _interruptions() -> tuple[type[BaseException], ...]:
    from finesweep.store import StoreError
    from trainer.checkpoint import Preempted

    return (Preempted, ConnectionError, TimeoutError, StoreError)


def _step(run: _Evaluation, store: ArtifactStore, part: str, body, required: bool = False) -> None:
    """Run one step; a failure is recorded in run.errors (and logged) instead of ending the evaluation, unless the
    step is `required` or the failure is an interruption (then eval.json is written without _DONE, and it is
    raised)."""
    started = time.time()
    try:
        body()
    except Exception as err:  # noqa: BLE001 - recorded with its reason; re-raised below when it must end the run
        reason = " ".join(str(err).split())[:2000]
        run.errors.append({"part": part, "error": type(err).__name__, "reason": reason})
        if required or isinstance(err, _interruptions()):
            log.error("%s: %s failed (%s: %s); the evaluation stops", run.label, part, type(err).__name__, reason)
            _write_incomplete(run, store)
            raise
        log.error("%s: %s failed (%s: %s); going on: eval.json keeps every other figure and records this error",
                  run.label, part, type(err).__name__, reason)
    finally:
        # Where the evaluation's time goes (eval.json timings_s: model build, each set, held-out, benchmark): what
        # `make bench --model real` (bench/pipeline_eval.py) sets against training.
        run.result.setdefault("timings_s", {})[part] = round(time.time() - started, 2)


def _generation_set(run: _Evaluation, set_name: str) -> None:
    """One eval set: greedy answers scored by BLEU/chrF, the reference answer's perplexity as the trainer would
    score it, repetition, refusals on harmful rows, final-number accuracy where rows have an answer; for the
    primary set of a trained trial, the trust check against its start model."""
    from trainer.sequences import sft_sequence

    spec, scoring, tokenizer, model = run.spec, run.scoring, run.tokenizer, run.model
    ev, per_row = spec.eval, run.per_row
    rows = load_evalset(set_name)
    ids = [row_id(set_name, i, r) for i, r in enumerate(rows)]
    prompts = [render_prompt(tokenizer, spec.prompt_format, user_turn(r["prompt"])) for r in rows]
    answers, gen_record = scoring.generate(model, tokenizer, prompts, ev.max_new_tokens, ev.batch_size,
                                           setting="eval.max_new_tokens")
    refs = [r["reference"] for r in rows]
    set_result = {"rows": len(rows), "generation": gen_record, **metrics.bleu_chrf(answers, refs, ev.bootstrap_samples)}
    # The reference answer scored as the trainer would train on it (same tokens, same max_length cut).
    seqs = [(i, sft_sequence(tokenizer, p, ref, spec.max_length)) for i, (p, ref) in enumerate(zip(prompts, refs))]
    kept = [(i, s) for i, s in seqs if s is not None]
    ref_scores = scoring.sequence_logprobs(model, tokenizer, [s for _, s in kept], ev.batch_size)
    set_result["ref_perplexity"] = _round(scoring.perplexity(ref_scores))
    set_result["ref_rows"], set_result["ref_dropped"] = len(kept), len(seqs) - len(kept)
    reps = [metrics.repetition_rate(a) for a in answers]
    set_result["repetition_rate"] = round(sum(reps) / len(reps), 4)
    harmful = [i for i, r in enumerate(rows) if r.get("harmful")]
    refusals = [int(metrics.is_refusal(answers[i])) for i in harmful]
    if harmful:
        set_result["refusal_rate"] = round(sum(refusals) / len(refusals), 4)
        set_result["refusal_rows"] = len(harmful)
    math_hits = None
    if all("answer" in r for r in rows):
        math_hits = [int(metrics.final_number(a) == metrics.final_number(r["answer"])) for a, r in zip(answers, rows)]
        set_result.update(metrics.math_accuracy(answers, [r["answer"] for r in rows]))
    set_result["fingerprint"] = metrics.output_fingerprint(answers)
    new_rows: dict = {}
    if set_name == ev.set:
        new_rows["bleu"] = _rows(set_name, "text", ids, [[a, r] for a, r in zip(answers, refs)])
        new_rows["chrf"] = _rows(set_name, "text", ids, [[a, r] for a, r in zip(answers, refs)])
        new_rows["ref_perplexity"] = _rows(set_name, "logprob", [ids[i] for i, _ in kept], [list(x) for x in ref_scores])
        new_rows["repetition_rate"] = _rows(set_name, "mean", ids, reps)
    if harmful and "refusal_rate" not in per_row:
        new_rows["refusal_rate"] = _rows(set_name, "binary", [ids[i] for i in harmful], refusals)
    if math_hits is not None and "math_accuracy" not in per_row:
        new_rows["math_accuracy"] = _rows(set_name, "binary", ids, math_hits)
    new_samples = [{"set": set_name, "id": row.get("id"), "row_id": rid, "prompt": row["prompt"], "answer": answer,
                    "reference": row["reference"]} for row, rid, answer in zip(rows, ids, answers)]
    log.info("%s: %s: %d rows, BLEU %.2f, chrF %.2f, ref ppl %s, repetition %.3f%s", run.label, set_name, len(rows),
             set_result.get("bleu", 0), set_result.get("chrf", 0), set_result["ref_perplexity"],
             set_result["repetition_rate"],
             f", refusals {set_result['refusal_rate']:.2f}" if "refusal_rate" in set_result else "")
    trust = None
    if run.own_adapter and set_name == ev.set:
        diff = scoring.max_logit_diff(model, tokenizer, prompts[: ev.batch_size], run.disabled)
        trust = {"adapter": run.loaded["own"], "max_logit_diff_vs_start": diff, "threshold": ADAPTER_EFFECT_THRESHOLD,
                 "adapter_changes_outputs": diff > ADAPTER_EFFECT_THRESHOLD}
        if diff <= ADAPTER_EFFECT_THRESHOLD:
            log.warning("%s: the adapter changes no logit by more than %g: it behaves like its start model",
                        run.label, ADAPTER_EFFECT_THRESHOLD)
    run.result["sets"][set_name] = set_result
    per_row.update(new_rows)
    run.samples.extend(new_samples)
    if trust is not None:
        run.result["trust"] = trust


def _heldout(run: _Evaluation) -> None:
    """Held-out rows: the same rows for base, start and every trial (the trial's test_rows cap applies to
    evaluation during training only), scored by the trainer's own tokenization and drop rules."""
    from trainer.data import load_splits, render_dpo, render_sft
    from trainer.sequences import dpo_pair, sft_sequence

    spec, scoring, tokenizer, model = run.spec, run.scoring, run.tokenizer, run.model
    ev = spec.eval
    _, held = load_splits(spec.dataset, None)
    if held is None or not ev.heldout_rows:
        return
    held = held.select(range(min(ev.heldout_rows, len(held))))
    hids = [f"heldout:{i}" for i in range(len(held))]
    new_rows: dict = {}
    if "chosen" in held.column_names:
        rendered = list(render_dpo(held, tokenizer, spec.prompt_format))
        built = [(i, dpo_pair(tokenizer, p["prompt"], p["chosen"], p["rejected"], spec.max_length))
                 for i, p in enumerate(rendered)]
        kept = [(i, pair) for i, pair in built if pair is not None]
        prefs = scoring.preference_scores(model, tokenizer, [pair for _, pair in kept], ev.batch_size,
                                          spec.hyper.beta, reference=run.disabled if run.own_adapter else None)
        kept_ids = [hids[i] for i, _ in kept]
        kinds = {"reward_margin": "mean", "logratio_margin": "mean", "heldout_dpo_loss": "mean"}
        for metric, values in prefs["rows"].items():
            new_rows[metric] = _rows("heldout", kinds.get(metric, "binary"), kept_ids, values)
        heldout = {"split": _split_name(spec), "pairs": len(kept), "rows": len(kept), "dropped": len(built) - len(kept),
                   "drop_rule": f"prompt alone fills max_length {spec.max_length} (TRL drops it too)",
                   "cut": sum(c.cut or r.cut for _, (c, r) in kept),
                   "chosen_perplexity": _round(scoring.perplexity(prefs["chosen"])), "fixed_beta": scoring.FIXED_BETA}
        heldout.update({m: _mean(v) for m, v in prefs["rows"].items()})
        if prefs["health"] is not None:
            heldout["health"] = prefs["health"]
    else:
        rendered = list(render_sft(held, tokenizer, spec.prompt_format))
        built = [(i, sft_sequence(tokenizer, r["prompt"], r["completion"], spec.max_length))
                 for i, r in enumerate(rendered)]
        kept = [(i, seq) for i, seq in built if seq is not None]
        scores = scoring.sequence_logprobs(model, tokenizer, [seq for _, seq in kept], ev.batch_size)
        kept_ids = [hids[i] for i, _ in kept]
        new_rows["heldout_perplexity"] = _rows("heldout", "logprob", kept_ids, [list(x) for x in scores])
        new_rows["heldout_loss"] = {**new_rows["heldout_perplexity"], "as_loss": True}
        ppl = scoring.perplexity(scores)
        heldout = {"split": _split_name(spec), "rows": len(kept), "dropped": len(built) - len(kept),
                   "drop_rule": f"no completion token within max_length {spec.max_length} (TRL drops it)",
                   "cut": sum(seq.cut for _, seq in kept), "perplexity": _round(ppl),
                   "loss": _round(math.log(ppl)) if ppl else None}
    run.per_row.update(new_rows)
    run.result["heldout"] = heldout
    log.info("%s: held-out %s", run.label, json.dumps({k: v for k, v in heldout.items() if k != "health"}))
    if heldout.get("health", {}).get("both_falling"):
        log.warning("%s: chosen and rejected log-probs both fell vs the start model (mean %+.3f, %+.3f): the margin "
                    "grows by making every answer less likely", run.label, heldout["health"]["chosen_logp_change"],
                    heldout["health"]["rejected_logp_change"])


def _benchmark(run: _Evaluation) -> None:
    """eval.benchmark: exact match of the final number on GSM8K's test split (a real benchmark next to the small
    hand-written sets), prompts rendered as the trial was trained."""
    record, rows = _gsm8k_benchmark(run.spec, run.model, run.tokenizer, run.scoring)
    run.per_row["gsm8k_accuracy"] = rows
    run.result["benchmark"] = record
    log.info("%s: %s", run.label, json.dumps(record))


def _gsm8k_benchmark(spec: TrialSpec, model, tokenizer, scoring) -> tuple[dict, dict]:
    """(the benchmark's record, its per-row data). The rows are read by trainer.data.load_benchmark, the
    resolution the submitter's preflight checked (a local file or folder, or the Hub)."""
    from trainer.data import load_benchmark

    bench = spec.eval.benchmark
    rows = load_benchmark(bench)
    prompts = [render_prompt(tokenizer, spec.prompt_format, r["messages"]) for r in rows]
    answers, gen = scoring.generate(model, tokenizer, prompts, bench.max_new_tokens, spec.eval.batch_size,
                                    setting="eval.benchmark.max_new_tokens")
    hits = [int(metrics.final_number(a) == metrics.final_number(r["response"])) for a, r in zip(answers, rows)]
    per_row = _rows("gsm8k", "binary", [f"gsm8k:{i}" for i in range(len(rows))], hits)
    return ({"path": bench.path, "split": bench.split, "rows": len(rows), "gsm8k_accuracy": _mean(hits),
             "generation": gen}, per_row)


def _finish(run: _Evaluation, store: ArtifactStore, hw, started: float) -> dict:
    """The summary, costs and errors; then eval.json, samples.jsonl and _DONE (and the figures to tracking)."""
    from trainer import tracking  # final figures to TensorBoard and the trial's MLflow run
    from trainer.runtime import peak_memory_gb

    result = run.result
    result["evaluation"] = evaluation_record(run.spec)
    result["per_row"] = run.per_row
    result["summary"] = summarize(result, run.spec.eval.set)
    result["wall_time_s"] = round(time.time() - started, 2)
    result["peak_memory_gb"] = round(peak_memory_gb(hw), 3)
    if run.errors:
        result["errors"] = run.errors
    _write(store, run.spec, result, run.samples, tracking.record_evaluation(run.spec, store, result))
    if run.errors:
        log.warning("%s: done with errors in %s: eval.json has the other figures and each error",
                    run.label, ", ".join(e["part"] for e in run.errors))
    log.info("%s: done: %s", run.label, json.dumps(result["summary"]))
    return result


def _write_incomplete(run: _Evaluation, store: ArtifactStore) -> None:
    """eval.json with the figures so far and the errors, without _DONE: the trial is not finished (its failure is
    recorded by whoever ran it) and a retry overwrites the file."""
    result = {**run.result, "evaluation": evaluation_record(run.spec), "per_row": run.per_row, "errors": run.errors,
              "incomplete": True}
    try:
        store.write_bytes(f"{trial_prefix(run.spec.sweep, run.spec.trial_id)}/eval.json",
                          json.dumps(result, indent=2, default=str).encode())
    except Exception as err:  # noqa: BLE001 - the store may be what failed; the original error is what matters
        log.warning("%s: could not write the incomplete eval.json (%s: %s)", run.label, type(err).__name__, err)


def evaluation_record(spec: TrialSpec) -> dict:
    """Which evaluation eval.json holds: the settings' id (TrialSpec.evaluation_id, also in _DONE) and the
    settings themselves. The trial id leaves them out, so a new evaluation of the same training replaces it."""
    return {"id": spec.evaluation_id, "settings": to_dict(spec.eval)}


def summarize(result: dict, primary_set: str) -> dict:
    """The flat point figures the leaderboard shows and a sweep selects by, each with its row count; intervals
    and comparisons are computed from `per_row` (finesweep.stats)."""
    main = result["sets"][primary_set]
    summary = {k: main.get(k) for k in ("bleu", "chrf", "ref_perplexity", "repetition_rate")}
    summary["bleu_ci95"] = main.get("bleu_ci95")
    summary["eval_rows"] = main["rows"]
    if "heldout" in result:
        summary["heldout_rows"], summary["heldout_dropped"] = result["heldout"]["rows"], result["heldout"]["dropped"]
    for metric, rows in result.get("per_row", {}).items():
        summary[f"{metric}_rows"] = len(rows["ids"])
        if metric not in summary or summary[metric] is None:
            summary[metric] = _point(rows)
    return summary


def _point(rows: dict) -> float | None:
    if rows["kind"] == "logprob":
        tokens = sum(n for _, n in rows["values"])
        if not tokens:
            return None
        loss = -sum(lp for lp, _ in rows["values"]) / tokens
        return round(loss, 4) if rows.get("as_loss") else round(math.exp(loss), 4)
    if rows["kind"] in ("binary", "mean"):
        return _mean(rows["values"])
    return None


def _rows(set_name: str, kind: str, ids: list[str], values: list) -> dict:
    return {"set": set_name, "kind": kind, "ids": list(ids), "values": list(values)}


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else None


def _split_name(spec: TrialSpec) -> str:
    d = spec.dataset
    return d.test_split or f"{d.split} (seeded {d.test_fraction:.0%} hold-out, seed {d.seed})"


def _round(value):
    return round(value, 4) if value is not None else None


def _write(store: ArtifactStore, spec: TrialSpec, result: dict, samples: list[dict],
           extra: dict[str, str] | None = None) -> None:
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    files = dict(extra or {})  # files already written (the evaluation's TensorBoard events), listed in _DONE
    outputs = [("eval.json", json.dumps(result, indent=2, default=str).encode()),
               ("samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples).encode())]
    spec_key = f"{prefix}/spec.json"
    if spec.trains and store.exists(spec_key):
        # The trainer's spec.json is checksummed in _TRAINED (a DPO trial verifies its start that way): an
        # evaluation under new settings leaves it as trained; eval.json's `evaluation` says which one this is.
        files[spec_key] = checksum(store.read_bytes(spec_key))
    else:
        outputs.insert(0, ("spec.json", json.dumps(to_dict(spec), indent=2).encode()))
    for name, data in outputs:
        store.write_bytes(f"{prefix}/{name}", data)
        files[f"{prefix}/{name}"] = checksum(data)
    # The evaluation it holds: a submit with other eval settings evaluates the trial again (store.read_status).
    store.write_marker(f"{prefix}/{DONE}", files, evaluation=spec.evaluation_id)
    # The attempt that produced _DONE ends here, whoever runs it (a local subprocess, a cluster pod), so the
    # store's attempt record says done without the backend having to notice.
    end_attempt(store, spec.sweep, spec.trial_id, "done")
