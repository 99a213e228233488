"""`search:` and `prune:` of a sweep, parsed and validated (parse_search): the search space (_parse_space), each
value it can produce checked like a hand-written trial (_check_space_values), and the pruner (_parse_prune)."""

from __future__ import annotations

from typing import Any, get_type_hints

from .fields import _build, _check_choice, _check_keys, _check_type, _clip, _coerce, _field_names, _type_name
from .types import MAX_TRIALS, DatasetSpec, EvalSpec, Hyper, Param, PruneSpec, SearchSpec, SelectSpec, SweepError
from .validation import _check_hyper, _check_read_by_stage

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
            params.append(_parse_choices(key, body, source, w, hints[key]))
            continue
        if method == "grid" and forms[0] == ("low", "high"):
            raise SweepError(source, w, "is a range, which a grid cannot enumerate", "list the values as `choices:`")
        if forms[0] == ("times",):
            params.append(_parse_tie(key, body, source, w))
            continue
        params.append(_parse_range(key, body, source, w))
    by_key = {p.key: p for p in params}
    for p in params:
        if p.kind == "tie" and by_key.get(p.times, Param("", "")).kind == "tie":
            raise SweepError(source, f"{where}.{p.key}.times", f"{p.times} is itself a tie",
                             "tie to a searched or fixed key")
    if all(p.kind == "tie" for p in params):
        raise SweepError(source, where, "has only ties: nothing to search", "give at least one range or choices")
    return tuple(params)


def _parse_choices(key: str, body: dict, source: str, w: str, hint: Any) -> Param:
    """`{choices: [..]}`: each value of the key's type, none twice."""
    _check_keys(source, w, body, {"choices"})
    choices = body["choices"]
    if not isinstance(choices, list) or not choices:
        raise SweepError(source, f"{w}.choices", "must be a non-empty list", f"write `choices: [a, b]`")
    values = tuple(_coerce(source, f"{w}.choices[{i}]", c, hint) for i, c in enumerate(choices))
    if len(set(values)) != len(values):
        raise SweepError(source, f"{w}.choices", "lists a value twice", "list each value once")
    return Param(key, "choice", choices=values)


def _parse_tie(key: str, body: dict, source: str, w: str) -> Param:
    """`{times: r, factor: 2}`: a numeric key set to a multiple of another (tie_value)."""
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
    return Param(key, "tie", times=times, factor=factor)


def _parse_range(key: str, body: dict, source: str, w: str) -> Param:
    """`{low: .., high: .., log: .., step: ..}`: an int or float range of a numeric key."""
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
    return Param(key, kind, low, high, log_scale, step)


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
