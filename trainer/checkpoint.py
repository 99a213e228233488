"""Preemption-safe training: checkpoints go to the artifact store, and a restarted trial resumes from them.

On SIGTERM (a spot/preemptible node being reclaimed, `kubectl delete pod`), the trainer finishes the current
optimizer step, saves a full Trainer checkpoint (adapter, optimizer, scheduler, RNG states, step and data
position), uploads it, and exits with PREEMPTED (143), which the Job's podFailurePolicy retries without counting
it against backoffLimit. Checkpoints are also taken every FINESWEEP_CHECKPOINT_MINUTES (default 30) so a hard
kill loses at most that much. The next pod finds <trial>/checkpoint/_CHECKPOINT and resumes from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path

from finesweep.store import ArtifactStore, StoreError

from .runtime import any_rank, barrier, processes

log = logging.getLogger("finesweep")
MARKER = "_CHECKPOINT"


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint to the store."""


def fetch_checkpoint(store: ArtifactStore, prefix: str, out_dir: Path) -> Path | None:
    """Download the trial's last checkpoint (verified against its marker) into out_dir; None if there is none."""
    key = f"{prefix}/checkpoint/{MARKER}"
    if not store.exists(key):
        return None
    try:
        marker = store.verify_marker(key)
    except StoreError as err:  # a checkpoint that does not verify is ignored, never half-used
        log.warning("ignoring checkpoint in %s: %s", store.url, err)
        return None
    target = out_dir / marker["name"]
    shutil.rmtree(target, ignore_errors=True)
    store.download_dir(f"{prefix}/checkpoint/{marker['name']}", target, checksums=marker["files"])
    log.info("resuming from %s (step %d) in %s", marker["name"], marker["step"], store.url)
    return target


def checkpoint_callback(store: ArtifactStore, prefix: str, label: str):
    from transformers import TrainerCallback

    class StoreCheckpoints(TrainerCallback):
        """Turns SIGTERM and the checkpoint interval into Trainer saves, and uploads every save (from the main
        process). Registered on every rank: each must take part in the stop vote and the save."""

        def __init__(self):
            self.preempted = False
            self.main = processes().main
            self.interval = float(os.environ.get("FINESWEEP_CHECKPOINT_MINUTES", "30")) * 60
            self.last = time.time()
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

        def _on_sigterm(self, signum, frame):
            log.warning("%s: SIGTERM: saving a checkpoint after this step, then exiting", label)
            self.preempted = True

        def on_step_end(self, args, state, control, **kwargs):
            # Several processes: every rank votes after every optimizer step, so all stop (and save) at the same
            # step even when SIGTERM reached them a step apart; a rank that stopped alone would leave the others
            # waiting in the next step's all-reduce. The main process's clock decides the interval checkpoint.
            self.preempted, due = any_rank(self.preempted, self.main and time.time() - self.last > self.interval)
            if self.preempted:
                control.should_save = True
                control.should_training_stop = True
            elif due:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"
            local = Path(args.output_dir) / name
            # Every rank has written its part into the shared scratch folder (its RNG state, DeepSpeed's optimizer
            # shards) before the main process uploads the whole folder as one checkpoint.
            barrier()
            self.last = time.time()
            if not self.main or not local.is_dir():
                return
            old = f"{prefix}/checkpoint/"
            stale = [k for k in store.list(old) if not k.startswith(f"{old}{name}/")]
            files = store.upload_dir(local, f"{prefix}/checkpoint/{name}")
            # The marker is rewritten last, so a checkpoint interrupted half way is never the one resumed.
            store.write_marker(f"{prefix}/checkpoint/{MARKER}", files, name=name, step=state.global_step)
            for key in stale:
                if not key.endswith(MARKER):
                    store.delete(key)
            shutil.rmtree(local, ignore_errors=True)
            log.info("%s: checkpoint %s saved to %s", label, name, store.url)

        def restore_signal(self):
            signal.signal(signal.SIGTERM, self.previous)

    return StoreCheckpoints()


def clear_checkpoints(store: ArtifactStore, prefix: str) -> None:
    """After the adapter is saved, the trial no longer needs its checkpoints."""
    for key in store.list(f"{prefix}/checkpoint/"):
        store.delete(key)
