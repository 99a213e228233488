"""Models and datasets staged into the store (finesweep/staging.py): copied once with checksums, loaded from the
store's copy with the real `from_pretrained` / `load_dataset` once the local source is gone, refused when a
staged file no longer matches, and counted in the submitter's preflight."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from finesweep import staging
from finesweep.spec import DatasetSpec, SweepError
from finesweep.store import LocalStore, StoreError

from .conftest import FIXTURES


@pytest.fixture
def active():
    yield
    staging.activate(None)


def test_a_staged_model_loads_from_the_store_once_its_folder_is_gone(tiny_model, tmp_path, monkeypatch, active):
    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.runtime import detect_hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = shutil.copytree(tiny_model, tmp_path / "models" / "tiny-llama")
    store = LocalStore(tmp_path / "store")
    said = []
    record = staging.stage(store, str(source), say=said.append)
    assert record["kind"] == "models" and record["bytes"] > 0 and "config.json" in "".join(record["files"])
    written = {k: (store.root / k).stat().st_mtime_ns for k in record["files"]}
    assert staging.stage(store, str(source), say=said.append)["files"] == record["files"]
    assert "already staged" in said[-1], said
    assert {k: (store.root / k).stat().st_mtime_ns for k in record["files"]} == written, "staged once"

    expected = load_tokenizer(str(source))("Hello there").input_ids
    shutil.rmtree(source)  # from here on only the store has it
    staging.activate(store)
    tok = load_tokenizer(str(source))
    assert tok("Hello there").input_ids == expected and tok.bos_token_id == 1
    model = load_base_model(str(source), detect_hardware())
    assert model.config.num_hidden_layers > 0
    cached = list((tmp_path / "cache" / "finesweep" / "staged" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / ".verified").is_file()

    # A staged file that no longer matches its checksum is refused, not loaded (by the next trial process: one
    # process resolves each name once).
    shutil.rmtree(cached[0])
    weights = next(k for k in record["files"] if k.endswith(".safetensors"))
    store.write_bytes(weights, b"not the weights")
    staging.activate(store)
    with pytest.raises(StoreError, match="checksum differs.*stage .* again"):
        load_tokenizer(str(source))


def test_a_staged_dataset_file_and_folder_load_from_the_store(tmp_path, monkeypatch, active):
    from trainer.data import load_splits

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = LocalStore(tmp_path / "store")
    file_copy = tmp_path / "data" / "train.jsonl"
    file_copy.parent.mkdir()
    shutil.copy(FIXTURES / "datasets" / "instructions-local" / "train.jsonl", file_copy)
    folder_copy = shutil.copytree(FIXTURES / "datasets" / "databricks-dolly-15k", tmp_path / "data" / "dolly")
    for source, fmt in ((file_copy, "instruction"), (folder_copy, "dolly")):
        assert staging.stage(store, str(source), say=lambda _: None)["kind"] == "datasets"
        before, _ = load_splits(DatasetSpec(str(source), fmt))
        shutil.rmtree(source) if source.is_dir() else source.unlink()
        with pytest.raises(Exception):
            load_splits(DatasetSpec(str(source), fmt))  # not staged-aware without a store: the path is gone
        staging.activate(store)
        after, _ = load_splits(DatasetSpec(str(source), fmt))
        staging.activate(None)
        assert after.to_list() == before.to_list()


def test_preflight_accepts_staged_sources_and_says_where_each_comes_from(tiny_model, tmp_path, active):
    from submitter.plan import describe_sources, load_plan

    store = LocalStore(tmp_path / "store")
    model = shutil.copytree(tiny_model, tmp_path / "tiny")
    sweep_file = tmp_path / "staged.yaml"
    sweep_file.write_text(textwrap.dedent(f"""
        name: staged
        stage: sft
        model: {model}
        dataset: {{path: {FIXTURES}/datasets/databricks-dolly-15k, format: dolly, test_fraction: 0.2}}
        eval: {{set: sft-open-questions}}
        trials: [{{name: a, lr: 1.0e-3}}]
    """))
    staging.stage(store, str(model), say=lambda _: None)
    shutil.rmtree(model)
    (plan,) = load_plan(str(sweep_file), store)  # the folder is gone, but the store has it
    lines = describe_sources(plan, store)
    assert f"model {model}: staged in {store.url} (" in lines[0], lines
    assert "dataset" in lines[1] and "not staged: a local path" in lines[1], lines
    with pytest.raises(SweepError) as err:
        load_plan(str(sweep_file), LocalStore(tmp_path / "empty"))
    assert err.value.field_path == "model" and "stage it" in err.value.fix


def test_stage_command_errors_name_the_source(tmp_path, caplog):
    from submitter.__main__ import main

    assert main(["stage", str(tmp_path / "missing-model"), "--store", str(tmp_path / "store")]) == 2
    assert "missing-model: no such file or folder" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["stage", str(empty), "--store", str(tmp_path / "store")]) == 2
    assert "holds no files" in caplog.text and "Traceback" not in caplog.text
