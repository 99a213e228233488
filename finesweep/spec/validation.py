"""The rules a value's type cannot say, across fields and against the stage: `dataset:` and `eval:` values,
`select:` (metrics, tie-break, guardrails; reward_margin in a beta sweep), `tracking:`, each trial's
hyperparameters (_check_hyper, and the keys a stage ignores), and a DPO sweep against its SFT start point
(check_start_compatible)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .fields import _clip
from .types import (DPO_FORMATS, GUARDRAIL_REFERENCES, LORA_TARGETS, MAX_TEXT, SCHEDULERS, SELECTABLE_METRICS,
                    SFT_FORMATS, STAGES, DatasetSpec, EvalSpec, Hyper, SelectSpec, Sweep, SweepError, TrackingSpec,
                    TrialSpec)


def _check_dataset(dataset: DatasetSpec, stage: str, source: str, at) -> None:
    """`dataset:` once built: a format of the sweep's stage, rows held out one way only, a usable path and name."""
    allowed = SFT_FORMATS if stage == "sft" else DPO_FORMATS
    if dataset.format not in allowed:
        raise SweepError(source, at("dataset.format"), f"{dataset.format!r} is not a {stage} dataset format",
                         f"use one of {', '.join(allowed)}")
    if not 0.0 <= dataset.test_fraction < 1.0:
        raise SweepError(source, at("dataset.test_fraction"), f"{dataset.test_fraction} is outside [0, 1)",
                         "hold out a fraction such as 0.1, or 0 for none")
    if dataset.test_split and dataset.test_fraction:
        raise SweepError(source, at("dataset.test_fraction"), "is set together with test_split",
                         "hold out rows either by test_split or by test_fraction, not both")
    if not dataset.path.strip() or len(dataset.path) > MAX_TEXT:
        raise SweepError(source, at("dataset.path"), "is empty or absurdly long",
                         "name a Hub dataset id, a local file or a folder")
    if dataset.name is not None and not dataset.name.strip():
        raise SweepError(source, at("dataset.name"), "is blank", "leave it out, or name a config of a Hub dataset")
    if dataset.seed < 0:
        raise SweepError(source, at("dataset.seed"), f"{dataset.seed} is negative", "use a seed of 0 or more")
    if dataset.min_answer_chars < 0:
        raise SweepError(source, at("dataset.min_answer_chars"), "is negative", "use 0 or more")


def _check_eval(eval_spec: EvalSpec, source: str, at) -> None:
    """`eval:` once built: positive sizes, and a benchmark (if any) that can be scored."""
    for key in ("max_new_tokens", "batch_size", "bootstrap_samples"):
        if getattr(eval_spec, key) <= 0:
            raise SweepError(source, at(f"eval.{key}"), f"{getattr(eval_spec, key)} is not positive",
                             "use a positive number")
    if eval_spec.benchmark is not None:
        bench = eval_spec.benchmark
        if bench.rows <= 0:
            raise SweepError(source, at("eval.benchmark.rows"), f"{bench.rows} is not positive",
                             "score e.g. `rows: 250` of GSM8K's test split")
        if bench.max_new_tokens <= 0:
            raise SweepError(source, at("eval.benchmark.max_new_tokens"), f"{bench.max_new_tokens} is not positive",
                             "give the answers room, e.g. `max_new_tokens: 256`")
        if not bench.path.strip() or len(bench.path) > MAX_TEXT:
            raise SweepError(source, at("eval.benchmark.path"), "is empty or absurdly long",
                             "use openai/gsm8k, or a local JSONL file or folder with question/answer fields")
        if bench.name is not None and not bench.name.strip():
            raise SweepError(source, at("eval.benchmark.name"), "is empty",
                             "leave it out (openai/gsm8k's `main` is the default), or name a config")
    if eval_spec.heldout_rows < 0:
        raise SweepError(source, at("eval.heldout_rows"), "is negative", "use 0 (none) or more rows")


# The second metric that decides among trials the selection metric cannot tell apart, when `select.tie_break`
# is not set: a finer-grained figure from the same evaluation, the first that does not rank like `metric`.
DEFAULT_TIE_BREAK = {"sft": ("heldout_loss", "ref_perplexity"), "dpo": ("heldout_dpo_loss", "logratio_margin")}
# Metric pairs that always rank trials the same way (loss = log perplexity): one cannot break the other's ties.
SAME_RANKING = ({"heldout_loss", "heldout_perplexity"},)


def _ranks_alike(a: str, b: str) -> bool:
    return a == b or any({a, b} <= pair for pair in SAME_RANKING)


def _check_select(select: SelectSpec, stage: str, source: str, at) -> SelectSpec:
    """Validate `select:` and fill in its defaults (mode, tie_break)."""
    def known(metric: Any, where: str) -> str:
        if not isinstance(metric, str) or metric not in SELECTABLE_METRICS:
            raise SweepError(source, at(where), f"{_clip(metric)} is not a metric the evaluator writes",
                             f"use one of {', '.join(SELECTABLE_METRICS)}")
        return metric

    known(select.metric, "select.metric")
    mode = select.mode or SELECTABLE_METRICS[select.metric]
    if mode not in ("min", "max"):
        raise SweepError(source, at("select.mode"), f"{mode!r} is not min or max", "use min or max")
    tie_break = select.tie_break or next(m for m in DEFAULT_TIE_BREAK[stage] if not _ranks_alike(m, select.metric))
    known(tie_break, "select.tie_break")
    if _ranks_alike(tie_break, select.metric):
        raise SweepError(source, at("select.tie_break"), f"{tie_break!r} ranks trials exactly as select.metric "
                         f"{select.metric!r}, so it cannot break its ties",
                         "name another metric, e.g. "
                         f"{next(m for m in DEFAULT_TIE_BREAK[stage] if not _ranks_alike(m, select.metric))}")
    for i, rail in enumerate(select.guardrails):
        where = f"select.guardrails[{i}]"
        known(rail.metric, f"{where}.metric")
        if (rail.min is None) == (rail.max is None):
            raise SweepError(source, at(where), "needs exactly one of min or max",
                             f"write e.g. `{{metric: {rail.metric}, min: start}}` or `{{metric: {rail.metric}, "
                             "max: 0.2}`")
        bound = rail.bound
        if isinstance(bound, str):
            if bound not in GUARDRAIL_REFERENCES:
                raise SweepError(source, at(f"{where}.{rail.side}"), f"{_clip(bound)} is not a number, base or start",
                                 "give a number, or `base` / `start` for that reference row's value")
            if bound == "start" and stage != "dpo":
                raise SweepError(source, at(f"{where}.{rail.side}"), "`start` is a DPO sweep's SFT start row; an "
                                 "SFT sweep has none", "use `base` (the untrained model) or a number")
        elif isinstance(bound, bool) or not isinstance(bound, (int, float)) or not _finite(bound):
            raise SweepError(source, at(f"{where}.{rail.side}"), f"{_clip(bound)} is not a finite number",
                             "give a number, or `base` / `start` for that reference row's value")
    return dataclasses.replace(select, mode=mode, tie_break=tie_break)


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer too large for a float
        return False


def _check_select_betas(select: SelectSpec, trials: list, source: str, at) -> None:
    """reward_margin = beta * (log-ratio margin): trials with different betas are on different scales."""
    betas = sorted({hyper.beta for _, hyper in trials})
    if len(betas) < 2:
        return
    uses = [("select.metric", select.metric), ("select.tie_break", select.tie_break)]
    uses += [(f"select.guardrails[{i}].metric", g.metric) for i, g in enumerate(select.guardrails)]
    for where, metric in uses:
        if metric == "reward_margin":
            raise SweepError(source, at(where), "reward_margin scales with beta and the trials use betas "
                             f"{', '.join(f'{b:g}' for b in betas)}, so it cannot compare them",
                             "use logratio_margin (the margin / beta) or heldout_dpo_loss (one fixed beta for "
                             "every trial)")



MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "databricks")


def _check_tracking(tracking: TrackingSpec, source: str, at) -> TrackingSpec:
    uri = tracking.mlflow_uri
    if uri is None:
        if tracking.experiment is not None:
            raise SweepError(source, at("tracking.experiment"), "is set without tracking.mlflow_uri",
                             "add `mlflow_uri: http://<mlflow server>:5000` or remove `experiment:`")
        return tracking
    scheme = uri.split("://", 1)[0].split(":", 1)[0].lower() if ":" in uri else ""
    if scheme not in MLFLOW_SCHEMES or len(uri) > MAX_TEXT:
        raise SweepError(source, at("tracking.mlflow_uri"), f"{_clip(uri)!r} is not an MLflow tracking URI",
                         f"use e.g. http://mlflow.example:5000 (schemes: {', '.join(MLFLOW_SCHEMES)})")
    if "@" in uri.split("://", 1)[-1].split("/", 1)[0]:
        # Sweep files are committed and shown in reports: credentials never go in them.
        raise SweepError(source, at("tracking.mlflow_uri"), "contains credentials (user:password@)",
                         "remove them; set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD in the "
                         "environment (a Secret on Kubernetes)")
    if tracking.experiment is not None and not tracking.experiment.strip():
        raise SweepError(source, at("tracking.experiment"), "is empty", "name the experiment or leave it out")
    return tracking



# Hyper keys a stage's trainer never reads (trainer/sft.py, dpo.py, recipe.py: only DPOConfig takes beta). The
# trial id hashes every Hyper field, so a value other than the default would be a new trial id for the very same
# model: a search varying it, or two trials differing only in it, train one model twice under two ids.
STAGE_IGNORES = {"sft": ("beta",), "dpo": ()}


def _check_read_by_stage(source: str, where: str, stage: str, hyper: Hyper | None = None,
                         searched: frozenset | set = frozenset()) -> None:
    """The one rule for what the stage ignores (STAGE_IGNORES): `hyper` (a trial, a grid point, `defaults:`) may
    not set such a key to anything but its default (_check_hyper), and a search space may not vary it at all,
    even over one value or as a tie (`searched`, parse_search)."""
    for key in STAGE_IGNORES.get(stage, ()):
        # != is also true for NaN, which is never the default.
        if key in searched or (hyper is not None and getattr(hyper, key) != getattr(Hyper, key)):
            readers = " or ".join(f"`stage: {s}`" for s in STAGES if key not in STAGE_IGNORES[s])
            raise SweepError(source, f"{where}.{key}", f"{key} is not used by {stage.upper()} training, so each "
                             "value would train the same model under another trial id",
                             f"remove `{key}` from this {stage} sweep (it applies to {readers} sweeps)")


def _check_hyper(h: Hyper, source: str, where: str, stage: str) -> None:
    def bad(key: str, problem: str, fix: str):
        raise SweepError(source, f"{where}.{key}", problem, fix)

    _check_read_by_stage(source, where, stage, hyper=h)

    if h.r <= 0:
        bad("r", f"LoRA rank {h.r} is not positive", "use a rank such as 4, 8 or 16")
    if h.alpha <= 0:
        bad("alpha", f"LoRA alpha {h.alpha} is not positive", "use e.g. alpha = 2 * r")
    if not 0.0 <= h.dropout < 1.0:
        bad("dropout", f"{h.dropout} is outside [0, 1)", "use a dropout such as 0.05")
    if not h.target_modules:
        bad("target_modules", "is empty", f"list modules from {', '.join(LORA_TARGETS)}")
    for module in h.target_modules:
        if module not in LORA_TARGETS:
            bad("target_modules", f"{module!r} is not a Llama projection",
                f"use modules from {', '.join(LORA_TARGETS)}")
    if len(set(h.target_modules)) != len(h.target_modules):
        bad("target_modules", "lists a module twice", "list each module once")
    if not (h.lr > 0 and math.isfinite(h.lr)) or h.lr >= 1:
        bad("lr", f"learning rate {h.lr} is not in (0, 1)", "use e.g. 2e-4 for SFT LoRA, 5e-6 for DPO")
    if h.batch_size <= 0:
        bad("batch_size", f"{h.batch_size} is not positive",
            "use a global batch (rows per step before grad_accum, split over the processes) such as 4 or 8")
    if h.grad_accum <= 0:
        bad("grad_accum", f"{h.grad_accum} is not positive", "use 1 for no accumulation")
    if not (h.epochs > 0 and math.isfinite(h.epochs)) and h.max_steps <= 0:
        bad("epochs", f"{h.epochs} is not positive", "train for at least a fraction of an epoch, or set max_steps")
    if h.max_steps == 0 or h.max_steps < -1:
        bad("max_steps", f"{h.max_steps} is not a step count", "use -1 (run `epochs`) or a positive count")
    if stage == "dpo" and not (h.beta > 0 and math.isfinite(h.beta)):
        bad("beta", f"DPO beta {h.beta} is not positive", "use e.g. 0.1")
    if not 0.0 <= h.warmup_ratio < 1.0:
        bad("warmup_ratio", f"{h.warmup_ratio} is outside [0, 1)", "use e.g. 0.03")
    if h.scheduler not in SCHEDULERS:
        bad("scheduler", f"{h.scheduler!r} is not supported", f"use one of {', '.join(SCHEDULERS)}")
    if h.weight_decay < 0:
        bad("weight_decay", "is negative", "use 0 or a small positive value")
    for key in ("train_rows", "test_rows"):
        value = getattr(h, key)
        if value is not None and value <= 0:
            bad(key, f"{value} is not positive", "leave it out to use every row, or give a positive count")
    if h.seed < 0:
        bad("seed", f"{h.seed} is negative", "use a seed of 0 or more")
    if h.gradient_checkpointing not in ("auto", "on", "off"):
        bad("gradient_checkpointing", f"{h.gradient_checkpointing!r} is not auto, on or off", "use auto")



def check_start_compatible(sweep: Sweep, start: TrialSpec, where: str = "") -> None:
    """A DPO sweep trains on what its SFT start point learned: the same model (tokenizer), the same prompt
    format and the same max_length, or the adapter is asked for prompts it was never trained on."""
    at = f"{where}" if where else ""
    ref = f"{start.sweep}/{start.name} ({start.trial_id})"
    for key, ours, theirs in (("model", sweep.model, start.model), ("prompt_format", sweep.prompt_format,
                                                                       start.prompt_format),
                              ("max_length", sweep.max_length, start.max_length)):
        if ours != theirs:
            raise SweepError(sweep.source, f"{at}{key}", f"{ours!r} differs from its start point {ref}, which was "
                             f"trained with {key} {theirs!r}", f"set `{key}: {theirs}` to match the SFT sweep "
                             f"(or start from an SFT sweep trained with {key} {ours!r})")


