# finesweep: LoRA SFT -> DPO sweeps, locally or as Kubernetes Jobs.
#   make submit SWEEP=smoke          set up (idempotent), build the tiny model, run jobs/smoke.yaml locally
#   make submit SWEEP=real           the same on the real chat model (make real-model: SmolLM2-135M-Instruct)
#   make test                        every test suite (what CI runs): test-unit, then e2e on a local cluster
#   make status|logs|report|cancel SWEEP=...   the sweep's trials, logs, reports; cancel stops its Jobs (k8s)
# Every target runs the installed console script .venv/bin/finesweep (the same as `finesweep --help`).
# Knobs: SWEEP (name under jobs/ or a path), STORE (folder or s3://bucket/prefix), BACKEND (local | k8s),
#        DRY_RUN=1 (k8s: print the manifests, touch nothing), WAIT=1 (k8s: follow the controller to the end),
#        TRIAL (for make logs),
#        NAMESPACE / KUBE_CONTEXT (k8s).

SHELL := /bin/bash
SWEEP ?= smoke
STORE ?= artifacts
BACKEND ?= local
DRY_RUN ?=
WAIT ?=
TRIAL ?=
NAMESPACE ?=
KUBE_CONTEXT ?=
K8S_FLAGS = $(if $(NAMESPACE),--namespace $(NAMESPACE)) $(if $(KUBE_CONTEXT),--kube-context $(KUBE_CONTEXT))
PY := .venv/bin/python
SUBMIT := .venv/bin/finesweep

.PHONY: setup tiny-model submit status report logs cancel test test-unit test-fast clean
.DEFAULT_GOAL := help

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

setup:
	@bash scripts/setup.sh

build/tiny-llama/finesweep-tiny.json: trainer/tiny_model.py | setup
	$(PY) -m trainer.tiny_model build/tiny-llama --force

# The second tiny family behaves like SmolLM2 (ChatML, no BOS, pad = EOS = <|im_end|>, tied embeddings, a template
# that injects a system prompt): tests run on both, so no test leans on one tokenizer's habits.
build/tiny-chatml/finesweep-tiny.json: trainer/tiny_model.py | setup
	$(PY) -m trainer.tiny_model build/tiny-chatml --family chatml --force

tiny-model: setup build/tiny-llama/finesweep-tiny.json build/tiny-chatml/finesweep-tiny.json

submit: setup tiny-model $(if $(filter real,$(SWEEP)),real-model)
	$(SUBMIT) submit $(SWEEP) --store $(STORE) --backend $(BACKEND) $(K8S_FLAGS) $(if $(DRY_RUN),--dry-run) $(if $(WAIT),--wait)

status: setup
	$(SUBMIT) status $(SWEEP) --store $(STORE) --backend $(BACKEND) $(K8S_FLAGS)

report: setup
	$(SUBMIT) report $(SWEEP) --store $(STORE)

logs: setup
	$(SUBMIT) logs $(SWEEP) --trial "$(TRIAL)" --store $(STORE) --backend $(BACKEND) $(K8S_FLAGS)

cancel: setup
	$(SUBMIT) cancel $(SWEEP) --store $(STORE) --backend $(BACKEND) $(K8S_FLAGS)

test: test-unit e2e

test-unit: setup tiny-model real-model
	$(PY) -m pytest -q tests --ignore=tests/e2e

test-fast: setup tiny-model real-model
	$(PY) -m pytest -q tests --ignore=tests/e2e -m "not slow"

clean:
	rm -rf build artifacts

-include mk/*.mk
