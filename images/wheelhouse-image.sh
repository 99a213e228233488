#!/usr/bin/env bash
# Offline image builds get their wheels from an image: this imports the wheels the images install
# (requirements/train.txt and controller.txt, plus DeepSpeed and its deps when its wheel is in the wheelhouse) as
# finesweep/wheelhouse:<key>, key = those wheels' names and sizes, and prints the tag (stdout, last line).
# Only those wheels, so a change to requirements/dev.txt (tests, tooling) neither re-imports ~3 GB nor
# invalidates the images' pip layer. Idempotent: an existing tag is reused; older wheelhouse tags are removed.
# Knobs: FINESWEEP_WHEELHOUSE, DOCKER, PY (a python 3.11 with pip >= 22.2), IMAGE_PREFIX, DEEPSPEED_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE="${FINESWEEP_WHEELHOUSE:-$HOME/.cache/finesweep/wheelhouse}"
DOCKER="${DOCKER:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker )}"
PY="${PY:-.venv/bin/python}"
PREFIX="${IMAGE_PREFIX:-finesweep}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"

# controller.txt: the controller image's own venv (kubernetes and its deps; the rest are train.txt's pins).
reqs=(-r requirements/train.txt -r requirements/controller.txt)
if ls "$WHEELHOUSE"/deepspeed-"$DEEPSPEED_VERSION"-*.whl >/dev/null 2>&1; then
  reqs+=("deepspeed==$DEEPSPEED_VERSION")
fi

# pip resolves exactly what the image's `pip install --no-index --find-links` will pick, without installing.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip install --quiet --dry-run --ignore-installed --no-index --find-links "$WHEELHOUSE" \
  --report "$work/report.json" "${reqs[@]}" >&2
"$PY" - "$work/report.json" "$WHEELHOUSE" > "$work/files" <<'EOF'
import json, os, sys
from urllib.parse import unquote, urlparse
report, wheelhouse = json.load(open(sys.argv[1])), os.path.realpath(sys.argv[2])
for item in report["install"]:
    path = os.path.realpath(unquote(urlparse(item["download_info"]["url"]).path))
    if os.path.dirname(path) != wheelhouse or not path.endswith(".whl"):
        sys.exit(f"wheelhouse-image: {item['metadata']['name']} resolves to {path}, not a wheel in {wheelhouse}")
    print(os.path.basename(path))
EOF
sort -o "$work/files" "$work/files"
key=$(cd "$WHEELHOUSE" && xargs -a "$work/files" stat -c '%n %s' | sha256sum | cut -c1-16)
tag="$PREFIX/wheelhouse:$key"

if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
  echo "wheelhouse-image: $tag up to date ($(wc -l < "$work/files") wheels)" >&2
else
  size=$(cd "$WHEELHOUSE" && xargs -a "$work/files" du -cb | tail -1 | cut -f1 | numfmt --to=iec)
  echo "wheelhouse-image: importing $(wc -l < "$work/files") wheels ($size) from $WHEELHOUSE as $tag" >&2
  tar -C "$WHEELHOUSE" -cf - -T "$work/files" \
    | "$DOCKER" import --message "finesweep wheelhouse: ${reqs[*]}" - "$tag" >/dev/null
  for old in $("$DOCKER" images --format '{{.Repository}}:{{.Tag}}' "$PREFIX/wheelhouse" | grep -vxF "$tag" || true); do
    "$DOCKER" image rm "$old" >/dev/null || true
  done
fi
echo "$tag"
