"""DPO reference log-probs computed once per sweep, not once per trial (issue 20).

A DPO trial precomputes (TRL `precompute_ref_log_probs=True`) the reference model's log p(chosen) and
log p(rejected) of every training pair before it trains. The reference is the start model (the policy with its
adapters disabled, the SFT adapter merged in: trainer/modeling.py), so every trial with the same start weights,
the same training pairs (dataset, split, rows, prompt format, order, tokenizer), the same collator (max_length,
truncation, padding), reference batch size, process count, precision, attention and library versions computes
the same numbers. Trials differing only in lr, beta, LoRA rank, ... share them: the first writes them into the
store (finesweep.store.ReferenceLogps: one file keyed by the sha256 of those fields, with a checksum), the others
check and reuse them.

How TRL 1.16 precomputes (trl/trainer/dpo_trainer.py): DPOTrainer.__init__ calls
`self._precompute_ref_logps(train_dataset, "train", batch_size)`, which runs the reference over the tokenized
pairs in order (no shuffle), caches the two columns in a datasets cache file and returns
`concatenate_datasets([dataset, columns], axis=1)`; training then reads `ref_chosen_logps` / `ref_rejected_logps`
from each batch (`_compute_loss`, because `precompute_ref_logps` is set). A dataset that already holds those
columns gets no special treatment: with precomputation on, TRL computes them again (and the concatenation would
clash); with it off, `_compute_loss` runs the reference every step and ignores the columns. So the hook is that
one method: `SharedReferenceDPOTrainer._precompute_ref_logps` (train split only) returns the pairs with the stored
columns added exactly as TRL adds its own (float32, same order), or calls TRL's method and stores its result.
Evaluation sets (a search's monitored trials) are left to TRL.

What determines the numbers (the key's fields, `ReferenceShare.fields`):
- weights: sha256 of the reference model's state dict (names, dtypes, shapes, bytes), taken from the model
  `build_model` returned, before PEFT wraps it: the base model, the start chain merged in, the training dtype.
- rows: sha256 of the tokenized pairs TRL prepared (prompt_ids, chosen_ids, rejected_ids, in order), so the
  dataset, split, rows selected, prompt format, order and tokenizer are all in it.
- collator: DataCollatorForPreference's fields (pad token, max_length, truncation_mode, pad_to_multiple_of):
  truncation happens there, per batch.
- batch_size (per process) and processes: which rows share a padded batch (and accelerate's last-batch padding).
- ld_alpha, device, device name, precision, attention implementation, torch/transformers/trl/peft versions, and
  the recipe's speed settings for DPOConfig (trainer/speed.speed_kwargs).

A stored file that fails its checks (header, key and fields, row count, sha256 of the body) is not used: the trial
warns, recomputes and overwrites it. Several processes: only the main one hashes, reads and writes; it broadcasts
what it read (or that nothing usable was there) so every rank either reuses the same numbers or joins TRL's
computation. FINESWEEP_SHARE_REFERENCE_LOGPS=0 turns sharing off (TRL computes, nothing is read or written).

train.json `reference_logps` says what happened: source computed | reused | recomputed (a stored file was
refused: `problem` says why), `seconds` (the reference pass this trial ran, 0 when reused), `overhead_s` (hashing
and store reads/writes), and when reused `saved_s` (what the pass took the trial that wrote the file, less this
trial's overhead), `computed_s_by_writer`, `written_by`; plus the key and the store path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from dataclasses import fields as dataclass_fields, is_dataclass

from finesweep.store import ArtifactStore, SharedFileError, reference_logps

from .runtime import Hardware, broadcast_from_main, library_versions, processes

log = logging.getLogger("finesweep")

ENV = "FINESWEEP_SHARE_REFERENCE_LOGPS"
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def sharing_enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def weights_digest(model) -> str:
    """sha256 of a model's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy: a buffer
    return h.hexdigest()


def rows_digest(dataset, columns=PAIR_COLUMNS) -> str:
    """sha256 of the token ids of every row, in order (lengths and values of each list column)."""
    import numpy as np
    import pyarrow.compute as pc

    h = hashlib.sha256()
    h.update(f"{len(dataset)}|{','.join(columns)}|".encode())
    for batch in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=4096):
        for column in columns:
            values = batch.column(column).combine_chunks()
            h.update(np.asarray(pc.list_value_length(values).to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
            h.update(np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return h.hexdigest()


def collator_fields(collator) -> dict:
    """The settings of TRL's preference collator (it truncates to max_length and pads each batch)."""
    out = {"type": type(collator).__name__}
    if is_dataclass(collator):
        out.update({f.name: getattr(collator, f.name) for f in dataclass_fields(collator)
                    if isinstance(getattr(collator, f.name), (int, float, str, bool, type(None)))})
    return out


def with_columns(dataset, chosen: list[float], rejected: list[float]):
    """`dataset` with the two reference columns added as TRL adds its own (float32, axis-1 concatenation)."""
    from datasets import Dataset, Features, Value, concatenate_datasets

    columns = Dataset.from_dict({COLUMNS[0]: chosen, COLUMNS[1]: rejected},
                                features=Features({c: Value("float32") for c in COLUMNS}))
    return concatenate_datasets([dataset, columns], axis=1)


class ReferenceShare:
    """What one trial needs to share its reference log-probs: the store, the reference weights' digest (taken
    on the main process when the share is built, before PEFT wraps the model) and what the trial is, for the
    file's header. `info` becomes train.json's `reference_logps`."""

    def __init__(self, store: ArtifactStore, model, hw: Hardware, describes: dict, settings: dict | None = None,
                 enabled: bool | None = None):
        self.store, self.hw, self.describes, self.settings = store, hw, describes, dict(settings or {})
        self.enabled = sharing_enabled() if enabled is None else enabled
        self.main = processes().main
        self.world_size = processes().world_size
        started = time.time()
        self.weights = weights_digest(model) if self.enabled and self.main else None
        self.overhead = time.time() - started
        self.info: dict = {"source": None, "shared": self.enabled}

    def fields(self, trainer, dataset, batch_size: int) -> dict:
        versions = library_versions()
        return {
            "what": "DPO reference log-probs (policy with adapters disabled), summed over completion tokens",
            "weights": self.weights,
            "rows": rows_digest(dataset),
            "pairs": len(dataset),
            "collator": collator_fields(trainer.data_collator),
            "batch_size": int(batch_size),
            "processes": self.world_size,
            "ld_alpha": getattr(trainer, "ld_alpha", None),
            "device": self.hw.device,
            "device_name": self.hw.name,
            "precision": self.hw.precision,
            "attention": self.hw.attn_implementation,
            "versions": {k: versions.get(k) for k in ("torch", "transformers", "trl", "peft")},
            "settings": self.settings,  # what else the recipe passes DPOConfig that could change the forward pass
        }

    def precompute(self, trainer, dataset, batch_size: int, compute):
        """The training pairs with their reference columns: read from the store when a matching, intact file is
        there, else computed by `compute` (TRL's own method) and written to the store."""
        if not self.enabled:
            started = time.time()
            out = compute()
            self.info = {"source": "computed", "shared": False, "seconds": round(time.time() - started, 3),
                         "pairs": len(dataset)}
            return out
        started = time.time()
        handle, stored, problem, store_error = None, None, None, None
        if self.main:
            try:
                handle = reference_logps(self.store, self.fields(trainer, dataset, batch_size))
                stored = handle.read(len(dataset)) if handle.exists() else None
            except SharedFileError as err:
                problem = str(err)
                log.warning("%s; computing the reference log-probs again and replacing it", problem)
            except Exception as err:  # noqa: BLE001 - unreachable store, a vanished file: compute, as without sharing
                store_error = f"{type(err).__name__}: {err}"
                log.warning("shared reference log-probs could not be looked up in %s (%s); computing them",
                            self.store.url, store_error)
        # Before any rank can fail on its own: every rank waits here for the main one's answer.
        stored = broadcast_from_main(stored)
        common = {"shared": True, "pairs": len(dataset),
                  "key": handle.key if handle else None, "store_key": handle.path if handle else None}
        if stored is not None:
            out = with_columns(dataset, stored[COLUMNS[0]], stored[COLUMNS[1]])
            writer_s = float(stored.get("compute_seconds") or 0.0)
            overhead = self.overhead + time.time() - started
            self.info = {"source": "reused", **common, "seconds": 0.0, "overhead_s": round(overhead, 3),
                         "computed_s_by_writer": round(writer_s, 3),
                         "saved_s": round(max(0.0, writer_s - overhead), 3),
                         "written_by": stored.get("written_by")}
            writer = (stored.get("written_by") or {}).get("trial_id", "?")
            log.info("reference log-probs of %d pairs reused from %s/%s (computed by %s in %.1fs)", len(dataset),
                     self.store.url, handle.path if handle else "?", writer, writer_s)
            return out
        overhead = self.overhead + time.time() - started
        computing = time.time()
        out = compute()
        seconds = time.time() - computing
        written = False
        if self.main and handle is not None:
            writing = time.time()
            try:
                handle.write(out[COLUMNS[0]], out[COLUMNS[1]], compute_seconds=round(seconds, 3),
                             processes=self.world_size, written_by=self.describes)
                written = True
                log.info("reference log-probs of %d pairs computed in %.1fs and stored as %s/%s", len(dataset),
                         seconds, self.store.url, handle.path)
            except Exception as err:  # noqa: BLE001 - the trial has its numbers; only the sharing is lost
                store_error = f"{type(err).__name__}: {err}"
                log.warning("reference log-probs computed in %.1fs but not stored as %s/%s (%s); later trials will "
                            "compute them again", seconds, self.store.url, handle.path, store_error)
            overhead += time.time() - writing
        self.info = {"source": "recomputed" if problem else "computed", **common, "seconds": round(seconds, 3),
                     "overhead_s": round(overhead, 3), "written": written}
        if problem:
            self.info["problem"] = problem
        if store_error:
            self.info["store_error"] = store_error
        return out


@functools.cache
def shared_reference_trainer():
    """DPOTrainer with one method replaced: the training pairs' reference pass goes through a ReferenceShare
    (pass `reference_share=`; None: TRL's own pass)."""
    from trl import DPOTrainer

    class SharedReferenceDPOTrainer(DPOTrainer):
        def __init__(self, *args, reference_share: ReferenceShare | None = None, **kwargs):
            # Set before DPOTrainer.__init__, which runs the precomputation.
            self.finesweep_reference_share = reference_share
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            share = self.finesweep_reference_share
            own = functools.partial(super()._precompute_ref_logps, dataset, name, batch_size)
            if share is None or name != "train":
                return own()
            return share.precompute(self, dataset, batch_size, own)

    return SharedReferenceDPOTrainer
