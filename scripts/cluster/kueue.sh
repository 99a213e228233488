#!/usr/bin/env bash
# Kueue (sigs.k8s.io/kueue) on the offline cluster, its manager run as a host process like the other
# components, with the job integration only (batch/job; Jobs without kueue.x-k8s.io/queue-name are left alone).
#   bash scripts/cluster/kueue.sh build   build cmd/kueue at the version pinned in k8s/kueue/go.mod (cached)
#   bash scripts/cluster/kueue.sh up      build, certificates, CRDs, start the manager, then its webhooks
#   bash scripts/cluster/kueue.sh down    webhooks deleted (the cluster keeps working), manager stopped, files gone
#
# The cluster has no kube-proxy, so the API server cannot reach a webhook behind a Service: the manager serves
# its webhooks on 127.0.0.1:$KUEUE_WEBHOOK_PORT with a certificate for that address signed by the cluster CA,
# and the webhook configurations and CRD conversion webhooks (kueue-manifests.py, from the module's own
# config/components) point at that URL. Internal certificate management is off. Metrics (HTTPS) and health
# (HTTP) bind 127.0.0.1 too; the visibility API server is off (nothing registers its APIService here).
# The manager reads its metrics certificate from a fixed path, /etc/kueue/metrics/certs, when internal cert
# management is off: that path is a symlink into $KUEUE_DIR, removed by `down`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

METRICS_CERTS=/etc/kueue/metrics/certs
INTEGRATIONS=(batch/job)

build() {  # prints the binary's path
  [[ -n "$KUEUE_VERSION" ]] || die "no 'sigs.k8s.io/kueue vX.Y.Z' requirement in $ROOT/k8s/kueue/go.mod"
  if [[ -x "$KUEUE_BIN/kueue" ]]; then echo "$KUEUE_BIN/kueue"; return; fi
  mkdir -p "$KUEUE_BIN"
  log "building Kueue $KUEUE_VERSION into $KUEUE_BIN (cold: a few minutes on 2 cores)"
  local tmp started=$SECONDS
  tmp="$(mktemp -d "$KUEUE_BIN/.build.XXXX")"
  # The module's go.sum is complete, so the default -mod=readonly builds exactly what is pinned.
  (cd "$ROOT/k8s/kueue" && CGO_ENABLED=0 go build -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
    -o "$tmp/kueue" sigs.k8s.io/kueue/cmd/kueue) || { rm -rf "$tmp"; die "building Kueue failed (see above)"; }
  mv "$tmp/kueue" "$KUEUE_BIN/kueue" && rmdir "$tmp"
  log "Kueue built in $((SECONDS - started))s"
  echo "$KUEUE_BIN/kueue"
}

# cert <file stem> <CN> <O or ""> <extendedKeyUsage> [subjectAltName]: signed by the cluster CA
cert() { signed_cert "$KUEUE_DIR/pki" "$@"; }

webhooks_work() {  # the API server reaches the validating and mutating webhooks: a server-side dry run
  kubectl_ create --dry-run=server -o name -f - <<EOF
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: finesweep-kueue-probe}
EOF
}

up() {
  [[ $(id -u) == 0 ]] || die "kueue.sh up writes $METRICS_CERTS (a fixed path of Kueue's); run as root, like up.sh"
  running kube-apiserver && kubectl_ get --raw /readyz >/dev/null 2>&1 \
    || die "the cluster is not up at $KUBECONFIG_ADMIN (make cluster-up)"
  if running kueue && curl -sf "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null; then
    log "Kueue $KUEUE_VERSION already up"; return
  fi
  running kueue && { log "a Kueue manager is running but not ready; restarting it"; down; }
  if [[ -e $METRICS_CERTS || -L $METRICS_CERTS ]] && [[ "$(readlink "$METRICS_CERTS")" != "$KUEUE_DIR/"* ]]; then
    die "$METRICS_CERTS exists and is not this cluster's (a symlink into $KUEUE_DIR): another Kueue's? remove it first"
  fi
  local bin module started=$SECONDS
  bin="$(build)"
  module="$(cd "$ROOT/k8s/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
  local py=""
  for candidate in ${PYTHON:-} "$ROOT/.venv/bin/python" python3; do
    if "$candidate" -c 'import yaml' 2>/dev/null; then py="$candidate"; break; fi
  done
  [[ -n $py ]] || die "kueue-manifests.py needs a Python with PyYAML: make setup (.venv), or set PYTHON"

  mkdir -p "$KUEUE_DIR/pki" "$LOGS" "$PIDS"
  cert serving finesweep-kueue-webhook "" serverAuth "IP:127.0.0.1"
  cp "$KUEUE_DIR/pki/serving.crt" "$KUEUE_DIR/pki/tls.crt"; cp "$KUEUE_DIR/pki/serving.key" "$KUEUE_DIR/pki/tls.key"
  # The manager's own identity; system:masters keeps this test harness free of a copy of Kueue's RBAC.
  cert client finesweep-kueue system:masters clientAuth
  cat >"$KUEUE_DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: finesweep-local
  cluster: {server: "https://127.0.0.1:$APISERVER_PORT", certificate-authority: "$PKI/ca.crt"}
users:
- name: finesweep-kueue
  user: {client-certificate: "$KUEUE_DIR/pki/client.crt", client-key: "$KUEUE_DIR/pki/client.key"}
contexts:
- name: finesweep-local
  context: {cluster: finesweep-local, user: finesweep-kueue}
current-context: finesweep-local
EOF
  mkdir -p "$(dirname "$METRICS_CERTS")"
  ln -sfn "$KUEUE_DIR/pki" "$METRICS_CERTS"

  cat >"$KUEUE_DIR/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: 127.0.0.1:$KUEUE_HEALTH_PORT
metrics:
  bindAddress: 127.0.0.1:$KUEUE_METRICS_PORT
webhook:
  host: 127.0.0.1
  port: $KUEUE_WEBHOOK_PORT
  certDir: $KUEUE_DIR/pki
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
manageJobsWithoutQueueName: false
integrations:
  frameworks: [$(IFS=,; echo "${INTEGRATIONS[*]}")]
featureGates:
  # An aggregated API server on 0.0.0.0:8082 by default; nothing here registers its APIService.
  VisibilityOnDemand: false
EOF

  local args=(--module-dir "$module" --url-base "https://127.0.0.1:$KUEUE_WEBHOOK_PORT" --ca-file "$PKI/ca.crt")
  for i in "${INTEGRATIONS[@]}"; do args+=(--integration "$i"); done
  "$py" "$ROOT/scripts/cluster/kueue-manifests.py" "${args[@]}" >"$KUEUE_DIR/manifests.yaml"
  "$py" - "$KUEUE_DIR/manifests.yaml" "$KUEUE_DIR/crds.yaml" "$KUEUE_DIR/webhooks.yaml" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
yaml.safe_dump_all(crds, open(sys.argv[2], "w"), sort_keys=False)
yaml.safe_dump_all([d for d in docs if d not in crds], open(sys.argv[3], "w"), sort_keys=False)
PY
  # Server-side: the Workload CRD is larger than client-side apply's last-applied annotation allows.
  kubectl_ apply --server-side --force-conflicts --field-manager finesweep-kueue -f "$KUEUE_DIR/crds.yaml" >/dev/null
  kubectl_ wait --for=condition=Established --timeout=60s -f "$KUEUE_DIR/crds.yaml" >/dev/null
  kubectl_ get namespace kueue-system >/dev/null 2>&1 || kubectl_ create namespace kueue-system >/dev/null

  setsid nohup env KUBECONFIG="$KUEUE_DIR/kubeconfig" "$bin" --config "$KUEUE_DIR/config.yaml" --zap-log-level=2 \
    >"$LOGS/kueue.log" 2>&1 </dev/null &
  echo $! >"$PIDS/kueue.pid"
  local deadline=$((SECONDS + 120))
  until curl -sf "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz" >/dev/null; do
    running kueue || { log "Kueue exited; last lines of $LOGS/kueue.log:"; tail -25 "$LOGS/kueue.log" >&2; exit 1; }
    ((SECONDS < deadline)) || { log "Kueue not ready after 120s; last lines of $LOGS/kueue.log:"; tail -25 "$LOGS/kueue.log" >&2; exit 1; }
    sleep 1
  done
  # The webhook configurations only once the manager serves them: failurePolicy is Fail, so a Job created
  # before would be refused.
  kubectl_ apply --server-side --force-conflicts --field-manager finesweep-kueue -f "$KUEUE_DIR/webhooks.yaml" >/dev/null
  deadline=$((SECONDS + 30))
  until webhooks_work >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "the API server cannot call Kueue's webhooks at https://127.0.0.1:$KUEUE_WEBHOOK_PORT:"
      webhooks_work >&2 || true; tail -25 "$LOGS/kueue.log" >&2; exit 1
    fi
    sleep 1
  done
  log "Kueue $KUEUE_VERSION up in $((SECONDS - started))s (integrations: ${INTEGRATIONS[*]}; log $LOGS/kueue.log)"
}

down() {
  local leftover=0
  if running kueue; then
    # Without the manager, webhooks with failurePolicy Fail would refuse every Job; the CRDs may stay.
    if running kube-apiserver && [[ -f $KUEUE_DIR/webhooks.yaml ]]; then
      kubectl_ delete --ignore-not-found --wait=false -f "$KUEUE_DIR/webhooks.yaml" >/dev/null 2>&1 \
        || log "could not delete Kueue's webhook configurations (kubectl delete -f $KUEUE_DIR/webhooks.yaml)"
    fi
    local pid; pid="$(cat "$PIDS/kueue.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null && log "kueue needed SIGKILL"
  fi
  rm -f "$PIDS/kueue.pid"
  if [[ -L $METRICS_CERTS && "$(readlink "$METRICS_CERTS")" == "$KUEUE_DIR/"* ]]; then
    rm -f "$METRICS_CERTS"
    rmdir "$(dirname "$METRICS_CERTS")" /etc/kueue 2>/dev/null || true  # only if nothing else is in them
  fi
  rm -rf "$KUEUE_DIR"
  if pgrep -f -- "$KUEUE_BIN/kueue --config" >/dev/null; then
    log "leftover Kueue processes:"; pgrep -af -- "$KUEUE_BIN/kueue --config" >&2; leftover=1
  fi
  if [[ -L $METRICS_CERTS && "$(readlink "$METRICS_CERTS")" == "$KUEUE_DIR/"* ]]; then
    log "leftover $METRICS_CERTS"; leftover=1
  fi
  return $leftover
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down ;;
  *) die "usage: kueue.sh build|up|down" ;;
esac
