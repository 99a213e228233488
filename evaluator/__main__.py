"""Evaluate one trial (or a base/start reference row): python -m evaluator --spec spec.json --store STORE

Loads the model exactly as trained (base + merged start chain + the trial's own adapter, checked to be
really loaded), generates answers for the sweep's eval sets (batched greedy), scores them, scores held-out
rows, and writes eval.json, samples.jsonl and finally the _DONE marker.
Exit codes (finesweep.exitcodes): 0 done, 3 configuration error (never retried), 1 anything else.
"""

from __future__ import annotations

import logging
import sys

from trainer.entry import run_trial_command

log = logging.getLogger("finesweep")


def evaluate(spec, store, force: bool) -> int:
    from finesweep import exitcodes
    from finesweep.store import TrialState, status_of

    from .evaluate import evaluate_trial

    status = status_of(store, spec)
    if status.state is TrialState.PRUNED and not force:
        # A search stopped it early: it is not a candidate for best, and a _DONE marker would make it one.
        log.info("[%s/%s %s] was pruned by the search; not evaluated", spec.sweep, spec.name, spec.trial_id)
        return exitcodes.OK
    if status.done and not force:
        log.info("[%s/%s %s] already evaluated in %s; skipping", spec.sweep, spec.name, spec.trial_id, store.url)
        return exitcodes.OK
    if spec.trains and not status.trained:
        log.error("[%s/%s %s] has no trained adapter in %s: train it first", spec.sweep, spec.name,
                  spec.trial_id, store.url)
        return exitcodes.CONFIG_ERROR
    evaluate_trial(spec, store)
    return exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    return run_trial_command("python -m evaluator", __doc__, "evaluate even if the trial is marked done", argv,
                             evaluate)


if __name__ == "__main__":
    sys.exit(main())
