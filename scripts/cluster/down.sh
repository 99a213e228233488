#!/usr/bin/env bash
# Tears down the cluster scripts/cluster/up.sh started and checks nothing is left behind: no process of it,
# no mount under its directory, no network namespace or bridge of its CNI, no cgroup of its pods.
# Keeps the build cache (binaries, pause image). Safe to run when nothing is up. Exit 1 if a leftover remains.
#   bash scripts/cluster/down.sh
set -uo pipefail
source "$(dirname "$0")/lib.sh"

stop() {  # stop <component>: SIGTERM, then SIGKILL after 20 s
  local pidfile="$PIDS/$1.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null && log "$1 needed SIGKILL"
  fi
  rm -f "$pidfile"
}

# Kueue first (scripts/cluster/kueue.sh: its process, certificates, the /etc/kueue link); then the kubelet,
# so it restarts nothing; then every pod's containers through containerd, whose shims
# would outlive it otherwise.
bash "$(dirname "$0")/kueue.sh" down
stop kubelet
if running containerd; then
  for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$task" >/dev/null 2>&1; done
  for _ in $(seq 1 20); do
    ctr_ tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"' | grep -q . || break
    sleep 0.5
  done
  for task in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$task" >/dev/null 2>&1; done
  for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1; done
fi
for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
  [[ ${COMPONENTS[i]} == kubelet ]] || stop "${COMPONENTS[i]}"
done
# Shims whose containerd is gone exit on their own once their task is deleted; any left are ours by address.
pkill -9 -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" 2>/dev/null

# Mounts: pod volumes (tmpfs emptyDirs, projected), sandbox /dev/shm, container rootfs overlays. Deepest first.
if [[ -d "$CLUSTER_DIR" ]]; then
  for _ in 1 2 3; do
    mapfile -t mounts < <(awk -v d="$CLUSTER_DIR" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r)
    ((${#mounts[@]})) || break
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  done
fi

# Network: namespaces the CNI bridge plugin made for non-hostNetwork pods, and its bridge.
for ns in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do
  if ip netns exec "$ns" ip -o addr show 2>/dev/null | grep -qF " ${POD_SUBNET%.*}."; then ip netns delete "$ns"; fi
done
ip link show "$CNI_BRIDGE" >/dev/null 2>&1 && ip link delete "$CNI_BRIDGE"

# cgroups the kubelet created for pods (kubepods/...), per controller, deepest first; empty by now.
for controller in /sys/fs/cgroup/*/; do
  [[ -d "$controller/kubepods" ]] || continue
  find "$controller/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null
done

# What the kubelet and containerd hard-code outside the cluster dir: container log links, the device-plugin
# socket, runc's and the shims' state dirs (removed only when empty: Docker's containerd shares /run/containerd).
find /var/log/containers -maxdepth 1 -lname "$CLUSTER_DIR/*" -delete 2>/dev/null
rm -f /var/lib/kubelet/device-plugins/kubelet.sock
for d in /var/lib/kubelet/device-plugins /var/lib/kubelet /var/log/containers /run/containerd/runc/k8s.io \
         /run/containerd/runc /run/containerd/s /run/containerd; do
  rmdir "$d" 2>/dev/null
done

rm -rf "$CLUSTER_DIR"

# ------------------------------------------------------------------------------------------ leftovers?
leftover=0
for pattern in "$K8S_BIN/" "$KUEUE_BIN/kueue --config" "etcd --name finesweep" "containerd --config $CLUSTER_DIR" "-address $CONTAINERD_SOCK"; do
  if pgrep -f -- "$pattern" >/dev/null; then
    log "leftover processes matching '$pattern':"; pgrep -af -- "$pattern" >&2; leftover=1
  fi
done
if grep -q " $CLUSTER_DIR" /proc/self/mounts; then log "leftover mounts:"; grep " $CLUSTER_DIR" /proc/self/mounts >&2; leftover=1; fi
if [[ -L /etc/kueue/metrics/certs ]]; then log "leftover /etc/kueue/metrics/certs (kueue.sh)"; leftover=1; fi
if ip link show "$CNI_BRIDGE" >/dev/null 2>&1; then log "leftover bridge $CNI_BRIDGE"; leftover=1; fi
if [[ -e /var/lib/kubelet/device-plugins/kubelet.sock ]] || find /var/log/containers -maxdepth 1 -lname "$CLUSTER_DIR/*" 2>/dev/null | grep -q .; then
  log "leftover kubelet files in /var/lib/kubelet or /var/log/containers"; leftover=1
fi
if ls -d /sys/fs/cgroup/*/kubepods >/dev/null 2>&1; then
  log "leftover cgroups:"; ls -d /sys/fs/cgroup/*/kubepods >&2; leftover=1
fi
if ((leftover)); then log "teardown left the above behind"; exit 1; fi
log "down: no processes, mounts, network devices, cgroups or files left"
