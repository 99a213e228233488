# Stage models and datasets into the store (included by the main Makefile; finesweep/staging.py, README "Using it").
#   make stage SOURCES="build/tiny-llama tests/fixtures/datasets/databricks-dolly-15k" [STORE=s3://...]
#                         each SOURCE (a local folder or file, or a Hub id) copied once with checksums; trial pods
#                         then load it from the store by the name the sweep uses (HF_HUB_OFFLINE=1 works);
#                         a Hub dataset id needs STAGE_KIND=datasets (a Hub id is taken for a model otherwise)

SOURCES ?=
REVISION ?=
STAGE_KIND ?=

.PHONY: stage

stage: setup
	@test -n "$(SOURCES)" || { echo "make stage: SOURCES is empty. Fix: SOURCES=\"<model or dataset as the sweep names it> ...\"" >&2; exit 2; }
	$(SUBMIT) stage $(SOURCES) --store $(STORE) $(if $(REVISION),--revision $(REVISION)) $(if $(STAGE_KIND),--kind $(STAGE_KIND))
