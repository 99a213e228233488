"""`finesweep export SWEEP [TRIAL|best] --store STORE --out DIR`: a finished trial out of the store as a model
anyone loads with plain transformers, checked to be the model that was evaluated.

DIR holds (written as DIR.partial and renamed only once the logit check has passed, so a folder named DIR is
always a finished, checked export):
    config.json, model.safetensors, generation_config.json, tokenizer files, chat_template.jinja
                                        base + every adapter of the trial's chain, merged in fp32
    adapter/                            the trial's own LoRA adapter (verified against its _TRAINED checksums)
    start_adapters/NN-<sweep>-<trial>/  a DPO trial's start chain, oldest first: merged in before adapter/
    README.md                           model card: trial, hyperparameters, data, metrics with intervals,
                                        the selection record (best), the logit check, library versions
    export.json                         the same as data
With --out s3://bucket/prefix the checked folder is uploaded there, file by file, with an _EXPORTED marker
listing every file's SHA-256 written last (the store's rule: no marker, no finished export).

Pushing to the Hub is left to huggingface_hub (see README.md): `hf upload <repo> DIR .` with
HF_TOKEN, and HF_ENDPOINT for a mirror.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from finesweep.evalsets import load_evalset
from finesweep.prompts import render_prompt, user_turn
from finesweep.spec import TrialSpec, to_dict, trial_from_dict
from finesweep.store import ArtifactStore, StoreError, checksum, iter_trials, open_store, read_status, trial_prefix

from .modeling import (AdapterError, build_model, fetch_adapter, load_adapter_checked, load_base_model,
                       load_tokenizer, scratch_dir, start_chain)
from .runtime import Hardware, library_versions

log = logging.getLogger("finesweep")
BEST = "best.json"  # the selection record submitter.plan.select_best writes
EXPORTED = "_EXPORTED"
# fp32 on CPU, merged W + BA against the unmerged PEFT forward pass: the same sums in a different order, so
# differences are float rounding (~1e-6 on the tiny model). A wrong or missing adapter moves logits by > 1e-2.
TOLERANCE = 1e-4
CHECK_PROMPTS = 4
# The check and the merge run here, whatever the machine: fp32 on CPU is the one setting where "merged equals
# base + adapters" holds to a stated tolerance (bf16 would round every merged weight to 8 mantissa bits).
CPU_FP32 = Hardware("cpu", "cpu", "fp32", "sdpa", 0.0, 0)


class ExportError(RuntimeError):
    """A user mistake or a trial that cannot be exported yet: one line, exit 2."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}")


class ExportCheckError(RuntimeError):
    """The merged model does not reproduce base + adapters: the export is not finished (exit 1)."""


# ------------------------------------------------------------------------------------------ what to export

def resolve_trial(store: ArtifactStore, sweep: str, which: str) -> tuple[TrialSpec, dict | None]:
    """The finished trial `which` (a trial name, a trial id, or `best`) of `sweep`, and the selection record
    when it is `best`."""
    trials = [(tid, spec) for tid, spec in iter_trials(store, sweep) if spec.get("stage") != "base"]
    if not trials:
        known = _sweeps_in(store)
        raise ExportError(f"store {store.url} has no trained trial of sweep {sweep!r}",
                          f"name a sweep in it ({', '.join(known) if known else 'it holds none'}); a pipeline "
                          "file's sweeps go by their own names, e.g. smoke-dpo")
    best = None
    if which == "best":
        key = f"{sweep}/{BEST}"
        best = store.read_json(key) if store.exists(key) else None
        if not best or not best.get("trial_id"):
            raise ExportError(f"sweep {sweep!r} has no best trial in store {store.url} (no {key})",
                              f"finish the sweep (make submit SWEEP=...) so one is selected, or name a trial: "
                              f"{', '.join(sorted({s['name'] for _, s in trials}))}")
        which = best["trial_id"]
    matches = [(tid, spec) for tid, spec in trials if which in (tid, spec.get("name"))]
    if not matches:
        raise ExportError(f"sweep {sweep!r} has no trial {which!r} in store {store.url}",
                          "name one of " + ", ".join(f"{s['name']} ({tid})" for tid, s in trials) + ", or best")
    if len(matches) > 1:
        raise ExportError(f"trial name {which!r} names {len(matches)} trials of sweep {sweep!r} (its configuration "
                          "changed between runs)", "give the trial id: " + ", ".join(t for t, _ in matches))
    trial_id, raw = matches[0]
    spec = trial_from_dict(raw)
    state = read_status(store, sweep, trial_id).state.value
    if state != "done":
        raise ExportError(f"trial {sweep}/{spec.name} ({trial_id}) is {state}, not done: an unevaluated model is "
                          "not exported", f"finish it first (make submit SWEEP=... with STORE={store.url})")
    return spec, best


def _sweeps_in(store: ArtifactStore) -> list[str]:
    try:
        return sorted({k.split("/")[0] for k in store.list("") if k.endswith("/spec.json")})[:20]
    except StoreError:
        return []


# ------------------------------------------------------------------------------------------------ export

def export_trial(store: ArtifactStore, sweep: str, which: str, out: str, prompts: int = CHECK_PROMPTS,
                 tolerance: float = TOLERANCE) -> dict:
    """Export, check, then publish DIR (rename) or the store prefix (upload, marker last). Returns export.json."""
    spec, best = resolve_trial(store, sweep, which)
    to_store = out.startswith("s3://")
    target = None if to_store else Path(out)
    if target is not None and target.exists():
        raise ExportError(f"--out {out} already exists", "remove it or choose another folder (an export is "
                          "never written over another)")
    workdir = scratch_dir(f"export-{spec.trial_id}")
    partial = (workdir / "export") if to_store else target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a stale one from an interrupted export: never finished
    try:
        started = time.time()
        chain = merge_and_save(spec, store, workdir, partial)
        try:
            check = check_export(spec, store, partial, workdir, prompts, tolerance)
        except ExportCheckError as err:
            where = f"nothing was uploaded to {out}" if to_store else f"the unfinished export is in {partial}"
            raise ExportCheckError(f"{err}; {where}") from None
        record = _record(spec, store, best, chain, check, time.time() - started)
        (partial / "export.json").write_text(json.dumps(record, indent=2, default=str))
        (partial / "README.md").write_text(model_card(record))
        if to_store:
            publish_to_store(partial, open_store(out))
        else:
            partial.rename(target)
        log.info("exported %s/%s (%s) to %s: logit check max |diff| %.2e <= %g", sweep, spec.name, spec.trial_id,
                 out, check["max_abs_diff"], tolerance)
        return record
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def merged_model(spec: TrialSpec, chain: list[TrialSpec], store: ArtifactStore, workdir: Path):
    """Base model (fp32) with every adapter of `chain` + [spec] merged in, oldest first, each adapter checked
    (present, complete, non-zero lora_B) and verified against its _TRAINED checksums; and their folders."""
    import torch

    model = load_base_model(chain[0].model if chain else spec.model, CPU_FP32, dtype=torch.float32)
    folders = []
    for trial in [*chain, spec]:
        folder = fetch_adapter(store, trial, workdir / "adapters")
        peft_model, _ = load_adapter_checked(model, folder)
        model = peft_model.merge_and_unload()
        folders.append(folder)
    return model, folders


def merge_and_save(spec: TrialSpec, store: ArtifactStore, workdir: Path, partial: Path) -> list[TrialSpec]:
    from transformers import GenerationConfig

    chain = start_chain(spec, store)
    model, folders = merged_model(spec, chain, store, workdir)
    tokenizer = load_tokenizer(spec.model)  # pad token as trained and evaluated (eos when the model has none)
    # The evaluator's generation settings (greedy, its max_new_tokens), so `model.generate(**inputs)` answers
    # as the evaluated trial did.
    model.generation_config = GenerationConfig(
        max_new_tokens=spec.eval.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.config.pad_token_id = tokenizer.pad_token_id
    partial.mkdir(parents=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    del model
    shutil.copytree(folders[-1], partial / "adapter")
    for i, (trial, folder) in enumerate(zip(chain, folders[:-1]), 1):
        shutil.copytree(folder, partial / "start_adapters" / f"{i:02d}-{trial.sweep}-{trial.trial_id}")
    return chain


def check_prompts(spec: TrialSpec, tokenizer, n: int) -> list[str]:
    """The first `n` prompts of the trial's eval set, rendered in its prompt format."""
    rows = load_evalset(spec.eval.set)[:n]
    return [render_prompt(tokenizer, spec.prompt_format, user_turn(r["prompt"])) for r in rows]


def check_export(spec: TrialSpec, store: ArtifactStore, folder: Path, workdir: Path, n: int,
                 tolerance: float = TOLERANCE) -> dict:
    """Load `folder` with plain transformers and compare its logits with base + adapters built the evaluator's
    way (trainer.modeling.build_model: chain merged, own adapter as a PeftModel), fp32 on CPU, on `n` prompts
    rendered by the exported tokenizer, which must render and tokenize them exactly as the original does.
    Raises ExportCheckError on a mismatch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original_tok = load_tokenizer(spec.model)
    exported_tok = AutoTokenizer.from_pretrained(str(folder))
    prompts = check_prompts(spec, original_tok, n)
    if check_prompts(spec, exported_tok, n) != prompts:
        raise ExportCheckError(f"{folder}: the exported tokenizer's chat template renders the prompts differently "
                               "from the model's own")
    ids = [original_tok(p, return_tensors="pt")["input_ids"] for p in prompts]
    if any(not torch.equal(a, exported_tok(p, return_tensors="pt")["input_ids"]) for a, p in zip(ids, prompts)):
        raise ExportCheckError(f"{folder}: the exported tokenizer tokenizes the prompts differently")

    @torch.no_grad()
    def logits(model) -> list:
        model.eval()
        return [model(input_ids=x).logits[0].float() for x in ids]

    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    got = logits(exported)
    del exported
    # build_model leaves an SFT trial's base in its saved dtype on CPU (bf16 for TinyLlama); bf16 -> fp32 is
    # exact, so .float() gives the fp32 base + adapter the merge started from.
    reference, loaded = build_model(spec, store, CPU_FP32, workdir / "reference", with_own_adapter=True)
    want = logits(reference.float())
    del reference
    base = load_base_model(loaded["base"], CPU_FP32, dtype=torch.float32)
    plain = logits(base)
    del base
    diffs = [float((g - w).abs().max()) for g, w in zip(got, want)]
    result = {"prompts": len(prompts), "tokens": [int(x.shape[1]) for x in ids], "tolerance": tolerance,
              "max_abs_diff": max(diffs), "per_prompt_max_abs_diff": diffs,
              "max_abs_diff_vs_base": max(float((g - b).abs().max()) for g, b in zip(got, plain)),
              "compared": "AutoModelForCausalLM.from_pretrained(export, fp32) vs trainer.modeling.build_model "
                          "(base + merged start chain + own adapter as a PeftModel), fp32, CPU",
              "prompt_source": f"eval set {spec.eval.set}, first {len(prompts)} rows, prompt_format "
                               f"{spec.prompt_format}"}
    if not result["max_abs_diff"] <= tolerance:  # `not <=` also catches NaN
        worst = diffs.index(max(diffs))
        raise ExportCheckError(f"logit check failed: the merged model differs from base + adapters by max |diff| "
                               f"{result['max_abs_diff']:.3e} > tolerance {tolerance:g} (prompt {worst + 1} of "
                               f"{len(prompts)})")
    return result


def publish_to_store(folder: Path, store: ArtifactStore) -> None:
    """Every file of the checked export, then the _EXPORTED marker listing them with checksums (last)."""
    if store.exists(EXPORTED):
        raise ExportError(f"{store.url} already holds an export", "choose another prefix (an export is never "
                          "written over another)")
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        store.write_bytes(key, data)
        files[key] = checksum(data)
    store.write_marker(EXPORTED, files)


# ------------------------------------------------------------------------------------------- model card

def _record(spec: TrialSpec, store: ArtifactStore, best: dict | None, chain: list[TrialSpec], check: dict,
            seconds: float) -> dict:
    from finesweep import stats

    prefix = trial_prefix(spec.sweep, spec.trial_id)
    evaluation = store.read_json(f"{prefix}/eval.json")
    train = store.read_json(f"{prefix}/train.json") if store.exists(f"{prefix}/train.json") else {}
    per_row = evaluation.get("per_row") or {}
    return {
        "sweep": spec.sweep, "trial": spec.name, "trial_id": spec.trial_id, "stage": spec.stage,
        "store": store.url, "base_model": chain[0].model if chain else spec.model,
        "chain": [{"sweep": t.sweep, "trial": t.name, "trial_id": t.trial_id, "stage": t.stage} for t in chain],
        "spec": to_dict(spec),
        "train": {k: train.get(k) for k in ("steps", "wall_time_s", "train_tokens", "tokens_per_s", "final_loss",
                                            "trainable_params", "rows", "global_batch", "hardware", "versions")},
        "summary": evaluation.get("summary", {}),
        "intervals": stats.summarize(per_row, n_boot=spec.eval.bootstrap_samples) if per_row else {},
        "selection": _selection(best) if best else None,
        "check": check, "export_seconds": round(seconds, 1), "export_versions": library_versions(),
    }


def _selection(best: dict) -> dict:
    """best.json without its row-id lists (thousands of ids say nothing on a model card)."""
    return {k: v for k, v in best.items() if k not in ("validation_ids", "test_ids")}


def model_card(r: dict) -> str:
    spec, check = r["spec"], r["check"]
    chain = "".join(f" + {c['stage'].upper()} adapter {c['sweep']}/{c['trial']} ({c['trial_id']}, merged)"
                    for c in r["chain"])
    lines = [
        "---", "library_name: transformers", f"base_model: {r['base_model']}", "tags: [finesweep, lora, "
        f"{r['stage']}]", "---", "",
        f"# {r['sweep']}/{r['trial']} ({r['trial_id']})", "",
        f"`{r['base_model']}`{chain} + {r['stage'].upper()} adapter {r['sweep']}/{r['trial']}, merged in fp32 "
        "(`transformers.AutoModelForCausalLM.from_pretrained` this folder). The adapter alone is in `adapter/`"
        + (" (it applies on top of the start adapters in `start_adapters/`, merged in order)" if r["chain"] else "")
        + f". Prompt format: `{spec['prompt_format']}`, max length {spec['max_length']}; generation_config.json "
        f"is the evaluation's (greedy, {spec['eval']['max_new_tokens']} new tokens).", "",
        "## Hyperparameters", "", "| key | value |", "|---|---|",
        *(f"| {k} | {_cell(v)} |" for k, v in spec["hyper"].items()), "",
        "## Data", "", "| key | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in spec["dataset"].items()),
        *([f"| rows used | {_cell(r['train']['rows'])} |"] if r["train"].get("rows") else []),
        f"| eval set | {spec['eval']['set']} (+ {', '.join(spec['eval']['extra_sets']) or 'no extra sets'}) |", "",
        "## Metrics", "",
    ]
    if r["intervals"]:
        lines += ["| metric | value | 95% interval | rows | interval | set |", "|---|---|---|---|---|---|"]
        for metric, s in r["intervals"].items():
            ci = f"[{s['ci'][0]:.4g}, {s['ci'][1]:.4g}]" if s["ci"] else "n/a"
            value = f"{s['value']:.4g}" if isinstance(s["value"], (int, float)) else "n/a"
            lines.append(f"| {metric} | {value} | {ci} | {s['rows']} | {s['interval']} | {s['set']} |")
    else:
        lines += ["eval.json has no per-row data, so no intervals; point figures:", "", "| metric | value |",
                  "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in r["summary"].items() if not k.endswith("_rows"))]
    lines.append("")
    sel = r["selection"]
    if sel:
        facts = [f"best of sweep {r['sweep']} by {sel.get('metric')} ({sel.get('mode')}) = {_cell(sel.get('value'))}"
                 + (f" on the {sel['value_part']}" if sel.get("value_part") else "")]
        facts += [f"{label}: {_cell(sel[key])}" for key, label in (("tied", "tied set"), ("guardrails", "guardrails"),
                                                                     ("rows_used", "rows used"), ("split", "split"))
                  if sel.get(key)]
        if (sel.get("tie_break") or {}).get("rule"):
            facts.append(f"tie-break {sel['tie_break']['rule']}"
                         + (f" (decided by {sel['tie_break']['decided_by']})" if sel["tie_break"].get("decided_by")
                            else ""))
        lines += ["## Why this trial (best.json)", "", "; ".join(facts) + ".", "", "```json",
                  json.dumps(sel, indent=2, default=str)[:6000], "```", ""]
    train = r["train"]
    lines += [
        "## Training", "", f"{train.get('steps')} steps, {train.get('wall_time_s')} s, "
        f"{train.get('train_tokens')} tokens ({train.get('tokens_per_s')} tok/s), final loss "
        f"{train.get('final_loss')}, {train.get('trainable_params')} trainable parameters, global batch "
        f"{train.get('global_batch')}, on {(train.get('hardware') or {}).get('name')}.", "",
        "## Export check", "",
        f"{check['compared']}: max |logit diff| {check['max_abs_diff']:.3e} over {check['prompts']} prompts "
        f"({check['prompt_source']}), tolerance {check['tolerance']:g}; the merged model differs from the base "
        f"model by {check['max_abs_diff_vs_base']:.3g}.", "",
        "## Library versions", "", "| library | training | export |", "|---|---|---|",
        *(f"| {k} | {(train.get('versions') or {}).get(k, '')} | {v} |" for k, v in r["export_versions"].items()),
        "", f"Store: `{r['store']}`.", "",
    ]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------------- CLI

def cli(args, store: ArtifactStore) -> int:
    """`finesweep export`: one line and exit 2 for what the user can fix, exit 1 when the check fails."""
    try:
        export_trial(store, args.sweep, args.trial, args.out)
    except ExportError as err:
        log.error("export %s %s: %s", args.sweep, args.trial, err)
        return 2
    except AdapterError as err:
        log.error("export %s %s: %s. Fix: re-run the trial (make submit SWEEP=...)", args.sweep, args.trial, err)
        return 2
    except ExportCheckError as err:
        log.error("export %s %s: %s", args.sweep, args.trial, err)
        return 1
    except OSError as err:  # from_pretrained of a base model this machine cannot reach, a full disk
        log.error("export %s %s: %s. Fix: make the base model reachable (HF_ENDPOINT, a local folder) and the "
                  "--out location writable", args.sweep, args.trial, str(err).replace("\n", " ")[:500])
        return 2
    print(args.out)
    return 0
