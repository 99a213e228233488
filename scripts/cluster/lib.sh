# Shared settings of the offline single-node cluster (sourced by every script in scripts/cluster/).
# Every server binds to 127.0.0.1; every path the cluster writes is under $CLUSTER_DIR (wiped by down.sh),
# except the version-keyed build cache under $CLUSTER_CACHE.
# Knobs: FINESWEEP_CLUSTER_DIR, FINESWEEP_CACHE, CLUSTER_PORT_BASE (ports are BASE+offset, default 26000).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
K8S_VERSION="$(awk '/^require k8s.io\/kubernetes /{print $3}' "$ROOT/k8s/local-cluster/components/go.mod")"
CLUSTER_CACHE="${FINESWEEP_CACHE:-$HOME/.cache/finesweep}/k8s"
K8S_BIN="$CLUSTER_CACHE/$K8S_VERSION/bin"
CLUSTER_DIR="${FINESWEEP_CLUSTER_DIR:-/tmp/finesweep-cluster}"
# Named by its address, as in hack/local-up-cluster.sh: the kubelet then reports InternalIP 127.0.0.1 (it
# refuses a loopback --node-ip), which is where the API server reaches it for logs and exec.
NODE_NAME="127.0.0.1"
PAUSE_IMAGE="finesweep.local/pause:3.10"
# The CNI bridge for pods without hostNetwork, and their addresses (host-local IPAM).
CNI_BRIDGE="fsweep0"
POD_SUBNET="10.88.77.0/24"

port_base="${CLUSTER_PORT_BASE:-26000}"
ETCD_PORT=$((port_base + 79))          # etcd clients
ETCD_PEER_PORT=$((port_base + 80))     # etcd peers (one member, still needs a listener)
APISERVER_PORT=$((port_base + 443))
KUBELET_PORT=$((port_base + 250))
KUBELET_HEALTHZ_PORT=$((port_base + 248))
CONTROLLER_MANAGER_PORT=$((port_base + 257))
SCHEDULER_PORT=$((port_base + 259))
# Kueue's manager (scripts/cluster/kueue.sh), a host process like the others: webhook, metrics, health.
KUEUE_WEBHOOK_PORT=$((port_base + 943))
KUEUE_METRICS_PORT=$((port_base + 944))
KUEUE_HEALTH_PORT=$((port_base + 945))
KUEUE_VERSION="$(awk '$1 == "sigs.k8s.io/kueue" {print $2}' "$ROOT/k8s/kueue/go.mod")"
KUEUE_BIN="${FINESWEEP_CACHE:-$HOME/.cache/finesweep}/kueue/$KUEUE_VERSION/bin"
KUEUE_DIR="$CLUSTER_DIR/kueue"

PKI="$CLUSTER_DIR/pki"
LOGS="$CLUSTER_DIR/logs"
PIDS="$CLUSTER_DIR/pids"
CONTAINERD_SOCK="$CLUSTER_DIR/containerd/containerd.sock"
KUBECONFIG_ADMIN="$CLUSTER_DIR/admin.kubeconfig"
# The components in start order; down.sh stops them in reverse. kueue is optional (kueue.sh, FINESWEEP_KUEUE=1).
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kueue)

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }

ctr_() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }
kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

running() {  # running <component>: its recorded pid is alive
  local pidfile="$PIDS/$1.pid"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# signed_cert <dir> <file stem> <CN> <O or ""> <extendedKeyUsage> [subjectAltName]: a key and a certificate in
# <dir>, signed by the cluster CA in $PKI (the cluster's components and Kueue's endpoints alike).
signed_cert() {
  local dir="$1" stem="$2" cn="$3" org="$4" usage="$5" san="${6:-}"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$dir/$stem.key" \
    -out "$dir/$stem.csr" -subj "/CN=$cn${org:+/O=$org}" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [[ -n "$san" ]] && echo "subjectAltName=$san"
  } >"$dir/$stem.ext"
  openssl x509 -req -in "$dir/$stem.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 30 \
    -extfile "$dir/$stem.ext" -out "$dir/$stem.crt" 2>/dev/null
  rm -f "$dir/$stem.csr" "$dir/$stem.ext"
}
