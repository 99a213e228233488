"""Multi-process trials on CPU, launched as a pod launches them: images/bin/finesweep-train with
FINESWEEP_PROCESSES=2 (accelerate launch, gloo). One writer, one copy of each progress line, the same optimisation
as one process (batch_size is the global batch), preemption with one checkpoint for every rank, an error on a
non-main rank reaching the trial's failure reason, and DeepSpeed ZeRO-2 (the image's config, DS_ACCELERATOR=cpu)
against plain data parallel for SFT and DPO.

Tolerance: fp32, dropout 0. The 2-process curves are the 1-process curve up to float summation order (gradients
are summed in two halves, then all-reduced); measured identical to 4 decimals here, asserted within abs 1e-3
per logged step (losses are ~10 on the tiny random model)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from finesweep import exitcodes
from finesweep.spec import StartRef, parse_sweep, to_dict
from finesweep.store import TRAINED, LocalStore

from .conftest import FIXTURES, ROOT

pytestmark = pytest.mark.slow

ENTRY = ROOT / "images" / "bin" / "finesweep-train"
ZERO2 = ROOT / "images" / "accelerate" / "deepspeed-zero2.yaml"
LOSS_TOL = 1e-3
# A test-only hook, loaded by every Python process of a run through PYTHONPATH: logs each store write and delete
# with the writer's rank, and can make one rank fail at one step (through the recipe's one list of callbacks).
SITECUSTOMIZE = '''
import importlib.abc, importlib.util, os, sys

_log = os.environ.get("FINESWEEP_TEST_WRITE_LOG")
if _log:
    from finesweep import store as _store

    def _logged(name):
        original = getattr(_store.LocalStore, name)

        def wrapper(self, key, *args, **kwargs):
            with open(_log, "a") as f:
                f.write(f"{name} {os.environ.get('RANK', '-')} {key}\\n")
            return original(self, key, *args, **kwargs)
        return wrapper

    _store.LocalStore.write_bytes = _logged("write_bytes")
    _store.LocalStore.delete = _logged("delete")

_fail = os.environ.get("FINESWEEP_TEST_FAIL")  # "RANK:STEP"
if _fail and _fail.split(":")[0] == os.environ.get("RANK"):
    _step = int(_fail.split(":")[1])

    def _patch(module):
        from transformers import TrainerCallback

        class Boom(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == _step:
                    raise RuntimeError(f"injected failure at step {_step}")

        original = module.Recipe.callbacks
        module.Recipe.callbacks = lambda self, checkpoints: original(self, checkpoints) + [Boom()]

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "trainer.recipe":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
'''


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hooks")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def env_for(hooks: Path, **extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)]),
           # the entry script runs `python` and `accelerate` from PATH, as in the image
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           # a failed rank's peers are stopped within seconds, not the entry script's 120 s default
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "20"}
    for key in ("FINESWEEP_PROCESSES", "FINESWEEP_NUM_GPUS", "FINESWEEP_ACCELERATE_CONFIG", "FINESWEEP_TEST_FAIL",
                "FINESWEEP_TEST_WRITE_LOG"):
        env.pop(key, None)
    env.update(extra)
    return env


def spec_for(tiny_model: Path, stage: str, trial: dict, spec_file: Path, start: StartRef | None = None):
    """A sweep of one trial whose rows split evenly into global batches of 8 (so one process and two see the
    same rows at every step, including the last one of each epoch)."""
    data = {"sft": ("instructions-local/train.jsonl", "instruction"),
            "dpo": ("preferences-local/train.jsonl", "preference")}[stage]
    raw = {"name": f"mp-{stage}", "stage": stage, "model": str(tiny_model), "max_length": 96,
           "dataset": {"path": str(FIXTURES / "datasets" / data[0]), "format": data[1], "split": "train[:16]"},
           "eval": {"set": "sft-open-questions"},
           "trials": [{"r": 8, "alpha": 16, "dropout": 0.0, "warmup_ratio": 0.0, "batch_size": 8, **trial}]}
    if stage == "dpo":
        raw["from"] = "mp-sft:best"
    spec = parse_sweep(yaml.safe_load(yaml.safe_dump(raw)), "test.yaml", "", None).trial_specs(start)[0]
    spec_file.write_text(json.dumps(to_dict(spec)))
    return spec


def launch(spec_file: Path, store: Path, env: dict, processes: int | None, config: Path | None = None,
           timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(env)
    if processes:
        env["FINESWEEP_PROCESSES"] = str(processes)
    if config:
        env["FINESWEEP_ACCELERATE_CONFIG"] = str(config)
    return subprocess.run([str(ENTRY), "--spec", str(spec_file), "--store", str(store)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def record(store: Path, spec) -> dict:
    return json.loads((store / spec.sweep / spec.trial_id / "train.json").read_text())


def curve(rec: dict) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in rec["log_history"] if "loss" in e]


def assert_same_curve(a: dict, b: dict, what: str) -> None:
    assert a["steps"] == b["steps"], what
    ca, cb = curve(a), curve(b)
    assert [s for s, _ in ca] == [s for s, _ in cb], what
    worst = max(abs(x - y) for (_, x), (_, y) in zip(ca, cb))
    assert worst <= LOSS_TOL, f"{what}: losses differ by up to {worst:.2e}: {ca} vs {cb}"


def progress_lines(output: str) -> list[str]:
    return [ln.split("]: ", 1)[1].split(" tok/s")[0] for ln in output.splitlines() if "]: step " in ln]


@pytest.fixture(scope="module")
def sft(tiny_model, hooks, tmp_path_factory):
    """One SFT trial (16 rows, global batch 8, 10 steps): 1 process, then 2 processes (DDP) through the entry
    script with every store write logged."""
    root = tmp_path_factory.mktemp("sft")
    spec = spec_for(tiny_model, "sft", {"name": "t", "lr": 5.0e-3, "epochs": 5}, root / "spec.json")
    one = launch(root / "spec.json", root / "one", env_for(hooks), processes=None)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    writes = root / "writes.log"
    two = launch(root / "spec.json", root / "two", env_for(hooks, FINESWEEP_TEST_WRITE_LOG=str(writes)), 2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    return {"spec": spec, "root": root, "one": one, "two": two, "writes": writes.read_text().splitlines()}


def test_two_processes_train_the_one_process_curve(sft):
    spec, one, two = sft["spec"], record(sft["root"] / "one", sft["spec"]), record(sft["root"] / "two", sft["spec"])
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["global_batch"] == two["global_batch"] == 8 and two["per_process_batch"] == 4
    assert two["distributed"] == "ddp" and two["cpu_threads_per_process"] >= 1
    assert one["steps"] == 10, "16 rows at a global batch of 8 for 5 epochs"
    assert_same_curve(one, two, "1 process vs 2 (DDP)")
    assert two["train_tokens"] == one["train_tokens"], "every row once per epoch, counted over both ranks"
    assert spec.trial_id == one["trial_id"] == two["trial_id"]


def test_one_writer_and_each_progress_line_once(sft):
    spec, writes = sft["spec"], sft["writes"]
    prefix = f"{spec.sweep}/{spec.trial_id}"
    by_key = Counter(line.split()[2] for line in writes if line.startswith("write_bytes"))
    assert {line.split()[1] for line in writes} == {"0"}, f"only rank 0 touches the store: {writes}"
    assert by_key and set(by_key.values()) == {1}, f"every object written once: {by_key}"
    assert {f"{prefix}/{TRAINED}", f"{prefix}/train.json", f"{prefix}/spec.json",
            f"{prefix}/adapter/adapter_model.safetensors"} <= set(by_key)
    assert [line.split()[2] for line in writes if line.startswith("write_bytes")][-1] == f"{prefix}/{TRAINED}", \
        "the marker is written last"
    LocalStore(sft["root"] / "two").verify_marker(f"{prefix}/{TRAINED}")

    out = sft["two"].stdout
    lines = progress_lines(out)
    assert len(lines) == 10 and len(set(lines)) == len(lines), f"each progress line once: {lines}"
    assert lines == progress_lines(sft["one"].stdout), "the same steps and losses as one process"
    assert out.count("saved adapter and train.json") == 1
    assert "rank 1/2" not in out, "the other rank logs only warnings and errors"


def test_sigterm_stops_both_ranks_at_one_step_and_the_resume_matches(sft, hooks):
    """SIGTERM to the entry script (what tini passes on from the kubelet) reaches both ranks through the
    launcher; they agree on one stop step, one checkpoint holds both ranks' RNG states, the script exits 143, and
    the restarted 2-process run reproduces the uninterrupted 2-process curve."""
    spec, root = sft["spec"], sft["root"]
    store_dir = root / "preempted"
    env = env_for(hooks, FINESWEEP_PROCESSES="2")
    kill_at = random.Random().randint(2, 6)
    proc = subprocess.Popen([str(ENTRY), "--spec", str(root / "spec.json"), "--store", str(store_dir)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if f"]: step {kill_at}/" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == exitcodes.PREEMPTED, "".join(output)[-4000:]
    text = "".join(output)
    store = LocalStore(store_dir)
    prefix = f"{spec.sweep}/{spec.trial_id}"
    assert not store.exists(f"{prefix}/{TRAINED}")
    marker = store.verify_marker(f"{prefix}/checkpoint/_CHECKPOINT")
    assert kill_at <= marker["step"] < 10, text[-3000:]
    saved = {Path(k).name for k in marker["files"]}
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= saved, saved
    assert text.count("checkpoint checkpoint-") == 1, "one checkpoint, uploaded once"
    stops = re.findall(r"stopped at step (\d+) on SIGTERM", text)
    assert stops == [str(marker["step"])] * 2, f"both ranks stopped at the checkpoint's step: {stops}"

    resumed = launch(root / "spec.json", store_dir, env, 2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from checkpoint-{marker['step']}" in resumed.stdout
    assert_same_curve(record(root / "two", spec), record(store_dir, spec), "resumed vs uninterrupted (2 processes)")
    assert store.list(f"{prefix}/checkpoint/") == []


def test_an_error_on_the_other_rank_is_the_failure_reason(sft, hooks, tmp_path):
    spec = sft["spec"]
    run = launch(sft["root"] / "spec.json", tmp_path / "store", env_for(hooks, FINESWEEP_TEST_FAIL="1:3"), 2)
    assert run.returncode == exitcodes.FAILED, run.stdout[-2000:] + run.stderr[-3000:]
    lines = (run.stdout + run.stderr).splitlines()
    # submitter/local.run_phase takes the last line with " ERROR " (or "Error") as the reason
    reason = next(ln for ln in reversed(lines) if " ERROR " in ln or "Error" in ln)
    assert "rank 1 of 2 failed first" in reason and "RuntimeError: injected failure at step 3" in reason, reason
    assert not LocalStore(tmp_path / "store").exists(f"{spec.sweep}/{spec.trial_id}/{TRAINED}")


def test_a_batch_that_does_not_split_is_a_configuration_error(tiny_model, hooks, tmp_path):
    spec_for(tiny_model, "sft", {"name": "odd", "lr": 5.0e-3, "epochs": 1, "batch_size": 3}, tmp_path / "spec.json")
    run = launch(tmp_path / "spec.json", tmp_path / "store", env_for(hooks), 2)
    assert run.returncode == exitcodes.CONFIG_ERROR, run.stdout[-2000:] + run.stderr[-3000:]
    reason = next(ln for ln in reversed(run.stderr.splitlines()) if " ERROR " in ln)
    assert "batch_size 3 is the global batch" in reason and "2 training processes" in reason, reason


def test_processes_setting_is_checked(tmp_path):
    bad = launch(tmp_path / "spec.json", tmp_path / "store", env_for(tmp_path), None)  # no spec: exit 3
    assert bad.returncode == exitcodes.CONFIG_ERROR
    for value, message in (("two", "FINESWEEP_PROCESSES must be a whole number"),
                           ("0", "FINESWEEP_PROCESSES must be at least 1")):
        run = launch(tmp_path / "spec.json", tmp_path / "store", env_for(tmp_path, FINESWEEP_PROCESSES=value), None)
        assert run.returncode == exitcodes.CONFIG_ERROR and message in run.stderr, run.stderr
    gpu = launch(tmp_path / "spec.json", tmp_path / "store",
                 env_for(tmp_path, FINESWEEP_NUM_GPUS="2", FINESWEEP_PROCESSES="3"), None)
    assert gpu.returncode == exitcodes.CONFIG_ERROR and "one process per GPU" in gpu.stderr, gpu.stderr


def test_deepspeed_zero2_on_cpu_trains_the_ddp_curve(sft, hooks):
    """The image's ZeRO-2 config, 2 CPU processes (DeepSpeed's CPU accelerator over gloo)."""
    spec, root = sft["spec"], sft["root"]
    run = launch(root / "spec.json", root / "zero2", env_for(hooks), 2, config=ZERO2, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    zero2 = record(root / "zero2", spec)
    assert zero2["distributed"] == "deepspeed-zero2" and zero2["processes"] == 2
    assert_same_curve(record(root / "two", spec), zero2, "ZeRO-2 vs DDP (2 processes)")
    assert len(progress_lines(run.stdout)) == 10


def test_dpo_two_processes_and_zero2_match_one_process(sft, tiny_model, hooks, tmp_path):
    """DPO: the precomputed reference pass (a second DeepSpeed engine under ZeRO-2) and training, on 1 process, 2
    (DDP) and 2 (ZeRO-2), from the same SFT start."""
    sft_spec = sft["spec"]
    spec = spec_for(tiny_model, "dpo", {"name": "d", "lr": 5.0e-3, "beta": 0.1, "epochs": 2}, tmp_path / "spec.json",
                    start=StartRef(sft_spec.sweep, sft_spec.trial_id))
    runs = {}
    for name, processes, config in (("one", None, None), ("ddp", 2, None), ("zero2", 2, ZERO2)):
        store = tmp_path / name
        shutil.copytree(sft["root"] / "one" / sft_spec.sweep, store / sft_spec.sweep)  # the start adapter
        started = time.time()
        run = launch(tmp_path / "spec.json", store, env_for(hooks), processes, config=config, timeout=900)
        assert run.returncode == 0, f"{name}: " + run.stdout[-3000:] + run.stderr[-3000:]
        runs[name] = record(store, spec)
        runs[name]["_wall"] = time.time() - started
    assert runs["one"]["steps"] == 4
    assert [r["distributed"] for r in runs.values()] == ["none", "ddp", "deepspeed-zero2"]
    assert_same_curve(runs["one"], runs["ddp"], "DPO: 1 process vs 2 (DDP)")
    assert_same_curve(runs["ddp"], runs["zero2"], "DPO: ZeRO-2 vs DDP")
    margins = [[e.get("rewards/margins") for e in r["log_history"] if "loss" in e] for r in runs.values()]
    assert margins[0][0] == pytest.approx(0.0, abs=1e-6), "step 1 starts at the reference (the SFT model)"
    for other in margins[1:]:
        assert other == pytest.approx(margins[0], abs=1e-3)
