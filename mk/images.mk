# Container images and a dev MinIO (included by the main Makefile).
#   make docker-up        install (apt docker.io) and start the Docker engine if needed
#   make base-image       finesweep/base:bookworm-py311 from debootstrap (no registry pull)
#   make images           finesweep/{trainer,evaluator,controller}:$(VERSION), built offline
#   make minio            build the pinned MinIO server into ~/.cache/finesweep/bin (go install, once)
#   make minio-up         dev MinIO on 127.0.0.1:9000 (data under build/minio), bucket $(MINIO_BUCKET)
#   make minio-down       stop it
# Knobs: VERSION, DOCKER, IMAGE_PREFIX, WITH_DEEPSPEED (auto|1|0), BUILD_CACHE_KEEP, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD,
#        MINIO_ADDRESS, MINIO_BUCKET.

.PHONY: docker-up base-image wheelhouse deepspeed-wheel wheelhouse-image images image-trainer image-evaluator image-controller \
        minio minio-up minio-down minio-env

VERSION ?= $(shell git describe --tags --dirty 2>/dev/null || echo 0.1.0)
IMAGE_PREFIX ?= finesweep
# Debian's docker.io ships a 20.10 CLI at /usr/bin/docker with BuildKit built in; another `docker` earlier on PATH
# (a newer static CLI without the buildx plugin) cannot use BuildKit, so prefer the engine's own CLI.
DOCKER ?= $(shell [ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker)
BASE_IMAGE ?= $(IMAGE_PREFIX)/base:bookworm-py311
WHEELHOUSE ?= $(or $(FINESWEEP_WHEELHOUSE),$(HOME)/.cache/finesweep/wheelhouse)
DEEPSPEED_VERSION ?= 0.19.8
WITH_DEEPSPEED ?= auto
# Each wheelhouse change leaves a ~6 GB pip layer in the build cache; keep at most this much of it.
BUILD_CACHE_KEEP ?= 20GB
# The controller image (make cluster-load imports it next to trainer and evaluator: load-images.sh reads it).
CONTROLLER_IMAGE ?= $(IMAGE_PREFIX)/controller:$(VERSION)
export CONTROLLER_IMAGE
# --network none: the offline build must not need the network, and now cannot use it.
IMAGE_BUILD = DOCKER_BUILDKIT=1 $(DOCKER) build -f images/Dockerfile --progress=plain --network none \
	--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
	--build-arg DEEPSPEED_VERSION=$(DEEPSPEED_VERSION) --build-arg WITH_DEEPSPEED=$(WITH_DEEPSPEED)
# The wheels the images install, as an image (images/wheelhouse-image.sh prints its content-keyed tag).
WHEELHOUSE_IMAGE_CMD = FINESWEEP_WHEELHOUSE="$(WHEELHOUSE)" DOCKER=$(DOCKER) PY=$(PY) IMAGE_PREFIX=$(IMAGE_PREFIX) \
	DEEPSPEED_VERSION=$(DEEPSPEED_VERSION) bash images/wheelhouse-image.sh

docker-up:
	@bash scripts/docker-up.sh

base-image: docker-up
	@bash scripts/base-rootfs.sh

# The wheelhouse itself comes from scripts/setup.sh (the `setup` target), the same wheels the .venv uses.
wheelhouse: setup

# DeepSpeed is an sdist on PyPI whose build imports torch: build a pure-python wheel (no CUDA ops: DS_BUILD_OPS=0)
# once with the .venv's torch, and add its few runtime deps to the wheelhouse. Best effort: without it the
# trainer image is built without DeepSpeed (multi-GPU unavailable), which WITH_DEEPSPEED=1 turns into an error.
deepspeed-wheel: setup
	@if ls "$(WHEELHOUSE)"/deepspeed-$(DEEPSPEED_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "deepspeed-wheel: $(DEEPSPEED_VERSION) already in $(WHEELHOUSE)"; \
	else \
	  echo "deepspeed-wheel: building deepspeed $(DEEPSPEED_VERSION) (DS_BUILD_OPS=0) into $(WHEELHOUSE)"; \
	  { DS_BUILD_OPS=0 $(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w "$(WHEELHOUSE)" deepspeed==$(DEEPSPEED_VERSION) \
	    && $(PY) -m pip download --quiet --only-binary=:all: -d "$(WHEELHOUSE)" --find-links "$(WHEELHOUSE)" \
	         "$$(ls "$(WHEELHOUSE)"/deepspeed-$(DEEPSPEED_VERSION)-*.whl)" -r requirements/train.txt; } \
	  || { rm -f "$(WHEELHOUSE)"/deepspeed-$(DEEPSPEED_VERSION)-*.whl; \
	       echo "deepspeed-wheel: could not build it; the trainer image will have no DeepSpeed" >&2; }; \
	fi

wheelhouse-image: docker-up deepspeed-wheel
	@$(WHEELHOUSE_IMAGE_CMD) >/dev/null

# Both targets share every layer up to the code (OS, venv with the pinned wheels); the trainer adds DeepSpeed.
images: base-image deepspeed-wheel
	@start=$$(date +%s); \
	wheels=$$($(WHEELHOUSE_IMAGE_CMD)) \
	&& $(IMAGE_BUILD) --build-arg WHEELHOUSE_IMAGE=$$wheels --target trainer -t $(IMAGE_PREFIX)/trainer:$(VERSION) . \
	&& $(IMAGE_BUILD) --build-arg WHEELHOUSE_IMAGE=$$wheels --target evaluator -t $(IMAGE_PREFIX)/evaluator:$(VERSION) . \
	&& $(IMAGE_BUILD) --build-arg WHEELHOUSE_IMAGE=$$wheels --target controller -t $(IMAGE_PREFIX)/controller:$(VERSION) . \
	&& echo "images: built in $$(( $$(date +%s) - start ))s:" \
	&& $(DOCKER) images --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' $(IMAGE_PREFIX)/trainer:$(VERSION) \
	&& $(DOCKER) images --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' $(IMAGE_PREFIX)/evaluator:$(VERSION) \
	&& $(DOCKER) images --format '  {{.Repository}}:{{.Tag}}  {{.Size}}' $(IMAGE_PREFIX)/controller:$(VERSION) \
	&& $(DOCKER) image prune -f >/dev/null \
	&& $(DOCKER) builder prune -f --keep-storage $(BUILD_CACHE_KEEP) >/dev/null

image-trainer image-evaluator image-controller: image-%: base-image deepspeed-wheel
	wheels=$$($(WHEELHOUSE_IMAGE_CMD)) \
	&& $(IMAGE_BUILD) --build-arg WHEELHOUSE_IMAGE=$$wheels --target $* -t $(IMAGE_PREFIX)/$*:$(VERSION) .

# ------------------------------------------------------------------------------------------------ dev MinIO
MINIO_ROOT_USER ?= finesweep-dev
MINIO_ROOT_PASSWORD ?= finesweep-dev-secret
MINIO_ADDRESS ?= 127.0.0.1:9000
MINIO_CONSOLE_ADDRESS ?= 127.0.0.1:9001
MINIO_BUCKET ?= finesweep
MINIO_DIR := build/minio

minio:
	@bash scripts/install-minio.sh >/dev/null

minio-up: minio setup
	@mkdir -p $(MINIO_DIR)/data
	@if [ -f $(MINIO_DIR)/minio.pid ] && kill -0 "$$(cat $(MINIO_DIR)/minio.pid)" 2>/dev/null; then \
	  echo "minio-up: already running (pid $$(cat $(MINIO_DIR)/minio.pid)) on http://$(MINIO_ADDRESS)"; \
	else \
	  MINIO_ROOT_USER='$(MINIO_ROOT_USER)' MINIO_ROOT_PASSWORD='$(MINIO_ROOT_PASSWORD)' MINIO_UPDATE=off \
	    setsid nohup "$$(bash scripts/install-minio.sh 2>/dev/null)" server --quiet --address $(MINIO_ADDRESS) \
	    --console-address $(MINIO_CONSOLE_ADDRESS) $(MINIO_DIR)/data >$(MINIO_DIR)/minio.log 2>&1 </dev/null & \
	  echo $$! > $(MINIO_DIR)/minio.pid; \
	  for i in $$(seq 1 61); do \
	    [ $$i -le 60 ] || { echo "minio-up: not live after 30 s; see $(MINIO_DIR)/minio.log" >&2; exit 1; }; \
	    $(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
	      "http://$(MINIO_ADDRESS)/minio/health/live" 2>/dev/null && break; \
	    kill -0 "$$(cat $(MINIO_DIR)/minio.pid)" 2>/dev/null || { echo "minio-up: minio exited; see $(MINIO_DIR)/minio.log" >&2; tail -5 $(MINIO_DIR)/minio.log >&2; exit 1; }; \
	    sleep 0.5; \
	  done; \
	  echo "minio-up: running (pid $$(cat $(MINIO_DIR)/minio.pid)) on http://$(MINIO_ADDRESS), data in $(MINIO_DIR)/data"; \
	fi
	@FINESWEEP_S3_ENDPOINT=http://$(MINIO_ADDRESS) AWS_ACCESS_KEY_ID='$(MINIO_ROOT_USER)' \
	  AWS_SECRET_ACCESS_KEY='$(MINIO_ROOT_PASSWORD)' AWS_REGION=us-east-1 $(PY) -c \
	  'import os, sys, boto3; c = boto3.client("s3", endpoint_url=os.environ["FINESWEEP_S3_ENDPOINT"]); b = sys.argv[1]; \
	  names = [x["Name"] for x in c.list_buckets().get("Buckets", [])]; (b in names) or c.create_bucket(Bucket=b)' $(MINIO_BUCKET)
	@$(MAKE) --no-print-directory minio-env

# `eval "$(make -s minio-env)"` puts the variables S3Store reads into a shell; then STORE=s3://$(MINIO_BUCKET)/dev.
minio-env:
	@echo "export FINESWEEP_S3_ENDPOINT=http://$(MINIO_ADDRESS) AWS_ACCESS_KEY_ID='$(MINIO_ROOT_USER)' AWS_SECRET_ACCESS_KEY='$(MINIO_ROOT_PASSWORD)' AWS_REGION=us-east-1  # STORE=s3://$(MINIO_BUCKET)/dev"

minio-down:
	@if [ -f $(MINIO_DIR)/minio.pid ] && kill -0 "$$(cat $(MINIO_DIR)/minio.pid)" 2>/dev/null; then \
	  pid=$$(cat $(MINIO_DIR)/minio.pid); kill "$$pid"; \
	  for i in $$(seq 1 20); do kill -0 "$$pid" 2>/dev/null || break; sleep 0.5; done; \
	  kill -0 "$$pid" 2>/dev/null && kill -9 "$$pid"; \
	  echo "minio-down: stopped pid $$pid (data kept in $(MINIO_DIR)/data)"; \
	else \
	  echo "minio-down: not running"; \
	fi; \
	rm -f $(MINIO_DIR)/minio.pid
