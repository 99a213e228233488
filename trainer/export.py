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
# The logit check's bound comes from the model being exported, not from a constant: merged W + BA against the
# unmerged PEFT forward pass are the same sums in a different order, so a correct merge differs only by fp32
# rounding, and how large that is depends on the model (depth, width, logit scale): ~7e-6 on the 2-layer tiny
# model, 6e-5 to 1e-4 on SmolLM2-135M (30 layers), where a fixed 1e-4 refused correct merges. check_export measures
# the rounding (the fp32 reference against the same model in fp64) on the very prompts and positions it
# compares, and allows NOISE_SAFETY times it: two fp32 results each carry about that much error (the merge
# rounds every W + BA once more), and fp64 is not exact either (transformers keeps RMSNorm and RoPE in fp32).
# A wrong merge moves logits by a fraction of the adapter's effect, orders of magnitude above rounding; the
# check also refuses to pass when the adapter's own effect is not above the tolerance (it could not tell).
NOISE_SAFETY = 8.0
# Below this many fp32 ulps at the logits' scale a difference is rounding by definition (the floor for a model
# so small that its measured noise is a handful of ulps).
ULP_FLOOR = 64
FP32_EPS = 2.0 ** -23
CHECK_PROMPTS = 4
# The check and the merge run here, whatever the machine: fp32 on CPU is the one setting where "merged equals
# base + adapters" holds to a stated tolerance (bf16 would round every merged weight to 8 mantissa bits).
CPU_FP32 = Hardware("cpu", "cpu", "fp32", "sdpa", 0.0, 0)
# Settings greedy decoding never reads (sampling- and beam-only). A base model whose generation_config samples
# (do_sample, temperature, top_p) gets them unset next to do_sample=False: transformers refuses to save a greedy
# config that still carries them, and they did not take part in the evaluation.
GREEDY_UNUSED = ("temperature", "top_p", "top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
                 "early_stopping", "length_penalty", "num_return_sequences")


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
                 tolerance: float | None = None) -> dict:
    """Export, check, then publish DIR (rename) or the store prefix (upload, marker last). Returns export.json.
    `tolerance` None: derived from the model's own fp32 noise (check_export)."""
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
        chain, generation = merge_and_save(spec, store, workdir, partial)
        try:
            check = check_export(spec, store, partial, workdir, prompts, tolerance)
        except ExportCheckError as err:
            where = f"nothing was uploaded to {out}" if to_store else f"the unfinished export is in {partial}"
            raise ExportCheckError(f"{err}; {where}") from None
        record = _record(spec, store, best, chain, check, time.time() - started)
        record["generation_config"] = generation
        (partial / "export.json").write_text(json.dumps(record, indent=2, default=str))
        (partial / "README.md").write_text(model_card(record))
        if to_store:
            publish_to_store(partial, open_store(out))
        else:
            partial.rename(target)
        log.info("exported %s/%s (%s) to %s: logit check max |diff| %.2e <= tolerance %.2e (%s)", sweep, spec.name,
                 spec.trial_id, out, check["max_abs_diff"], check["tolerance"], check["tolerance_rule"])
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


def merge_and_save(spec: TrialSpec, store: ArtifactStore, workdir: Path, partial: Path) -> tuple[list[TrialSpec], dict]:
    """The merged model, its tokenizer and adapters into `partial`; returns the start chain and what the export
    did to the base model's generation config (export_generation_config)."""
    chain = start_chain(spec, store)
    model, folders = merged_model(spec, chain, store, workdir)
    tokenizer = load_tokenizer(spec.model)  # pad token as trained and evaluated (eos when the model has none)
    model.generation_config, generation = export_generation_config(model, tokenizer, spec)
    model.config.pad_token_id = tokenizer.pad_token_id
    partial.mkdir(parents=True)
    # Tied embeddings (SmolLM2: lm_head is embed_tokens) stay tied: LoRA targets only the projections
    # (finesweep.spec.LORA_TARGETS), so merging never writes the shared matrix, and save_pretrained stores it once
    # with config.tie_word_embeddings as the base had it.
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    del model
    shutil.copytree(folders[-1], partial / "adapter")
    for i, (trial, folder) in enumerate(zip(chain, folders[:-1]), 1):
        shutil.copytree(folder, partial / "start_adapters" / f"{i:02d}-{trial.sweep}-{trial.trial_id}")
    return chain, generation


def export_generation_config(model, tokenizer, spec: TrialSpec):
    """The base model's own generation config (its generation_config.json, as from_pretrained loaded it with
    the base weights: stop ids such as an end-of-turn token, bos, anything else it sets) with only what the
    evaluation set on top (evaluator.scoring.generate): greedy, one beam, eval.max_new_tokens, the stop ids
    (the model's eos ids plus the tokenizer's EOS), the pad token. Returns the config and a record of where it
    came from and every field changed ({field: {"base": ..., "export": ...}})."""
    import copy

    from .sequences import stop_token_ids

    config = copy.deepcopy(model.generation_config)
    before = config.to_dict()
    stops = stop_token_ids(model, tokenizer)
    wanted = {"do_sample": False, "num_beams": 1, "max_new_tokens": spec.eval.max_new_tokens, "use_cache": True,
              # One id stays an int, as most models write it (a one-element list would be a change for nothing).
              "eos_token_id": (stops[0] if len(stops) == 1 else stops) if stops else before.get("eos_token_id"),
              "pad_token_id": tokenizer.pad_token_id}
    wanted.update({k: None for k in GREEDY_UNUSED if before.get(k) is not None})
    changed = {}
    for key, value in wanted.items():
        if before.get(key) != value:
            changed[key] = {"base": before.get(key), "export": value}
            setattr(config, key, value)
    source = ("built by transformers from the base model's config.json (it has no generation_config.json)"
              if getattr(config, "_from_model_config", False) else "the base model's generation_config.json")
    return config, {"source": source, "changed": changed, "stop_token_ids": stops,
                    "stop_tokens": tokenizer.convert_ids_to_tokens(stops)}


def check_prompts(spec: TrialSpec, tokenizer, n: int) -> list[str]:
    """The first `n` prompts of the trial's eval set, rendered in its prompt format."""
    rows = load_evalset(spec.eval.set)[:n]
    return [render_prompt(tokenizer, spec.prompt_format, user_turn(r["prompt"])) for r in rows]


def template_prefix_tokens(spec: TrialSpec, tokenizer) -> int:
    """How many leading tokens every prompt of the trial's prompt format shares whatever the user writes: the
    common prefix of two prompts rendered around different user messages. For a chat template that is BOS (if
    any), an injected default system prompt and the user header (24 tokens for SmolLM2); for the instruction
    format its '### Instruction:' header."""
    a, b = ([*tokenizer(render_prompt(tokenizer, spec.prompt_format, user_turn(text)))["input_ids"]]
            for text in ("Alpha one?", "Zulu two!"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_export(spec: TrialSpec, store: ArtifactStore, folder: Path, workdir: Path, n: int,
                 tolerance: float | None = None) -> dict:
    """Load `folder` with plain transformers and compare its logits with base + adapters built the evaluator's
    way (trainer.modeling.build_model: chain merged, own adapter as a PeftModel), fp32 on CPU, on `n` prompts
    rendered by the exported tokenizer, which must render and tokenize them exactly as the original does.

    Compared: every position from the first token of the user's message on (the user content, the end of the
    turn, the generation prompt: the logits an answer is generated from). The template's fixed prefix (BOS, an
    injected default system prompt, the user header; template_prefix_tokens) is the same tokens in every prompt,
    so its logits are the same in every prompt too and say nothing per prompt; it still takes part, since every
    compared position attends to it, so an error there shows downstream.

    The tolerance (unless given) is derived from the model: max(NOISE_SAFETY x its fp32 noise, ULP_FLOOR fp32 ulps
    at the logits' scale), the noise being max |fp32 - fp64| of the reference on the compared positions. Raises
    ExportCheckError on a mismatch, and when the trial's own adapter moves no compared logit by more than the
    tolerance (a merge without it would pass: the check could not tell)."""
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
    prefix = template_prefix_tokens(spec, original_tok)
    # Every prompt has content after the prefix; min() keeps at least its last position (the one an answer's
    # first token comes from) should a tokenizer merge the content into the prefix.
    starts = [min(prefix, int(x.shape[1]) - 1) for x in ids]

    @torch.no_grad()
    def logits(model) -> list:
        """The compared positions' logits per prompt, in the model's own dtype."""
        model.eval()
        return [model(input_ids=x).logits[0, s:] for x, s in zip(ids, starts)]

    def max_diff(a: list, b: list) -> list[float]:
        return [float((x.double() - y.double()).abs().max()) for x, y in zip(a, b)]

    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    got = logits(exported)
    del exported
    # build_model leaves an SFT trial's base in its saved dtype on CPU (bf16 for TinyLlama); bf16 -> fp32 is
    # exact, so .float() gives the fp32 base + adapter the merge started from.
    reference, loaded = build_model(spec, store, CPU_FP32, workdir / "reference", with_own_adapter=True)
    reference = reference.float()
    want = logits(reference)
    with reference.disable_adapter():  # the start model (base + merged chain): what the own adapter changes
        start = logits(reference)
    exact = logits(reference.double())  # the same model in fp64: its fp32 rounding is want - exact
    del reference
    base = load_base_model(loaded["base"], CPU_FP32, dtype=torch.float32)
    plain = logits(base)
    del base

    diffs = max_diff(got, want)
    noise = max(max_diff(want, exact))
    scale = max(float(x.abs().max()) for x in want)
    effect = max(max_diff(want, start))
    derived = max(NOISE_SAFETY * noise, ULP_FLOOR * FP32_EPS * scale)
    rule = (f"given ({tolerance:g})" if tolerance is not None else
            f"max({NOISE_SAFETY:g} x fp32 noise {noise:.3e}, {ULP_FLOOR} fp32 ulps at logit scale {scale:.3g} = "
            f"{ULP_FLOOR * FP32_EPS * scale:.3e})")
    tolerance = derived if tolerance is None else tolerance
    result = {"prompts": len(prompts), "tokens": [int(x.shape[1]) for x in ids],
              "template_prefix_tokens": prefix,
              "compared_positions": sum(int(x.shape[1]) - s for x, s in zip(ids, starts)),
              "tolerance": tolerance, "tolerance_rule": rule, "fp32_noise": noise, "noise_safety": NOISE_SAFETY,
              "ulp_floor": ULP_FLOOR, "logit_scale": scale,
              "max_abs_diff": max(diffs), "per_prompt_max_abs_diff": diffs,
              "own_adapter_effect": effect,
              # A merge whose adapter is scaled by (1 + x) differs by about x * effect: smaller x passes.
              "undetectable_scale_error": tolerance / effect if effect else None,
              "max_abs_diff_vs_base": max(max_diff(got, plain)),
              "compared": "AutoModelForCausalLM.from_pretrained(export, fp32) vs trainer.modeling.build_model "
                          "(base + merged start chain + own adapter as a PeftModel), fp32, CPU, on the positions "
                          "after the prompt format's fixed prefix",
              "noise_measured": "the same reference in fp64 (transformers keeps RMSNorm and RoPE in fp32 there)",
              "prompt_source": f"eval set {spec.eval.set}, first {len(prompts)} rows, prompt_format "
                               f"{spec.prompt_format}"}
    if not result["max_abs_diff"] <= tolerance:  # `not <=` also catches NaN
        worst = diffs.index(max(diffs))
        raise ExportCheckError(f"logit check failed: the merged model differs from base + adapters by max |diff| "
                               f"{result['max_abs_diff']:.3e} > tolerance {tolerance:.3e} ({rule}) (prompt "
                               f"{worst + 1} of {len(prompts)})")
    if not effect > tolerance:
        raise ExportCheckError(f"logit check inconclusive: the trial's own adapter moves no compared logit by more "
                               f"than {effect:.3e}, not above the tolerance {tolerance:.3e} ({rule}), so a merge "
                               "that left it out would pass too; the adapter barely changes the model (see the "
                               "evaluation's trust.adapter_changes_outputs)")
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
    spec, check, gen = r["spec"], r["check"], r.get("generation_config") or {}
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
        f"is the base model's with the evaluation's settings (greedy, {spec['eval']['max_new_tokens']} new tokens, "
        f"stop tokens {_tokens(gen.get('stop_tokens'))}){_changes(gen.get('changed'))}.", "",
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
        f"({check['prompt_source']}; {check['compared_positions']} positions, the first "
        f"{check['template_prefix_tokens']} tokens of each being the prompt format's fixed prefix), tolerance "
        f"{check['tolerance']:.3e} = {check['tolerance_rule']}; the fp32 noise is measured against the same "
        f"model in fp64. The trial's own adapter moves logits by up to {check['own_adapter_effect']:.3g}; the "
        f"merged model differs from the base model by {check['max_abs_diff_vs_base']:.3g}.", "",
        "## Library versions", "", "| library | training | export |", "|---|---|---|",
        *(f"| {k} | {(train.get('versions') or {}).get(k, '')} | {v} |" for k, v in r["export_versions"].items()),
        "", f"Store: `{r['store']}`.", "",
    ]
    return "\n".join(lines)


def _tokens(tokens) -> str:
    return ", ".join(f"`{t}`" for t in tokens or []) or "none"


def _changes(changed) -> str:
    if not changed:
        return "; nothing changed from the base model's"

    def shown(value) -> str:
        return "unset" if value is None else _cell(value)

    return "; changed from the base model's: " + ", ".join(f"{k} {shown(v['base'])} -> {shown(v['export'])}"
                                                        for k, v in changed.items())


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
