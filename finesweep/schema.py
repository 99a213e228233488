"""The JSON Schema of sweep files, generated from the sweep types in finesweep.spec (never written by hand):
`python -m finesweep.schema > jobs/sweep.schema.json` (tests/test_schema.py fails when the committed file is
stale). Editors pick it up from each sweep file's `# yaml-language-server: $schema=./sweep.schema.json` line.

Generated from: the dataclasses (field names, types, which fields have no default), SWEEP_KEYS (every
top-level key, typed by the Sweep field of the same name where there is one), and the choice constants
(STAGES, DATASET_FORMATS, LORA_TARGETS, ...). What only the validator checks (value ranges, rules across fields
or against the store) is listed in the schema's description; the validator stays the one authority.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import typing
from typing import Any, get_args, get_origin

from finesweep import spec as S

DRAFT = "http://json-schema.org/draft-07/schema#"
# The values _check_hyper accepts for gradient_checkpointing (a literal there, not a constant; test_schema
# checks the two agree).
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
# Dataclasses the validator builds field by field (spec.fields._build): a field without a default is required there.
BUILT = (S.DatasetSpec, S.BenchmarkSpec, S.EvalSpec, S.Hyper, S.SelectSpec, S.Guardrail)
# Keys every sweep must have (parse_sweep checks them before building anything).
REQUIRED = ("stage", "model", "dataset", "eval")
# What `float` fields accept as text: PyYAML reads `2e-4` (no dot) as a string, and the validator takes it.
NUMBER_TEXT = r"^\s*[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9][0-9_]*)([eE][-+]?[0-9]+)?\s*$"
NOT_EXPRESSED = (
    "Checked by finesweep only, not by this schema: value ranges (positive ranks and batch sizes, dropout and "
    "warmup in [0, 1), lr in (0, 1), max_length 16-32768, ...), names' lengths, rules across fields (a grid's "
    "size, trial names used twice, test_split together with test_fraction, select.tie_break ranking like "
    "select.metric, reward_margin in a beta sweep, a guardrail's one of min/max, `start` only in DPO sweeps, "
    "search/prune consistency), `from` naming a sweep listed earlier in a pipeline or finished in the store, and "
    "local paths and eval sets that must exist. Run `make submit SWEEP=... BACKEND=k8s DRY_RUN=1` to check all.")


def _enums() -> dict[tuple[str, str], tuple]:
    """(class, field) -> the values it takes, from spec's constants (a constant not defined yet is skipped, so
    keys added to the types elsewhere flow in)."""
    metrics = tuple(S.SELECTABLE_METRICS)
    table = {("Sweep", "stage"): S.STAGES, ("Sweep", "prompt_format"): S.PROMPT_FORMATS,
             ("DatasetSpec", "format"): S.DATASET_FORMATS, ("Hyper", "scheduler"): S.SCHEDULERS,
             ("Hyper", "gradient_checkpointing"): GRADIENT_CHECKPOINTING, ("Hyper", "target_modules"): S.LORA_TARGETS,
             ("SelectSpec", "metric"): metrics, ("SelectSpec", "tie_break"): ("", *metrics),
             ("SelectSpec", "mode"): ("", "min", "max"), ("Guardrail", "metric"): metrics}
    for cls, constant in (("SearchSpec", "SEARCH_METHODS"), ("PruneSpec", "PRUNERS")):
        if hasattr(S, constant):
            table[(cls, "method")] = tuple(getattr(S, constant))
    return table


def _hints(cls) -> dict[str, Any]:
    """Field types, resolved one by one in the namespace of the module that defines `cls` (finesweep.spec.types):
    a forward reference to a type not written yet (another engineer's new key) becomes Any instead of failing the
    whole schema."""
    namespace = vars(sys.modules[cls.__module__])
    out = {}
    for f in dataclasses.fields(cls):
        hint = f.type
        for _ in range(2):  # `x: "T | None"` under `from __future__ import annotations` is a string twice
            if isinstance(hint, str):
                try:
                    hint = eval(hint, namespace, dict(vars(typing)))  # noqa: S307 - spec's own annotations
                except NameError:
                    hint = Any
        if isinstance(hint, str):
            hint = Any
        out[f.name] = hint
    return out


def _pattern(regex: re.Pattern) -> str:
    """A Python regex used with fullmatch, as an anchored ECMA-262 pattern (no named groups)."""
    body = re.sub(r"\(\?P<\w+>", "(", regex.pattern).removeprefix("^").removesuffix("$")
    return f"^(?:{body})$"


class _Builder:
    def __init__(self):
        self.defs: dict[str, dict] = {}
        self.enums = _enums()

    def ref(self, cls) -> dict:
        name = cls.__name__
        if name not in self.defs:
            self.defs[name] = {}  # placeholder first: a type may refer to itself
            self.defs[name] = self.object(cls)
        return {"$ref": f"#/definitions/{name}"}

    def object(self, cls, exclude: tuple[str, ...] = ()) -> dict:
        hints = _hints(cls)
        props = {f.name: self.field(cls, f.name, hints[f.name]) for f in dataclasses.fields(cls)
                 if f.name not in exclude}
        schema = {"type": "object", "properties": props, "additionalProperties": False}
        if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # dataclass's generated doc says nothing
            schema["description"] = " ".join(cls.__doc__.split())
        required = [f.name for f in dataclasses.fields(cls) if f.name not in exclude and cls in BUILT
                    and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if required:
            schema["required"] = required
        return schema

    def field(self, cls, name: str, hint: Any) -> dict:
        override = getattr(self, f"_{cls.__name__}_{name}", None)
        if override is not None:
            return override(hint)
        return self.type(hint, self.enums.get((cls.__name__, name)))

    def type(self, hint: Any, choices: tuple | None = None) -> dict:
        origin, args = get_origin(hint), get_args(hint)
        if args and type(None) in args:  # X | None
            inner = [a for a in args if a is not type(None)]
            return {"anyOf": [self.type(inner[0], choices), {"type": "null"}]}
        if origin in (tuple, list) or hint in (tuple, list):
            item = self.type(args[0] if args else Any, choices)
            array = {"type": "array", "items": item}
            # A bare string where a list of strings goes is that one-item list (spec.fields._coerce).
            return {"anyOf": [array, item]} if args and args[0] is str else array
        if dataclasses.is_dataclass(hint):
            return self.ref(hint)
        if choices is not None:
            return {"enum": list(choices)}
        if hint is str:
            return {"type": "string", "maxLength": S.MAX_TEXT}
        if hint is bool:
            return {"type": "boolean"}
        if hint is int:
            return {"type": "integer"}
        if hint is float:
            return {"anyOf": [{"type": "number"}, {"type": "string", "pattern": NUMBER_TEXT}]}
        return {}  # Any, or a type this generator does not know: the validator decides

    # Fields whose file form is not their Python type.
    def _Guardrail_min(self, hint) -> dict:
        return {"anyOf": [{"type": "number"}, {"enum": list(S.GUARDRAIL_REFERENCES)}, {"type": "null"}]}

    _Guardrail_max = _Guardrail_min

    def _SearchSpec_space(self, hint) -> dict:
        # Written as {hyperparameter: {low, high, log, step} | {choices} | {times, factor}}; `key` and `kind`
        # are what the parser derives from that.
        param = getattr(S, "Param", None)
        body = self.object(param, exclude=("key", "kind")) if param else {"type": "object"}
        return {"type": "object", "propertyNames": {"enum": sorted(S._field_names(S.Hyper))},
                "additionalProperties": body, "minProperties": 1}

    # ---------------------------------------------------------------------------------------- a sweep
    def hyper_point(self) -> dict:
        return self.ref(S.Hyper)

    def trial(self) -> dict:
        hyper = self.object(S.Hyper)
        hyper["properties"] = {"name": {"anyOf": [{"type": "string", "pattern": _pattern(S._TRIAL_NAME)},
                                                  {"type": "integer", "minimum": 0}]}, **hyper["properties"]}
        return hyper

    def grid(self) -> dict:
        hints = _hints(S.Hyper)
        return {"type": ["object", "null"], "additionalProperties": False,
                "properties": {f.name: {"type": "array", "minItems": 1,
                                        "items": self.field(S.Hyper, f.name, hints[f.name])}
                               for f in dataclasses.fields(S.Hyper)}}

    def sweep(self) -> dict:
        hints = _hints(S.Sweep)
        file_only = {
            "name": {"type": "string", "pattern": _pattern(S._K8S_NAME)},
            "from": {"type": "string", "pattern": _pattern(S._FROM),
                     "description": "DPO: the SFT trial it starts from, `<sweep>:best` or `<sweep>:<trial id>`"},
            "defaults": {"anyOf": [self.hyper_point(), {"type": "null"}]},
            "trials": {"type": ["array", "null"], "items": self.trial()},
            "grid": self.grid(),
        }
        props = {}
        for key in sorted(S.SWEEP_KEYS):
            if key in file_only:
                props[key] = file_only[key]
            elif key in hints:
                props[key] = self.field(S.Sweep, key, hints[key])
            else:  # a key added to SWEEP_KEYS without a Sweep field: present, left to the validator
                props[key] = {"description": "checked by finesweep; no schema for this key yet"}
        formats = {"sft": S.SFT_FORMATS, "dpo": S.DPO_FORMATS}
        return {
            "type": "object", "properties": props, "additionalProperties": False, "required": list(REQUIRED),
            "allOf": [
                {"if": {"properties": {"stage": {"const": "dpo"}}, "required": ["stage"]},
                 "then": {"required": ["from"],
                          "properties": {"dataset": {"properties": {"format": {"enum": list(formats["dpo"])}}}}},
                 "else": {"not": {"required": ["from"]},
                          "properties": {"dataset": {"properties": {"format": {"enum": list(formats["sft"])}}}}}},
            ],
        }


def build_schema() -> dict:
    b = _Builder()
    b.defs["sweep"] = b.sweep()
    b.defs["pipeline"] = {
        "type": "object", "additionalProperties": False, "required": ["pipeline"],
        "properties": {"name": {},
                       "pipeline": {"type": "array", "minItems": 1, "description": "sweeps run in this order",
                                    "items": {"allOf": [{"$ref": "#/definitions/sweep"}, {"required": ["name"]}]}}},
    }
    return {
        "$schema": DRAFT,
        "$id": "https://finesweep.invalid/jobs/sweep.schema.json",
        "title": "finesweep sweep file",
        "description": "One sweep (a mapping with `stage:`) or a `pipeline:` of sweeps run in order; generated by "
                       "`python -m finesweep.schema` from finesweep/spec.py. " + NOT_EXPRESSED,
        "if": {"type": "object", "required": ["pipeline"]},
        "then": {"$ref": "#/definitions/pipeline"},
        "else": {"$ref": "#/definitions/sweep"},
        "definitions": dict(sorted(b.defs.items())),
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
