"""finesweep {submit,status,logs,report,cancel} SWEEP [options]   (also: python -m submitter ...)
finesweep stage SOURCE... --store STORE; finesweep export SWEEP [TRIAL|best] --store STORE --out DIR

SWEEP is a name under ./jobs (smoke, sft, dpo, ...) or a path to a YAML file. The whole file is validated
before anything runs or is submitted. STORE is a folder (default: artifacts) or s3://bucket/prefix.
User mistakes (a sweep file, a setting, the store) end with one line naming the file or setting, the field
and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from finesweep.store import DEFAULT_MAX_ATTEMPTS
from submitter.cluster_settings import DEFAULT_NAMESPACE, SETTINGS

log = logging.getLogger("finesweep")
COMMANDS = (("submit", "validate, then run (local) or submit (k8s) every unfinished trial; failed ones again"),
            ("status", "one line per trial: state, attempts, key metrics, failure reason"),
            ("logs", "print (local) or follow (k8s) a trial's logs"),
            ("report", "build the sweep reports from the store"),
            ("cancel", "stop the sweep (k8s: delete its Jobs and ConfigMaps; local: stop the submit running it here) "
                       "and mark its running trials stopped (finished artifacts stay)"))
# Command-line flag of the settings a user gives on the command line, so errors name what they typed: the
# cluster settings' from their declaration (submitter/cluster_settings.py), and the store.
FLAGS = {**{s.field: s.flag for s in SETTINGS if s.flag}, "store": "--store (STORE=)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finesweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in COMMANDS:
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("sweep", help="name under jobs/ or path to a sweep YAML")
        p.add_argument("--store", default="artifacts", help="folder or s3://bucket/prefix (default: artifacts)")
        p.add_argument("--backend", choices=("local", "k8s"), default="local")
        p.add_argument("--namespace", default="", help=f"k8s: namespace (default: {DEFAULT_NAMESPACE})")
        p.add_argument("--kube-context", default="", help="k8s: kubeconfig context (default: the current one)")
        if name == "submit":
            p.add_argument("--dry-run", action="store_true", help="k8s: print manifests as YAML, touch nothing")
            p.add_argument("--wait", action="store_true",
                           help="k8s: follow the controller's log until the pipeline ends; exit with its result")
            p.add_argument("--max-attempts", type=_positive, default=DEFAULT_MAX_ATTEMPTS, metavar="N",
                           help=f"retry a failed trial until it has failed N times (default {DEFAULT_MAX_ATTEMPTS}); "
                                "a preempted run is not a failed attempt")
        if name == "logs":
            p.add_argument("--trial", default="", help="trial name or id (default: every trial)")
    p = sub.add_parser("controller", help="run a sweep file's pipeline inside the cluster (the controller Job)",
                       description="what the controller Job a k8s submit creates runs: creates the trial Jobs "
                       "under max_parallel, waits, selects the best, writes the reports, sweep after sweep")
    p.add_argument("--sweep-file", required=True, help="the sweep YAML (mounted from the controller's ConfigMap)")
    p.add_argument("--store", required=True, help="s3://bucket/prefix")
    p.add_argument("--namespace", default="", help=f"namespace of the trial Jobs (default: {DEFAULT_NAMESPACE})")
    p.add_argument("--kube-context", default="", help=argparse.SUPPRESS)
    p.add_argument("--max-attempts", type=_positive, default=DEFAULT_MAX_ATTEMPTS, metavar="N",
                   help=f"retry a failed trial until it has failed N times (default {DEFAULT_MAX_ATTEMPTS})")
    p = sub.add_parser("export", help="a finished trial as a merged model + adapter + model card, logit-checked",
                       description="writes DIR.partial, renamed to DIR once plain transformers reproduces base + "
                       "adapters' logits (trainer/export.py); exit 2: not done / no best, exit 1: check failed")
    p.add_argument("sweep", help="the sweep's name in the store (a pipeline's sweeps by their own names)")
    p.add_argument("trial", nargs="?", default="best", help="trial name or id, or best (default)")
    p.add_argument("--store", default="artifacts", help="folder or s3://bucket/prefix (default: artifacts)")
    p.add_argument("--out", required=True, help="folder to create, or s3://bucket/prefix")
    p = sub.add_parser("stage", help="copy models and datasets into the store once, with checksums; trial pods "
                       "then load them from there (finesweep/staging.py)",
                       description="SOURCE is what a sweep names: a local folder or file, or a Hub id "
                       "(snapshot_download at --revision). Staged again only when its files changed.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="model or dataset as the sweep names it")
    p.add_argument("--store", default="artifacts", help="folder or s3://bucket/prefix (default: artifacts)")
    p.add_argument("--kind", choices=("models", "datasets"), default=None,
                   help="default: models for a folder with config.json or a Hub id, else datasets")
    p.add_argument("--revision", default=None, help="Hub revision to pin (branch, tag or commit)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr if getattr(args, "dry_run", False) else sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from finesweep.spec import SweepError
    from finesweep.store import StoreError, open_store
    from submitter.k8s_manifests import SettingsError

    nothing = ", nothing was submitted" if args.command == "submit" else ""
    try:
        store = open_store(args.store)
        if args.command == "export":  # torch and transformers: the trainer's side, not the submitter's
            from finesweep import staging
            from trainer.export import cli

            staging.activate(store)  # a base model staged in the store loads from there
            return cli(args, store)
        if args.command == "stage":
            from finesweep.staging import StagingError, stage

            try:
                for source in args.sources:
                    stage(store, source, args.kind, args.revision, say=log.info)
            except StagingError as err:
                log.error("stage: %s", err)
                return 2
            return 0
        if args.command == "controller":
            from .controller import controller

            return controller(args, store)
        from . import commands

        return getattr(commands, args.command)(args, store)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or `finesweep cancel`: the trials under way are marked stopped
        log.warning("%s interrupted; submit again to carry on", args.command)
        return 130
    except SweepError as err:
        log.error("invalid sweep%s: %s", nothing, err)
        return 2
    except SettingsError as err:
        flag = FLAGS.get(err.setting)
        text = f"{flag}: {err.problem}" + (f". Fix: {err.fix}" if err.fix else "") if flag else str(err)
        log.error("invalid setting%s: %s", nothing, text)
        return 2
    except StoreError as err:
        log.error("artifact store: %s", err)
        return 2
    except Exception as err:  # noqa: BLE001 - botocore's and the API client's errors: what failed, not a traceback
        module = type(err).__module__
        if module.startswith(("botocore", "boto3")):
            log.error("artifact store %s unreachable or refused the request: %s", args.store, err)
            return 2
        if module.startswith(("kubernetes", "urllib3")):
            log.error("Kubernetes API: %s", _api_error(err))
            return 2
        raise


def _api_error(err: Exception) -> str:
    """One line for an API server that is unreachable or refuses the request (RBAC, a missing namespace)."""
    status = getattr(err, "status", None)
    if status:
        reason = getattr(err, "reason", "") or ""
        fix = {401: "the kubeconfig's credentials are not accepted; refresh them",
               403: "your account lacks a permission the chart's Role grants; use its ServiceAccount or ask "
                    "for rbac.extraSubjects",
               404: "check --namespace (NAMESPACE=) and that the chart is installed there"}.get(status, "")
        return f"{status} {reason}" + (f". Fix: {fix}" if fix else "")
    return f"{type(err).__name__}: {str(err)[:300]}. Fix: check the kube context and that the cluster is reachable"


if __name__ == "__main__":
    sys.exit(main())
