#!/usr/bin/env bash
# Writes the pod sandbox ("pause") image to stdout as an OCI image-layout tar, for `ctr images import`.
# The binary is compiled here, statically, from build/pause/linux/pause.c of the pinned Kubernetes module
# (nothing is pulled), and the image is assembled with Python's standard library. Cached by version.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

tarball="$CLUSTER_CACHE/$K8S_VERSION/pause-image.tar"
if [[ ! -s "$tarball" ]]; then
  src="$(cd "$ROOT/k8s/local-cluster/components" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  [[ -f "$src" ]] || die "pause.c not found at $src (run scripts/cluster/build.sh first)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  gcc -Os -static -Wall -Werror -DVERSION="$K8S_VERSION-finesweep" -o "$work/pause" "$src"
  strip "$work/pause"
  python3 - "$work/pause" "$PAUSE_IMAGE" "$tarball.tmp" <<'PY'
import hashlib, io, json, sys, tarfile

binary, name, out = sys.argv[1:]

def tar_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data, mode in entries:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()

def blob(data, media_type):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(data)}, data

layer_desc, layer = blob(tar_bytes([("pause", open(binary, "rb").read(), 0o755)]),
                         "application/vnd.oci.image.layer.v1.tar")
config = {"architecture": "amd64", "os": "linux",
          "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
          "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
config_desc, config_bytes = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc, "layers": [layer_desc]}
manifest_desc, manifest_bytes = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
entries = [("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644),
           ("index.json", json.dumps(index).encode(), 0o644)]
for desc, data in ((layer_desc, layer), (config_desc, config_bytes), (manifest_desc, manifest_bytes)):
    entries.append((f"blobs/sha256/{desc['digest'].split(':')[1]}", data, 0o644))
open(out, "wb").write(tar_bytes(entries))
PY
  mv "$tarball.tmp" "$tarball"
fi
cat "$tarball"
