"""Evaluation during training for a search: held-out figures at fixed amounts of training data, written to the
store as they are produced, and the pruning decision made right there, at the evaluation.

A trial is monitored when the engine wrote <trial>/monitor.json before it started ({"every_examples": N,
"min_examples": M, "objective": ..., "study": what rebuilding the study needs}); other trials train exactly as
before. Evaluation points are counted in training examples seen (optimizer steps x global batch), not steps, so
trials with different batch sizes or accumulation are compared at the same amount of data: the trainers' own
eval loop (TRL eval_dataset, eval_strategy "steps") runs at the first step at or past M, M + N, M + 2N, ... and
each point lands in <trial>/progress.json.

Right after writing a point, the main process asks finesweep.search.decide_at_evaluation: it rebuilds the study
from the store, reports the point's objective to the trial (Optuna's report + should_prune), and records the
value, the pruner's attributes and the decision in the trial's own study record. A pruned trial stops at THIS
evaluation: the recipe saves its adapter and train.json as usual, and the attempt is closed as "pruned", so
status and report show it pruned, not failed. The decision does not depend on when the search engine looks:
the same store gives the same decision at the same step, locally or in a pod. A trainer restarted after its
trial was pruned (a decision recorded, the attempt not yet closed) stops after its first step. Only the main
process reads and writes the store; in a multi-process trial its decision is broadcast so every rank stops at
the same step.
"""

from __future__ import annotations

import logging
import math
import time

from finesweep.store import end_attempt, read_monitor, read_progress, read_status, write_progress, TrialState

log = logging.getLogger("finesweep")


def plan_for(recipe) -> dict | None:
    """The trial's monitor.json (read once per recipe), or None when the trial is not monitored."""
    if not hasattr(recipe, "_monitor_plan"):
        recipe._monitor_plan = read_monitor(recipe.store, recipe.spec.sweep, recipe.spec.trial_id)
    return recipe._monitor_plan


def global_batch(args) -> int:
    """Examples per optimizer step, from the TrainingArguments the trial runs with (every process's share)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def eval_args(recipe) -> dict:
    """TrainingArguments for the eval loop: eval_steps from the interval in examples (the callback below picks the
    exact steps), the eval set's batch size. Empty for a trial that is not monitored."""
    plan = plan_for(recipe)
    if plan is None:
        return {}
    # A guess before TrainingArguments exist (the callback evaluates at the exact step): TRL needs a number.
    steps = max(1, round(plan["every_examples"] / (recipe.spec.hyper.batch_size * recipe.spec.hyper.grad_accum)))
    return {"eval_strategy": "steps", "eval_steps": steps,
            "per_device_eval_batch_size": recipe.spec.eval.batch_size}


def eval_data(recipe, test, render) -> dict:
    """{"eval_dataset": ...}: the held-out rows the evaluator scores (the first eval.heldout_rows of the test
    split, after the trial's test_rows cap), rendered like the training rows; empty when not monitored."""
    if plan_for(recipe) is None:
        return {}
    if test is None or len(test) == 0:
        raise ValueError(f"{recipe.label}: the search evaluates during training but the trial has no held-out "
                         "rows (set dataset.test_fraction or test_split)")
    return {"eval_dataset": render(test.select(range(min(recipe.spec.eval.heldout_rows, len(test)))))}


def point_index(examples: int, plan: dict) -> int:
    """Which evaluation point `examples` seen has reached: -1 before min_examples, then 0, 1, 2, ..."""
    if examples < plan["min_examples"]:
        return -1
    return (examples - plan["min_examples"]) // plan["every_examples"]


def callbacks(recipe) -> list:
    """[the progress callback] for a monitored trial, else []. It runs on every rank: all must stop together."""
    plan = plan_for(recipe)
    return [] if plan is None else [progress_callback(recipe, plan)]


def _broadcast(flag: bool) -> bool:
    """The main process's decision, on every rank (a no-op in a single process)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is always there in the trainer image
        return flag
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def progress_callback(recipe, plan: dict):
    from transformers import TrainerCallback

    spec, store = recipe.spec, recipe.store

    class SearchProgress(TrainerCallback):
        def __init__(self):
            self.stopped: dict | None = None
            self.batch = 0
            self.record = {"trial_id": spec.trial_id, "every_examples": plan["every_examples"],
                           "min_examples": plan["min_examples"], "points": [], "stopped": None}

        def on_train_begin(self, args, state, control, **kwargs):
            self.batch = batch = self.record["global_batch"] = global_batch(args)
            pruned = None
            if state.is_world_process_zero:
                # A resumed trial (preemption) keeps the points it measured before the checkpoint.
                earlier = read_progress(store, spec.sweep, spec.trial_id) or {}
                self.record["points"] = [p for p in earlier.get("points", []) if p["step"] <= state.global_step]
                log.info("%s: evaluating held-out rows every %d examples from %d (every ~%d steps of %d examples)",
                         recipe.label, plan["every_examples"], plan["min_examples"],
                         max(1, round(plan["every_examples"] / batch)), batch)
                pruned = _recorded(plan)
            if _broadcast(pruned is not None):  # pruned before a restart: the decision stands
                self._stop(state, "after a restart (pruned before it)", pruned)
                control.should_training_stop = True
            return control

        def on_step_end(self, args, state, control, **kwargs):
            # Evaluate exactly when an evaluation point is crossed; the same arithmetic on every rank.
            step, batch = state.global_step, self.batch
            crossed = point_index(step * batch, plan) > point_index((step - 1) * batch, plan)
            control.should_evaluate = crossed and self.stopped is None
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics = dict(metrics or {})
            # TRL adds its own eval figures (DPO rewards/accuracies) in log(); they are also in log_history.
            for entry in reversed(state.log_history):
                if "eval_loss" in entry:
                    metrics = {**entry, **metrics}
                    break
            examples = state.global_step * self.batch
            index = point_index(examples, plan)
            point = {"examples": plan["min_examples"] + max(index, 0) * plan["every_examples"],
                     "examples_seen": examples, "step": state.global_step, "at": time.time(),
                     "metrics": {k: float(v) for k, v in metrics.items()
                                 if k.startswith("eval_") and isinstance(v, (int, float)) and math.isfinite(v)}}
            decision = None
            if state.is_world_process_zero:
                self.record["points"].append(point)
                write_progress(store, spec.sweep, spec.trial_id, self.record)
                decision = _decide(plan, point)
            log.info("%s: held-out at %d examples (step %d): %s", recipe.label, point["examples"], state.global_step,
                     " ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(point["metrics"].items())
                              if k in ("eval_loss", "eval_rewards/accuracies")))
            if _broadcast(decision is not None) and self.stopped is None:
                self._stop(state, f"at the evaluation of {point['examples']} examples", decision)
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.stopped is None:
                # A decision recorded that this process did not act on (its evaluation's reply was lost): it
                # still counts as pruned.
                pruned = _recorded(plan) if state.is_world_process_zero else None
                if _broadcast(pruned is not None):
                    self._stop(state, "at the end of training", pruned)
            if self.stopped is not None and state.is_world_process_zero:
                self.record["stopped"] = self.stopped
                write_progress(store, spec.sweep, spec.trial_id, self.record)
                # Closing the attempt as pruned is what makes status, report and selection treat it so; the
                # recipe goes on to save the adapter and train.json as for any trial.
                if read_status(store, spec.sweep, spec.trial_id).state is TrialState.RUNNING:
                    end_attempt(store, spec.sweep, spec.trial_id, "pruned")

        def _stop(self, state, where: str, decision: dict | None):
            examples = state.global_step * self.batch
            self.stopped = {"reason": "pruned", "step": state.global_step, "examples_seen": examples, "where": where}
            if decision:  # known on the main process only
                self.stopped["pruned_at"] = decision["pruned_at"]
                self.stopped["value"] = decision["value"]
            log.info("%s: stop requested by the search: pruned %s, step %d (%d examples)%s", recipe.label, where,
                     state.global_step, examples,
                     f": {plan.get('objective')} {decision['value']:.4g} at {decision['pruned_at']} examples"
                     if decision else "")

    def _decide(plan: dict, point: dict) -> dict | None:
        """The pruner's decision at this point (main process). A failure to decide (the store unreachable, a
        study started over under this trial) is logged and the trial trains on (a lost decision must not fail
        the run): the next evaluation reports the missed point, from progress.json, before its own."""
        from finesweep.search import decide_at_evaluation

        try:
            return decide_at_evaluation(store, plan, spec.trial_id, point["examples"], point["metrics"])
        except Exception as err:  # noqa: BLE001 - a lost decision must not fail a training run
            log.warning("%s: no pruning decision at %d examples: %s: %s", recipe.label, point["examples"],
                        type(err).__name__, err)
            return None

    def _recorded(plan: dict) -> dict | None:
        from finesweep.search import recorded_decision

        try:
            return recorded_decision(store, plan, spec.trial_id)
        except Exception as err:  # noqa: BLE001
            log.warning("%s: could not read the trial's pruning decision: %s: %s", recipe.label,
                        type(err).__name__, err)
            return None

    return SearchProgress()
