#!/usr/bin/env bash
# Prints what is needed to debug a failing end-to-end run: nodes, Jobs and pods with their events, the last
# log lines of every container of the namespace, and the last lines of each cluster component's log.
#   bash scripts/cluster/dump.sh [namespace]      (default: finesweep)
set -uo pipefail
source "$(dirname "$0")/lib.sh"
ns="${1:-finesweep}"
lines="${DUMP_LINES:-40}"

section() { printf '\n===== %s =====\n' "$*"; }

if [[ -f "$KUBECONFIG_ADMIN" ]]; then
  section "nodes"; kubectl_ get nodes -o wide 2>&1
  kubectl_ describe nodes 2>&1 | sed -n '/^Conditions:/,/^Addresses:/p'
  section "jobs and pods in $ns"; kubectl_ -n "$ns" get jobs,pods -o wide 2>&1
  if kubectl_ get crd workloads.kueue.x-k8s.io >/dev/null 2>&1; then  # Kueue is up (kueue.sh)
    section "Kueue: cluster queues, local queues, workloads"; kubectl_ get clusterqueues,localqueues,workloads -A -o wide 2>&1
  fi
  section "events in $ns (oldest first)"
  kubectl_ -n "$ns" get events --sort-by=.lastTimestamp 2>&1 | tail -n 60
  for pod in $(kubectl_ -n "$ns" get pods -o name 2>/dev/null); do
    section "$pod"
    kubectl_ -n "$ns" get "$pod" -o jsonpath='{range .status.initContainerStatuses[*]}{.name}: {.state}{"\n"}{end}{range .status.containerStatuses[*]}{.name}: {.state}{"\n"}{end}' 2>&1
    for c in $(kubectl_ -n "$ns" get "$pod" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}' 2>/dev/null); do
      echo "--- $c (last $lines lines)"
      kubectl_ -n "$ns" logs "$pod" -c "$c" --tail "$lines" 2>&1
    done
  done
fi
for component in "${COMPONENTS[@]}"; do
  [[ -f "$LOGS/$component.log" ]] || continue
  section "$component log (last $lines lines; $(running "$component" && echo running || echo NOT running))"
  tail -n "$lines" "$LOGS/$component.log"
done
