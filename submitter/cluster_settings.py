"""Cluster settings, declared once: the SETTINGS table below is the only list of them.

Each row names a ClusterSettings field, its path in the chart (`jobs.processesPerTrial`: the key in
charts/finesweep/values.yaml and in the finesweep-defaults ConfigMap the chart renders from it), its Python type
and the JSON Schema constraints on the chart value. From that table come:
  - the ClusterSettings dataclass (fields, types, defaults);
  - the conversion of chart/ConfigMap/override values to field values (`settings_from_defaults`);
  - the settings' part of charts/finesweep/values.schema.json (submitter/values_schema.py generates the file).
Defaults are not written here: they are values.yaml's (read through the package, submitter/chart-values.yaml),
except for the few settings the chart has no value for (source SUBMITTER).

Adding a setting: a row here, the key with its `# path -- ...` comment in values.yaml, then
`python -m submitter.values_schema > charts/finesweep/values.schema.json`. Keys under `jobs` and `controller`
reach the finesweep-defaults ConfigMap as they are; one under `images` or `s3` also needs its line in
templates/defaults-configmap.yaml (tests/test_helm.py compares the ConfigMap with `resolved_defaults`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

# Package data: a link to charts/finesweep/values.yaml in the repository, a copy of it in the installed wheel
# (pyproject.toml), so the chart's file is the one source of the defaults also inside the images.
VALUES_FILE = Path(__file__).resolve().parent / "chart-values.yaml"
# The release name the chart is installed under (make helm-install); names derived from it (the S3 Secret, the
# controller's ServiceAccount) follow it in the cluster's finesweep-defaults.
DEFAULT_RELEASE = "finesweep"

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# Where a setting's value comes from.
VALUES = "values"        # a key of values.yaml at `path` (its default is there)
DERIVED = "derived"      # computed by the chart from other values (templates/defaults-configmap.yaml, resolved_defaults)
SUBMITTER = "submitter"  # not in the chart: the submitter's own behaviour or command line; default in the row

# ------------------------------------------------------------------------------------------------ schema pieces
# Reused by the settings and by the chart-only part of the values schema (submitter/values_schema.py).
K8S_NAME = {"type": "string", "pattern": "^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$", "maxLength": 253}  # or ""
QUANTITY = {"oneOf": [{"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"},
                      {"type": "number", "minimum": 0}]}
RESOURCE_LIST = {"type": "object", "additionalProperties": QUANTITY}
RESOURCES = {"type": "object", "additionalProperties": False,
             "properties": {"requests": RESOURCE_LIST, "limits": RESOURCE_LIST}}
# An image is {repository, tag} in values.yaml and "repository:tag" in the finesweep-defaults ConfigMap.
IMAGE = {"type": "object", "additionalProperties": False,
         "properties": {"repository": {"type": "string", "minLength": 1, "pattern": "^[a-z0-9][a-z0-9._/:-]*[a-z0-9]$"},
                        "tag": {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
                                "not": {"const": "latest"}, "description": "a fixed tag; 'latest' is rejected"}},
         "required": ["repository", "tag"]}
NAMED_ITEMS = {"type": "array", "items": {"type": "object", "required": ["name"],
                                          "properties": {"name": {"type": "string", "minLength": 1}}}}


@dataclass(frozen=True)
class Setting:
    """One cluster setting. `schema` holds the constraints on the values.yaml key (enum, minimum, pattern, ...);
    its JSON type comes from `type` unless `schema` gives one (an image's object, a quantity's oneOf).
    `unset`: values that mean "not set" for an optional field (None there). `note` describes a setting that is
    no values.yaml key; the others are described by their comment in values.yaml."""

    field: str
    path: str
    type: Any
    schema: dict | None = None
    source: str = VALUES
    default: Any = None  # SUBMITTER settings only: the chart has no value for them
    unset: tuple = ()
    flag: str = ""  # the command-line flag that sets it, named in errors
    note: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("namespace", "namespace", str, source=SUBMITTER, default="finesweep", flag="--namespace (NAMESPACE=)",
            note="namespace of the trial Jobs and the controller, where the chart is installed"),
    Setting("kube_context", "submitter.kubeContext", str | None, source=SUBMITTER, unset=(None, ""),
            flag="--kube-context (KUBE_CONTEXT=)", note="kubeconfig context (None: the current one)"),
    Setting("trainer_image", "images.trainer", str, IMAGE),
    Setting("evaluator_image", "images.evaluator", str, IMAGE),
    Setting("controller_image", "images.controller", str, IMAGE),
    Setting("image_pull_policy", "images.pullPolicy", str, {"enum": ["Always", "IfNotPresent", "Never"]}),
    Setting("image_pull_secrets", "images.pullSecrets", tuple[str, ...],
            {"items": {"type": "string", "pattern": DNS1123_LABEL.pattern, "maxLength": 63}}),
    Setting("gpus_per_trial", "jobs.gpusPerTrial", int, {"minimum": 0, "maximum": 16}),
    Setting("processes_per_trial", "jobs.processesPerTrial", int, {"minimum": 1, "maximum": 64}),
    Setting("gpu_resource_name", "jobs.gpuResourceName", str,
            {"minLength": 1, "pattern": "^[a-z0-9.-]+/[a-z0-9._-]+$"}),
    Setting("node_selector", "jobs.nodeSelector", dict[str, str], {"additionalProperties": {"type": "string"}}),
    Setting("tolerations", "jobs.tolerations", tuple[dict, ...], {"items": {
        "type": "object", "additionalProperties": False, "properties": {
            "key": {"type": "string"},
            "operator": {"type": "string", "enum": ["Exists", "Equal"]},
            "value": {"type": "string"},
            "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute", ""]},
            "tolerationSeconds": {"type": "integer"}}}}),
    Setting("resources", "jobs.resources", dict[str, dict[str, str]], RESOURCES),
    Setting("shm_size", "jobs.shmSize", str, QUANTITY),
    Setting("cache_size_limit", "jobs.cacheSizeLimit", str | None, QUANTITY, unset=(None, "", 0)),
    Setting("scratch_size_limit", "jobs.scratchSizeLimit", str | None, QUANTITY, unset=(None, "", 0)),
    Setting("backoff_limit", "jobs.backoffLimit", int, {"minimum": 0}),
    Setting("active_deadline_seconds", "jobs.activeDeadlineSeconds", int | None, {"minimum": 0},
            unset=(None, "", 0)),  # 0: no deadline
    Setting("ttl_seconds_after_finished", "jobs.ttlSecondsAfterFinished", int | None, {"minimum": 0},
            unset=(None, "")),  # 0 is meaningful: delete right away
    Setting("termination_grace_period_seconds", "jobs.terminationGracePeriodSeconds", int, {"minimum": 0}),
    Setting("service_account_name", "jobs.serviceAccountName", str, K8S_NAME),
    Setting("priority_class_name", "jobs.priorityClassName", str, K8S_NAME),
    Setting("kueue_queue_name", "jobs.kueueQueueName", str, {"pattern": LABEL_VALUE.pattern, "maxLength": 63}),
    Setting("hf_token_secret", "jobs.hfTokenSecret", str, K8S_NAME),
    Setting("run_as_user", "jobs.runAsUser", int, {"minimum": 1}),
    Setting("run_as_group", "jobs.runAsGroup", int, {"minimum": 1}),
    Setting("fs_group", "jobs.fsGroup", int, {"minimum": 1}),
    Setting("host_network", "jobs.hostNetwork", bool, {}),
    Setting("extra_env", "jobs.extraEnv", tuple[dict, ...], NAMED_ITEMS),
    Setting("extra_volumes", "jobs.extraVolumes", tuple[dict, ...], NAMED_ITEMS),
    Setting("extra_volume_mounts", "jobs.extraVolumeMounts", tuple[dict, ...], {"items": {
        "type": "object", "required": ["name", "mountPath"],
        "properties": {"name": {"type": "string", "minLength": 1}, "mountPath": {"type": "string", "pattern": "^/"}}}}),
    Setting("s3_endpoint", "s3.endpoint", str, {"pattern": "^(https?://[^\\s/]+(/.*)?)?$"}),
    Setting("s3_region", "s3.region", str, {"minLength": 1}),
    Setting("s3_bucket", "s3.bucket", str, {"pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"}),
    Setting("s3_secret_name", "s3.secretName", str, source=DERIVED,
            note="Secret with the S3 credentials: s3.existingSecret, else the one the chart creates (<fullname>-s3)"),
    Setting("s3_access_key_id_key", "s3.accessKeyIdKey", str, {"pattern": "^[-._a-zA-Z0-9]+$", "minLength": 1}),
    Setting("s3_secret_access_key_key", "s3.secretAccessKeyKey", str,
            {"pattern": "^[-._a-zA-Z0-9]+$", "minLength": 1}),
    Setting("controller_service_account", "controller.serviceAccountName", str, source=DERIVED,
            note="ServiceAccount the controller Job runs as: the chart's (serviceAccount.*), bound to its Role"),
    Setting("controller_api_server", "controller.apiServer", str, {"pattern": "^(https://[^/\\s]+:[0-9]+)?$"}),
    Setting("poll_seconds", "controller.pollSeconds", float, {"minimum": 0.5, "maximum": 3600}),
    Setting("use_cluster_defaults", "submitter.useClusterDefaults", bool, source=SUBMITTER, default=True,
            note="submit/status read the finesweep-defaults ConfigMap first"),
)

SETTINGS_BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}
# ClusterSettings field -> path in the resolved-defaults document. Overrides may use either name.
SETTINGS_PATHS: dict[str, str] = {s.field: s.path for s in SETTINGS}
_PATH_TO_FIELD = {s.path: s.field for s in SETTINGS}
DEFAULT_NAMESPACE: str = SETTINGS_BY_FIELD["namespace"].default


class SettingsError(ValueError):
    """A cluster setting (chart values, the cluster's finesweep-defaults, a command-line flag, the store URL
    or kube context the k8s backend is given) cannot work. `setting` is the ClusterSettings field (or `store`);
    the CLI turns it into one line naming the flag and the fix, exit 2."""

    def __init__(self, setting: str, problem: str, fix: str = ""):
        self.setting, self.problem, self.fix = setting, problem, fix
        where = f"cluster setting {setting} ({SETTINGS_PATHS[setting]})" if setting in SETTINGS_PATHS else setting
        super().__init__(f"{where}: {problem}" + (f". Fix: {fix}" if fix else ""))


# ------------------------------------------------------------------------------------------------ the chart

@functools.cache
def _chart_values_text() -> str:
    return VALUES_FILE.read_text(encoding="utf-8")


def chart_values() -> dict:
    """charts/finesweep/values.yaml as shipped with the package (a fresh copy each call)."""
    return yaml.safe_load(_chart_values_text())


def chart_fullname(release: str = DEFAULT_RELEASE, chart: str = "finesweep", name_override: str = "",
                   fullname_override: str = "") -> str:
    """The chart's `finesweep.fullname` helper in Python (same rules, same 63-char cut)."""
    if fullname_override:
        return fullname_override[:63].rstrip("-")
    name = name_override or chart
    full = release if name in release else f"{release}-{name}"
    return full[:63].rstrip("-")


def resolved_defaults(values: dict, namespace: str = DEFAULT_NAMESPACE, release: str = DEFAULT_RELEASE) -> dict:
    """The finesweep-defaults document the chart renders (templates/defaults-configmap.yaml), from values:
    every VALUES setting's key as it is, then what the template derives (image references, the S3 endpoint and
    Secret, the controller's ServiceAccount). Kept in step with the template by tests/test_helm.py."""
    doc: dict = {"namespace": namespace}
    for setting in SETTINGS:
        found, value = lookup(values, setting.path)
        if setting.source == VALUES and found:
            _put(doc, setting.path, copy.deepcopy(value))
    fullname = chart_fullname(release, "finesweep", values.get("nameOverride", ""), values.get("fullnameOverride", ""))
    images, s3, minio = values["images"], values["s3"], values.get("minio", {})
    for name in ("trainer", "evaluator", "controller"):
        doc["images"][name] = f"{images[name]['repository']}:{images[name]['tag']}"
    if not s3.get("endpoint") and minio.get("enabled"):
        doc["s3"]["endpoint"] = f"http://{fullname}-minio.{namespace}.svc.cluster.local:9000"
    doc["s3"]["secretName"] = s3.get("existingSecret") or f"{fullname}-s3"
    # The chart's `finesweep.serviceAccountName` helper: the ServiceAccount its Role is bound to.
    account = values["serviceAccount"]
    doc.setdefault("controller", {})["serviceAccountName"] = \
        (account.get("name") or fullname) if account.get("create", True) else (account.get("name") or "default")
    return doc


@functools.cache
def _defaults() -> dict[str, Any]:
    """Each field's default: values.yaml's for chart settings (as the chart would publish them for release
    `finesweep` in namespace `finesweep`), the row's own for SUBMITTER settings."""
    doc = resolved_defaults(chart_values())
    out = {}
    for setting in SETTINGS:
        found, value = lookup(doc, setting.path)
        if setting.source != SUBMITTER and not found:
            raise KeyError(f"{VALUES_FILE}: no default for cluster setting {setting.field} ({setting.path})")
        out[setting.field] = convert(setting, value if found else setting.default)
    return out


def _default_factory(name: str):
    return lambda: copy.deepcopy(_defaults()[name])


def _settings_class() -> type:
    fields = [(s.field, s.type, dataclasses.field(default_factory=_default_factory(s.field))) for s in SETTINGS]
    # The overrides given to load_settings, kept so cluster defaults can be layered underneath them later.
    fields.append(("overrides", tuple[tuple[str, Any], ...], dataclasses.field(default=())))
    cls = dataclasses.make_dataclass("ClusterSettings", fields, frozen=True, namespace={"__doc__": (
        "Everything about the cluster a trial Job needs besides the trial itself: one field per row of "
        "submitter.cluster_settings.SETTINGS, defaults from charts/finesweep/values.yaml. Load them with "
        "k8s_backend.load_settings rather than by hand.")})
    cls.__module__ = __name__
    return cls


ClusterSettings = _settings_class()


# ------------------------------------------------------------------------------------------------ loading

def _optional(setting: Setting) -> bool:
    return get_origin(setting.type) in (Union, types.UnionType) and type(None) in get_args(setting.type)


def base_type(setting: Setting) -> type:
    """The field's type without `| None` and type parameters: int, float, bool, str, tuple or dict."""
    tp = next(a for a in get_args(setting.type) if a is not type(None)) if _optional(setting) else setting.type
    return get_origin(tp) or tp


def convert(setting: Setting, value: Any) -> Any:
    """A value from values.yaml, the cluster's ConfigMap or an override, as the field's type (TypeError or
    ValueError when it is none)."""
    base = base_type(setting)
    if value in setting.unset and _optional(setting):
        return None
    if base is tuple:
        return tuple(value or ())
    if base is dict:
        return dict(value or {})
    if base is bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    if base in (int, float):
        return base(value)
    return "" if value is None else str(value)


def _kind(setting: Setting) -> str:
    """What a value must be, for error messages."""
    return {int: "whole number", float: "number"}.get(base_type(setting), "value")


def settings_from_defaults(*layers: dict, overrides: dict | None = None) -> ClusterSettings:
    """ClusterSettings from resolved-defaults documents (later layers win, merged deeply), then `overrides`:
    keys are ClusterSettings field names (`gpus_per_trial`) or document paths (`jobs.gpusPerTrial`)."""
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer or {})
    normalized: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        name = key if key in SETTINGS_PATHS else _PATH_TO_FIELD.get(key)
        if name is None:
            raise SettingsError("overrides", f"unknown cluster setting {key!r}",
                                f"use one of {', '.join(sorted(SETTINGS_PATHS))}")
        normalized[name] = value
    kwargs: dict[str, Any] = {}
    for setting in SETTINGS:
        found, value = lookup(merged, setting.path)
        if setting.field in normalized:
            found, value = True, normalized[setting.field]
        if found:
            try:
                kwargs[setting.field] = convert(setting, value)
            except (TypeError, ValueError):  # e.g. jobs.gpusPerTrial: "two" in the cluster's finesweep-defaults
                raise SettingsError(setting.field, f"{str(value)[:80]!r} is not a {_kind(setting)}",
                                    f"fix {setting.path} in the chart values (helm upgrade) or the override") from None
    kwargs["overrides"] = tuple(sorted(normalized.items(), key=lambda kv: kv[0]))
    settings = ClusterSettings(**kwargs)
    check_settings(settings)
    return settings


def check_settings(settings: ClusterSettings) -> None:
    """Reject settings that would give invalid manifests, naming the setting."""
    def bad(name: str, problem: str, fix: str = "") -> None:
        raise SettingsError(name, problem, fix)

    if not DNS1123_LABEL.fullmatch(settings.namespace or ""):
        bad("namespace", f"{(settings.namespace or '')[:80]!r} is not a valid namespace name",
            "lowercase letters, digits and '-', at most 63 characters, starting and ending alphanumeric "
            "(e.g. finesweep)")
    if not isinstance(settings.gpus_per_trial, int) or settings.gpus_per_trial < 0:
        bad("gpus_per_trial", f"{settings.gpus_per_trial!r} is not a GPU count (0 or more)")
    if not isinstance(settings.processes_per_trial, int) or settings.processes_per_trial < 1:
        bad("processes_per_trial", f"{settings.processes_per_trial!r} is not a process count (1 or more)")
    elif settings.processes_per_trial > 1 and settings.gpus_per_trial > 0:
        bad("processes_per_trial", f"is {settings.processes_per_trial} with {settings.gpus_per_trial} GPU(s) per "
            "trial; with GPUs a trial runs one process per GPU",
            "set jobs.processesPerTrial to 1 (it is for nodes without a GPU)")
    for name in ("trainer_image", "evaluator_image", "controller_image"):
        image = getattr(settings, name)
        untagged = ":" not in image.rsplit("/", 1)[-1] and "@" not in image
        if not image or image.endswith(":latest") or untagged:
            bad(name, f"{image!r} needs a fixed tag (not latest) so re-runs use the same code")
    if settings.controller_api_server and not re.fullmatch(r"https://[^/\s]+:\d+", settings.controller_api_server):
        bad("controller_api_server", f"{settings.controller_api_server[:80]!r} is not an https://HOST:PORT URL",
            "set controller.apiServer to the API server's address as pods on the host network see it (e.g. "
            "https://127.0.0.1:6443), or leave it empty on a cluster with kube-proxy")
    if settings.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        bad("image_pull_policy", f"{settings.image_pull_policy!r} is not Always, IfNotPresent or Never")
    if settings.kueue_queue_name and not LABEL_VALUE.fullmatch(settings.kueue_queue_name):
        bad("kueue_queue_name", f"{settings.kueue_queue_name!r} is not a valid label value")
    if not settings.s3_secret_name:
        bad("s3_secret_name", "is empty: trial pods take the S3 credentials from that Secret")
    if settings.backoff_limit < 0:
        bad("backoff_limit", "is negative")
    volumes = {v.get("name") for v in settings.extra_volumes if isinstance(v, dict)}
    for mount in settings.extra_volume_mounts:
        if not isinstance(mount, dict) or mount.get("name") not in volumes:
            bad("extra_volume_mounts", f"{mount!r} names no volume of jobs.extraVolumes ({sorted(volumes)})")
        if not str(mount.get("mountPath", "")).startswith("/"):
            bad("extra_volume_mounts", f"{mount!r} needs an absolute mountPath")
    builtin = {"spec", "tmp", "cache", "scratch", "dshm"}
    for volume in settings.extra_volumes:
        if not isinstance(volume, dict) or not DNS1123_LABEL.fullmatch(str(volume.get("name", ""))) \
                or volume["name"] in builtin:
            bad("extra_volumes", f"{volume!r} needs a DNS-1123 name other than {sorted(builtin)}")
    for var in settings.extra_env:
        if not isinstance(var, dict) or not var.get("name"):
            bad("extra_env", f"{var!r} needs a name (and a value or valueFrom)")


def settings_summary(settings: ClusterSettings) -> dict:
    """The settings as a plain dict (for printing); no secrets live in ClusterSettings."""
    out = dataclasses.asdict(settings)
    out.pop("overrides")
    return out


# ------------------------------------------------------------------------------------------------ documents

def lookup(doc: dict, path: str) -> tuple[bool, Any]:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _put(doc: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[leaf] = value


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
