"""Eval sets: the one place an `eval.set` value becomes a file and its rows (no torch).

The submitter's preflight and the evaluator both call `load_evalset`, so a sweep the submitter accepts names a
set the evaluator then finds, with rows it can use, before any trial trains.

    sft-open-questions          a shipped set: evaluator/evalsets/<name>.jsonl, package data of the evaluator
    data/my-questions.jsonl     a JSONL file: any value ending in .jsonl or holding a '/', relative to the
                                directory the command runs in (the project root under make; /app in a pod)
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

REQUIRED_TEXT_FIELDS = ("prompt", "reference")


class EvalSetError(FileNotFoundError):
    """An eval set cannot be used as named. A FileNotFoundError so that the trial entry point
    (trainer/entry.py) counts it as a configuration error: exit 3, the Job is not retried.
    `problem` and `fix` let the submitter name the sweep file and field around them."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}")


def shipped_dir() -> Path:
    """evaluator/evalsets, wherever the evaluator package is (a source checkout or an installed wheel).
    Importing the `evaluator` package itself loads nothing heavy: its __init__ is empty."""
    return Path(str(resources.files("evaluator") / "evalsets"))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.jsonl"))


def is_path(name_or_path: str) -> bool:
    return "/" in name_or_path or name_or_path.endswith(".jsonl")


def resolve_evalset(name_or_path: str) -> Path:
    """The file an `eval.set` value names; EvalSetError when there is none."""
    shown = name_or_path if len(name_or_path) <= 80 else name_or_path[:77] + "..."
    if is_path(name_or_path):
        path = Path(name_or_path)
        if not _is_file(path):
            raise EvalSetError(f"eval set file {shown!r} not found (looked in {Path.cwd()})",
                               "give a JSONL file relative to the project root, or the name of a shipped set: "
                               + ", ".join(shipped_names()))
        return path
    path = shipped_dir() / f"{name_or_path}.jsonl"
    if not _is_file(path):
        raise EvalSetError(f"eval set {shown!r} is not a shipped set",
                           f"use one of {', '.join(shipped_names())} or a path to a JSONL file")
    return path


def load_evalset(name_or_path: str) -> list[dict]:
    """Every row of the set; each needs text fields 'prompt' and 'reference'."""
    path = resolve_evalset(name_or_path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvalSetError(f"eval set {path} cannot be read ({type(err).__name__}: {err})",
                           "make it a readable UTF-8 JSONL file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise EvalSetError(f"eval set {path}: line {number} is not JSON ({err})",
                               "write one JSON object per line") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in REQUIRED_TEXT_FIELDS):
            raise EvalSetError(f"eval set {path}: line {number} needs text fields "
                               f"{' and '.join(map(repr, REQUIRED_TEXT_FIELDS))}", "add them to that row")
        rows.append(row)
    if not rows:
        raise EvalSetError(f"eval set {path} has no rows", "add at least one JSON object per line")
    return rows


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte, exists nowhere
        return False
