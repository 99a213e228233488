"""Bad input ends in a clear error before anything is submitted: property tests (hypothesis) on sweep files and
dataset rows, whole-sweep atomicity of the CLI, and "sweep values never reach a shell".

Properties
  * sweeps: every shipped sweep under jobs/, mutated at random (unknown keys at any level, values of another type,
    absurd numbers, 100k-character strings, non-UTF-8 bytes, names that are not DNS-1123 labels, empty lists), then
    load_sweeps + preflight: either it loads (and then every trial spec survives the JSON trip to a pod, its Job name
    is a DNS-1123 label, its manifests fit what the API server accepts and hand no sweep value to a command line), or
    it raises SweepError "<file>: <field>: <problem>. Fix: <fix>". Any other exception fails.
  * dataset rows: JSONL files for the `instruction` and `preference` formats (missing fields, wrong types, empty and
    blank strings, 100k-character text, emoji/RTL/NUL/lone surrogates, raw non-UTF-8 bytes, empty files):
    trainer.data.load_splits either returns rows whose fields are all non-empty text (exactly the input), or raises
    DatasetError naming the row and field (or the file). Any other exception fails.

Every input class the properties caught is also an exact example here: fixed ones as plain regression tests,
open ones as strict xfails named BUG-... . The properties tolerate exactly the open bugs' signatures
(KNOWN_SWEEP_BUGS / KNOWN_DATA_BUGS for exceptions; the places commented with a BUG-... name for wrong results) so
they stay useful for everything else. Whoever fixes one drops its xfail marker and its tolerance here.
Scale the properties up for a long fuzzing run with FINESWEEP_FUZZ=20 (20x the examples).
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
import resource
import subprocess
import sys
import traceback
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from finesweep.spec import (DatasetSpec, EvalSpec, Hyper, SelectSpec, SweepError, StartRef, SWEEP_KEYS, TrialSpec,
                            load_sweeps, to_dict, trial_from_dict)
from finesweep.store import LocalStore
from submitter import k8s_manifests as km
from submitter.plan import load_plan, preflight

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
SHIPPED = {p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in JOBS}
STORE_URL = "s3://finesweep/runs"
SETTINGS = km.ClusterSettings()
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Scale every property up for a long local fuzzing run: FINESWEEP_FUZZ=20 runs 20x the examples.
FUZZ = float(os.environ.get("FINESWEEP_FUZZ", "1"))
# API server limits a manifest must fit, or the create call fails half way through a sweep.
ANNOTATIONS_LIMIT = 256 * 1024  # apimachinery TotalAnnotationSizeLimitB (keys + values, bytes)
CONFIGMAP_LIMIT = 1024 * 1024  # ConfigMap data + binaryData
OBJECT_LIMIT = 1536 * 1024  # etcd's default request size limit (--max-request-bytes 1.5 MiB)


def _examples(n: int) -> int:
    return max(1, int(n * FUZZ))


def _project_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    """Frames of the project's own code (not the venv, not these tests), innermost last."""
    return [f for f in traceback.extract_tb(exc.__traceback__)
            if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename and "/tests/" not in f.filename]


def _raised_in(exc: BaseException, file: str, *functions: str) -> bool:
    frames = _project_frames(exc)
    return bool(frames) and frames[-1].filename == str(ROOT / file) and frames[-1].name in functions


# ================================================================================================ sweeps

# Exceptions the sweep property tolerates while their bug is open: name -> predicate on the exception. Empty since
# commit 9854821 fixed BUG-SPEC-OVERFLOW (OverflowError from spec._check_type) and BUG-PREFLIGHT-NAMETOOLONG
# (OSError from plan.preflight); their cases live on in REGRESSIONS below.
KNOWN_SWEEP_BUGS: dict = {}

# Every key the sweep schema knows at some level; an inserted key outside this set is unknown wherever it goes.
KNOWN_KEYS = set(SWEEP_KEYS) | {"pipeline"} | {f for cls in (DatasetSpec, EvalSpec, Hyper, SelectSpec)
                                               for f in cls.__dataclass_fields__}
HYPER_NUMBERS = ("r", "alpha", "dropout", "lr", "batch_size", "epochs", "grad_accum", "beta", "max_steps",
                 "warmup_ratio", "weight_decay", "seed", "train_rows", "test_rows")
HYPER_STRINGS = ("name", "scheduler", "gradient_checkpointing", "target_modules")
ABSURD_NUMBERS = [-1, 0, -0.0, -1e-9, 1e-320, 1e300, -1e300, math.nan, math.inf, -math.inf, 2 ** 63, 10 ** 400,
                  -10 ** 400]
HUGE = 100_000
MESSAGE_LIMIT = 2000  # a clear error quotes a bad value, it does not repeat 100k characters of it

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), st.floats(), st.text(max_size=12))
VALUES_BY_TYPE = {
    str: st.one_of(st.text(max_size=20), st.sampled_from(["q_proj", "sft", "dpo", "nan", "inf", "1e-4", "on", "",
                                                          " ", "sft:best", "Bad_Name", "~", "null"])),
    int: st.one_of(st.integers(-10 ** 6, 10 ** 6), st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 10 ** 400])),
    float: st.floats(allow_nan=True, allow_infinity=True),
    bool: st.booleans(),
    type(None): st.none(),
    list: st.lists(scalars, max_size=3),
    dict: st.dictionaries(st.text(max_size=8), scalars, max_size=3),
}
unknown_keys = st.one_of(
    st.sampled_from(["learning_rate", "lora_alpha", "rank", "max_seq_length", "base_model", "Name", "LR", "lr ",
                     "max-length", "targets", "stage_", "eval_set", "num_train_epochs", "x" * 300]),
    st.text(max_size=30), st.integers(-5, 5), st.none(), st.booleans(),
).filter(lambda k: k not in KNOWN_KEYS)
invalid_names = st.one_of(
    st.sampled_from(["Smoke", "SFT", "my_sweep", "-sft", "sft-", "a" * 41, "a" * 63, "a" * 64, "b" * 300, "",
                     " ", "sft.v2", "sft v2", "sft\n", "é", "ſft", "sft/dpo", "sft:best", "-", "0-", "ﬁne"]),
    st.text(max_size=30).map(lambda s: "Bad_" + s),  # uppercase and '_' whatever follows
    st.text(max_size=30).map(lambda s: "-" + s),  # a leading '-'
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=41, max_size=100).map(lambda s: "a" + s),
)
huge_strings = st.one_of(
    st.sampled_from(["x", "é", "😀", "q_proj", "a-b", "\u202e", "\x00", "line\n"]),
    st.text(min_size=1, max_size=8),
).map(lambda s: (s * (HUGE // len(s) + 1))[:HUGE])
NON_UTF8 = [b"\xff", b"\xfe\xff", b"\xe9", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"]


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, path + (i,))


def _get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


def _field_path(path) -> str:
    """('pipeline', 1, 'trials', 0, 'lr') -> 'pipeline[1].trials[0].lr', as SweepError names fields."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else ("." if out else "") + str(part)
    return out


def _sweep_containers(doc) -> list[tuple]:
    if isinstance(doc, dict) and isinstance(doc.get("pipeline"), list):
        return [("pipeline", i) for i, item in enumerate(doc["pipeline"]) if isinstance(item, dict)]
    return [()] if isinstance(doc, dict) else []


def _targets(doc, kind: str) -> list[tuple[tuple, str]]:
    """(container path, key) pairs a mutation of `kind` may set (the key need not exist yet)."""
    out = []
    for sweep in _sweep_containers(doc):
        node = _get(doc, sweep)
        hyper = [sweep + ("defaults",)] if isinstance(node.get("defaults"), dict) else []
        trials = node.get("trials") if isinstance(node.get("trials"), list) else []
        hyper += [sweep + ("trials", i) for i, t in enumerate(trials) if isinstance(t, dict)]
        sub = {k: sweep + (k,) for k in ("dataset", "eval", "select") if isinstance(node.get(k), dict)}
        if kind == "number":
            out += [(sweep, k) for k in ("max_length", "max_parallel")]
            out += [(sub["dataset"], k) for k in ("test_fraction", "min_answer_chars", "seed") if "dataset" in sub]
            out += [(sub["eval"], k) for k in ("max_new_tokens", "batch_size", "heldout_rows", "bootstrap_samples")
                    if "eval" in sub]
            out += [(h, k) for h in hyper for k in HYPER_NUMBERS]
        elif kind == "string":
            out += [(sweep, k) for k in ("name", "model", "from", "prompt_format", "stage")]
            out += [(sub["dataset"], k) for k in ("path", "split", "format", "name", "test_split") if "dataset" in sub]
            out += [(sub["eval"], k) for k in ("set",) if "eval" in sub]
            out += [(sub["select"], k) for k in ("metric", "mode") if "select" in sub]
            out += [(h, k) for h in hyper for k in HYPER_STRINGS]
        elif kind == "empty_list":
            out += [(h, "target_modules") for h in hyper] + [(sweep, "trials")]
            out += [(sub["eval"], "extra_sets")] if "eval" in sub else []
            out += [(sub["dataset"], "data_files")] if "dataset" in sub else []
    if kind == "empty_list" and isinstance(doc, dict) and "pipeline" in doc:
        out.append(((), "pipeline"))
    return out


MUTATIONS = ["unknown_key", "retype", "absurd_number", "huge_string", "bad_name", "empty_list", "non_utf8"]


@st.composite
def mutated_sweeps(draw):
    """(file stem, file bytes, [mutation descriptions], expected SweepError field or None)."""
    stem = draw(st.sampled_from(sorted(SHIPPED)))
    doc = copy.deepcopy(SHIPPED[stem])
    kinds = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3))
    done, expect, bad_bytes = [], None, None
    for kind in kinds:
        if kind == "non_utf8":
            bad_bytes = draw(st.sampled_from(NON_UTF8))
            done.append(f"non-UTF-8 bytes {bad_bytes!r}")
            expect = "(file)"
            continue
        if kind == "unknown_key":
            dicts = [p for p, n in _walk(doc) if isinstance(n, dict)]
            where, key = draw(st.sampled_from(dicts)), draw(unknown_keys)
            _get(doc, where)[key] = draw(scalars)
            done.append(f"unknown key {key!r} at {_field_path(where) or '(top)'}")
            expect = ("unknown", _field_path(where), key)
        elif kind == "retype":
            nodes = [p for p, _ in _walk(doc) if p]
            where = draw(st.sampled_from(nodes))
            old = _get(doc, where)
            new_type = draw(st.sampled_from([t for t in VALUES_BY_TYPE if t is not type(old)]))
            value = draw(VALUES_BY_TYPE[new_type])
            _get(doc, where[:-1])[where[-1]] = value
            done.append(f"{_field_path(where)}: {old!r:.40} -> {value!r:.60}")
            expect = None
        else:
            if kind == "bad_name":
                targets = [(s, "name") for s in _sweep_containers(doc)]
                values = invalid_names
            elif kind == "absurd_number":
                targets, values = _targets(doc, "number"), st.sampled_from(ABSURD_NUMBERS)
            elif kind == "huge_string":
                targets, values = _targets(doc, "string"), huge_strings
            else:
                targets, values = _targets(doc, "empty_list"), st.just([])
            if not targets:
                continue
            where, key = draw(st.sampled_from(targets))
            value = draw(values)
            _get(doc, where)[key] = value
            done.append(f"{kind} {_field_path(where + (key,))} = {value!r:.60}")
            expect = (_field_path(where) + "." if where else "") + "name" if kind == "bad_name" else None
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False, width=120).encode("utf-8")
    if bad_bytes is not None:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + bad_bytes + text[at:]
    return stem, text, done, (expect if len(done) == 1 else None)


def _check_sweep_error(err: SweepError, path: Path, expect) -> str | None:
    """The message is '<file>: <field>: <problem>. Fix: <fix>'; `expect` is the field (a str), or for an unknown
    key ('unknown', <where>, <key>): the key is named as written, or quoted when blank or long. Returns the name
    of the known bug the message shows, if any."""
    message = str(err)
    bug = None
    assert len(message) < MESSAGE_LIMIT, message[:300]  # BUG-SPEC-LONG-MESSAGE, fixed: values are clipped
    assert err.source == str(path) and message.startswith(f"{path}: "), message[:300]
    assert err.field_path.strip() and err.field_path.rsplit(".", 1)[-1].strip(), message[:300]
    assert f": {err.field_path}: " in message and ". Fix: " in message and err.fix.strip(), message[:300]
    if isinstance(expect, tuple):
        _, where, key = expect
        prefix = f"{where}." if where else ""
        assert err.problem == "unknown key" and err.field_path.startswith(prefix), message[:300]
        assert err.field_path[len(prefix):] in (str(key), repr(str(key)[:80])), message[:300]
    elif expect is not None:
        assert err.field_path == expect, f"expected the error at {expect!r}: {message[:300]}"
    if expect == "(file)":
        assert "UTF-8" in message, message[:300]
    return bug


def _nonfinite(node, path=""):
    if isinstance(node, float) and not math.isfinite(node):
        yield path
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _nonfinite(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for value in node:
            yield from _nonfinite(value, path)


def manifest_problems(manifests: list[dict]) -> list[str]:
    """What the API server would reject in otherwise schema-valid manifests: names, label values, sizes."""
    problems = []
    for m in manifests:
        meta, kind = m["metadata"], m["kind"]
        name = meta["name"]
        if kind == "Job" and not (len(name) <= 63 and DNS1123_LABEL.fullmatch(name)):
            problems.append(f"Job name {name!r} is not a DNS-1123 label")
        if kind == "ConfigMap" and not (len(name) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name)):
            problems.append(f"ConfigMap name {name!r} is not a DNS-1123 subdomain")
        metas = [meta] + ([m["spec"]["template"]["metadata"]] if kind == "Job" else [])
        for md in metas:
            for value in (md.get("labels") or {}).values():
                if len(value) > 63 or not km.LABEL_VALUE.fullmatch(value):
                    problems.append(f"{kind} {name}: label value {value[:40]!r} is invalid")
            size = sum(len(k.encode()) + len(v.encode()) for k, v in (md.get("annotations") or {}).items())
            if size > ANNOTATIONS_LIMIT:
                problems.append(f"{kind} {name}: annotations are {size} bytes (limit {ANNOTATIONS_LIMIT})")
        if kind == "ConfigMap":
            size = sum(len(k.encode()) + len(v.encode()) for k, v in m["data"].items())
            if size > CONFIGMAP_LIMIT:
                problems.append(f"ConfigMap {name}: data is {size} bytes (limit {CONFIGMAP_LIMIT})")
        size = len(json.dumps(m).encode())
        if size > OBJECT_LIMIT:
            problems.append(f"{kind} {name}: {size} bytes (limit {OBJECT_LIMIT})")
    return problems


def _check_no_value_reaches_a_command(manifests: list[dict]) -> None:
    for m in manifests:
        if m["kind"] != "Job":
            continue
        pod = m["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert "command" not in c, c.get("command")
            assert c["args"] == [{"train": "finesweep-train", "eval": "finesweep-eval"}[c["name"]], "--spec",
                                 km.SPEC_PATH, "--store", STORE_URL], c["args"]


def check_loaded(sweeps) -> None:
    """The 'it loaded' branch of the property."""
    for i, sweep in enumerate(sweeps):
        preflight(sweep, f"pipeline[{i}]." if len(sweeps) > 1 else "")
    for sweep in sweeps:
        assert len(sweep.name) <= 40 and DNS1123_LABEL.fullmatch(sweep.name), repr(sweep.name)
        start = StartRef(sweep.start_sweep, "sft-0123456789") if sweep.stage == "dpo" else None
        specs = sweep.reference_specs(start) + sweep.trial_specs(start)
        for spec in specs:
            body = json.dumps(to_dict(spec), sort_keys=True)  # what the ConfigMap / spec.json carries
            rebuilt = trial_from_dict(json.loads(body))
            assert rebuilt.trial_id == spec.trial_id and json.dumps(to_dict(rebuilt), sort_keys=True) == body
            assert rebuilt == spec
            bad = list(_nonfinite(to_dict(spec)))
            assert not bad, f"non-finite {bad} accepted in trial {spec.name!r:.40}"
            name = km.job_name(spec)
            assert len(name) <= 63 and DNS1123_LABEL.fullmatch(name), name
        manifests = km.sweep_manifests(specs, SETTINGS, STORE_URL)
        _check_no_value_reaches_a_command(manifests)
        problems = manifest_problems(manifests)
        assert not problems, problems  # the API server would reject these half way through the sweep


@settings(max_examples=_examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])
@given(case=mutated_sweeps())
def test_mutated_shipped_sweep_loads_or_fails_clearly(tmp_path_factory, case):
    stem, text, mutations, expect = case
    note(f"{stem}: {mutations}")
    path = tmp_path_factory.mktemp("sweep", numbered=True) / f"{stem}.yaml"
    path.write_bytes(text)
    try:
        check_loaded(load_sweeps(path))
    except SweepError as err:
        bug = _check_sweep_error(err, path, expect)
        event(bug or f"SweepError at {re.sub(r'[0-9]+', 'N', err.field_path.split('.')[-1])[:30]}")
        return
    except Exception as exc:  # noqa: BLE001 - the property: nothing else may escape
        bug = next((name for name, matches in KNOWN_SWEEP_BUGS.items() if matches(exc)), None)
        if bug is None:
            raise
        event(bug)
        return
    assert expect is None, f"expected a SweepError at {expect!r}, but {mutations} loaded"
    event("loaded (harmless mutation)")


# --------------------------------------------------------- what the property found: regressions, open bugs

SFT = (ROOT / "jobs" / "sft.yaml").read_text(encoding="utf-8")
LAST_SFT_TRIAL = "  - {name: t5, r: 8, alpha: 64, dropout: 0.05, target_modules: [gate_proj, up_proj, down_proj], " \
                 "lr: 2.0e-5, batch_size: 4, epochs: 5}"
assert LAST_SFT_TRIAL in SFT, "jobs/sft.yaml changed: update LAST_SFT_TRIAL"


def _sft_with_last_trial(tmp_path: Path, trial: str) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(SFT.replace(LAST_SFT_TRIAL, f"  - {trial}"), encoding="utf-8")
    return path


def _expect_sweep_error(path: Path, field: str | None = None, plan: bool = False):
    with pytest.raises(SweepError) as err:
        if plan:
            load_plan(str(path), LocalStore(path.parent / "store"))
        else:
            for sweep in load_sweeps(path):
                preflight(sweep)
    _check_sweep_error(err.value, path, None)
    if field is not None:
        assert err.value.field_path == field, str(err.value)[:300]
    return err.value


DPO = (ROOT / "jobs" / "dpo.yaml").read_text(encoding="utf-8")
# Absurd values the property found: each was a traceback or a silent acceptance before commit 9854821 (see the
# reply to the issue); kept here as cheap, exact regression cases. (case, edit of jobs/sft.yaml, field named)
REGRESSIONS = [
    ("blank-top-level-key", ("max_parallel: 5", "'': 5"), None),
    ("blank-eval-key", ("{set: sft-open-questions,", "{' ': 1, set: sft-open-questions,"), None),
    ("name-with-trailing-newline", (None, 'name: "sft\\n"\n'), "name"),
    ("int-beyond-float-range", "{name: t5, lr: 1" + "0" * 400 + "}", "trials[4].lr"),
    ("negative-int-beyond-float-range", "{name: t5, lr: -" + "9" * 309 + "}", "trials[4].lr"),
    ("int-literal-over-4300-digits", "{name: t5, r: " + "9" * 5000 + "}", "(file)"),
    ("1000-nested-lists", "{name: t5, target_modules: " + "[" * 1000 + "]" * 1000 + "}", "(file)"),
    ("nan-weight-decay", "{name: t5, weight_decay: .nan}", "trials[4].weight_decay"),
    ("inf-weight-decay", "{name: t5, weight_decay: .inf}", "trials[4].weight_decay"),
    ("nan-string-weight-decay", "{name: t5, weight_decay: 'nan'}", "trials[4].weight_decay"),
    ("nan-beta-on-sft", "{name: t5, beta: .nan}", "trials[4].beta"),
    ("nan-epochs-with-max-steps", "{name: t5, epochs: .nan, max_steps: 10}", "trials[4].epochs"),
    ("negative-seed", "{name: t5, seed: -1}", "trials[4].seed"),
    ("negative-dataset-seed", ("  seed: 42\n", "  seed: -1\n"), "dataset.seed"),
    ("empty-dataset-path", ("path: databricks/databricks-dolly-15k", "path: ''"), "dataset.path"),
    ("blank-dataset-path", ("path: databricks/databricks-dolly-15k", "path: '  '"), "dataset.path"),
    ("300k-character-trial-name", "{name: " + "n" * 300_000 + "}", "trials[4].name"),
    ("eval-set-name-over-255-bytes", ("{set: sft-open-questions,", "{set: " + "e" * 300 + ","), "eval.set"),
    ("model-folder-over-255-bytes", ("model: TinyLlama/TinyLlama-1.1B-Chat-v1.0", "model: build/" + "m" * 300),
     "model"),
    ("data-file-over-255-bytes", ("path: databricks/databricks-dolly-15k", "path: " + "d" * 300 + ".jsonl"),
     "dataset"),
    # Dataset references are resolved by the loader's own resolution (trainer.data.resolve_source) in the preflight:
    # what the loader would refuse names its field (tests/test_preflight_data.py has every refusal).
    ("split-syntax-of-a-hub-dataset", ("split: train", "split: 'train[:'"), "dataset.split"),
    ("benchmark-path-over-255-bytes", ("{set: sft-open-questions,",
                                       "{benchmark: {path: ./" + "g" * 300 + "}, set: sft-open-questions,"),
     "eval.benchmark"),
    ("benchmark-split-with-a-newline", ("{set: sft-open-questions,",
                                        "{benchmark: {split: \"test\\n\"}, set: sft-open-questions,"),
     "eval.benchmark.split"),
    ("benchmark-zero-max-new-tokens", ("{set: sft-open-questions,",
                                       "{benchmark: {max_new_tokens: 0}, set: sft-open-questions,"),
     "eval.benchmark.max_new_tokens"),
]


@pytest.mark.parametrize("edit,field", [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS])
def test_absurd_values_found_by_the_property_are_rejected(tmp_path, edit, field):
    if isinstance(edit, str):
        path = _sft_with_last_trial(tmp_path, edit)
    else:
        old, new = edit
        path = tmp_path / "sft.yaml"
        path.write_text(new + SFT if old is None else SFT.replace(old, new, 1), encoding="utf-8")
    err = _expect_sweep_error(path, field, plan=True)  # load_plan: load_sweeps + preflight, as the CLI does
    assert err.field_path.rsplit(".", 1)[-1].strip(), str(err)[:300]  # the field is named, even a blank key
    assert len(str(err)) < MESSAGE_LIMIT, "the message quotes the absurd value whole"


@pytest.mark.parametrize("key", ["stage", "prompt_format"])
def test_huge_choice_values_give_a_short_message(tmp_path, key):
    raw = yaml.safe_load(SFT)
    raw[key] = "x" * HUGE
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    err = _expect_sweep_error(path, key)
    assert len(str(err)) < MESSAGE_LIMIT, f"{len(str(err))} characters"


@pytest.mark.parametrize("override", [{"namespace": "finesweep\n"}, {"kueue_queue_name": "t4\n"}],
                         ids=["namespace", "kueue-queue"])
def test_cluster_settings_with_a_trailing_newline_are_rejected(override):
    from submitter import k8s_backend

    try:
        settings = k8s_backend.load_settings(override)
    except ValueError as err:
        assert "cluster setting" in str(err)
        return
    raise AssertionError(f"accepted: namespace {settings.namespace!r}, queue {settings.kueue_queue_name!r}")


def test_from_with_a_trailing_newline_is_rejected(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(DPO.replace("from: sft:best", 'from: "sft:best\\n"'), encoding="utf-8")
    _expect_sweep_error(path, "from")


def test_overlong_sweep_argument_is_a_sweep_error(tmp_path):
    with pytest.raises(SweepError, match="no such sweep file"):
        load_plan("s" * 300 + ".yaml", LocalStore(tmp_path / "store"))


def test_a_grid_of_ten_to_the_eighth_trials_is_rejected_at_once(tmp_path):
    """8 keys x 10 values: expanding it would never finish; the cap must answer before expanding."""
    path = tmp_path / "grid.yaml"
    raw = yaml.safe_load(SFT)
    raw.pop("trials")
    raw["grid"] = {k: list(range(1, 11)) for k in ("r", "alpha", "batch_size", "grad_accum", "seed", "max_steps",
                                                    "train_rows", "test_rows")}
    path.write_text(yaml.safe_dump(raw))
    code = ("import sys\nfrom finesweep.spec import load_sweeps, SweepError\ntry:\n    load_sweeps(sys.argv[1])\n"
            "except SweepError as err:\n    print(err)\n    sys.exit(2)\n")

    def limit_memory():  # a regression must not eat the shared machine while it expands
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=10, preexec_fn=limit_memory, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and ": grid: " in proc.stdout and "Fix:" in proc.stdout, \
        proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------- CLI: atomicity

def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "submitter", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _smoke_on_hub_model(tmp_path: Path, edit) -> Path:
    """jobs/smoke.yaml with a Hub model id (no local model folder needed) and `edit` applied."""
    doc = copy.deepcopy(SHIPPED["smoke"])
    for sweep in doc["pipeline"]:
        sweep["model"] = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    edit(doc)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _break_last_trial(doc):
    doc["pipeline"][-1]["trials"][-1]["lr"] = -1.0


def _break_last_dataset(doc):
    doc["pipeline"][-1]["dataset"]["path"] = "tests/fixtures/datasets/no-such-folder"


def _break_last_benchmark(doc):
    """A benchmark on the local GSM8K-layout folder, with a split it does not have (it has train and test)."""
    doc["pipeline"][-1]["eval"]["benchmark"] = {"path": "tests/fixtures/datasets/gsm8k-local", "split": "validation"}


ATOMICITY = [
    ("smoke-last-trial", lambda tmp: _smoke_on_hub_model(tmp, _break_last_trial), "pipeline[1].trials[1].lr"),
    ("sft-last-trial", lambda tmp: _sft_with_last_trial(tmp, "{name: t5, target_modules: []}"),
     "trials[4].target_modules"),
    ("smoke-last-dataset", lambda tmp: _smoke_on_hub_model(tmp, _break_last_dataset), "pipeline[1].dataset"),
    ("smoke-last-benchmark", lambda tmp: _smoke_on_hub_model(tmp, _break_last_benchmark),
     "pipeline[1].eval.benchmark.split"),
]


@pytest.mark.parametrize("make,field", [a[1:] for a in ATOMICITY[:2]], ids=[a[0] for a in ATOMICITY[:2]])
def test_local_submit_of_a_sweep_broken_at_its_last_trial_runs_nothing(tmp_path, make, field):
    sweep, store = make(tmp_path), tmp_path / "store"
    proc = _cli("submit", str(sweep), "--store", str(store))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "invalid sweep, nothing was submitted" in out and f"{sweep}: {field}: " in out and "Fix:" in out, out
    assert "Traceback" not in out, out
    assert not store.exists() or not any(store.rglob("*")), sorted(store.rglob("*"))


@pytest.mark.parametrize("make,field", [a[1:] for a in (ATOMICITY[0], *ATOMICITY[2:])],
                         ids=[ATOMICITY[0][0], *(a[0] for a in ATOMICITY[2:])])
def test_k8s_dry_run_of_a_sweep_broken_at_its_end_prints_no_manifest(tmp_path, make, field):
    sweep, store = make(tmp_path), tmp_path / "store"
    proc = _cli("submit", str(sweep), "--backend", "k8s", "--dry-run", "--store", str(store))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout == "", proc.stdout[:2000]
    assert f"{sweep}: {field}: " in proc.stderr and "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists() or not any(store.rglob("*"))


def test_cli_rejects_an_integer_beyond_float_range_without_a_traceback(tmp_path):
    sweep, store = _sft_with_last_trial(tmp_path, "{name: t5, lr: 1" + "0" * 400 + "}"), tmp_path / "store"
    proc = _cli("submit", str(sweep), "--store", str(store))
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-1500:]
    assert f"{sweep}: trials[4].lr: " in proc.stdout and not store.exists()


def test_status_against_an_unreachable_store_is_a_clear_error(monkeypatch, caplog):
    from submitter.__main__ import main

    for key, value in {"FINESWEEP_S3_ENDPOINT": "http://127.0.0.1:1", "FINESWEEP_S3_RETRY_SECONDS": "1",
                       "FINESWEEP_S3_MAX_ATTEMPTS": "1", "AWS_ACCESS_KEY_ID": "AKIAFINESWEEPTEST1234",
                       "AWS_SECRET_ACCESS_KEY": "x" * 40, "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    assert main(["status", "sft", "--store", "s3://finesweep/unreachable"]) == 2
    assert "s3://finesweep/unreachable" in caplog.text and "127.0.0.1:1" in caplog.text


# ================================================================================================ datasets

FIELDS = {"instruction": ("prompt", "response"), "preference": ("prompt", "chosen", "rejected")}
MISSING = object()


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """Dataset caches of this module in a tmp folder, not the user's ~/.cache/huggingface."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        datasets.disable_progress_bars()
        try:
            yield tmp_path_factory.mktemp("jsonl")
        finally:
            datasets.enable_progress_bars()


# Exceptions the dataset properties tolerate while their bug is open. Commit 9854821 fixed BUG-DATA-EMPTY-FILE
# (StopIteration) and BUG-DATA-GENERATION (DatasetGenerationError from malformed JSON, lone surrogates, bare bytes):
# load_split now wraps them in DatasetError. Still open:
# (BUG-DATA-UTF8 was fixed too: normalize turns UnicodeDecodeError into DatasetError.)
KNOWN_DATA_BUGS: dict = {}

short_text = st.one_of(
    st.text(min_size=1, max_size=30).filter(str.strip),
    st.sampled_from(["hello", "مرحبا بالعالم", "\u202egnp.exe", "😀👍🏽🇫🇷", "שלום עולם", "a\x00b", "\ufeffbom",
                     "line\nbreak", "  padded  ", "日本語のテキスト", "\U0010FFFF", "Ω≈ç√∫"]),
)
# Huge text goes into valid files only (every column plain text), one value per file, written as raw UTF-8 so each
# row stays under pyarrow's 320 KiB JSON block. Huge rows next to mixed-type columns (which datasets re-encodes
# with \uXXXX escapes) were their own bug classes (BUG-DATA-SEGFAULT, BUG-DATA-SILENT-CAST: pyarrow's reader),
# fixed by reading local JSON row by row; their exact inputs stay below as regression tests, run in a subprocess.
huge_text = st.sampled_from([("x", HUGE), ("é", HUGE), ("日", HUGE), ("😀", 60_000), ("ab\n", HUGE)]).map(
    lambda cn: (cn[0] * (cn[1] // len(cn[0]) + 1))[:cn[1]])
good_text = st.one_of(short_text, short_text, short_text, huge_text)
surrogate_text = st.tuples(st.text(max_size=5), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                           st.text(max_size=5)).map("".join)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12))
bad_value = st.one_of(st.sampled_from(["", " ", "\n\t ", "\u3000"]), st.integers(), st.integers(2 ** 64, 2 ** 80),
                      st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                      st.lists(st.text(max_size=3), max_size=2),
                      st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
dirty_value = st.one_of(short_text, short_text, bad_value, bad_value, st.just(MISSING), surrogate_text)


@st.composite
def jsonl_files(draw, fmt: str):
    """(rows, file bytes) for `fmt`; rows may break every rule."""
    rows, huge_used = [], False
    clean = draw(st.booleans())  # half the files are valid: their text must come back exactly
    for _ in range(draw(st.integers(0 if not clean else 1, 4))):
        row = {}
        for name in FIELDS[fmt]:
            value = draw(good_text if clean else dirty_value)
            if isinstance(value, str) and len(value) > 1000:  # one huge value per file (see huge_text)
                value, huge_used = (value[:1000] if huge_used else value), True
            if value is not MISSING:
                row[name] = value
        if draw(st.integers(0, 5)) == 0:  # an extra field: any JSON in dirty files, text in valid ones
            row[draw(st.sampled_from(["extra", "context", "", "é"]))] = draw(st.text(max_size=12) if clean
                                                                              else json_scalars)
        rows.append(row)
    if not rows:
        return rows, draw(st.sampled_from([b"", b"\n", b"\n\n"]))
    ascii_only = draw(st.booleans()) and not huge_used  # \uXXXX escapes would make a huge row straddle blocks
    text = "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows) + "\n"
    # Without ensure_ascii a lone surrogate can only be written as invalid UTF-8 (surrogatepass): a raw-bytes file.
    return rows, text.encode("utf-8", "surrogatepass")


def _surrogates(value) -> bool:
    return isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value)


def _write(folder: Path, data: bytes) -> Path:
    path = folder / f"rows-{uuid.uuid4().hex}.jsonl"  # a new name each time: datasets caches by path
    path.write_bytes(data)
    return path


def _invalid(value) -> bool:
    return not isinstance(value, str) or not value.strip() or _surrogates(value)


def _load_rows_property(path: Path, fmt: str, rows: list[dict] | None) -> str:
    """load_splits either gives every row back as non-empty text, or raises DatasetError naming row and field (or
    the file, for a file that cannot be read as UTF-8 JSON lines). `rows` is None for files that are not valid
    UTF-8 JSON lines by construction (no row-level oracle then). Returns an outcome label for the statistics."""
    from trainer.data import DatasetError, load_splits

    fields = FIELDS[fmt]
    # Empty (no rows, or only `{}` rows: no columns at all), not UTF-8, or a lone surrogate: the file as a whole.
    unreadable = rows is None or not any(rows) or any(_surrogates(r.get(f)) for r in rows for f in fields)
    try:
        train, test = load_splits(DatasetSpec(str(path), fmt))
    except DatasetError as err:
        message = str(err)
        assert str(path) in message and "Traceback" not in message, message[:300]
        if unreadable:  # naming the file is all one can do
            return "DatasetError (file)"
        absent = [f for f in fields if all(f not in r for r in rows)]
        if absent:
            assert "missing" in message and absent[0] in message, message[:300]
            return "DatasetError (missing field)"
        bad = [(i, f) for i, r in enumerate(rows) for f in fields if _invalid(r.get(f))]
        assert bad, f"every row was valid text, yet: {message[:300]}"
        i, field = bad[0]
        assert f"row {i}: field {field!r}" in message, message[:300]
        return "DatasetError (row)"
    except Exception as exc:  # noqa: BLE001 - the property: nothing else may escape
        bug = next((name for name, matches in KNOWN_DATA_BUGS.items() if matches(exc)), None)
        if bug is None:
            raise
        return bug
    # Loaded: every field is non-empty text, and (for clean input) exactly the rows written.
    assert test is None and len(train) >= 1
    for row in train:
        assert isinstance(row["messages"], list) and row["messages"][-1]["role"] == "user"
        assert isinstance(row["messages"][-1]["content"], str) and row["messages"][-1]["content"].strip()
        for name in fields[1:]:
            assert isinstance(row[name], str) and row[name].strip(), row
    if rows is None or unreadable:
        return "loaded (unreadable input)"
    assert not any(_invalid(r.get(f)) for r in rows for f in fields), \
        f"an invalid row loaded: {[{k: repr(v)[:30] for k, v in r.items()} for r in rows]}"
    assert len(train) == len(rows)
    for got, want in zip(train, rows):
        assert got["messages"][-1]["content"] == want["prompt"].strip()
        assert all(got[f] == want[f] for f in fields[1:])
    return "loaded"


@pytest.mark.parametrize("fmt", sorted(FIELDS))
@settings(max_examples=_examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large,
                                                                           HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_dataset_rows_load_as_text_or_fail_naming_row_and_field(hf_cache, fmt, data):
    rows, content = data.draw(jsonl_files(fmt))
    note(f"{len(content)} bytes: {content[:300]!r}")
    event(_load_rows_property(_write(hf_cache, content), fmt, rows))


@settings(max_examples=_examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FIELDS)), junk=st.sampled_from(NON_UTF8), where=st.floats(0, 1),
       rows=st.integers(1, 3))
def test_non_utf8_dataset_file_fails_with_a_dataset_error(hf_cache, fmt, junk, where, rows):
    lines = [json.dumps({f: f"{f} number {i} caf\u00e9" for f in FIELDS[fmt]}, ensure_ascii=False)
             for i in range(rows)]
    good = ("\n".join(lines) + "\n").encode("utf-8")
    at = int(where * len(good))
    event(_load_rows_property(_write(hf_cache, good[:at] + junk + good[at:]), fmt, None))


@pytest.mark.parametrize("content", [
    b"",  # was StopIteration (BUG-DATA-EMPTY-FILE, fixed in 9854821)
    b'{"prompt": "a", "response": "b"}\nnot json\n',  # was DatasetGenerationError (BUG-DATA-GENERATION, fixed)
    b'{"prompt": NaN, "response": "b"}\n',  # Python's json.dumps writes NaN
    b'{"prompt": "\\ud800", "response": "b"}\n',  # a lone surrogate escape: was DatasetGenerationError (fixed)
    '{"prompt": "caf\xe9", "response": "b"}\n'.encode("latin-1"),  # was UnicodeDecodeError (BUG-DATA-UTF8, fixed)
    b"\n",
    b"{}\n{}\n",
], ids=["empty-file", "malformed-line", "nan", "lone-surrogate", "latin-1", "blank-lines", "empty-objects"])
def test_dataset_file_level_errors(hf_cache, content):
    from trainer.data import DatasetError, load_splits

    path = _write(hf_cache, content)
    with pytest.raises(DatasetError) as err:
        load_splits(DatasetSpec(str(path), "instruction"))
    assert str(path) in str(err.value)


def test_bug_error_names_a_valid_row(hf_cache):
    from trainer.data import DatasetError, load_splits

    path = _write(hf_cache, b'{"prompt": "p", "response": "0"}\n{"prompt": "p", "response": 0}\n')
    with pytest.raises(DatasetError) as err:
        load_splits(DatasetSpec(str(path), "instruction"))
    assert "row 1: field 'response'" in str(err.value), str(err.value)


@pytest.mark.parametrize("rows,where", [
    ([{"prompt": "p", "response": "r"}, {"prompt": "p", "response": -2 ** 63 - 1}], "row 1"),
    ([{"prompt": "hi", "response": 7}, {"prompt": "x" * 340_000, "response": "fine"}], "row 0"),
], ids=["int-beyond-int64", "number-before-a-huge-row"])
def test_bug_file_level_error_names_no_row(hf_cache, rows, where):
    from trainer.data import DatasetError, load_splits

    path = _write(hf_cache, "".join(json.dumps(r) + "\n" for r in rows).encode())
    with pytest.raises(DatasetError) as err:
        load_splits(DatasetSpec(str(path), "instruction"))
    assert f"{where}: field 'response'" in str(err.value), str(err.value)[:300]


def test_bug_number_after_a_huge_row_loads_as_text(hf_cache):
    from trainer.data import DatasetError, load_splits

    rows = [{"prompt": "hi", "response": "ok"}, {"prompt": "x" * 340_000, "response": 7}]
    path = _write(hf_cache, "".join(json.dumps(r) + "\n" for r in rows).encode())
    try:
        train, _ = load_splits(DatasetSpec(str(path), "instruction"))
    except DatasetError as err:
        assert "row 1: field 'response'" in str(err), str(err)
        return
    raise AssertionError(f"row 1 loaded with response {train[1]['response']!r}")


@pytest.mark.parametrize("rows", [
    [{"prompt": "a", "response": "x" * 400_000}, {"prompt": "x" * 400_000, "response": True}],
    [{"prompt": 2, "response": 3}, {"response": "日" * 100_000}, {"prompt": True, "response": "ab"}],
], ids=["two-huge-rows", "mixed-columns-and-cjk"])
def test_bug_dataset_crashes_the_interpreter(hf_cache, rows):
    path = _write(hf_cache, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    code = ("import sys\nfrom finesweep.spec import DatasetSpec\nfrom trainer.data import DatasetError, load_splits\n"
            "try:\n    load_splits(DatasetSpec(sys.argv[1], 'instruction'))\nexcept DatasetError as err:\n"
            "    print(err)\n    sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(hf_cache / f"cache-{uuid.uuid4().hex}")}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "row" in proc.stdout, f"exit {proc.returncode}: {proc.stderr[-500:]}"


# ================================================================================================ no shell

PY_SOURCES = sorted({*ROOT.glob("finesweep/**/*.py"), *ROOT.glob("trainer/**/*.py"), *ROOT.glob("evaluator/**/*.py"),
                     *ROOT.glob("submitter/**/*.py"), *ROOT.glob("scripts/*.py")})
BIN_SCRIPTS = sorted(p for p in (ROOT / "images" / "bin").iterdir() if p.is_file())
SHELL_PATTERNS = [r"shell\s*=\s*True", r"\bos\.system\s*\(", r"\bos\.popen\s*\(", r"\bgetstatusoutput\s*\(",
                  r"\bgetoutput\s*\(", r"create_subprocess_shell\s*\("]


def test_no_source_hands_a_command_line_to_a_shell():
    assert len(PY_SOURCES) > 10 and BIN_SCRIPTS
    hits = []
    for path in PY_SOURCES + BIN_SCRIPTS:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for p in SHELL_PATTERNS if re.search(p, line)]
    assert not hits, hits
    for path in PY_SOURCES:  # spelled any other way: shell=<anything but False>
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    assert not (kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and
                                                           kw.value.value is False)), \
                        f"{path.relative_to(ROOT)}:{node.lineno}: shell={ast.unparse(kw.value)}"


def test_images_bin_scripts_pass_arguments_through_quoted():
    for path in BIN_SCRIPTS:
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        assert not re.search(r"\beval\b|\bsh\s+-c\b|\bbash\s+-c\b", code), path.name
        assert "$@" in code and "$*" not in code, path.name
        assert re.sub(r'"\$@"', "", code).count("$@") == 0, f"{path.name}: an unquoted $@"


def test_local_backend_calls_subprocess_with_an_argument_list():
    source = (ROOT / "submitter" / "local.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    calls = 0
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        lists = {t.id for n in ast.walk(func) if isinstance(n, ast.Assign) and isinstance(n.value, ast.List)
                 for t in n.targets if isinstance(t, ast.Name)}
        others = {t.id for n in ast.walk(func) if isinstance(n, ast.Assign) and not isinstance(n.value, ast.List)
                  for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(func):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"):
                continue
            calls += 1
            args = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
            ok = isinstance(args, ast.List) or (isinstance(args, ast.Name) and args.id in lists
                                                and args.id not in others)
            assert ok, f"submitter/local.py:{node.lineno}: subprocess.{node.func.attr}({ast.unparse(args)}) " \
                       "is not given a list"
    assert calls >= 1, "no subprocess call found in submitter/local.py: update this test"


SHELLY = "x; touch /tmp/finesweep-pwned #$(id)`id`|&>' \"\n"


def test_sweep_values_with_shell_syntax_reach_no_command_line(tmp_path, monkeypatch):
    """Dynamic check of the two launch paths: the local backend's argv and the k8s containers' args."""
    from submitter import local

    spec = TrialSpec("sft", "sft", SHELLY, "org/" + SHELLY, DatasetSpec(SHELLY + ".jsonl", "instruction",
                                                                        split=SHELLY), "chat", 64, Hyper(),
                     EvalSpec(SHELLY))
    seen = []

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            seen.append((cmd, kwargs))
            self.stdout, self.returncode = iter(["ok\n"]), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(local.subprocess, "Popen", FakePopen)
    store = LocalStore(tmp_path / "store")
    assert local.run_phase("trainer", spec, store, str(store.root)) == 0
    ((cmd, kwargs),) = seen
    assert isinstance(cmd, list) and not kwargs.get("shell") and "executable" not in kwargs
    assert cmd[:3] == [sys.executable, "-m", "trainer"] and cmd[3] == "--spec" and cmd[5:] == ["--store",
                                                                                              str(store.root)]
    assert not any(SHELLY.strip() in part or "touch" in part for part in cmd), cmd
    manifests = km.sweep_manifests([spec], SETTINGS, STORE_URL)
    _check_no_value_reaches_a_command(manifests)
    job = next(m for m in manifests if m["kind"] == "Job")
    assert "touch" not in json.dumps(job["spec"]["template"]["spec"]["containers"])
