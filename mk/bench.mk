# Speed benchmark (included by the main Makefile; docs/benchmarks.md).
#   make bench            users' recipe vs finesweep defaults (training) + evaluator, on this machine's device:
#                         CUDA -> the full TinyLlama-1.1B architecture, CPU -> the scaled-down model (~4 min)
#                         results: docs/benchmarks/<device>/{results.md,plot.png,train.json,eval.json,meta.json}
#   make bench BENCH_ARGS="--model real"
#                         SmolLM2-135M-Instruct (make real-model) on this device: users' recipe, each speed lever
#                         on top of the previous, finesweep's defaults; 3 rounds, medians (~40 min on 2 CPU cores)
#                         results: docs/benchmarks/<device>-smollm2/{results.md,plot.png,train.json,summary.json,meta.json}
# Knobs: BENCH_ARGS (e.g. "--size full", "--skip-eval", "--out DIR", "--model real --repeats 3 --ladder-repeats 1").

BENCH_ARGS ?=

.PHONY: bench

# The real model is built first when BENCH_ARGS asks for it (make real-model is idempotent).
bench: setup $(if $(findstring --model real,$(BENCH_ARGS)),real-model)
	BENCH_ARGS="$(BENCH_ARGS)" $(PY) -m bench $(BENCH_ARGS)
