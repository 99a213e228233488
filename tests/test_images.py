"""The trainer and evaluator images, built offline (make images) and run here with Docker.

Checks what a cluster relies on: non-root uid 1000, tini as PID 1 forwarding SIGTERM, the entrypoint commands,
only the code the image needs, no credentials in the image; then a whole trial in the containers: train and
evaluate the tiny model against a real MinIO, and `make report` reads the results back from it.
First run on a machine: base rootfs (~1 min), DeepSpeed wheel (~1 min) and the images (~2.5 min); then seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from finesweep.store import S3Store, trial_state
from tests.support.minio import minio_server  # noqa: F401  (session fixture; conftest.py may import it too)

from .conftest import ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TAG = "pytest"
TRAINER = f"finesweep/trainer:{TAG}"
EVALUATOR = f"finesweep/evaluator:{TAG}"
CONTROLLER = f"finesweep/controller:{TAG}"
DOCKER = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else "docker"
# Values that must never end up in an image: set while building, searched for afterwards.
CANARY = "canary-" + uuid.uuid4().hex


def docker(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None,
           **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}... exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_in(image: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
    return docker("run", "--rm", "--network", "host", image, *cmd, **kw)


@pytest.fixture(scope="module")
def images():
    if os.geteuid() != 0 and not shutil.which("docker"):
        pytest.skip("no docker and not root: scripts/docker-up.sh cannot install it")
    up = subprocess.run(["bash", "scripts/docker-up.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                        stdin=subprocess.DEVNULL)
    assert up.returncode == 0, up.stdout + up.stderr
    # Credentials in the environment of the build must not reach the image (no build-arg, no ENV picks them up).
    env = {**os.environ, "AWS_ACCESS_KEY_ID": CANARY, "AWS_SECRET_ACCESS_KEY": CANARY, "HF_TOKEN": CANARY,
           "MINIO_ROOT_PASSWORD": CANARY}
    start = time.monotonic()
    build = subprocess.run(["make", "--no-print-directory", "images", f"VERSION={TAG}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-6000:]
    print(f"make images: {time.monotonic() - start:.0f}s\n" + build.stdout[-400:])
    return {"trainer": TRAINER, "evaluator": EVALUATOR, "controller": CONTROLLER}


def inspect(image: str) -> dict:
    return json.loads(docker("image", "inspect", image).stdout)[0]


@pytest.mark.parametrize("target", ["trainer", "evaluator"])
def test_runs_as_uid_1000_not_root(images, target):
    image = images[target]
    assert inspect(image)["Config"]["User"] == "1000:1000"
    out = run_in(image, "sh", "-c", "id -u; id -g; id -un; echo $HOME; echo $HF_HOME; pwd").stdout.split()
    assert out == ["1000", "1000", "finesweep", "/home/finesweep", "/home/finesweep/.cache/huggingface", "/app"]
    # The job's user can write its HOME / HF cache, not the code or the venv.
    probe = run_in(image, "sh", "-c", "mkdir -p $HF_HOME/hub && touch /app/x 2>/dev/null; echo $?; "
                   "touch /opt/venv/x 2>/dev/null; echo $?").stdout.split()
    assert probe == ["1", "1"]


@pytest.mark.parametrize("target,command", [("trainer", "finesweep-train"), ("evaluator", "finesweep-eval")])
def test_entrypoint_commands_help(images, target, command):
    image = images[target]
    cfg = inspect(image)["Config"]
    assert cfg["Entrypoint"] == ["/usr/local/bin/tini", "--"]
    assert cfg["Cmd"] == [command, "--help"]
    default = run_in(image)  # the image's default command is its --help
    assert "--spec" in default.stdout and "--store" in default.stdout
    out = run_in(image, command, "--help").stdout
    assert "--spec" in out and "--store" in out
    # tini is PID 1 (signals forwarded, zombies reaped)
    assert run_in(image, "cat", "/proc/1/comm").stdout.strip() == "tini"


def test_trainer_gpu_count_and_deepspeed(images):
    bad = docker("run", "--rm", "--network", "host", "-e", "FINESWEEP_NUM_GPUS=two", images["trainer"],
                 "finesweep-train", "--spec", "x", "--store", "y", check=False)
    assert bad.returncode == 3 and "FINESWEEP_NUM_GPUS" in bad.stderr  # exitcodes.CONFIG_ERROR
    # 0 GPUs (this machine): plain python -m trainer, which rejects a missing spec file as a config error.
    missing = docker("run", "--rm", "--network", "host", images["trainer"], "finesweep-train",
                     "--spec", "/nonexistent.json", "--store", "/tmp/store", check=False)
    assert missing.returncode == 3, missing.stdout + missing.stderr
    # Several processes default to plain DDP (docs/benchmarks.md: for LoRA ZeRO-2 saves a few MB and is no
    # faster): no config is forced by the image. DeepSpeed and its ZeRO-2 config stay in the trainer image for
    # FINESWEEP_ACCELERATE_CONFIG=/app/images/accelerate/deepspeed-zero2.yaml.
    env = run_in(images["trainer"], "sh", "-c", "echo \"${FINESWEEP_ACCELERATE_CONFIG-unset}\"").stdout.split()
    assert env == ["unset"], env
    probe = run_in(images["trainer"], "python", "-c",
                   "import deepspeed, yaml; d = yaml.safe_load(open('/app/images/accelerate/ddp.yaml'));"
                   "c = yaml.safe_load(open('/app/images/accelerate/deepspeed-zero2.yaml'));"
                   "print(deepspeed.__version__, d['distributed_type'], c['distributed_type'],"
                   " c['deepspeed_config']['zero_stage'])",
                   check=False)
    if probe.returncode != 0 and "No module named 'deepspeed'" in probe.stderr:
        pytest.skip("trainer image built without DeepSpeed (no wheel in the wheelhouse)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[-3:] == ["MULTI_GPU", "DEEPSPEED", "2"], probe.stdout


def test_sigterm_reaches_python(images):
    """tini -> the command -> python: `docker stop` (what the kubelet does) lands in Python as SIGTERM."""
    name = f"finesweep-sigterm-{uuid.uuid4().hex[:8]}"
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    docker("run", "-d", "--name", name, "--network", "host", images["evaluator"], "python", "-c", code)
    try:
        deadline = time.monotonic() + 60
        while "ready" not in docker("logs", name).stdout:
            assert time.monotonic() < deadline, "container never got ready"
            time.sleep(0.2)
        start = time.monotonic()
        docker("stop", "-t", "30", name)
        assert time.monotonic() - start < 10  # not the 30 s SIGKILL fallback
        assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "143"
    finally:
        docker("rm", "-f", name, check=False)


FAKE_ACCELERATE = """#!/bin/sh
# Stands in for `accelerate launch` the way torch's elastic launcher behaves: on SIGTERM it stops its workers,
# then dies of an exception (exit 1).
echo "launch $*"
trap 'echo "launcher got TERM"; sleep 1; exit 1' TERM
while :; do sleep 0.1; done
"""


def test_multi_gpu_launch_is_preemptible(images, tmp_path):
    """N >= 2 GPUs: finesweep-train runs accelerate with the DDP config, forwards SIGTERM to it, and exits 143
    (exitcodes.PREEMPTED) even though the launcher itself exits 1 on SIGTERM."""
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    (fake / "accelerate").write_text(FAKE_ACCELERATE)
    for p in (tmp_path, fake, fake / "accelerate"):
        p.chmod(0o755)
    name = f"finesweep-multigpu-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "--network", "host", "-v", f"{fake}:/fake:ro",
           "-e", "PATH=/fake:/opt/venv/bin:/usr/local/bin:/usr/bin:/bin", "-e", "FINESWEEP_NUM_GPUS=2",
           images["trainer"], "finesweep-train", "--spec", "/x y.json", "--store", "s3://b/p")
    try:
        deadline = time.monotonic() + 60
        while "launch" not in docker("logs", name).stdout:
            assert time.monotonic() < deadline, docker("logs", name).stderr
            time.sleep(0.2)
        docker("stop", "-t", "30", name)
        logs = docker("logs", name)
        assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "143", logs.stderr
        assert ("launch --config_file /app/images/accelerate/ddp.yaml --num_processes 2 -m trainer "
                "--spec /x y.json --store s3://b/p") in logs.stdout
        assert "launcher got TERM" in logs.stdout
    finally:
        docker("rm", "-f", name, check=False)


@pytest.mark.parametrize("target", ["trainer", "evaluator", "controller"])
def test_only_needed_code_and_no_credentials(images, target):
    image = images[target]
    # The code is a package in /opt/venv (commit d56f99e); /app holds only the trainer's accelerate configs.
    expected = {"images"} if target == "trainer" else set()
    as_root = ("run", "--rm", "--network", "host", "--user", "0", image)  # to see into /root as well
    listing = docker(*as_root, "sh", "-c", "ls -A /app; echo ---; ls -A /home/finesweep; echo ---; ls -A /root"
                     ).stdout.split("---")
    assert set(listing[0].split()) == expected
    assert set(listing[1].split()) <= {".cache", ".bashrc", ".profile", ".bash_logout"}
    for leaked in (".aws", ".docker", ".git", ".venv", ".netrc", ".env"):
        assert leaked not in listing[1].split() + listing[2].split()
    found = docker(*as_root, "sh", "-c", "find / -xdev \\( -name .git -o -name .venv -o -name tests -path '/app/*' "
                   "-o -name .aws -o -name credentials -path '*aws*' \\) 2>/dev/null | head").stdout.strip()
    assert found == ""

    cfg = inspect(image)["Config"]
    env_names = {e.split("=", 1)[0] for e in cfg["Env"]}
    secretish = ("AWS_", "MINIO_", "TOKEN", "SECRET", "PASSWORD", "KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    assert not [n for n in env_names if any(s in n for s in secretish)], env_names
    assert "MLFLOW_DISABLE_TELEMETRY=true" in cfg["Env"]  # MLflow's client would report usage home
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    text = json.dumps(cfg) + history
    assert CANARY not in text
    for needle in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MINIO_ROOT_PASSWORD", "HF_TOKEN"):
        assert needle not in text, needle


def test_controller_image_runs_the_cli_without_torch(images):
    image = images["controller"]
    assert inspect(image)["Config"]["User"] == "1000:1000"
    out = run_in(image, "finesweep", "--help").stdout
    assert "controller" in out and "submit" in out, out
    assert "controller" in run_in(image, "finesweep", "controller", "--help").stdout
    # What the controller imports on its path, and no torch: a small image that never trains.
    probe = run_in(image, "python", "-c", "import submitter.controller, evaluator.report, finesweep.stats, kubernetes, "
                   "boto3, matplotlib, sacrebleu, optuna, mlflow; import importlib.util as u; print(u.find_spec('torch'))")
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr


# ---------------------------------------------------------------------------------------------- a trial in containers
SMOKE_SWEEP = """\
# One SFT trial of the smoke sweep, run by tests/test_images.py in the containers.
name: {name}
stage: sft
model: build/tiny-llama
dataset:
  path: tests/fixtures/datasets/databricks-dolly-15k
  format: dolly
  split: train
  test_fraction: 0.2
  seed: 42
prompt_format: chat
max_length: 128
eval: {{set: sft-open-questions, max_new_tokens: 16, batch_size: 12, heldout_rows: 8, bootstrap_samples: 100}}
select: {{metric: heldout_perplexity}}
defaults: {{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj], batch_size: 4, epochs: 1}}
trials:
  - {{name: lr-high, lr: 5.0e-3}}
"""


def test_trial_in_containers_against_minio(images, tiny_model, minio_server, tmp_path, monkeypatch):  # noqa: F811
    from finesweep.spec import load_sweeps, to_dict

    sweep_name = f"img-smoke-{uuid.uuid4().hex[:6]}"
    sweep_file = tmp_path / f"{sweep_name}.yaml"
    sweep_file.write_text(SMOKE_SWEEP.format(name=sweep_name))
    (sweep,) = load_sweeps(sweep_file)
    specs = sweep.reference_specs() + sweep.trial_specs()

    bucket = minio_server.bucket("finesweep-images")
    store_url = f"s3://{bucket}/{sweep_name}-store"
    # Specs are mounted read-only; the container user (uid 1000) must be able to read them.
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    for spec in specs:
        (spec_dir / f"{spec.trial_id}.json").write_text(json.dumps(to_dict(spec), indent=2))
    for p in [tmp_path, spec_dir, *spec_dir.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)

    # The containers run as uid 1000: give them a world-readable copy of the tiny model (the builder writes
    # model.safetensors 0600, readable by its root owner only).
    model_dir = tmp_path / "tiny-llama"
    shutil.copytree(tiny_model, model_dir)
    for p in [model_dir, *model_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)

    # Credentials go by name (-e NAME), values from the docker CLI's environment: never on a command line.
    s3 = minio_server.env()
    env = {**os.environ, **s3}
    mounts = ["-v", f"{model_dir}:/app/build/tiny-llama:ro",
              "-v", f"{ROOT / 'tests' / 'fixtures' / 'datasets'}:/app/tests/fixtures/datasets:ro",
              "-v", f"{spec_dir}:/specs:ro"]
    # As in the Job manifests: read-only root filesystem, writable scratch paths mounted explicitly.
    writable = ["--read-only", "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/home/finesweep/.cache:rw,uid=1000,gid=1000",
                "--tmpfs", "/work:rw,uid=1000,gid=1000"]
    base = ["run", "--rm", "--network", "host", *writable, *mounts, *[a for n in s3 for a in ("-e", n)],
            "-e", "HF_HUB_OFFLINE=1", "-e", "HF_DATASETS_OFFLINE=1", "-e", "FINESWEEP_NUM_GPUS=0"]
    for spec in specs:
        args = ["--spec", f"/specs/{spec.trial_id}.json", "--store", store_url]
        if spec.trains:
            train = docker(*base, images["trainer"], "finesweep-train", *args, env=env, check=False, timeout=1200)
            assert train.returncode == 0, f"train {spec.name}:\n{train.stdout[-3000:]}\n{train.stderr[-5000:]}"
        ev = docker(*base, images["evaluator"], "finesweep-eval", *args, env=env, check=False, timeout=1200)
        assert ev.returncode == 0, f"eval {spec.name}:\n{ev.stdout[-3000:]}\n{ev.stderr[-5000:]}"

    # Read back from MinIO on the host, as the submitter does.
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # resolve the credentials set here, not cached ones
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    store = S3Store(store_url)
    for spec in specs:
        assert trial_state(store, spec.sweep, spec.trial_id) == "done", spec.name
        store.verify_marker(f"{spec.sweep}/{spec.trial_id}/_DONE")
    trained = next(s for s in specs if s.trains)
    assert store.read_json(f"{sweep_name}/{trained.trial_id}/train.json")  # written in the trainer container

    report = subprocess.run(["make", "--no-print-directory", "report", f"SWEEP={sweep_file}",
                             f"STORE={store_url}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    local = ROOT / "build" / "reports" / sweep_name / "report.md"
    try:
        text = local.read_text()
        assert "| **best** |" in text and "lr-high" in text
    finally:
        shutil.rmtree(local.parent, ignore_errors=True)
