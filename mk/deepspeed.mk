# DeepSpeed in .venv (included by the main Makefile), for the tests that run the image's ZeRO-2 accelerate config
# on CPU (tests/test_multiprocess.py). Kept out of scripts/setup.sh on purpose: DeepSpeed is an sdist built once
# into the wheelhouse by `make deepspeed-wheel` (mk/images.mk), and a plain `make setup` must not need it.
#   make deepspeed-venv   build the wheel if it is not in the wheelhouse, then install it into .venv (offline)
# It holds scripts/setup.sh's lock while installing, so it never runs during a .venv rebuild. Re-runs are no-ops while .venv has that version; a `make setup` that rebuilds .venv drops it, the next
# test-unit/test-fast puts it back.

.PHONY: deepspeed-venv

deepspeed-venv: deepspeed-wheel
	@if [ "$$($(PY) -c 'from importlib.metadata import version; print(version("deepspeed"))' 2>/dev/null)" = "$(DEEPSPEED_VERSION)" ]; then \
	  :; \
	elif ls "$(WHEELHOUSE)"/deepspeed-$(DEEPSPEED_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "deepspeed-venv: installing deepspeed $(DEEPSPEED_VERSION) into .venv from $(WHEELHOUSE) (offline)"; \
	  flock "$(WHEELHOUSE)/.lock" $(PY) -m pip install --quiet --no-index --find-links "$(WHEELHOUSE)" deepspeed==$(DEEPSPEED_VERSION); \
	else \
	  echo "deepspeed-venv: no deepspeed $(DEEPSPEED_VERSION) wheel in $(WHEELHOUSE) (make deepspeed-wheel failed above)" >&2; \
	  exit 1; \
	fi

# The unit suites include the DeepSpeed ZeRO-2 CPU tests: they depend on it here rather than in the Makefile.
test-unit test-fast: deepspeed-venv
