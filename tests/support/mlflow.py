"""A real MLflow tracking server for tests: the `mlflow_server` fixture (session scope).

scripts/mlflow-server.sh builds the server's own venv once (~/.cache/finesweep/mlflow-venv, offline from a
wheelhouse; the full `mlflow` package cannot live in .venv next to the training stack) and runs
`mlflow server` on 127.0.0.1 and a free port, with a SQLite backend and artifacts in a pytest tmp dir. The tests
talk to it with the client the trainer and evaluator use (mlflow-skinny in .venv).

Use:
    from tests.support.mlflow import mlflow_server  # noqa: F401

    def test_x(mlflow_server, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "mlflow-server.sh"
HOST = "127.0.0.1"  # never anything else: the tests talk to this machine only
START_TIMEOUT = float(os.environ.get("FINESWEEP_MLFLOW_START_TIMEOUT", "300"))  # a loaded 2-core machine


def _die_with_parent() -> None:
    """In the child: SIGKILL me when pytest dies hard, so no orphan server keeps the port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.uri = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "server.log"

    def start(self) -> None:
        # Building the venv can take minutes the first time; it is its own step so its failure reads as such.
        setup = subprocess.run(["bash", str(SCRIPT), "setup"], capture_output=True, text=True, timeout=3600,
                               stdin=subprocess.DEVNULL)
        if setup.returncode != 0:
            raise RuntimeError(f"scripts/mlflow-server.sh setup failed ({setup.returncode}):\n{setup.stderr[-4000:]}")
        out = self.log.open("ab")
        self.proc = subprocess.Popen(["bash", str(SCRIPT), "serve", str(self.data_dir), str(self.port)],
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy at {self.uri} after {START_TIMEOUT:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # Its own session: the script execs mlflow, which starts uvicorn workers; end that group only.
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()
