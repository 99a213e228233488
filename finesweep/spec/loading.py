"""A sweep file to validated Sweeps: load_sweeps reads the file (one sweep or a pipeline), parse_sweep checks one
sweep, and _expand_trials turns its `defaults`, `trials` and `grid` into named hyperparameter sets."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import yaml

from .fields import _build, _check_choice, _check_keys, _check_type, _field_names, _type_name
from .search_space import parse_search
from .types import (_FROM, _K8S_NAME, _TRIAL_NAME, MAX_TEXT, MAX_TRIALS, PROMPT_FORMATS, STAGES, DatasetSpec, EvalSpec,
                    Hyper, SelectSpec, Sweep, SweepError, TrackingSpec)
from .validation import (_check_dataset, _check_eval, _check_hyper, _check_select, _check_select_betas,
                         _check_tracking)
from .yaml_text import read_yaml


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
    _check_dataset(dataset, stage, source, at)
    prompt_format = _check_choice(source, at("prompt_format"), raw.get("prompt_format", "chat"), PROMPT_FORMATS)
    max_length = _check_type(source, at("max_length"), raw.get("max_length", 512), int)
    if not 16 <= max_length <= 32768:
        raise SweepError(source, at("max_length"), f"{max_length} is out of range",
                         "use a token count between 16 and 32768, e.g. 256 or 512")
    eval_spec = _build(EvalSpec, raw["eval"], source, at("eval"))
    _check_eval(eval_spec, source, at)
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


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(str(x).replace("_proj", "") for x in v)
    return str(v)



def resolve_sweep_path(name_or_path: str, jobs_dir: str | Path = "jobs") -> Path:
    """`SWEEP=dpo` means jobs/dpo.yaml; anything with a slash or .yaml suffix is a path."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    return Path(jobs_dir) / f"{name_or_path}.yaml"

