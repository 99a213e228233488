"""Models and datasets staged into the store: copied there once with checksums, fetched from there by every trial.

    finesweep stage SOURCE... --store STORE [--kind models|datasets] [--revision REV]

SOURCE is what a sweep names: a local folder or file (`build/tiny-llama`, `tests/fixtures/datasets/...`,
`../shared/data/gsm8k/...`) or a Hub id (`TinyLlama/TinyLlama-1.1B-Chat-v1.0`, fetched with
`huggingface_hub.snapshot_download` at a pinned revision, then uploaded by the same code). In the store:

    _staged/<kind>/<slug>/files/...   the files, as they were
    _staged/<kind>/<slug>/_STAGED     written last: every file's sha256, the source, its revision, the byte count

A sweep keeps naming the source exactly as before (trial ids do not change). Whoever loads one (trainer,
evaluator, export) passes the name through `local_source`: when the store the process works with holds it
staged, the files are downloaded once into the local cache (`$XDG_CACHE_HOME/finesweep/staged`, the pod's cache
emptyDir), each verified against its checksum, and the local folder is loaded with `from_pretrained` /
`load_dataset` as any folder would be; otherwise the name is returned unchanged (a local path, or the Hub). With
everything a sweep needs staged, trial pods run with HF_HUB_OFFLINE=1 and no volume holding models or data.
Several processes of one pod may fetch at once: each downloads into its own temporary folder and renames it into
place; the first rename wins, the others discard theirs. Nothing here writes to the store except `stage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .store import ArtifactStore, StoreError, checksum

KINDS = ("models", "datasets")
ROOT = "_staged"
STAGED = "_STAGED"


class StagingError(ValueError):
    """A source that cannot be staged (or a staged copy that fails its checksums): says what and the fix."""


def slug(name: str) -> str:
    """The store folder for a source name: `build/tiny-llama` -> `build--tiny-llama`."""
    cleaned = name.strip()
    while cleaned.startswith("./"):
        cleaned = cleaned[2:]
    cleaned = cleaned.rstrip("/")
    if not cleaned:
        raise StagingError("an empty name cannot be staged")
    return cleaned.replace("/", "--")


def prefix(kind: str, name: str) -> str:
    if kind not in KINDS:
        raise StagingError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    return f"{ROOT}/{kind}/{slug(name)}"


def marker(store: ArtifactStore, kind: str, name: str) -> dict | None:
    """The _STAGED record of `name`, or None when it is not staged."""
    key = f"{prefix(kind, name)}/{STAGED}"
    return store.read_json(key) if store.exists(key) else None


def guess_kind(source: str) -> str:
    """models for a folder with a config.json (or a Hub id), datasets for anything else local."""
    path = Path(source)
    if path.exists():
        return "models" if (path / "config.json").is_file() else "datasets"
    return "models"


def stage(store: ArtifactStore, source: str, kind: str | None = None, revision: str | None = None,
          say: Callable[[str], None] = print) -> dict:
    """Copy `source` into the store (skipped when the same files are staged already); returns its _STAGED
    record."""
    kind = kind or guess_kind(source)
    local, origin = Path(source), source
    if not local.exists():
        if source.startswith(("/", "./", "../")):
            raise StagingError(f"{source}: no such file or folder")
        local, revision = _from_hub(source, kind, revision)
    files = _local_files(local)
    if not files:
        raise StagingError(f"{source}: holds no files")
    base = prefix(kind, source)
    single = local.name if local.is_file() else None
    sums = {f"{base}/files/{rel}": _file_sha256(path) for rel, path in files}
    current = marker(store, kind, source)
    if current is not None and current.get("files") == sums:
        say(f"stage: {kind[:-1]} {source} already staged in {store.url}/{base} ({len(sums)} files)")
        return current
    total = 0
    for (rel, path), key in zip(files, sums):
        data = path.read_bytes()
        if checksum(data) != sums[key]:
            raise StagingError(f"{path} changed while it was being staged; stage it again")
        store.write_bytes(key, data)
        total += len(data)
    record_source = origin if not Path(origin).exists() else str(Path(origin).resolve())
    store.write_marker(f"{base}/{STAGED}", sums, kind=kind, name=source, source=record_source,
                       revision=revision, single_file=single, bytes=total)
    say(f"stage: {kind[:-1]} {source} staged in {store.url}/{base}: {len(sums)} files, {total / 1e6:.1f} MB"
        + (f", revision {revision}" if revision else ""))
    return store.read_json(f"{base}/{STAGED}")


def fetch(store: ArtifactStore, kind: str, name: str, cache_dir: Path | None = None) -> Path | None:
    """The verified local copy of a staged source (downloaded on first use), or None when it is not staged."""
    record = marker(store, kind, name)
    if record is None:
        return None
    files: dict[str, str] = record["files"]
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    dest = (cache_dir or default_cache()) / kind / f"{slug(name)}-{digest}"
    if not (dest / ".verified").is_file():
        base = f"{prefix(kind, name)}/files/"
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for key, sha in sorted(files.items()):
                data = store.read_bytes(key)
                if checksum(data) != sha:
                    raise StoreError(f"{store.url}/{key}: checksum differs from {prefix(kind, name)}/{STAGED}; "
                                     f"stage {name} again")
                target = tmp / key[len(base):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            (tmp / ".verified").write_text(digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, dest)
            except OSError:  # another process of this pod put the same files there first
                if not (dest / ".verified").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / record["single_file"] if record.get("single_file") else dest


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finesweep" / "staged"


# The store of the trial this process runs (trainer/entry.py sets it): the one place names are resolved, each
# once per process (a trial loads its tokenizer, model and splits separately; the store does not change meanwhile).
_active: ArtifactStore | None = None
_resolved: dict[tuple[str, str], str] = {}


def activate(store: ArtifactStore | None) -> None:
    global _active
    _active = store
    _resolved.clear()


def local_source(kind: str, name: str) -> str:
    """What to load for `name`: the staged copy's local path when the active store holds one, else `name`."""
    if _active is None or not name:
        return name
    if (kind, name) not in _resolved:
        path = fetch(_active, kind, name)
        _resolved[(kind, name)] = name if path is None else str(path)
    return _resolved[(kind, name)]


def _local_files(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    return [(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(path).parts]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _from_hub(repo_id: str, kind: str, revision: str | None) -> tuple[Path, str]:
    """A Hub snapshot in the local HF cache (needs network or a mirror via HF_ENDPOINT; HF_TOKEN for gated
    repositories) and the commit it resolved to."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id=repo_id, revision=revision,
                                      repo_type="model" if kind == "models" else "dataset"))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated: all say the same to the user
        raise StagingError(f"{repo_id}: not a local path, and the Hub snapshot failed ({type(err).__name__}: "
                           f"{str(err)[:200]}); stage a local folder, or set HF_ENDPOINT / HF_TOKEN") from None
    return path, path.name
