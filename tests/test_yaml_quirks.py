"""YAML that silently means something other than what was written is a sweep error naming the line and the key:
duplicate keys, YAML 1.1 booleans, octals, sexagesimals and dates where text or a number was meant."""

from __future__ import annotations

import textwrap

import pytest

from finesweep.spec import SweepError, load_sweeps

from .test_sweeps import BASE

# BASE is 4 lines; a line appended to it is line 5.
QUIRKS = [
    # (appended to BASE, field path, line, words in the problem, words in the fix)
    ("name: no\ntrials: [{r: 8}]", "name", 5, "boolean false", "quote it ('no')"),
    ("trials: [{target_modules: [q_proj, on]}]", "trials[0].target_modules[1]", 5, "boolean true", "('on')"),
    ("trials: [{name: Yes}]", "trials[0].name", 5, "boolean true", "('Yes')"),
    ("trials: [{lr: 1:30}]", "trials[0].lr", 5, "base-60 number 90", "2.0e-4"),
    ("trials: [{lr: 1:30.5}]", "trials[0].lr", 5, "base-60 number 90.5", "('1:30.5')"),
    ("trials: [{seed: 010}]", "trials[0].seed", 5, "octal number 8", "write 10"),
    ("trials: [{seed: 09}]", "trials[0].seed", 5, "leading zero", "write 9"),
    ("trials: [{r: 0b1000}]", "trials[0].r", 5, "binary number 8", "decimal"),
    ("trials: [{name: 2024-01-01}]", "trials[0].name", 5, "a date", "('2024-01-01')"),
    ("trials: [{r: 8}]\nmax_length: 128\nmax_length: 256", "max_length", 7, "set twice in one mapping (lines 6 and 7)",
     "keep one"),
    ("trials:\n  - r: 8\n    lr: 1.0e-4\n    r: 16", "trials[0].r", 8, "lines 6 and 8", "keep one"),
    ("trials: [{r: 8}]\nselect: {metric: bleu, metric: chrf}", "select.metric", 6, "YAML keeps only the last", "keep"),
    ("trials: [{r: 8}]\noff: 1", "off", 6, "the key `off` is read as the boolean false", "('off')"),
]


@pytest.mark.parametrize("extra,field,line,problem,fix", QUIRKS, ids=[q[0][:40] for q in QUIRKS])
def test_yaml_quirk_is_an_error_naming_line_and_key(tmp_path, extra, field, line, problem, fix):
    path = tmp_path / "quirk.yaml"
    path.write_text(BASE + extra + "\n")
    with pytest.raises(SweepError) as err:
        load_sweeps(path)
    e = err.value
    assert e.source == str(path) and e.field_path == field, str(e)
    assert e.problem.startswith(f"line {line}: ") and problem in e.problem and fix in e.fix, str(e)
    assert str(e).startswith(f"{path}: {field}: line {line}: ") and "\n" not in str(e)


def test_a_duplicate_key_in_a_pipeline_sweep_names_its_path(tmp_path):
    path = tmp_path / "pipe.yaml"
    path.write_text(textwrap.dedent("""\
        pipeline:
          - name: a
            stage: sft
            model: m
            stage: dpo
    """))
    with pytest.raises(SweepError) as err:
        load_sweeps(path)
    assert err.value.field_path == "pipeline[0].stage" and err.value.problem.startswith("line 5: "), str(err.value)


@pytest.mark.parametrize("extra", [
    "name: 'no'\ntrials: [{r: 8}]",  # quoted: the text it says
    "trials: [{target_modules: [q_proj, 'v_proj'], seed: 10, lr: 2.0e-4}]",
    "trials: [{name: '2024-01-01', seed: 0}]",
])
def test_quoted_and_plain_values_load_as_written(tmp_path, extra):
    path = tmp_path / "ok.yaml"
    path.write_text(BASE + extra + "\n")
    load_sweeps(path)


def test_quoted_quirk_values_mean_what_they_say(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(BASE + "name: 'no'\ntrials: [{name: '010', lr: 2e-4}, {name: 't2', lr: '1.0e-3'}]\n")
    (sweep,) = load_sweeps(path)
    assert sweep.name == "no"
    (n1, h1), (_, h2) = sweep.trials
    assert n1 == "010" and h1.lr == 2e-4 and h2.lr == 1e-3  # `2e-4` (text to PyYAML) is still the number


def test_merge_keys_override_without_counting_as_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(BASE + textwrap.dedent("""\
        defaults: &common {r: 8, alpha: 16, lr: 1.0e-4}
        trials:
          - {<<: *common, name: a, r: 4}
          - {<<: *common, name: b}
    """))
    (sweep,) = load_sweeps(path)
    assert [(n, h.r, h.alpha) for n, h in sweep.trials] == [("a", 4, 16), ("b", 8, 16)]


def test_a_self_referencing_alias_is_a_clear_error_not_a_hang(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text(BASE + "trials: &t [*t]\n")
    with pytest.raises(SweepError):
        load_sweeps(path)
