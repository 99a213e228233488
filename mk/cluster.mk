# The offline alternative to kind (included by the main Makefile): a single-node cluster from the pinned
# Kubernetes release built from its Go modules, plus Debian's etcd/containerd/runc/CNI (scripts/cluster/).
#   make cluster-up       bring it up (idempotent; the first time builds Kubernetes: ~5 min on 2 cores)
#   make cluster-load     import the trainer, evaluator and controller images into its containerd
#   make cluster-down     tear it down; fails if a process, mount, network device or cgroup is left behind
#   make cluster-dump     print what is needed to debug it (events, pod states, logs, component logs)
#   make kueue            build (cached) and start Kueue on it (scripts/cluster/kueue.sh; cluster-down stops it)
#   make e2e              cluster-up, images, Kueue, helm install, the smoke pipeline as Jobs (tests/e2e), cluster-down
# Then: export KUBECONFIG=$(CLUSTER_KUBECONFIG); ~/.cache/finesweep/bin/kubectl get pods -A

CLUSTER_KUBECONFIG ?= $(or $(FINESWEEP_CLUSTER_DIR),/tmp/finesweep-cluster)/admin.kubeconfig

.PHONY: cluster-up cluster-down cluster-load cluster-dump kueue e2e

cluster-up:
	@bash scripts/cluster/up.sh

cluster-down:
	@bash scripts/cluster/down.sh

cluster-load: cluster-up images
	@bash scripts/cluster/load-images.sh $(TRAINER_IMAGE) $(EVALUATOR_IMAGE)

kueue: cluster-up
	@bash scripts/cluster/kueue.sh up

cluster-dump:
	@bash scripts/cluster/dump.sh $(or $(NAMESPACE),finesweep-e2e)

# The cluster comes down whatever the tests did, and a teardown that leaves something behind fails the target.
e2e: setup tiny-model helm minio cluster-load kueue
	@rc=0; KUBECONFIG=$(CLUSTER_KUBECONFIG) TRAINER_IMAGE=$(TRAINER_IMAGE) EVALUATOR_IMAGE=$(EVALUATOR_IMAGE) \
		$(PY) -m pytest -q -p no:cacheprovider tests/e2e $(E2E_ARGS) || rc=$$?; \
	bash scripts/cluster/down.sh || rc=$$((rc ? rc : 1)); \
	exit $$rc
