"""Sweep files and trial specs: parse, validate, expand, hash.

A sweep file under jobs/ holds one sweep (a mapping with `stage:`) or a pipeline (`pipeline:` a list of
sweeps run in order). Each sweep expands into trial specs: its `defaults`, overridden by each entry of
`trials` and by each point of the `grid`. A trial spec is everything one trial needs, and its id is a
hash of it, so an unchanged trial always maps to the same folder in the artifact store.

No torch here: the submitter imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

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
# The second metric that decides among trials the selection metric cannot tell apart, when `select.tie_break`
# is not set: a finer-grained figure from the same evaluation, the first that does not rank like `metric`.
DEFAULT_TIE_BREAK = {"sft": ("heldout_loss", "ref_perplexity"), "dpo": ("heldout_dpo_loss", "logratio_margin")}
# Metric pairs that always rank trials the same way (loss = log perplexity): one cannot break the other's ties.
SAME_RANKING = ({"heldout_loss", "heldout_perplexity"},)


@dataclass(frozen=True)
class SelectSpec:
    metric: str = "ref_perplexity"
    mode: str = ""  # filled from SELECTABLE_METRICS when empty
    tie_break: str = ""  # filled from DEFAULT_TIE_BREAK when empty
    guardrails: tuple[Guardrail, ...] = ()

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


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
    return _build(TrialSpec, data, "spec.json", "")


# ---------------------------------------------------------------------------------------------- parsing

class SweepLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what YAML 1.1 (which PyYAML implements) silently reads as something other
    than what was written, and what YAML 1.2 tools (editors, the JSON Schema in jobs/) read differently again:
    a key set twice in one mapping (the last wins), yes/no/on/off as booleans, a leading zero as octal
    (`seed: 010` is 8), colon-separated digits as base 60 (`lr: 1:30` is 90), bare dates. Quoted, each is text.
    `2e-4` stays what PyYAML reads (text), which number fields accept as the number."""

    source = "(sweep)"

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_yaml_nodes(self, node, self.source)
        return self.construct_document(node)


_YAML_BOOL, _YAML_INT, _YAML_FLOAT, _YAML_DATE = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float",
                                                                                    "timestamp"))
_YAML_MERGE = "tag:yaml.org,2002:merge"
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")


def read_yaml(text: str, source: str) -> Any:
    """The document in `text`, read by SweepLoader; a quirk is a SweepError naming the line and the key."""
    loader = SweepLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_quirk(loader: SweepLoader, node: yaml.ScalarNode) -> tuple[str, str] | None:
    """(problem, fix) when a plain scalar does not mean what it says, else None."""
    if not isinstance(node, yaml.ScalarNode) or node.style is not None:
        return None  # quoted or block text is always a string
    text = node.value
    quote = f"quote it ('{text}') if you meant the text"
    if node.tag == _YAML_BOOL and text.lower() not in ("true", "false"):
        value = loader.construct_yaml_bool(node)
        return (f"`{text}` is read as the boolean {str(value).lower()} (YAML 1.1 takes yes/no/on/off for "
                "true/false; YAML 1.2 tools read text)", f"{quote}, or write {str(value).lower()} for a boolean")
    if _LEADING_ZERO.fullmatch(text):
        plain = int(text.replace("_", ""), 10)
        read = f"the octal number {loader.construct_yaml_int(node)}" if node.tag == _YAML_INT else "text"
        return (f"`{text}` has a leading zero, which YAML 1.1 reads as {read} (YAML 1.2 tools: {plain})",
                f"write {plain} for the number, or {quote}")
    if node.tag in (_YAML_INT, _YAML_FLOAT) and ":" in text:
        value = (loader.construct_yaml_int if node.tag == _YAML_INT else loader.construct_yaml_float)(node)
        return (f"`{text}` is read as the base-60 number {value} (YAML 1.1 sexagesimal; YAML 1.2 tools read text)",
                f"{quote}, or write the number itself (e.g. 2.0e-4)")
    if node.tag == _YAML_INT and text.lstrip("+-").startswith(("0b", "0B")):
        return (f"`{text}` is read as the binary number {loader.construct_yaml_int(node)} (YAML 1.1; YAML 1.2 "
                "tools read text)", f"write the number in decimal, or {quote}")
    if node.tag == _YAML_DATE:
        return f"`{text}` is read as a date, not text", quote
    return None


def _check_yaml_nodes(loader: SweepLoader, root: yaml.Node, source: str) -> None:
    seen: set[int] = set()  # aliases share nodes (and can loop): each is checked once

    def fail(node: yaml.Node, where: str, problem: str, fix: str):
        # The field as every other sweep error names it; the line in the problem, since YAML is where it went wrong.
        raise SweepError(source, where or "(file)", f"line {node.start_mark.line + 1}: {problem}", fix)

    def walk(node: yaml.Node, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            quirk = _yaml_quirk(loader, node)
            if quirk:
                fail(node, where, *quirk)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{where}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if key.tag == _YAML_MERGE:  # `<<: *defaults`: keys written here override merged ones, by design
                    walk(value, where)
                    continue
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "(complex key)"
                at = f"{where}.{name}" if where else name
                quirk = _yaml_quirk(loader, key)
                if quirk:
                    fail(key, at, f"the key {quirk[0]}", quirk[1])
                if isinstance(key, yaml.ScalarNode):
                    ident = (key.tag, key.value)
                    if ident in first_line:
                        fail(key, at, f"is set twice in one mapping (lines {first_line[ident]} and "
                             f"{key.start_mark.line + 1}); YAML keeps only the last, silently",
                             "keep one of them")
                    first_line[ident] = key.start_mark.line + 1
                walk(value, at)

    walk(root, "")


def load_sweeps(path: str | Path) -> list[Sweep]:
    """Load and validate a sweep file. Raises SweepError naming the file, field and fix."""
    path = Path(path)
    source = str(path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), source)
    except SweepError:
        raise
    except FileNotFoundError:
        raise SweepError(source, "(file)", "no such file", "name a file under jobs/ or give a path") from None
    except UnicodeDecodeError as err:
        raise SweepError(source, "(file)", f"not UTF-8 text ({err.reason})", "save the file as UTF-8") from None
    except yaml.YAMLError as err:
        raise SweepError(source, "(file)", f"not valid YAML: {err}".replace("\n", " "),
                         "fix the YAML syntax at the position shown") from None
    except (ValueError, RecursionError) as err:  # PyYAML's int() of a 4300+ digit literal; absurd nesting
        raise SweepError(source, "(file)", f"cannot be read: {type(err).__name__}: {str(err)[:200]}",
                         "remove the absurdly long number or deeply nested value") from None
    if not isinstance(raw, dict):
        raise SweepError(source, "(file)", f"top level is {_type_name(raw)}, not a mapping",
                         "write `stage: ...` keys, or `pipeline:` with a list of sweeps")
    if "pipeline" in raw:
        _check_keys(source, "", raw, {"pipeline", "name"})
        items = raw["pipeline"]
        if not isinstance(items, list) or not items:
            raise SweepError(source, "pipeline", "must be a non-empty list of sweeps",
                             "list each sweep (a mapping with `stage:`) under `pipeline:`")
        sweeps = [parse_sweep(item, source, f"pipeline[{i}]", default_name=None)
                  for i, item in enumerate(items)]
    else:
        sweeps = [parse_sweep(raw, source, "", default_name=path.stem)]
    names = [s.name for s in sweeps]
    for i, sweep in enumerate(sweeps):
        prefix = f"pipeline[{i}]." if len(sweeps) > 1 else ""
        if names.count(sweep.name) > 1:
            raise SweepError(source, f"{prefix}name", f"sweep name {sweep.name!r} is used twice",
                             "give every sweep in a pipeline its own name")
        if sweep.start_sweep in names[i:]:
            raise SweepError(source, f"{prefix}from", f"{sweep.start_from!r} names a sweep that runs later",
                             "a sweep can only start from a sweep listed before it")
    return sweeps


SWEEP_KEYS = {"name", "stage", "model", "dataset", "prompt_format", "max_length", "eval", "select",
              "from", "defaults", "trials", "grid", "max_parallel", "search", "prune", "tracking"}


def parse_sweep(raw: Any, source: str, where: str, default_name: str | None) -> Sweep:
    at = (lambda key: f"{where}.{key}" if where else key)
    if not isinstance(raw, dict):
        raise SweepError(source, where or "(file)", f"is {_type_name(raw)}, not a mapping",
                         "write the sweep as `key: value` pairs")
    _check_keys(source, where, raw, SWEEP_KEYS)
    for key in ("stage", "model", "dataset", "eval"):
        if key not in raw:
            raise SweepError(source, at(key), "is missing", f"add `{key}:` (see jobs/sft.yaml for an example)")
    name = raw.get("name", default_name)
    if name is None:
        raise SweepError(source, at("name"), "is missing", "give each sweep of a pipeline a `name:`")
    name = _check_type(source, at("name"), name, str)
    if len(name) > 40 or not _K8S_NAME.fullmatch(name):
        raise SweepError(source, at("name"), f"{name!r} is not a valid name",
                         "use 1-40 lowercase letters, digits and '-', starting and ending with a letter or digit")
    stage = _check_choice(source, at("stage"), raw["stage"], STAGES)
    model = _check_type(source, at("model"), raw["model"], str)
    if not model.strip():
        raise SweepError(source, at("model"), "is empty", "name a Hub model id or a local model folder")
    if len(model) > MAX_TEXT:
        raise SweepError(source, at("model"), f"is {len(model)} characters long", "name a Hub id or a folder")
    dataset = _build(DatasetSpec, raw["dataset"], source, at("dataset"))
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
    prompt_format = _check_choice(source, at("prompt_format"), raw.get("prompt_format", "chat"), PROMPT_FORMATS)
    max_length = _check_type(source, at("max_length"), raw.get("max_length", 512), int)
    if not 16 <= max_length <= 32768:
        raise SweepError(source, at("max_length"), f"{max_length} is out of range",
                         "use a token count between 16 and 32768, e.g. 256 or 512")
    eval_spec = _build(EvalSpec, raw["eval"], source, at("eval"))
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
    select = _check_select(_build(SelectSpec, raw.get("select", {}), source, at("select")), stage, source, at)
    start_from = raw.get("from")
    if stage == "dpo":
        if start_from is None:
            raise SweepError(source, at("from"), "is missing: a DPO sweep starts from a trained SFT trial",
                             "add `from: <sft sweep>:best` (or `<sft sweep>:<trial id>`)")
        start_from = _check_type(source, at("from"), start_from, str)
        if not _FROM.fullmatch(start_from):
            raise SweepError(source, at("from"), f"{start_from!r} is not `<sweep>:best` or `<sweep>:<trial id>`",
                             "write e.g. `from: sft:best`")
    elif start_from is not None:
        raise SweepError(source, at("from"), "is set on an SFT sweep", "remove `from:`; SFT starts from `model:`")
    max_parallel = _check_type(source, at("max_parallel"), raw.get("max_parallel", 1), int)
    if max_parallel < 1:
        raise SweepError(source, at("max_parallel"), f"{max_parallel} is not positive",
                         "run at least 1 trial at a time")
    trials = _expand_trials(raw, source, where, stage)
    _check_select_betas(select, trials, source, at)
    search, prune = parse_search(raw, source, where, stage, select, dataset, eval_spec, len(trials))
    tracking = raw.get("tracking")
    if tracking is not None:
        tracking = _check_tracking(_build(TrackingSpec, tracking, source, at("tracking")), source, at)
    return Sweep(name, stage, model, dataset, prompt_format, max_length, eval_spec, select, tuple(trials),
                 start_from, max_parallel, source, search, prune, tracking)


def _expand_trials(raw: dict, source: str, where: str, stage: str) -> list[tuple[str, Hyper]]:
    at = (lambda key: f"{where}.{key}" if where else key)
    defaults = raw.get("defaults", {}) or {}
    if not isinstance(defaults, dict):
        raise SweepError(source, at("defaults"), f"is {_type_name(defaults)}, not a mapping",
                         "write hyperparameters as `key: value` pairs")
    _check_keys(source, at("defaults"), defaults, _field_names(Hyper))
    entries: list[tuple[str, str, dict]] = []
    explicit = raw.get("trials", []) or []
    if not isinstance(explicit, list):
        raise SweepError(source, at("trials"), f"is {_type_name(explicit)}, not a list",
                         "list the trials, one mapping of hyperparameters each")
    for i, item in enumerate(explicit):
        if not isinstance(item, dict):
            raise SweepError(source, at(f"trials[{i}]"), f"is {_type_name(item)}, not a mapping",
                             "write each trial as `key: value` pairs")
        item = dict(item)
        name = item.pop("name", f"t{i + 1}")
        if not isinstance(name, (str, int)) or not _TRIAL_NAME.fullmatch(str(name)):
            raise SweepError(source, at(f"trials[{i}].name"), f"{str(name)[:80]!r} is not a usable trial name",
                             "use 1-63 letters, digits, '.', '_', '+' or '-', starting with a letter or digit")
        name = str(name)
        entries.append((name, at(f"trials[{i}]"), {**defaults, **item}))
    grid = raw.get("grid", {}) or {}
    if not isinstance(grid, dict):
        raise SweepError(source, at("grid"), f"is {_type_name(grid)}, not a mapping",
                         "map each hyperparameter to a list of values")
    _check_keys(source, at("grid"), grid, _field_names(Hyper))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(source, at(f"grid.{key}"), "must be a non-empty list of values",
                             f"write `{key}: [value1, value2]`")
    keys = list(grid)
    size = math.prod(len(grid[k]) for k in keys) if keys else 0
    if size + len(entries) > MAX_TRIALS:
        raise SweepError(source, at("grid"), f"expands to {size + len(entries)} trials",
                         f"keep a sweep under {MAX_TRIALS} trials: fewer values per key, or split the sweep")
    points = itertools.product(*(grid[k] for k in keys)) if keys else ()
    for j, combo in enumerate(points):
        point = dict(zip(keys, combo))
        label = "-".join(f"{k}{_short(v)}" for k, v in point.items())
        entries.append((f"g{j + 1}-{label}"[:60], at(f"grid (point {j + 1}: {point})"), {**defaults, **point}))
    if not entries and not raw.get("search"):  # a search sweep may leave every trial to the search
        raise SweepError(source, at("trials"), "the sweep has no trials",
                         "add a `trials:` list and/or a `grid:` of hyperparameters")
    result, seen = [], {}
    for name, where_trial, values in entries:
        hyper = _build(Hyper, values, source, where_trial)
        _check_hyper(hyper, source, where_trial, stage)
        if name in seen:
            raise SweepError(source, where_trial, f"trial name {name!r} is used twice", "give each trial its own name")
        seen[name] = hyper
        result.append((name, hyper))
    return result


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


# ------------------------------------------------------------------------------------- typed building

def _build(cls, raw: Any, source: str, where: str):
    """Build dataclass `cls` from a mapping, checking keys and types; errors name the field."""
    if not isinstance(raw, dict):
        raise SweepError(source, where or cls.__name__, f"is {_type_name(raw)}, not a mapping",
                         "write it as `key: value` pairs")
    _check_keys(source, where, raw, _field_names(cls))
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SweepError(source, f"{where}.{f.name}" if where else f.name, "is missing",
                                 f"add `{f.name}:`")
            continue
        kwargs[f.name] = _coerce(source, f"{where}.{f.name}" if where else f.name, raw[f.name], hints[f.name])
    return cls(**kwargs)


def _coerce(source: str, where: str, value: Any, hint: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is type(None) or hint is type(None):
        return None
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(source, where, value, inner[0])
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SweepError(source, where, f"is {_type_name(value)}, not a list", "write a YAML list `[a, b]`")
        item_type = args[0] if args else Any
        items = [_coerce(source, f"{where}[{i}]", v, item_type) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, where)
    return _check_type(source, where, value, hint)


def _check_type(source: str, where: str, value: Any, expected: type) -> Any:
    if expected is Any:
        return value
    if expected is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:  # YAML 1.1 reads "2e-4" as a string; accept what people write for learning rates
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and math.isfinite(number):
            return number
        if number is not None or not isinstance(value, str):
            raise SweepError(source, where, f"{str(value)[:40]} is not a finite number", "write a finite number")
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        if expected is str and len(value) > MAX_TEXT:
            raise SweepError(source, where, f"is {len(value)} characters long", "shorten it")
        return value
    raise SweepError(source, where, f"{_clip(value)} is {_type_name(value)}, not {_type_name_of(expected)}",
                     f"write {_type_name_of(expected)}")


def _clip(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def _check_choice(source: str, where: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SweepError(source, where, f"{_clip(value)} is not one of {', '.join(choices)}",
                         f"use one of {', '.join(choices)}")
    return value


# What people write after using TRL, PEFT or transformers directly.
KEY_ALIASES = {"learning_rate": "lr", "lora_alpha": "alpha", "lora_dropout": "dropout", "rank": "r",
               "lora_r": "r", "per_device_train_batch_size": "batch_size", "num_train_epochs": "epochs",
               "gradient_accumulation_steps": "grad_accum", "target": "target_modules", "base_model": "model",
               "max_seq_length": "max_length", "start_from": "from", "eval_set": "set"}


def _check_keys(source: str, where: str, raw: dict, allowed: set[str]) -> None:
    import difflib

    for key in raw:
        if key not in allowed:
            alias = KEY_ALIASES.get(str(key))
            close = [alias] if alias in allowed else difflib.get_close_matches(str(key), sorted(allowed), 1, 0.7)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(allowed))}"
            if str(key) == "per_device_train_batch_size" and close == ["batch_size"]:
                hint += " (finesweep's batch_size is the global batch per optimizer step: per-device x processes)"
            shown = str(key) if str(key).strip() and len(str(key)) <= 80 else repr(str(key)[:80])
            raise SweepError(source, f"{where}.{shown}" if where else shown, "unknown key", f"remove it; {hint}")


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "empty"}.get(type(value), type(value).__name__)


def _type_name_of(t: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(t, t.__name__)


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(str(x).replace("_proj", "") for x in v)
    return str(v)


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


def resolve_sweep_path(name_or_path: str, jobs_dir: str | Path = "jobs") -> Path:
    """`SWEEP=dpo` means jobs/dpo.yaml; anything with a slash or .yaml suffix is a path."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    return Path(jobs_dir) / f"{name_or_path}.yaml"


# ----------------------------------------------------------------------------- search and pruning (issue 13)
# `search:` adds trials chosen by an Optuna sampler to a sweep's `trials:`/`grid:` (which run first and count
# toward the budget); `prune:` stops unpromising trials at fixed amounts of training data. finesweep.search runs
# them; this section only parses and validates, so a wrong value fails before anything runs.

SEARCH_METHODS = ("grid", "random", "tpe")
PRUNERS = ("median", "asha", "hyperband")
# What the trainers' own eval loop measures on the held-out rows during training, so what a pruner can watch.
INTERMEDIATE_METRICS = {"sft": ("heldout_loss", "heldout_perplexity"),
                        "dpo": ("heldout_dpo_loss", "preference_accuracy")}
SEARCH_KEYS = {"method", "seed", "budget", "parallel", "space", "startup_trials"}
PRUNE_KEYS = {"method", "every_examples", "min_examples", "reduction_factor", "startup_trials", "max_examples"}
_INT_KEYS = {"r", "alpha", "batch_size", "grad_accum", "max_steps", "seed", "train_rows", "test_rows"}
_FLOAT_KEYS = {"dropout", "lr", "epochs", "beta", "warmup_ratio", "weight_decay"}


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


def parse_search(raw: dict, source: str, where: str, stage: str, select: SelectSpec, dataset: DatasetSpec,
                 eval_spec: EvalSpec, fixed: int) -> tuple[SearchSpec | None, PruneSpec | None]:
    at = (lambda key: f"{where}.{key}" if where else key)
    search_raw, prune_raw = raw.get("search"), raw.get("prune")
    if search_raw is None:
        if prune_raw is not None:
            raise SweepError(source, at("prune"), "is set without a `search:` block",
                             "add `search: {method: tpe, budget: 20, space: {...}}`, or remove `prune:`")
        return None, None
    if not isinstance(search_raw, dict):
        raise SweepError(source, at("search"), f"is {_type_name(search_raw)}, not a mapping",
                         "write `search: {method: tpe, seed: 0, budget: 20, parallel: 1, space: {...}}`")
    _check_keys(source, at("search"), search_raw, SEARCH_KEYS)
    method = _check_choice(source, at("search.method"), search_raw.get("method", "tpe"), SEARCH_METHODS)
    numbers = {}
    for key, default, least in (("seed", 0, 0), ("budget", None, 1), ("parallel", 1, 1), ("startup_trials", 5, 0)):
        if key not in search_raw and default is None:
            raise SweepError(source, at(f"search.{key}"), "is missing", "give the number of trials, e.g. `budget: 20`")
        value = _check_type(source, at(f"search.{key}"), search_raw.get(key, default), int)
        if value < least:
            raise SweepError(source, at(f"search.{key}"), f"{value} is below {least}", f"use {least} or more")
        numbers[key] = value
    if numbers["budget"] > MAX_TRIALS:
        raise SweepError(source, at("search.budget"), f"{numbers['budget']} trials is too many",
                         f"keep a sweep under {MAX_TRIALS} trials")
    if numbers["budget"] < fixed:
        raise SweepError(source, at("search.budget"), f"{numbers['budget']} is less than the {fixed} `trials:`/"
                         "`grid:` entries, which run first and count toward it",
                         f"use a budget of at least {fixed + 1} to let the search add trials")
    space = _parse_space(search_raw.get("space"), source, at("search.space"), method)
    _check_read_by_stage(source, at("search.space"), stage, searched={p.key for p in space})
    # Every suggestion starts from `defaults:`; checked here so that an ignored key set there names `defaults`,
    # not the space (_check_space_values below checks the defaults merged into the space's values).
    base = _build(Hyper, dict(raw.get("defaults") or {}), source, at("defaults"))
    _check_read_by_stage(source, at("defaults"), stage, hyper=base)
    _check_space_values(raw, space, source, at("search.space"), stage)
    if any(p.key == "beta" for p in space):
        uses = [select.metric, select.tie_break, *(g.metric for g in select.guardrails)]
        if "reward_margin" in uses:
            raise SweepError(source, at("search.space.beta"), "beta is searched and select uses reward_margin, "
                             "which scales with beta", "select by logratio_margin or heldout_dpo_loss")
    search = SearchSpec(method, numbers["seed"], numbers["budget"], numbers["parallel"], space,
                        numbers["startup_trials"], base)
    if prune_raw is None:
        return search, None
    return search, _parse_prune(prune_raw, source, at, stage, select, dataset, eval_spec)


def _parse_prune(raw: Any, source: str, at, stage: str, select: SelectSpec, dataset: DatasetSpec,
                 eval_spec: EvalSpec) -> PruneSpec:
    if not isinstance(raw, dict):
        raise SweepError(source, at("prune"), f"is {_type_name(raw)}, not a mapping",
                         "write `prune: {method: asha, every_examples: 256, min_examples: 256}`")
    _check_keys(source, at("prune"), raw, PRUNE_KEYS)
    method = _check_choice(source, at("prune.method"), raw.get("method", "asha"), PRUNERS)
    if "every_examples" not in raw:
        raise SweepError(source, at("prune.every_examples"), "is missing",
                         "say how often to evaluate, in training examples seen, e.g. `every_examples: 256`")
    values = {}
    for key, default, least in (("every_examples", None, 1), ("min_examples", raw["every_examples"], 1),
                                ("reduction_factor", 3, 2), ("startup_trials", 2, 0)):
        value = _check_type(source, at(f"prune.{key}"), raw.get(key, default), int)
        if value < least:
            raise SweepError(source, at(f"prune.{key}"), f"{value} is below {least}", f"use {least} or more")
        values[key] = value
    max_examples = raw.get("max_examples")
    if max_examples is not None:
        if method != "hyperband":
            raise SweepError(source, at("prune.max_examples"), f"applies to hyperband, not {method}",
                             "remove it, or use `method: hyperband`")
        max_examples = _check_type(source, at("prune.max_examples"), max_examples, int)
        if max_examples <= values["min_examples"]:
            raise SweepError(source, at("prune.max_examples"), f"{max_examples} is not above min_examples "
                             f"{values['min_examples']}", "give the examples a full trial trains on")
    measurable = INTERMEDIATE_METRICS[stage]
    if select.metric not in measurable:
        raise SweepError(source, at("prune"), f"prunes by select.metric {select.metric!r}, which is not measured "
                         f"during training (a {stage} trial's eval loop measures {', '.join(measurable)})",
                         f"select by one of {', '.join(measurable)}, or remove `prune:`")
    if not eval_spec.heldout_rows or not (dataset.test_split or dataset.test_fraction):
        raise SweepError(source, at("prune"), "needs held-out rows to evaluate during training",
                         "set dataset.test_fraction (or test_split) and eval.heldout_rows")
    return PruneSpec(method, values["every_examples"], values["min_examples"], values["reduction_factor"],
                     values["startup_trials"], max_examples)


def _parse_space(raw: Any, source: str, where: str, method: str) -> tuple[Param, ...]:
    if not isinstance(raw, dict) or not raw:
        raise SweepError(source, where, "is missing or empty" if not raw else f"is {_type_name(raw)}, not a mapping",
                         "map each searched key to a range or choices, e.g. `lr: {low: 1.0e-5, high: 1.0e-3, "
                         "log: true}`")
    _check_keys(source, where, raw, _field_names(Hyper))
    hints = get_type_hints(Hyper)
    params = []
    for key, body in raw.items():
        w = f"{where}.{key}"
        if not isinstance(body, dict):
            raise SweepError(source, w, f"is {_type_name(body)}, not a mapping",
                             "write `{low: .., high: ..}`, `{choices: [..]}` or `{times: r, factor: 2}`")
        forms = [f for f in (("low", "high"), ("choices",), ("times",)) if f[0] in body]
        if len(forms) != 1:
            raise SweepError(source, w, "needs exactly one of low/high, choices or times",
                             "write `{low: .., high: ..}`, `{choices: [..]}` or `{times: r, factor: 2}`")
        if forms[0] == ("choices",):
            _check_keys(source, w, body, {"choices"})
            choices = body["choices"]
            if not isinstance(choices, list) or not choices:
                raise SweepError(source, f"{w}.choices", "must be a non-empty list", f"write `choices: [a, b]`")
            values = tuple(_coerce(source, f"{w}.choices[{i}]", c, hints[key]) for i, c in enumerate(choices))
            if len(set(values)) != len(values):
                raise SweepError(source, f"{w}.choices", "lists a value twice", "list each value once")
            params.append(Param(key, "choice", choices=values))
            continue
        if method == "grid" and forms[0] == ("low", "high"):
            raise SweepError(source, w, "is a range, which a grid cannot enumerate", "list the values as `choices:`")
        if forms[0] == ("times",):
            _check_keys(source, w, body, {"times", "factor"})
            if key not in _INT_KEYS | _FLOAT_KEYS:
                raise SweepError(source, w, f"{key} is not a number, so it cannot be a multiple of another key",
                                 "search it with `choices:`")
            times = body["times"]
            if times not in _INT_KEYS | _FLOAT_KEYS or times == key:
                raise SweepError(source, f"{w}.times", f"{_clip(times)} is not another numeric hyperparameter",
                                 "name a key such as r")
            factor = _check_type(source, f"{w}.factor", body.get("factor", 1.0), float)
            if factor <= 0:
                raise SweepError(source, f"{w}.factor", f"{factor} is not positive", "use e.g. `factor: 2`")
            params.append(Param(key, "tie", times=times, factor=factor))
            continue
        _check_keys(source, w, body, {"low", "high", "log", "step"})
        if "high" not in body:
            raise SweepError(source, f"{w}.high", "is missing", "give both low and high")
        if key not in _INT_KEYS | _FLOAT_KEYS:
            raise SweepError(source, w, f"{key} is not a number, so it has no range", "search it with `choices:`")
        kind = "int" if key in _INT_KEYS else "float"
        number = int if kind == "int" else float
        low = _check_type(source, f"{w}.low", body["low"], number)
        high = _check_type(source, f"{w}.high", body["high"], number)
        log_scale = _check_type(source, f"{w}.log", body.get("log", False), bool)
        step = body.get("step")
        if low >= high:
            raise SweepError(source, w, f"range [{low}, {high}] is {'empty' if low == high else 'inverted'}",
                             "give low below high (a single value belongs in `defaults:`)")
        if log_scale and low <= 0:
            raise SweepError(source, f"{w}.low", f"a log range cannot start at {low} (log of 0 or less)",
                             "start it above 0, e.g. `low: 1.0e-6`, or drop `log: true`")
        if step is not None:
            step = _check_type(source, f"{w}.step", step, number)
            if log_scale or step <= 0 or abs(round((high - low) / step) * step - (high - low)) > 1e-9 * max(1, high):
                raise SweepError(source, f"{w}.step", f"{step} does not divide [{low}, {high}] into equal steps"
                                 + (" (or is used with log)" if log_scale else ""),
                                 "use a positive step that divides high - low, without log")
        params.append(Param(key, kind, low, high, log_scale, step))
    by_key = {p.key: p for p in params}
    for p in params:
        if p.kind == "tie" and by_key.get(p.times, Param("", "")).kind == "tie":
            raise SweepError(source, f"{where}.{p.key}.times", f"{p.times} is itself a tie",
                             "tie to a searched or fixed key")
    if all(p.kind == "tie" for p in params):
        raise SweepError(source, where, "has only ties: nothing to search", "give at least one range or choices")
    return tuple(params)


def tie_value(param: Param, base: Any) -> Any:
    """alpha = factor * r; an integer key takes the nearest integer (at least 1)."""
    value = param.factor * base
    return max(1, round(value)) if param.key in _INT_KEYS else value


def _check_space_values(raw: dict, space: tuple[Param, ...], source: str, where: str, stage: str) -> None:
    """Every value the space can produce must pass the same checks as a hand-written trial (_check_hyper): each
    choice, and each end of a range, with the other keys at their defaults. The checks are bounds, so the ends
    stand for the range; a tie is checked at the ends of the key it multiplies."""
    defaults = dict(raw.get("defaults") or {})
    by_key = {p.key: p for p in space}

    def candidates(p: Param) -> list:
        if p.kind == "choice":
            return list(p.choices)
        if p.kind in ("int", "float"):
            return [p.low, p.high]
        return []

    def resolved(values: dict) -> dict:
        out = dict(values)
        for p in space:
            if p.kind == "tie":
                base = out.get(p.times, getattr(Hyper(), p.times))
                out[p.key] = tie_value(p, base)
        return out

    first = {p.key: candidates(p)[0] for p in space if p.kind != "tie"}
    for p in space:
        for value in candidates(p):
            values = resolved({**defaults, **first, p.key: value})
            _check_hyper(_build(Hyper, values, source, where), source, where, stage)
    for p in space:
        if p.kind == "tie" and p.times not in by_key:
            _check_hyper(_build(Hyper, resolved({**defaults, **first}), source, where), source, where, stage)
