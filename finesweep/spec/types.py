"""The vocabulary of sweep files and trial specs: the constants (stages, formats, metrics, limits, name patterns),
SweepError, and the frozen dataclasses a sweep file is read into (DatasetSpec ... Sweep, and the search's Param,
SearchSpec, PruneSpec). A TrialSpec's id is a hash of its to_dict() form (TrialSpec.trial_id).

Imports nothing else of finesweep.spec at module level: every other module of the package builds on this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

# 2: TinyLlama's real chat template (prompts end '<|assistant|>\n'), BOS-faithful scoring, DPO dropout honoured.
# 3: the trial id leaves out the evaluation settings (but eval.heldout_rows): TrialSpec.trial_id.
SPEC_VERSION = 3
STAGES = ("sft", "dpo")
PROMPT_FORMATS = ("chat", "instruction")
DATASET_FORMATS = (
    "dolly",  # databricks/databricks-dolly-15k: instruction, context, response, category
    "grade-school-math",  # qwedsacf/grade-school-math-instructions: INSTRUCTION, RESPONSE
    "gsm8k",  # openai/gsm8k: question, answer
    "instruction",  # local files: prompt, response
    "ultrafeedback",  # argilla/ultrafeedback-binarized-preferences: instruction, chosen_response, ...
    "hh-rlhf",  # Anthropic/hh-rlhf: chosen, rejected (whole dialogues)
    "preference",  # local files: prompt, chosen, rejected
)
SFT_FORMATS = ("dolly", "grade-school-math", "gsm8k", "instruction")
DPO_FORMATS = ("ultrafeedback", "hh-rlhf", "preference")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# Metrics an evaluation writes that a sweep may select its best trial by, with the better direction.
SELECTABLE_METRICS = {
    "bleu": "max",
    "chrf": "max",
    "ref_perplexity": "min",
    "heldout_perplexity": "min",
    "preference_accuracy": "max",
    "reward_margin": "max",
    "refusal_rate": "max",
    "math_accuracy": "max",
    "repetition_rate": "min",
    # Beta-independent DPO figures: reward_margin is beta * log-ratio margin, so it cannot compare a beta sweep.
    "logratio_margin": "max",
    "heldout_dpo_loss": "min",
    "lennorm_preference_accuracy": "max",
    "logp_preference_accuracy": "max",
    "heldout_loss": "min",
    "gsm8k_accuracy": "max",
}
MAX_TRIALS = 500
MAX_TEXT = 1000  # model ids, dataset paths, eval set names
_TRIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,62}")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_FROM = re.compile(r"^(?P<sweep>[a-z0-9]([-a-z0-9]*[a-z0-9])?):(?P<which>best|[a-z]+-[0-9a-f]{10})$")


class SweepError(ValueError):
    """A sweep file is wrong. The message names the file, the field and the fix."""

    def __init__(self, source: str, field_path: str, problem: str, fix: str):
        self.source, self.field_path, self.problem, self.fix = source, field_path, problem, fix
        super().__init__(f"{source}: {field_path}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class DatasetSpec:
    # `datasets.load_dataset` path: a Hub id, a local file or folder, or a builder ("json", "parquet").
    path: str
    format: str
    # Split in datasets' slicing syntax, e.g. "train" or "train[:5000]".
    split: str = "train"
    name: str | None = None
    data_files: list[str] | None = None
    # Held out for evaluation: either a split of its own (slicing syntax) or a fraction of `split`.
    test_split: str | None = None
    test_fraction: float = 0.0
    # Preference rows whose chosen or rejected answer is this short or shorter are dropped.
    min_answer_chars: int = 0
    seed: int = 42


@dataclass(frozen=True)
class BenchmarkSpec:
    """GSM8K's test split scored by exact match of the final number (a math SFT sweep's real benchmark row)."""

    # `datasets.load_dataset` path: openai/gsm8k on the Hub, or a local file or folder with question/answer fields
    # (a local file is the test split itself: `split` applies to Hub datasets and folders, e.g. a folder holding
    # train.jsonl and test.jsonl). `name` is the Hub config; the default `main` (openai/gsm8k's) is ignored by a
    # local file or folder that has no such config, any other name it lacks is refused (trainer.data.resolve_source).
    path: str = "openai/gsm8k"
    name: str | None = "main"
    split: str = "test"
    rows: int = 250
    max_new_tokens: int = 256


@dataclass(frozen=True)
class EvalSpec:
    # A set under evaluator/evalsets (by name) or a path to a JSONL file.
    set: str
    max_new_tokens: int = 128
    batch_size: int = 8
    # Rows of the held-out split scored for loss / preference accuracy (0 = none); a few hundred rows are
    # what it takes for intervals narrow enough to rank trials.
    heldout_rows: int = 300
    # Extra sets scored alongside, e.g. the math set for a math SFT sweep.
    extra_sets: tuple[str, ...] = ()
    bootstrap_samples: int = 1000
    benchmark: BenchmarkSpec | None = None


@dataclass(frozen=True)
class Hyper:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 2e-4
    # The GLOBAL batch of one forward/backward pass, before grad_accum (rows per optimizer step = batch_size *
    # grad_accum), split evenly over the trial's processes (GPUs, or FINESWEEP_PROCESSES on CPU): a trial optimises
    # the same way on 1 or N processes, so its id says what it trained. A batch that does not split is refused.
    batch_size: int = 8
    epochs: float = 1.0
    grad_accum: int = 1
    beta: float = 0.1
    max_steps: int = -1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 42
    # Caps applied after the train/test split (the users' DPO trials used 500/200 and 1000/500 rows).
    train_rows: int | None = None
    test_rows: int | None = None
    # "auto": on when the GPU would not fit the batch otherwise; the trainer decides and records it.
    gradient_checkpointing: str = "auto"


@dataclass(frozen=True)
class Guardrail:
    """A bound a trial must meet to be eligible for best: exactly one of `min` / `max`, each a number or a
    reference row (`base`, or `start` in a DPO sweep) whose value of the same metric is the bound."""

    metric: str
    min: Any = None
    max: Any = None

    @property
    def side(self) -> str:
        return "min" if self.min is not None else "max"

    @property
    def bound(self) -> Any:
        return self.min if self.min is not None else self.max


GUARDRAIL_REFERENCES = ("base", "start")


@dataclass(frozen=True)
class SelectSpec:
    metric: str = "ref_perplexity"
    mode: str = ""  # filled from SELECTABLE_METRICS when empty
    tie_break: str = ""  # filled from DEFAULT_TIE_BREAK when empty
    guardrails: tuple[Guardrail, ...] = ()

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


@dataclass(frozen=True)
class TrackingSpec:
    """Where a sweep's trials also show up (`tracking:`). It changes where figures are shown, not what is trained,
    so it is on the Sweep only, never in a TrialSpec (trial ids ignore it): the backends hand it to the trainer and
    evaluator as MLflow's own environment variables (env()), which a cluster may also set for every trial."""

    mlflow_uri: str | None = None
    experiment: str | None = None  # default: the sweep's name (one experiment per sweep)

    def env(self, sweep: str) -> dict[str, str]:
        if not self.mlflow_uri:
            return {}
        return {"MLFLOW_TRACKING_URI": self.mlflow_uri, "MLFLOW_EXPERIMENT_NAME": self.experiment or sweep}


@dataclass(frozen=True)
class StartRef:
    """The trained model a DPO trial (or a reference row) starts from."""

    sweep: str
    trial_id: str


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs. `name` is for people; the id ignores it."""

    sweep: str
    stage: str  # sft | dpo | base (base: evaluation only, of `model` + `start` without training)
    name: str
    model: str
    dataset: DatasetSpec
    prompt_format: str
    max_length: int
    hyper: Hyper
    eval: EvalSpec
    start: StartRef | None = None

    @property
    def trial_id(self) -> str:
        """What the trained weights depend on: model, data, prompt format, max length, hyperparameters, start
        point. Not the evaluation: changing `eval` re-evaluates a trial (evaluation_id), it never retrains it. The
        one evaluation setting kept is `eval.heldout_rows`: a search trial is evaluated on those rows while it
        trains and pruned by the result, so they decide where its training stops."""
        body = to_dict(self)
        body.pop("name")
        body["eval"] = {"heldout_rows": self.eval.heldout_rows}
        body["spec_version"] = SPEC_VERSION
        if self.stage == "base":
            body.pop("hyper")  # nothing is trained, so hyperparameters do not change the result
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return f"{self.stage}-{digest[:10]}"

    @property
    def evaluation_id(self) -> str:
        """The evaluation settings a trial's eval.json and _DONE were made with: a finished trial whose
        evaluation_id differs from its sweep's is evaluated again (store.read_status, NextAction.EVALUATE)."""
        body = {"eval": to_dict(self.eval), "spec_version": SPEC_VERSION}
        return "eval-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def trains(self) -> bool:
        return self.stage in STAGES


@dataclass(frozen=True)
class Sweep:
    name: str
    stage: str
    model: str
    dataset: DatasetSpec
    prompt_format: str
    max_length: int
    eval: EvalSpec
    select: SelectSpec
    trials: tuple[tuple[str, Hyper], ...]
    start_from: str | None = None  # "<sweep>:best" or "<sweep>:<trial-id>"
    max_parallel: int = 1
    source: str = ""
    search: "SearchSpec | None" = None  # trials beyond `trials:`/`grid:` chosen by finesweep.search
    prune: "PruneSpec | None" = None
    tracking: TrackingSpec | None = None  # not in any TrialSpec: trial ids ignore where figures are shown

    @property
    def start_sweep(self) -> str | None:
        return self.start_from.split(":", 1)[0] if self.start_from else None

    def trial_specs(self, start: StartRef | None = None) -> list[TrialSpec]:
        if self.stage == "dpo" and start is None:
            raise ValueError(f"sweep {self.name}: a DPO sweep needs its resolved start point")
        return [
            TrialSpec(self.name, self.stage, name, self.model, self.dataset, self.prompt_format,
                      self.max_length, hyper, self.eval, start)
            for name, hyper in self.trials
        ]

    def reference_specs(self, start: StartRef | None = None) -> list[TrialSpec]:
        """Rows every report compares against: the base model, and for DPO the SFT start model too."""
        refs = [TrialSpec(self.name, "base", "base", self.model, self.dataset, self.prompt_format,
                          self.max_length, Hyper(), self.eval, None)]
        if start is not None:
            refs.append(dataclasses.replace(refs[0], name="start", start=start))
        return refs


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def trial_from_dict(data: dict) -> TrialSpec:
    """Rebuild a TrialSpec from `to_dict` output (spec.json in the store)."""
    from .fields import _build  # fields builds on these types, so it is imported when first needed

    return _build(TrialSpec, data, "spec.json", "")


# ------------------------------------------------------------------------------- search and pruning (issue 13)
# The types parse_search (finesweep/spec/search_space.py) fills in; finesweep.search runs them.

@dataclass(frozen=True)
class Param:
    """One searched Hyper key: a float or int range (`low`/`high`, `log`, `step`), `choices`, or a tie
    (`times` another key, `factor`: alpha = 2 * r)."""

    key: str
    kind: str  # float | int | choice | tie
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    times: str = ""
    factor: float = 1.0


@dataclass(frozen=True)
class SearchSpec:
    method: str  # grid | random | tpe
    seed: int
    budget: int  # trials in the study, `trials:`/`grid:` entries included
    parallel: int  # trials trained at once
    space: tuple[Param, ...]
    startup_trials: int = 5  # tpe: finished trials before its model is used (random until then)
    base: Hyper = Hyper()  # the sweep's `defaults:`, which every suggestion starts from


@dataclass(frozen=True)
class PruneSpec:
    method: str  # median | asha | hyperband
    every_examples: int  # evaluate every this many training examples ...
    min_examples: int  # ... from this many on (the first rung of asha / hyperband)
    reduction_factor: int = 3  # asha, hyperband: keep the best 1/reduction_factor at each rung
    startup_trials: int = 2  # median: trials that finish unpruned before it prunes
    max_examples: int | None = None  # hyperband: a full trial's examples (None: the first finished trial's)

