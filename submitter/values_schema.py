"""charts/finesweep/values.schema.json, generated (never edited by hand):

    .venv/bin/python -m submitter.values_schema > charts/finesweep/values.schema.json

tests/test_k8s_manifests.py fails when the committed file is stale. The schema is CHART_ONLY below (the keys
that are not settings of the submitter: names, the chart's own objects, MinIO, credentials) with every
cluster setting's key added from its declaration (submitter/cluster_settings.py: type and constraints), and
each key's description taken from its `# path -- ...` comment in values.yaml.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from typing import Any

from submitter.cluster_settings import (
    IMAGE, K8S_NAME, QUANTITY, RESOURCES, SETTINGS, VALUES, Setting, _chart_values_text, base_type, chart_values)

# In a group's "required": every key the group has (chart-only and settings alike), so a new setting there
# is required like its neighbours.
EVERY_KEY = "<every key>"


def _group(properties: dict[str, Any], required: Any = EVERY_KEY) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    if required is not None:
        out["required"] = required
    return out


# The chart's values that are no cluster setting. Groups that hold settings (images, jobs, s3, controller) list
# only their chart-only keys here.
CHART_ONLY: dict = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "finesweep chart values",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "global": {"type": "object", "description": "Helm passes global values to every chart; unused here"},
        "nameOverride": {"type": "string", "maxLength": 63},
        "fullnameOverride": {"type": "string", "maxLength": 63},
        "images": _group({}),
        "jobs": _group({}),
        "controller": _group({}, required=None),
        "s3": _group({
            "existingSecret": K8S_NAME,
            "accessKeyId": {"type": "string"},
            "secretAccessKey": {"type": "string"},
        }),
        "serviceAccount": _group({
            "create": {"type": "boolean"},
            "name": K8S_NAME,
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        }),
        "rbac": _group({
            "create": {"type": "boolean"},
            "extraSubjects": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["kind", "name"], "properties": {
                    "kind": {"type": "string", "enum": ["User", "Group", "ServiceAccount"]},
                    "name": {"type": "string", "minLength": 1},
                    "namespace": {"type": "string"},
                    "apiGroup": {"type": "string"}}}},
        }),
        "podSecurityContext": {"type": "object"},
        "securityContext": {"type": "object"},
        "minio": _group({
            "enabled": {"type": "boolean"},
            "image": IMAGE,
            "mcImage": IMAGE,
            "persistence": _group({"enabled": {"type": "boolean"}, "size": QUANTITY, "storageClass": {"type": "string"}}),
            "resources": RESOURCES,
        }),
    },
    "required": ["images", "jobs", "s3", "serviceAccount", "rbac", "minio"],
}

_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", tuple: "array", dict: "object"}


def setting_schema(setting: Setting) -> dict:
    """The values.yaml key's schema: the JSON type of the field's type, then the declared constraints."""
    if "type" in setting.schema or "oneOf" in setting.schema:
        return copy.deepcopy(setting.schema)
    return {"type": _JSON_TYPES[base_type(setting)], **copy.deepcopy(setting.schema)}


def value_comments(text: str) -> dict[str, str]:
    """`# path -- text` comments of values.yaml (with their continuation lines), by path."""
    out: dict[str, str] = {}
    path = None
    for line in text.splitlines():
        comment = re.fullmatch(r"\s*#\s?(.*)", line)
        if not comment:
            path = None
            continue
        start = re.fullmatch(r"([A-Za-z0-9_.]+) -- (.*)", comment.group(1))
        if start:
            path = start.group(1)
            out[path] = start.group(2).strip()
        elif path:
            out[path] += " " + comment.group(1).strip()
    return out


def build_schema() -> dict:
    # Through JSON: the shared pieces (IMAGE, QUANTITY, ...) become separate objects, each to get its own
    # description.
    schema = json.loads(json.dumps(CHART_ONLY))
    for setting in SETTINGS:
        if setting.source != VALUES:
            continue
        *groups, key = setting.path.split(".")
        node = schema
        for group in groups:
            node = node["properties"][group]
        node["properties"][key] = json.loads(json.dumps(setting_schema(setting)))
    _finish(schema, chart_values(), value_comments(_chart_values_text()), "")
    return schema


def _finish(node: dict, values: Any, comments: dict[str, str], prefix: str) -> None:
    """Order properties as values.yaml does, fill EVERY_KEY, add descriptions from the comments."""
    properties = node.get("properties")
    if not properties:
        return
    order = list(values) if isinstance(values, dict) else []
    keys = sorted(properties, key=lambda k: (k in order, order.index(k) if k in order else 0))
    node["properties"] = {k: properties[k] for k in keys}
    for key, child in node["properties"].items():
        path = f"{prefix}{key}"
        if path in comments:
            child["description"] = comments[path]
        _finish(child, values.get(key) if isinstance(values, dict) else None, comments, f"{path}.")
    if node.get("required") == EVERY_KEY:
        node["required"] = list(node["properties"])


def render() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
