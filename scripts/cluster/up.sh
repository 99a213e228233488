#!/usr/bin/env bash
# Brings up a single-node Kubernetes cluster on this machine from real components, offline, the way
# Kubernetes' own hack/local-up-cluster.sh does: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd (+ runc, CNI plugins) and a kubelet. The Kubernetes components are built from
# their Go modules at the version pinned in k8s/local-cluster/components/go.mod (scripts/cluster/build.sh,
# cached); etcd, containerd, runc and the CNI plugins come from Debian's packages. Certificates are made
# here with openssl; the pause image is compiled here from the Kubernetes source.
#
# Everything listens on 127.0.0.1 and lives under $CLUSTER_DIR; scripts/cluster/down.sh removes it all.
# Idempotent: a cluster that is already up is left as it is. Needs root (kubelet, containerd).
#   bash scripts/cluster/up.sh && export KUBECONFIG=/tmp/finesweep-cluster/admin.kubeconfig
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[[ $(id -u) == 0 ]] || die "the kubelet and containerd need root; run as root (CI does)"

if running kube-apiserver && running kubelet && kubectl_ get --raw /readyz >/dev/null 2>&1; then
  log "already up (Kubernetes $K8S_VERSION); KUBECONFIG=$KUBECONFIG_ADMIN"
  [[ ${FINESWEEP_KUEUE:-0} != 1 ]] || bash "$(dirname "$0")/kueue.sh" up
  exit 0
fi
if [[ -d "$CLUSTER_DIR" ]]; then
  log "a half-started cluster is in $CLUSTER_DIR; tearing it down first"
  bash "$(dirname "$0")/down.sh"
fi

# ------------------------------------------------------------------------------------------ packages
packages=(etcd-server containerd runc containernetworking-plugins openssl iptables curl)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  # No service may start from a postinst (etcd's would listen on the default port): policy-rc.d says no.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi
CNI_BIN=/usr/lib/cni
[[ -x $CNI_BIN/bridge ]] || die "CNI plugins not found in $CNI_BIN (package containernetworking-plugins)"

bash "$(dirname "$0")/build.sh" >/dev/null

mkdir -p "$PKI" "$LOGS" "$PIDS" "$CLUSTER_DIR"/{etcd,kubelet,pod-logs,cni/net.d,containerd}
started_at=$SECONDS

start() {  # start <component> <command...>: in its own session, so it outlives this script
  local name="$1"; shift
  setsid nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

wait_for() {  # wait_for <component> <seconds> <check command...>
  local name="$1" limit="$2"; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ! running "$name"; then
      log "$name exited; last lines of $LOGS/$name.log:"; tail -25 "$LOGS/$name.log" >&2; exit 1
    fi
    if ((SECONDS > deadline)); then
      log "$name not ready after ${limit}s; last lines of $LOGS/$name.log:"; tail -25 "$LOGS/$name.log" >&2; exit 1
    fi
    sleep 1
  done
  log "$name ready ($((SECONDS - started_at))s)"
}

# ------------------------------------------------------------------------------------------ certificates
cert() { signed_cert "$PKI" "$@"; }  # cert <file stem> <CN> <O or ""> <extendedKeyUsage> [subjectAltName]

kubeconfig() {  # kubeconfig <file> <cert stem>
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: finesweep-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: finesweep-local
  context: {cluster: finesweep-local, user: $2}
current-context: finesweep-local
EOF
}

log "certificates"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$PKI/ca.key" \
  -out "$PKI/ca.crt" -days 30 -subj "/CN=finesweep-local-ca" 2>/dev/null
cert apiserver kube-apiserver "" serverAuth \
  "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert kubelet-serving "system:node:$NODE_NAME" system:nodes serverAuth "IP:127.0.0.1,DNS:localhost"
cert admin finesweep-admin system:masters clientAuth
cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters clientAuth
cert controller-manager system:kube-controller-manager "" clientAuth
cert scheduler system:kube-scheduler "" clientAuth
cert kubelet "system:node:$NODE_NAME" system:nodes clientAuth
openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
kubeconfig "$KUBECONFIG_ADMIN" admin
kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" controller-manager
kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" scheduler
kubeconfig "$CLUSTER_DIR/kubelet.kubeconfig" kubelet

# ------------------------------------------------------------------------------------------ control plane
start etcd etcd --name finesweep --data-dir "$CLUSTER_DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "finesweep=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
  --quota-backend-bytes 2147483648 --log-level warn
wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

# --endpoint-reconciler-type=none: the reconciler refuses a loopback advertise address; nothing in the
# e2e reaches the API through the `kubernetes` Service (trial pods get no token at all).
start kube-apiserver "$K8S_BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
  --endpoint-reconciler-type none \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --client-ca-file "$PKI/ca.crt" \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --allow-privileged=false --profiling=false --v=1
wait_for kube-apiserver 120 kubectl_ get --raw /readyz

start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
  --kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$CLUSTER_DIR/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" --leader-elect=false \
  --use-service-account-credentials --service-account-private-key-file "$PKI/sa.key" \
  --root-ca-file "$PKI/ca.crt" --profiling=false --v=1
start kube-scheduler "$K8S_BIN/kube-scheduler" \
  --kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
  --authentication-kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
  --authorization-kubeconfig "$CLUSTER_DIR/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" --leader-elect=false --profiling=false --v=1
wait_for kube-controller-manager 60 curl -skf "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz"
wait_for kube-scheduler 60 curl -skf "https://127.0.0.1:$SCHEDULER_PORT/healthz"

# ------------------------------------------------------------------------------------------ node
# A bridge with no gateway, no masquerade and no route out: a pod without hostNetwork gets a network
# namespace that reaches only its neighbours. finesweep's pods use hostNetwork (jobs.hostNetwork) to reach the
# store on the node's loopback.
cat >"$CLUSTER_DIR/cni/net.d/10-finesweep.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "finesweep-local", "plugins": [
  {"type": "bridge", "bridge": "$CNI_BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_SUBNET"}]],
            "dataDir": "$CLUSTER_DIR/cni/ipam"}}]}
EOF

cat >"$CLUSTER_DIR/containerd/config.toml" <<EOF
version = 2
root = "$CLUSTER_DIR/containerd/root"
state = "$CLUSTER_DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$CLUSTER_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # This machine refuses to lower oom_score_adj (runc would fail every sandbox, which asks for -998).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$CLUSTER_DIR/cni/net.d"
EOF
start containerd containerd --config "$CLUSTER_DIR/containerd/config.toml"
wait_for containerd 30 ctr_ version

bash "$(dirname "$0")/pause-image.sh" | ctr_ images import --no-unpack - >/dev/null
log "pause image $PAUSE_IMAGE imported"

cat >"$CLUSTER_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
failSwapOn: false
podLogsDir: $CLUSTER_DIR/pod-logs
# The cluster shares the machine with everything else: no image GC, evictions only when nearly full.
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
# Leaves the host's iptables alone (docker's rules live there too).
makeIPTablesUtilChains: false
resolvConf: /etc/resolv.conf
maxPods: 30
serializeImagePulls: false
EOF
start kubelet "$K8S_BIN/kubelet" --config "$CLUSTER_DIR/kubelet/config.yaml" \
  --kubeconfig "$CLUSTER_DIR/kubelet.kubeconfig" --root-dir "$CLUSTER_DIR/kubelet" \
  --hostname-override "$NODE_NAME" --v=1
wait_for kubelet 90 kubectl_ get node "$NODE_NAME"
log "node $NODE_NAME registered; waiting for it to be Ready"
wait_for kubelet 90 kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s

mkdir -p "$(dirname "$CLUSTER_CACHE")/bin"
ln -sf "$K8S_BIN/kubectl" "$(dirname "$CLUSTER_CACHE")/bin/kubectl"
log "Kubernetes $K8S_VERSION up in $((SECONDS - started_at))s: node $NODE_NAME Ready"
log "use it:  export KUBECONFIG=$KUBECONFIG_ADMIN; $(dirname "$CLUSTER_CACHE")/bin/kubectl get nodes"
# Kueue only on request (make kueue, make e2e, or FINESWEEP_KUEUE=1): its first build takes minutes.
[[ ${FINESWEEP_KUEUE:-0} != 1 ]] || bash "$(dirname "$0")/kueue.sh" up
