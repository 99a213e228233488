"""Train one trial: python -m trainer --spec spec.json --store STORE

Reads the trial spec (JSON of finesweep.spec.TrialSpec), trains its LoRA adapter, and writes adapter,
train.json and the _TRAINED marker to the store. A trial already trained is skipped; a trial stopped by
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
    if not force and read_status(store, spec.sweep, spec.trial_id).trained:
        log.info("[%s/%s %s] already trained in %s; skipping", spec.sweep, spec.name, spec.trial_id, store.url)
        return exitcodes.OK
    if spec.stage == "sft":
        from .sft import SFTRecipe as recipe_cls
    else:
        from .dpo import DPORecipe as recipe_cls
    recipe_cls(spec, store).run()
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    return run_trial_command("python -m trainer", __doc__, "train even if the store has this trial's adapter",
                             argv, train)


if __name__ == "__main__":
    sys.exit(main())
