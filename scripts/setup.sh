#!/usr/bin/env bash
# Idempotent set-up: a cached wheelhouse (downloaded once, reused by the venv and the images), .venv, and the
# project installed into it (.venv/bin/finesweep). Re-runs are no-ops unless requirements/*.txt or pyproject.toml
# changed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE="${FINESWEEP_WHEELHOUSE:-$HOME/.cache/finesweep/wheelhouse}"
PYTHON="${PYTHON:-python3}"
REQS=(requirements/train.txt requirements/dev.txt)
key=$(cat "${REQS[@]}" | sha256sum | cut -c1-16)

mkdir -p "$WHEELHOUSE"
# One set-up at a time (parallel make targets, a test and a user): the others wait, then find it done.
exec 9>"$WHEELHOUSE/.lock"
flock 9
if [ ! -f "$WHEELHOUSE/.complete-$key" ]; then
  echo >&2 "setup: downloading wheels into $WHEELHOUSE (torch is ~3 GB; once per requirements change)"
  "$PYTHON" -m pip download --quiet --dest "$WHEELHOUSE" $(printf -- '-r %s ' "${REQS[@]}")
  touch "$WHEELHOUSE/.complete-$key"
fi

if [ ! -f ".venv/.complete-$key" ]; then
  echo >&2 "setup: installing .venv from the wheelhouse (offline)"
  rm -rf .venv
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --no-index --find-links "$WHEELHOUSE" $(printf -- '-r %s ' "${REQS[@]}")
  touch ".venv/.complete-$key"
fi

# The project itself, editable (code changes need no re-install) and offline: --no-build-isolation uses the
# setuptools the venv already has from the wheelhouse, --no-deps because the pins above are installed.
# Re-run when pyproject.toml (entry points, package data) changes.
project_key=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f ".venv/.project-$project_key" ] || [ ! -x .venv/bin/finesweep ]; then
  echo >&2 "setup: installing finesweep into .venv (editable; console script .venv/bin/finesweep)"
  rm -f .venv/.project-*
  .venv/bin/pip install --quiet --no-index --no-deps --no-build-isolation -e .
  touch ".venv/.project-$project_key"
fi
echo >&2 "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers, trl, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")'))"
