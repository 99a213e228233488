"""Typed building: a dataclass of finesweep.spec.types from a mapping read from YAML (_build), checking each key
(_check_keys: unknown keys, with the likely meant one), each value's type (_coerce, _check_type) and choices
(_check_choice); every error is a SweepError naming the field. The type-name and clipping helpers word them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, get_args, get_origin, get_type_hints

from .types import MAX_TEXT, SweepError


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

