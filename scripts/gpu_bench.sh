#!/usr/bin/env bash
# The GPU part of `make bench` (issue 20), for a lent device machine that has PyTorch but not this project's
# Python packages, data or real weights, and takes at most 64 MiB along:
#   bash scripts/gpu_bench.sh real|tiny CARRY OUT
# CARRY (made here by `scripts/gpu_bench_carry.sh`): whl/ (transformers, trl, datasets, peft and what they need
# that the machine lacks), data/ (../shared/data: GSM8K, HH-RLHF, the Llama-2 tokenizer), smollm2/ (the real
# model's folder without its 514 MB of weights). OUT gets meta.json, <part>/train.json (+ the tiny part's report)
# and <part>.log.
#   real: SmolLM2-135M-Instruct's architecture, tokenizer and chat template with random-init weights (speed and
#         memory depend on shapes and token counts, not on weight values), users' recipe vs finesweep's defaults,
#         ROUNDS rounds (default 2), the same rows and recipe as the CPU run (bench.bench_train, --model real).
#   tiny: `python -m bench` as `make bench` runs it on CUDA: TinyLlama-1.1B's architecture (random init), users vs
#         finesweep, then the evaluator benchmark, with its report.
# Each part runs under its own time limit (REAL_S / TINY_S seconds) so the results written so far come back.
# The report and the comparison with the CPU ratios are made afterwards on any machine:
#   .venv/bin/python -m bench --model real --skip-train --out docs/benchmarks/cuda-<gpu>-smollm2
set -uo pipefail
part=${1:?real or tiny}
carry=$(cd "${2:?carry folder}" && pwd)
out=${3:?out folder}
PY=${PY:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1

if [ -z "${SKIP_PIP:-}" ] && [ ! -f /tmp/site/.finesweep ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$carry"/whl/*.whl || exit 1
  touch /tmp/site/.finesweep
fi
[ -z "${SKIP_PIP:-}" ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# bench/ reads ../shared/data beside the repository, as on a developer's machine.
mkdir -p ../shared/data && cp -rn "$carry"/data/. ../shared/data/
"$PY" - "$out/meta.json" <<'EOF'
import json, sys
from bench.report import meta
json.dump(meta("scripts/gpu_bench.sh"), open(sys.argv[1], "w"), indent=2)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"

case "$part" in
  real)
    if [ ! -f build/smollm2-135m-instruct/model.safetensors ]; then
      "$PY" -c "from pathlib import Path; from bench.model import build_real_architecture as b; \
b(Path('$carry/smollm2'), Path('build/smollm2-135m-instruct'))" || exit 1
    fi
    timeout "${REAL_S:-270}" "$PY" -m bench.bench_train --model-name real --repeats "${ROUNDS:-2}" \
      --only ${ONLY:-sft-users sft-finesweep dpo-users dpo-finesweep} --out "$out/real" 2>&1 | tee "$out/real.log"
    ;;
  tiny)
    timeout "${TINY_S:-240}" "$PY" -m bench --out "$out/tiny" ${TINY_ARGS:-} 2>&1 | tee "$out/tiny.log"
    ;;
  *) echo "part: real or tiny" >&2; exit 2 ;;
esac
ls -la "$out" "$out"/* 2>/dev/null | head -40
