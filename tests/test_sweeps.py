"""Every shipped sweep loads and validates; bad sweeps fail early naming the file, the field and the fix."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from finesweep.spec import SweepError, StartRef, load_sweeps, parse_sweep, trial_from_dict, to_dict
from submitter.plan import load_plan, preflight
from finesweep.store import LocalStore

from .conftest import ROOT

JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_every_job_is_shipped():
    assert {p.stem for p in JOBS} >= {"smoke", "sft", "dpo", "gsm8k-sft", "hh-dpo"}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_shipped_sweep_validates(path, tiny_model):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# make submit SWEEP="), "each sweep's first line shows the command that runs it"
    sweeps = load_sweeps(path)
    for sweep in sweeps:
        preflight(sweep)
        start = StartRef("sft", "sft-0123456789") if sweep.stage == "dpo" else None
        specs = sweep.trial_specs(start)
        ids = [s.trial_id for s in specs]
        assert len(set(ids)) == len(ids), "two trials of one sweep resolve to the same config"
        for spec in specs:  # the spec survives the JSON trip to a pod unchanged, id included
            assert trial_from_dict(to_dict(spec)) == spec


def _trials(name):
    (sweep,) = load_sweeps(ROOT / "jobs" / f"{name}.yaml")
    return sweep, {n: h for n, h in sweep.trials}


def test_report1_sft_matches_user_table():
    sweep, t = _trials("sft")
    assert sweep.dataset.path == "databricks/databricks-dolly-15k" and sweep.max_length == 256
    assert sweep.dataset.test_fraction == 0.1
    table = {  # user-sweeps.md, Report 1 SFT: r, alpha, dropout, targets, lr, batch, epochs
        "t1": (8, 32, 0.05, ("q_proj", "v_proj"), 2e-4, 8, 2),
        "t2": (16, 64, 0.1, ("q_proj", "v_proj", "k_proj", "o_proj"), 1e-4, 8, 2),
        "t3": (32, 128, 0.2, ("q_proj", "v_proj"), 5e-5, 4, 4),
        "t4": (64, 256, 0.1, ("q_proj", "v_proj", "k_proj", "o_proj", "gate_proj"), 3e-4, 8, 3),
        "t5": (8, 64, 0.05, ("gate_proj", "up_proj", "down_proj"), 2e-5, 4, 5),
    }
    for name, row in table.items():
        h = t[name]
        assert (h.r, h.alpha, h.dropout, h.target_modules, h.lr, h.batch_size, h.epochs) == row, name


def test_report1_dpo_matches_user_table():
    sweep, t = _trials("dpo")
    assert sweep.start_from == "sft:best" and sweep.dataset.format == "ultrafeedback"
    table = {  # r, alpha, targets, dropout, beta, lr, batch, epochs, grad acc, train/test rows
        "t1": (16, 64, ("q_proj", "v_proj"), 0.15, 0.1, 5e-4, 4, 3, 2, 500, 200),
        "t2": (8, 32, ("q_proj", "v_proj", "k_proj"), 0.1, 0.2, 5e-4, 3, 2, 2, 500, 200),
        "t3": (16, 64, ("q_proj",), 0.2, 0.05, 2e-4, 4, 3, 2, 1000, 500),
        "t4": (16, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), 0.1, 0.15, 4e-5, 2, 1, 2, 1000, 500),
        "t5": (12, 128, ("q_proj", "k_proj"), 0.2, 0.2, 5e-6, 6, 2, 2, 1000, 500),
    }
    for name, row in table.items():
        h = t[name]
        got = (h.r, h.alpha, h.target_modules, h.dropout, h.beta, h.lr, h.batch_size, h.epochs, h.grad_accum,
               h.train_rows, h.test_rows)
        assert got == row, name


def test_report2_sweeps_match_user_tables():
    sweep, t = _trials("gsm8k-sft")
    assert sweep.dataset.split == "train[:5000]" and sweep.prompt_format == "instruction" and sweep.max_length == 512
    assert [(h.r, h.alpha, h.lr, h.batch_size, h.epochs) for h in t.values()] == [
        (4, 8, 2e-4, 2, 3), (16, 32, 5e-5, 1, 2), (8, 16, 5e-4, 2, 3), (4, 8, 1e-4, 1, 3), (2, 4, 3e-4, 2, 3)]
    sweep, t = _trials("hh-dpo")
    assert sweep.dataset.min_answer_chars == 10 and sweep.dataset.test_split == "test[:500]"
    assert [(h.r, h.lr, h.beta, h.epochs) for h in t.values()] == [
        (4, 5e-7, 0.1, 3), (4, 1e-6, 0.1, 3), (4, 5e-7, 0.3, 3), (8, 5e-7, 0.1, 3), (4, 1e-6, 0.05, 3)]


def test_trial_id_is_stable_and_ignores_the_display_name():
    sweep, _ = _trials("sft")
    a, b = sweep.trial_specs()[0], load_sweeps(ROOT / "jobs" / "sft.yaml")[0].trial_specs()[0]
    assert a.trial_id == b.trial_id and a.trial_id.startswith("sft-")
    renamed = type(a)(**{**a.__dict__, "name": "renamed"})
    assert renamed.trial_id == a.trial_id
    changed = type(a)(**{**a.__dict__, "max_length": 300})
    assert changed.trial_id != a.trial_id


def test_trial_id_is_the_training_and_evaluation_id_the_evaluation():
    """Evaluation settings do not change what is trained: same trial id, another evaluation_id. The held-out
    rows are the exception (a search prunes by them while training)."""
    import dataclasses

    sweep, _ = _trials("sft")
    a = sweep.trial_specs()[0]
    for change in ({"max_new_tokens": a.eval.max_new_tokens + 1}, {"set": "math-word-problems"},
                   {"extra_sets": ("math-word-problems",)}, {"batch_size": 3}, {"bootstrap_samples": 17}):
        b = dataclasses.replace(a, eval=dataclasses.replace(a.eval, **change))
        assert (b.trial_id, b.evaluation_id != a.evaluation_id) == (a.trial_id, True), change
    fewer = dataclasses.replace(a, eval=dataclasses.replace(a.eval, heldout_rows=a.eval.heldout_rows // 2))
    assert fewer.trial_id != a.trial_id
    trained_differently = dataclasses.replace(a, hyper=dataclasses.replace(a.hyper, lr=a.hyper.lr * 2))
    assert (trained_differently.trial_id != a.trial_id, trained_differently.evaluation_id) == (True, a.evaluation_id)


def test_grid_is_a_cartesian_product_on_top_of_defaults():
    raw = yaml.safe_load(BASE + "defaults: {lr: 1.0e-4, epochs: 2}\ngrid: {r: [4, 8], lr: [1.0e-4, 3.0e-4]}\n"
                         "trials: [{name: hand, r: 16}]\n")
    sweep = parse_sweep(raw, "grid.yaml", "", "grid")
    names = [n for n, _ in sweep.trials]
    assert names[0] == "hand" and len(names) == 5
    assert {(h.r, h.lr) for _, h in sweep.trials[1:]} == {(4, 1e-4), (4, 3e-4), (8, 1e-4), (8, 3e-4)}
    assert all(h.epochs == 2 for _, h in sweep.trials)


BASE = textwrap.dedent("""\
    stage: sft
    model: build/tiny-llama
    dataset: {path: tests/fixtures/datasets/databricks-dolly-15k, format: dolly}
    eval: {set: sft-open-questions}
""")

BAD = [
    # (yaml appended to BASE or replacing it, field named in the error, words in the fix)
    ("trials: [{r: 0}]", "trials[0].r", "rank"),
    ("trials: [{r: -4}]", "trials[0].r", "rank"),
    ("trials: [{target_modules: []}]", "trials[0].target_modules", "q_proj"),
    ("trials: [{target_modules: [q_prj]}]", "trials[0].target_modules", "q_proj"),
    ("trials: [{lr: fast}]", "trials[0].lr", "number"),
    ("trials: [{lr: 0}]", "trials[0].lr", "2e-4"),
    ("trials: [{batch_size: 2.5}]", "trials[0].batch_size", "integer"),
    ("trials: [{dropout: 1.5}]", "trials[0].dropout", "0.05"),
    ("trials: [{epochs: 0}]", "trials[0].epochs", "epoch"),
    ("trials: [{learning_rate: 1.0e-4}]", "trials[0].learning_rate", "did you mean 'lr'"),
    ("trials: [{r: 8}]\nmax_lenght: 256", "max_lenght", "did you mean 'max_length'"),
    ("trials: [{r: 8}]\nmax_length: 4", "max_length", "between 16"),
    ("trials: [{r: 8}]\nselect: {metric: accuracy}", "select.metric", "bleu"),
    ("trials: [{r: 8}]\nname: Bad_Name", "name", "lowercase"),
    ("trials: [{r: 8}]\nfrom: sft:best", "from", "remove"),
    ("trials: []", "trials", "add a `trials:`"),
    ("trials: [{r: 8}, {r: 8}]\ngrid: {r: []}", "grid.r", "non-empty"),
    ("trials: [{name: a}, {name: a}]", "trials[1]", "own name"),
]


@pytest.mark.parametrize("extra,field,fix", BAD, ids=[b[1] + ":" + b[0][:30] for b in BAD])
def test_bad_sweep_is_rejected_with_field_and_fix(tmp_path, extra, field, fix):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + extra + "\n")
    with pytest.raises(SweepError) as err:
        load_sweeps(path)
    message = str(err.value)
    assert str(path) in message and f": {field}: " in message and "Fix:" in message, message
    assert fix in message, message


@pytest.mark.parametrize("text,field", [
    ("stage: dpo\nmodel: m\ndataset: {path: d, format: hh-rlhf}\neval: {set: x}\ntrials: [{beta: 0}]\nfrom: s:best",
     "trials[0].beta"),
    ("stage: dpo\nmodel: m\ndataset: {path: d, format: hh-rlhf}\neval: {set: x}\ntrials: [{r: 4}]", "from"),
    ("stage: dpo\nmodel: m\ndataset: {path: d, format: dolly}\neval: {set: x}\ntrials: [{r: 4}]\nfrom: s:best",
     "dataset.format"),
    ("stage: ppo\nmodel: m\ndataset: {path: d, format: dolly}\neval: {set: x}", "stage"),
    ("stage: sft\nmodel: m\neval: {set: x}", "dataset"),
    ("- just\n- a list", "(file)"),
    ("stage: sft\nmodel: [unclosed", "(file)"),
    ("pipeline:\n  - {name: b, stage: dpo, from: a:best, model: m, dataset: {path: d, format: hh-rlhf}, "
     "eval: {set: x}, trials: [{r: 4}]}\n  - {name: a, stage: sft, model: m, dataset: {path: d, format: dolly}, "
     "eval: {set: x}, trials: [{r: 4}]}", "pipeline[0].from"),
])
def test_structural_errors(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SweepError) as err:
        load_sweeps(path)
    assert f": {field}: " in str(err.value) and "Fix:" in str(err.value), str(err.value)


def test_non_utf8_file_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("stage: sft\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SweepError, match="UTF-8"):
        load_sweeps(path)


def test_dpo_start_point_must_exist_in_the_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(SweepError) as err:
        load_plan("dpo", store)
    assert "sweep 'sft' has no finished best trial" in str(err.value)
    assert "make submit SWEEP=sft" in str(err.value)
    assert not list((tmp_path / "store").rglob("*")), "validation wrote to the store"
    from finesweep.spec import to_dict

    (sft,) = load_sweeps("jobs/sft.yaml")
    start = sft.trial_specs()[0]
    store.write_json(f"sft/{start.trial_id}/spec.json", to_dict(start))
    store.write_json("sft/best.json", {"trial_id": start.trial_id})
    (plan,) = load_plan("dpo", store)
    assert plan.start == StartRef("sft", start.trial_id)
    assert all(t.start == plan.start for t in plan.trials())


def test_missing_local_paths_and_eval_sets_fail_preflight(tmp_path):
    for extra, field in (("model: build/no-such-model", "model"),
                         ("dataset: {path: tests/nope.jsonl, format: instruction}", "dataset"),
                         ("eval: {set: no-such-set}", "eval.set")):
        raw = yaml.safe_load(BASE + "trials: [{r: 4}]\n")
        raw.update(yaml.safe_load(extra))
        sweep = parse_sweep(raw, "x.yaml", "", "x")
        with pytest.raises(SweepError, match=f": {field}: "):
            preflight(sweep)


def test_dpo_sweep_must_match_its_sft_start_point():
    """A DPO sweep whose model, prompt format or max length differs from its SFT start point fails in
    preflight, naming the field and the fix (issue 10)."""
    import dataclasses

    from finesweep.spec import SweepError, check_start_compatible, load_sweeps

    sft, dpo = load_sweeps("jobs/smoke.yaml")
    (start,) = sft.trial_specs()[:1]
    check_start_compatible(dpo, start)  # the shipped pipeline matches
    for key, value in (("max_length", 128), ("prompt_format", "instruction"), ("model", "other/model")):
        with pytest.raises(SweepError, match=rf"{key}: .* differs from its start point .*Fix: set `{key}: "):
            check_start_compatible(dataclasses.replace(dpo, **{key: value}), start, "pipeline[1].")
