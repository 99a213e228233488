"""Reading a sweep file's YAML: SweepLoader (PyYAML's safe loader) and read_yaml, which refuse the YAML 1.1
quirks that make a value mean something other than what was written, as a SweepError naming the line and key."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .types import SweepError


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

