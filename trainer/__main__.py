"""Train one trial: python -m trainer --spec spec.json --store STORE

Reads the trial spec (JSON of finesweep.spec.TrialSpec), trains its LoRA adapter, and writes adapter,
train.json and the _TRAINED marker to the store. A trial already trained is skipped (trained again when a stored
file no longer matches its _TRAINED checksum); a trial stopped by
SIGTERM saves a checkpoint and resumes from it on the next run.
Exit codes (finesweep.exitcodes): 0 done, 3 configuration error (never retried), 143 preempted, 1 other.
"""

from __future__ import annotations

import logging
import sys

from .entry import run_trial_command

log = logging.getLogger("finesweep")


def train(spec, store, force: bool) -> int:
    from finesweep import exitcodes
    from finesweep.store import read_status

    if not spec.trains:
        log.error("trial %s has stage %r: nothing to train", spec.trial_id, spec.stage)
        return exitcodes.CONFIG_ERROR
    status = read_status(store, spec.sweep, spec.trial_id)
    if not force and status.trained:
        problem = None if status.done else stored_adapter_problem(store, spec)
        if problem is None:
            log.info("[%s/%s %s] already trained in %s; skipping", spec.sweep, spec.name, spec.trial_id, store.url)
            return exitcodes.OK
        # A retried attempt whose adapter was damaged after training (the evaluation refused it): train it
        # again. Every rank reads the same store and decides alike; the recipe's main process overwrites the
        # files and writes _TRAINED last, as on a first run.
        log.warning("[%s/%s %s] the stored adapter fails its _TRAINED checksums (%s); training again",
                    spec.sweep, spec.name, spec.trial_id, problem)
    if spec.stage == "sft":
        from .sft import SFTRecipe as recipe_cls
    else:
        from .dpo import DPORecipe as recipe_cls
    recipe_cls(spec, store).run()
    return exitcodes.OK


def stored_adapter_problem(store, spec) -> str | None:
    """Why the trial's stored adapter cannot be used (a file missing or not matching its _TRAINED checksum), or
    None when every file matches."""
    from finesweep.store import TRAINED, StoreError, trial_prefix

    try:
        store.verify_marker(f"{trial_prefix(spec.sweep, spec.trial_id)}/{TRAINED}")
    except (StoreError, KeyError, ValueError) as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    return run_trial_command("python -m trainer", __doc__, "train even if the store has this trial's adapter",
                             argv, train)


if __name__ == "__main__":
    sys.exit(main())
