"""Issue 20: a DPO sweep's trials share their reference log-probs through the store. The first trial computes and
writes them (one file keyed by what determines them, with a checksum); a trial with the same start model, pairs
and settings reuses them and trains exactly as if it had computed them itself; a trial with another max_length or
other rows computes its own; a corrupt or mismatched file is refused with a warning and recomputed.

Tiny llama model, 8 preference pairs, a few steps per trial."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from finesweep.spec import StartRef, parse_sweep
from finesweep.store import (LocalStore, ReferenceLogps, SharedFileError, StoreError, reference_logps,
                             shared_key, trial_prefix)
from trainer.dpo import DPORecipe
from trainer.reference_logps import COLUMNS, ENV
from trainer.sft import SFTRecipe

from .conftest import FIXTURES
from .test_multiprocess import hooks  # noqa: F401 - the fixture, for the two-process test

DATA = FIXTURES / "datasets"
PREFS = str(DATA / "preferences-local" / "train.jsonl")
DPO_TRIAL = {"name": "d", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 5.0e-3, "beta": 0.1, "batch_size": 4,
             "max_steps": 3, "warmup_ratio": 0.0, "scheduler": "constant"}


def sweep_spec(model, stage: str, trial: dict, dataset: str, fmt: str, start=None, max_length=96,
               split="train[:8]", **extra):
    raw = {"name": f"t-{stage}", "stage": stage, "model": str(model), "max_length": max_length,
           "dataset": {"path": dataset, "format": fmt, "split": split},
           "eval": {"set": "sft-open-questions"}, "trials": [trial], **extra}
    if stage == "dpo":
        raw["from"] = "t-sft:best"
    return parse_sweep(yaml.safe_load(yaml.safe_dump(raw)), "test", "", None).trial_specs(start)[0]


@pytest.fixture(scope="module")
def sft_start(tiny_model, tmp_path_factory):
    """A trained SFT trial (the DPO trials' start point) in a store of its own; each test copies it."""
    store = LocalStore(tmp_path_factory.mktemp("sft-store"))
    trial = {"name": "s", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 1.0e-2, "batch_size": 8, "epochs": 2,
             "warmup_ratio": 0.0, "scheduler": "constant"}
    spec = sweep_spec(tiny_model, "sft", trial, str(DATA / "instructions-local" / "train.jsonl"), "instruction",
                      prompt_format="instruction")
    recipe = SFTRecipe(spec, store)
    try:
        recipe.run()
    finally:
        recipe.cleanup()
    return spec, store


@pytest.fixture
def store(sft_start, tmp_path):
    import shutil

    _, source = sft_start
    return LocalStore(shutil.copytree(source.root, tmp_path / "store"))


def dpo_spec(tiny_model, sft_start, **changes):
    sft_spec, _ = sft_start
    trial = {**DPO_TRIAL, **{k: v for k, v in changes.items() if k in DPO_TRIAL or k == "name"}}
    sweep = {k: v for k, v in changes.items() if k in ("max_length", "split")}
    return sweep_spec(tiny_model, "dpo", trial, PREFS, "preference", start=StartRef(sft_spec.sweep, sft_spec.trial_id),
                      **sweep)


def run_dpo(spec, store):
    """Train a DPO trial; returns (train.json, the reference columns it trained with, its adapter weights)."""
    recipe = DPORecipe(spec, store)
    try:
        recipe.setup()
        ref = {c: list(recipe.trainer.train_dataset[c]) for c in COLUMNS}
        features = {c: str(recipe.trainer.train_dataset.features[c]) for c in COLUMNS}
        recipe.train()
        recipe.save()
        lora = {n: p.detach().clone() for n, p in recipe.trainer.model.named_parameters() if "lora_" in n}
    finally:
        recipe.cleanup()
    record = store.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/train.json")
    return record, ref, features, lora


def shared_files(store) -> list[str]:
    return [k for k in store.list("_shared/reference-logps/") if k.endswith(".json")]


def losses(record) -> list[float]:
    return [e["loss"] for e in record["log_history"] if "loss" in e]


def test_trials_differing_in_lr_and_beta_share_and_train_as_if_computed(tiny_model, sft_start, store, tmp_path,
                                                                         monkeypatch):
    first, _, first_features, _ = run_dpo(dpo_spec(tiny_model, sft_start, name="a"), store)
    assert first["reference_logps"]["source"] == "computed" and first["reference_logps"]["seconds"] > 0
    assert first["reference_logps"]["written"] is True and first["reference_logps"]["pairs"] == 8
    files = shared_files(store)
    assert files == [first["reference_logps"]["store_key"]]

    second_spec = dpo_spec(tiny_model, sft_start, name="b", lr=1.0e-3, beta=0.3)
    second, reused, features, lora = run_dpo(second_spec, store)
    info = second["reference_logps"]
    assert info["source"] == "reused" and info["seconds"] == 0.0 and info["key"] == first["reference_logps"]["key"]
    assert info["computed_s_by_writer"] == first["reference_logps"]["seconds"]
    assert info["saved_s"] == pytest.approx(max(0.0, info["computed_s_by_writer"] - info["overhead_s"]), abs=1e-3)
    assert info["written_by"]["trial_id"] == first["trial_id"]
    assert features == first_features  # float32 columns, as TRL's own

    # The same trial with sharing off: TRL computes the reference log-probs itself, in a store of its own.
    monkeypatch.setenv(ENV, "0")
    alone = LocalStore(tmp_path / "alone")
    for key in store.list(f"{sft_start[0].sweep}/"):
        alone.write_bytes(key, store.read_bytes(key))
    own, computed, own_features, own_lora = run_dpo(second_spec, alone)
    assert own["reference_logps"] == {"source": "computed", "shared": False, "pairs": 8,
                                      "seconds": own["reference_logps"]["seconds"]}
    assert not shared_files(alone)
    assert own_features == features
    for column in COLUMNS:
        assert len(reused[column]) == len(computed[column]) == 8
        assert torch.allclose(torch.tensor(reused[column]), torch.tensor(computed[column]), atol=1e-5, rtol=0)
    assert losses(second) == pytest.approx(losses(own), abs=1e-6) and len(losses(second)) >= 2
    assert lora.keys() == own_lora.keys()
    for name in lora:
        assert torch.allclose(lora[name], own_lora[name], atol=1e-6, rtol=0), name


def test_other_max_length_or_rows_compute_their_own(tiny_model, sft_start, store):
    first, ref, _, _ = run_dpo(dpo_spec(tiny_model, sft_start, name="a"), store)
    shorter, _, _, _ = run_dpo(dpo_spec(tiny_model, sft_start, name="a", max_length=64), store)
    fewer, fewer_ref, _, _ = run_dpo(dpo_spec(tiny_model, sft_start, name="a", split="train[:6]"), store)
    for record in (shorter, fewer):
        assert record["reference_logps"]["source"] == "computed", record["reference_logps"]
    keys = {r["reference_logps"]["store_key"] for r in (first, shorter, fewer)}
    assert len(keys) == 3 and sorted(keys) == shared_files(store)
    assert len(fewer_ref[COLUMNS[0]]) == 6


def test_a_corrupt_shared_file_is_refused_and_recomputed(tiny_model, sft_start, store, caplog):
    spec = dpo_spec(tiny_model, sft_start, name="a")
    first, ref, _, _ = run_dpo(spec, store)
    key = first["reference_logps"]["store_key"]
    good = store.read_bytes(key)
    head, _, body = good.partition(b"\n")
    values = json.loads(body)
    values[COLUMNS[0]][3] += 0.5  # a changed number under the old checksum
    store.write_bytes(key, head + b"\n" + json.dumps(values).encode())

    other = dpo_spec(tiny_model, sft_start, name="b", lr=1.0e-3)
    with caplog.at_level("WARNING", logger="finesweep"):
        second, recomputed, _, _ = run_dpo(other, store)
    assert "checksum mismatch" in caplog.text and "computing the reference log-probs again" in caplog.text
    info = second["reference_logps"]
    assert info["source"] == "recomputed" and "checksum mismatch" in info["problem"] and info["seconds"] > 0
    assert recomputed == ref  # the stored file was not used
    # ... and was replaced by an intact one, which the next trial reuses.
    assert store.read_bytes(key).partition(b"\n")[2] == body
    third, _, _, _ = run_dpo(dpo_spec(tiny_model, sft_start, name="c", beta=0.2), store)
    assert third["reference_logps"]["source"] == "reused"


def test_a_store_that_cannot_take_the_file_costs_only_the_sharing(tiny_model, sft_start, store, monkeypatch, caplog):
    """The trial has its numbers: a failed write of the shared file is a warning and a note in train.json."""
    def refuse(self, *args, **kwargs):
        raise StoreError("disk full")

    monkeypatch.setattr(ReferenceLogps, "write", refuse)
    with caplog.at_level("WARNING", logger="finesweep"):
        record, _, _, _ = run_dpo(dpo_spec(tiny_model, sft_start, name="a"), store)
    info = record["reference_logps"]
    assert info["source"] == "computed" and info["written"] is False and "disk full" in info["store_error"]
    assert "later trials will compute them again" in caplog.text and not shared_files(store)


# ------------------------------------------------------------------ the store handle alone (no training)

FIELDS = {"weights": "w", "rows": "r", "pairs": 3, "collator": {"max_length": 96}}


def test_store_handle_writes_one_checked_file(tmp_path):
    store = LocalStore(tmp_path)
    handle = reference_logps(store, FIELDS)
    assert handle.path == f"_shared/reference-logps/{shared_key(FIELDS)}.json" and not handle.exists()
    with pytest.raises(StoreError):
        handle.read(3)
    handle.write([-1.5, -2.25, -3.0], [-4.0, -5.125, -6.0], compute_seconds=1.25, written_by={"trial_id": "x"})
    assert store.list("_shared/") == [handle.path]  # one file, no temporary left behind
    read = handle.read(3)
    assert read["ref_chosen_logps"] == [-1.5, -2.25, -3.0] and read["ref_rejected_logps"] == [-4.0, -5.125, -6.0]
    assert read["compute_seconds"] == 1.25 and read["rows"] == 3 and read["fields"] == FIELDS

    with pytest.raises(SharedFileError, match="rows"):
        handle.read(4)  # this trial has another number of pairs
    moved = reference_logps(store, {**FIELDS, "pairs": 4})
    store.write_bytes(moved.path, store.read_bytes(handle.path))
    with pytest.raises(SharedFileError, match="other inputs"):
        moved.read(3)  # a file stored under another key
    data = store.read_bytes(handle.path)
    store.write_bytes(handle.path, data[: len(data) - 5])
    with pytest.raises(SharedFileError, match="checksum"):
        handle.read(3)  # cut short
    store.write_bytes(handle.path, b"\x00garbage")
    with pytest.raises(SharedFileError, match="header"):
        handle.read(3)
    assert isinstance(handle, ReferenceLogps)


# ------------------------------------------------------------------ two processes (slow: launched as a pod would)

@pytest.mark.slow
def test_two_process_trials_share_through_the_main_process(tiny_model, sft_start, store, hooks, tmp_path):
    """Two processes (FINESWEEP_PROCESSES=2): only the main one reads and writes the shared file, every rank
    trains with the same numbers, and the reusing trial's curve is the one it trains with sharing off."""
    from finesweep.spec import to_dict

    from .test_multiprocess import env_for, launch

    def trial(spec, target, **env):
        spec_file = tmp_path / f"{spec.trial_id}.json"
        spec_file.write_text(json.dumps(to_dict(spec)))
        writes = tmp_path / f"writes-{len(list(tmp_path.iterdir()))}.log"
        run = launch(spec_file, target.root, env_for(hooks, FINESWEEP_TEST_WRITE_LOG=str(writes), **env), 2)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        shared = [line for line in writes.read_text().splitlines() if "_shared/" in line]
        return target.read_json(f"{trial_prefix(spec.sweep, spec.trial_id)}/train.json"), shared

    first, first_writes = trial(dpo_spec(tiny_model, sft_start, name="a"), store)
    assert first["processes"] == 2 and first["reference_logps"]["source"] == "computed"
    assert [w.split()[:2] for w in first_writes] == [["write_bytes", "0"]]  # the main process, once
    second_spec = dpo_spec(tiny_model, sft_start, name="b", lr=1.0e-3, beta=0.3)
    second, second_writes = trial(second_spec, store)
    assert second["reference_logps"]["source"] == "reused" and not second_writes

    alone = LocalStore(tmp_path / "alone")
    for key in store.list(f"{sft_start[0].sweep}/"):
        alone.write_bytes(key, store.read_bytes(key))
    own, _ = trial(second_spec, alone, **{ENV: "0"})
    assert own["reference_logps"]["source"] == "computed" and not shared_files(alone)
    assert losses(second) == pytest.approx(losses(own), abs=1e-6) and len(losses(second)) >= 2
