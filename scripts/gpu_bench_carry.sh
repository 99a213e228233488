#!/usr/bin/env bash
# What scripts/gpu_bench.sh needs on a lent GPU machine, in one folder of at most 64 MiB (the device tool's
# limit), made here from the wheelhouse, ../shared/data and build/smollm2-135m-instruct:
#   bash scripts/gpu_bench_carry.sh [DIR=.devcarry]
# whl/: this project's versions of what the machine's image lacks or has older (its Python is 3.12; pure-Python
# wheels from the wheelhouse, multiprocess for 3.12 from PyPI); data/; smollm2/ (no weights).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.devcarry}
wheelhouse=${WHEELHOUSE:-$HOME/.cache/finesweep/wheelhouse}
rm -rf "$dir" && mkdir -p "$dir/whl" "$dir/data" "$dir/smollm2"
for name in transformers-5.23.0 trl-1.16.0 datasets-5.2.0 peft-0.21.2 dill-0.4.1 fsspec-2026.9.0 accelerate-1.15.0; do
  cp "$wheelhouse/$name"-py3-none-any.whl "$dir/whl/"
done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dir/whl" multiprocess==0.70.19
cp -r ../shared/data/gsm8k ../shared/data/hh-rlhf ../shared/data/tokenizer-llama2 "$dir/data/"
find build/smollm2-135m-instruct/ -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$dir/smollm2/" \;
exclude="$(git rev-parse --git-common-dir)/info/exclude"; grep -qx '/.devcarry/' "$exclude" 2>/dev/null || echo '/.devcarry/' >> "$exclude"
du -sh "$dir"
