#!/usr/bin/env bash
# An MLflow tracking server on 127.0.0.1, from a venv of its own (~/.cache/finesweep/mlflow-venv).
#
#   scripts/mlflow-server.sh setup              # build the venv only (idempotent)
#   scripts/mlflow-server.sh serve DIR [PORT]   # build if needed, then run the server in the foreground:
#                                               #   sqlite:///DIR/mlflow.db, artifacts in DIR/artifacts,
#                                               #   PORT (default: a free one), printed as `mlflow-server: URI`
#
# The full `mlflow` package pins dependencies (pyarrow, ...) that clash with the training stack, so it never goes
# into .venv: the trainer and evaluator use the client, mlflow-skinny. Like scripts/setup.sh, the wheels are
# downloaded once into a wheelhouse keyed by requirements/mlflow-server.txt's hash, and the venv is installed
# offline from it (a re-run, or a fresh venv, needs no network).
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=requirements/mlflow-server.txt
WHEELHOUSE="${FINESWEEP_MLFLOW_WHEELHOUSE:-$HOME/.cache/finesweep/mlflow-wheelhouse}"
VENV="${FINESWEEP_MLFLOW_VENV:-$HOME/.cache/finesweep/mlflow-venv}"
PYTHON="${PYTHON:-python3}"
key=$(sha256sum "$REQS" | cut -c1-16)

setup() {
  mkdir -p "$WHEELHOUSE"
  # One set-up at a time (parallel test workers): the others wait, then find it done.
  exec 9>"$WHEELHOUSE/.lock"
  flock 9
  if [ ! -f "$WHEELHOUSE/.complete-$key" ]; then
    echo >&2 "mlflow-server: downloading wheels into $WHEELHOUSE (once per $REQS change)"
    "$PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" -r "$REQS"
    touch "$WHEELHOUSE/.complete-$key"
  fi
  if [ ! -f "$VENV/.complete-$key" ]; then
    echo >&2 "mlflow-server: installing $VENV from the wheelhouse (offline)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELHOUSE" -r "$REQS"
    touch "$VENV/.complete-$key"
  fi
  exec 9>&-
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "${1:-}" in
  setup)
    setup
    ;;
  serve)
    dir="${2:?usage: $0 serve DIR [PORT]}"
    port="${3:-$(free_port)}"
    setup
    mkdir -p "$dir/artifacts"
    dir=$(cd "$dir" && pwd)
    echo >&2 "mlflow-server: http://127.0.0.1:$port (store $dir)"
    # --artifacts-destination + serving artifacts: clients upload through the server's REST API, so a trial pod
    # needs no access to the server's disk. One worker: a test server, and the CPUs are shared.
    export MLFLOW_DISABLE_TELEMETRY=true  # the server too would report usage to mlflow-telemetry.io
    exec "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$port" --workers 1 \
      --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "$dir/artifacts" --serve-artifacts
    ;;
  *)
    echo >&2 "usage: $0 setup | serve DIR [PORT]"
    exit 2
    ;;
esac
