# Export a finished trial (included by the main Makefile; trainer/export.py, README "Using it").
#   make export SWEEP=smoke-dpo [TRIAL=best] OUT=exports/smoke-dpo [STORE=...]
#                         merged fp32 model + adapter/ + README.md model card in OUT, after a logit check;
#                         SWEEP is the sweep's name in the store (a pipeline's sweeps by their own names)

OUT ?=

.PHONY: export

export: setup
	@test -n "$(OUT)" || { echo "make export: OUT is empty. Fix: OUT=<folder to create> or OUT=s3://bucket/prefix" >&2; exit 2; }
	$(SUBMIT) export $(SWEEP) $(or $(TRIAL),best) --store $(STORE) --out $(OUT)
