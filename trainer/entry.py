"""What `python -m trainer` and `python -m evaluator` share: arguments, reading the trial spec, exit codes.

Under several processes each rank also leaves its outcome in FINESWEEP_RANK_DIR (set by images/bin/finesweep-train
for the launch): `rank-<N>.json` with the exit code, the error and when it happened. The launcher itself only
reports that "a child failed" and exits 1; the entry script reads these files to exit with the code the Job acts
on (a configuration error on any rank is still exit 3) and to name the first error as the trial's failure reason,
on whichever rank it happened.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("finesweep")
RANK_DIR_ENV = "FINESWEEP_RANK_DIR"


def write_rank_outcome(code: int, error: str | None) -> None:
    """This rank's outcome for the entry script (no-op outside a finesweep-train multi-process launch)."""
    folder = os.environ.get(RANK_DIR_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "exit_code": code,
              "error": error, "time": time.time()}
    path = Path(folder) / f"rank-{rank}.json"
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def launch_outcome(folder: str, launcher_code: str, terminated: str, processes: str) -> int:
    """After a multi-process launch: the exit code for the Job, with the first error as the last log line.

    SIGTERM to the pod -> 143, whatever the launcher said. Otherwise the ranks' own outcomes decide: a
    configuration error on any rank -> 3 (never retried), another error -> 1, every rank preempted -> 143, every
    rank done -> 0. A rank that left no outcome was killed (e.g. out of memory) and the launcher's code stands."""
    import sys

    from finesweep import exitcodes

    code, world = int(launcher_code), int(processes)
    if terminated == "1":
        print(f"finesweep-train: stopped by SIGTERM (launcher exit {code}); exiting 143 (preempted)", file=sys.stderr)
        return exitcodes.PREEMPTED
    outcomes = {}
    for path in sorted(Path(folder).glob("rank-*.json")):
        record = json.loads(path.read_text())
        outcomes[record["rank"]] = record
    failed = sorted((r for r in outcomes.values() if r["exit_code"] not in (exitcodes.OK, exitcodes.PREEMPTED)),
                    key=lambda r: r["time"])
    missing = [rank for rank in range(world) if rank not in outcomes]
    if failed:
        first = failed[0]
        final = (exitcodes.CONFIG_ERROR if any(r["exit_code"] == exitcodes.CONFIG_ERROR for r in failed)
                 else exitcodes.FAILED)
        # The line local.run_phase and `make status` take as the failure reason: the last one with " ERROR ".
        print(f"finesweep-train: ERROR rank {first['rank']} of {world} failed first (exit {first['exit_code']}): "
              f"{first['error'] or 'see its traceback above'}", file=sys.stderr)
        return final
    if missing and code != exitcodes.OK:
        print(f"finesweep-train: ERROR rank {missing[0]} of {world} exited without an outcome (killed, e.g. out of "
              f"memory?); launcher exit {code}", file=sys.stderr)
        return code
    if outcomes and all(r["exit_code"] == exitcodes.PREEMPTED for r in outcomes.values()) and not missing:
        return exitcodes.PREEMPTED
    return code


def run_trial_command(prog: str, doc: str, force_help: str, argv: list[str] | None,
                      body: Callable[[object, object, bool], int]) -> int:
    """Parse --spec/--store/--force, load the spec and store, and map failures to finesweep.exitcodes:
    a spec, dataset, adapter or store problem is a configuration error (never retried by the Job)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="trial spec JSON file")
    parser.add_argument("--store", required=True, help="artifact store: a folder or s3://bucket/prefix")
    parser.add_argument("--force", action="store_true", help=force_help)
    args = parser.parse_args(argv)

    from finesweep import exitcodes, staging
    from finesweep.spec import SweepError, trial_from_dict
    from finesweep.store import StoreError, open_store

    from .runtime import setup_logging

    setup_logging()
    try:
        with open(args.spec, encoding="utf-8") as f:
            spec = trial_from_dict(json.load(f))
    except (OSError, ValueError, SweepError) as err:
        log.error("cannot read trial spec %s: %s", args.spec, err)
        return exitcodes.CONFIG_ERROR

    from .checkpoint import Preempted
    from .data import DatasetError
    from .modeling import AdapterError
    from .runtime import LaunchError

    code, error = exitcodes.FAILED, None
    try:
        store = open_store(args.store)
        staging.activate(store)  # models and datasets staged in this store load from there
        code = body(spec, store, args.force)
        return code
    except (DatasetError, AdapterError, StoreError, FileNotFoundError, LaunchError) as err:
        log.error("[%s/%s %s] configuration error: %s", spec.sweep, spec.name, spec.trial_id, err)
        code, error = exitcodes.CONFIG_ERROR, f"configuration error: {err}"
        return code
    except Preempted as err:
        log.warning("%s; checkpoint saved, a restart resumes it", err)
        code = exitcodes.PREEMPTED
        return code
    except Exception as err:
        # Logged as one line (with the rank under several processes) before the traceback Python prints.
        log.error("[%s/%s %s] %s: %s", spec.sweep, spec.name, spec.trial_id, type(err).__name__, err)
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        write_rank_outcome(code, error)
        if code in (exitcodes.OK, exitcodes.PREEMPTED):
            # Only a rank that ended well waits for its peers; a failed one leaves, and the launcher stops the rest
            # (the outcome is written first, so a rank stopped while waiting here still reports its own).
            from .runtime import end_distributed

            end_distributed()
