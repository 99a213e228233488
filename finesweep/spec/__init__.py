"""Sweep files and trial specs: parse, validate, expand, hash.

A sweep file under jobs/ holds one sweep (a mapping with `stage:`) or a pipeline (`pipeline:` a list of
sweeps run in order). Each sweep expands into trial specs: its `defaults`, overridden by each entry of
`trials` and by each point of the `grid`. A trial spec is everything one trial needs, and its id is a
hash of it, so an unchanged trial always maps to the same folder in the artifact store.

No torch here: the submitter imports this package.

The modules, each doing one thing (each imports only those listed above it):
  types.py         the vocabulary: constants (SPEC_VERSION, STAGES, formats, SELECTABLE_METRICS, limits, name
                   patterns), SweepError, the frozen dataclasses (DatasetSpec ... TrialSpec, Sweep, and the search's
                   Param, SearchSpec, PruneSpec), to_dict and trial_from_dict; TrialSpec.trial_id / evaluation_id
  yaml_text.py     reading YAML: SweepLoader and read_yaml, which refuse YAML 1.1 quirks (yes/no, 010, 1:30, dates,
                   keys set twice)
  fields.py        typed building: a dataclass from a mapping (_build), with the key, type and choice checks and
                   the helpers that word their errors
  validation.py    the rules across fields: dataset and eval values, select (tie-break, guardrails, betas),
                   tracking, hyperparameters and the keys a stage ignores, a DPO sweep against its start point
                   (check_start_compatible)
  search_space.py  `search:` and `prune:` (parse_search): the space, its values checked like trials, the pruner
  loading.py       a file to Sweeps: load_sweeps, parse_sweep, the expansion of defaults/trials/grid into trials,
                   resolve_sweep_path

Every name the rest of the project uses is re-exported here, so `from finesweep.spec import X` is the way in.
"""

# __all__ lists the public names; the private ones re-exported (_field_names, _FROM, _K8S_NAME, _TRIAL_NAME) are
# what finesweep/schema.py reads to generate the JSON Schema.
from .fields import KEY_ALIASES, _field_names
from .loading import SWEEP_KEYS, load_sweeps, parse_sweep, resolve_sweep_path
from .search_space import (INTERMEDIATE_METRICS, PRUNE_KEYS, PRUNERS, SEARCH_KEYS, SEARCH_METHODS, parse_search,
                           tie_value)
from .types import (_FROM, _K8S_NAME, _TRIAL_NAME, DATASET_FORMATS, DPO_FORMATS, GUARDRAIL_REFERENCES, LORA_TARGETS,
                    MAX_TEXT, MAX_TRIALS, PROMPT_FORMATS, SCHEDULERS, SELECTABLE_METRICS, SFT_FORMATS, SPEC_VERSION,
                    STAGES, BenchmarkSpec, DatasetSpec, EvalSpec, Guardrail, Hyper, Param, PruneSpec, SearchSpec,
                    SelectSpec, StartRef, Sweep, SweepError, TrackingSpec, TrialSpec, to_dict, trial_from_dict)
from .validation import DEFAULT_TIE_BREAK, MLFLOW_SCHEMES, SAME_RANKING, STAGE_IGNORES, check_start_compatible
from .yaml_text import SweepLoader, read_yaml

__all__ = [
    # types
    "SPEC_VERSION", "STAGES", "PROMPT_FORMATS", "DATASET_FORMATS", "SFT_FORMATS", "DPO_FORMATS", "LORA_TARGETS",
    "SCHEDULERS", "SELECTABLE_METRICS", "MAX_TRIALS", "MAX_TEXT", "GUARDRAIL_REFERENCES", "SweepError",
    "DatasetSpec", "BenchmarkSpec", "EvalSpec", "Hyper", "Guardrail", "SelectSpec", "TrackingSpec", "StartRef",
    "TrialSpec", "Sweep", "Param", "SearchSpec", "PruneSpec", "to_dict", "trial_from_dict",
    # fields
    "KEY_ALIASES",
    # yaml_text
    "SweepLoader", "read_yaml",
    # validation
    "DEFAULT_TIE_BREAK", "SAME_RANKING", "MLFLOW_SCHEMES", "STAGE_IGNORES", "check_start_compatible",
    # search_space
    "SEARCH_METHODS", "PRUNERS", "INTERMEDIATE_METRICS", "SEARCH_KEYS", "PRUNE_KEYS", "parse_search", "tie_value",
    # loading
    "SWEEP_KEYS", "load_sweeps", "parse_sweep", "resolve_sweep_path",
]
