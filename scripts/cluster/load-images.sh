#!/usr/bin/env bash
# Imports Docker images into the cluster's containerd (namespace k8s.io), the offline stand-in for a
# registry pull (like `kind load docker-image`). Images already there with the same ID are skipped.
#   bash scripts/cluster/load-images.sh finesweep/trainer:0.1.0 finesweep/evaluator:0.1.0
# CONTROLLER_IMAGE (exported by mk/images.mk: the controller image `make images` built) is imported too.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DOCKER="${DOCKER:-$([ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker)}"
running containerd || die "the cluster is not up (make cluster-up)"

images=("$@")
[[ -z "${CONTROLLER_IMAGE:-}" ]] || images+=("$CONTROLLER_IMAGE")
todo=()
for image in "${images[@]}"; do
  id="$("$DOCKER" image inspect --format '{{.Id}}' "$image" 2>/dev/null)" || die "no Docker image $image (make images)"
  ref="$image"; [[ "${image%%/*}" == *.* || "${image%%/*}" == *:* || "${image%%/*}" == localhost ]] || ref="docker.io/$image"
  # A Docker image ID is the digest of its config, which the imported manifest names.
  manifest="$(ctr_ images ls 2>/dev/null | awk -v r="$ref" '$1 == r {print $3}')"
  if [[ -n "$manifest" ]] && ctr_ content get "$manifest" 2>/dev/null | grep -q "${id#sha256:}"; then
    log "$image already in the cluster"
  else
    todo+=("$image")
  fi
done
((${#todo[@]})) || exit 0
started=$SECONDS
log "importing ${todo[*]} into containerd (one stream, shared layers once)"
"$DOCKER" save "${todo[@]}" | ctr_ images import --snapshotter overlayfs - >/dev/null
log "imported in $((SECONDS - started))s"
