"""Loading base models, tokenizers and adapter chains from the artifact store.

A DPO trial trains a fresh LoRA adapter on top of its SFT start model. The SFT adapter is merged into the
base weights first, so that (a) TRL's reference model, which is the policy with its adapter disabled, is
exactly the SFT model, and (b) the evaluator rebuilds the same weights: base + merged chain + own adapter.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from finesweep.spec import TrialSpec, trial_from_dict
from finesweep.store import TRAINED, ArtifactStore, StoreError, trial_prefix

from .runtime import Hardware, LaunchError

log = logging.getLogger("finesweep")


class AdapterError(RuntimeError):
    pass


class ModelError(LaunchError):
    """The model cannot be trained the way the sweep asks (its chat template, its context length): a
    configuration error (a LaunchError, so the trial exits 3 with one line and is never retried)."""


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    from finesweep.staging import local_source

    tok = AutoTokenizer.from_pretrained(local_source("models", model_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# Stands in for an answer when the chat template renders a conversation: letters only, so no template's
# trim/escape changes it and no tokenizer merges it with what the template writes around it.
ANSWER_SENTINEL = "FinesweepAnswerSentinel"


def check_turn_end_is_eos(tokenizer, model_id: str) -> str:
    """The chat template must end an assistant turn with the tokenizer's EOS, the token TRL appends to every
    completion (sequences.sft_sequence / dpo_pair). Otherwise training teaches the model to stop with a token its
    own chat format never writes (e.g. a template that ends turns with <|eot_id|> while eos_token is
    <|end_of_text|>), and answers run on past the end of the turn. Returns what follows the answer up to and
    including the EOS; raises ModelError naming the model, what the turn ends with instead, the EOS and the fix."""
    messages = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": ANSWER_SENTINEL}]
    eos = tokenizer.eos_token
    fix = (f"use a model whose tokenizer's eos_token is the token its chat template ends an assistant turn with, "
           f"or set eos_token to that token in the tokenizer_config.json of {model_id} (and eos_token_id in its "
           "generation_config.json), or train with prompt_format: instruction")
    if eos is None:
        raise ModelError(f"model {model_id}: its tokenizer has no eos_token, so TRL has nothing to end a "
                         f"completion with. Fix: {fix}")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # a template that refuses [user, assistant] (jinja raise_exception) or fails
        raise ModelError(f"model {model_id}: its chat template cannot render a user turn followed by an "
                         f"assistant turn ({type(err).__name__}: {str(err)[:200]}). Fix: use a chat model whose "
                         "template renders assistant turns, or prompt_format: instruction") from None
    if ANSWER_SENTINEL not in text:
        raise ModelError(f"model {model_id}: its chat template drops the assistant's answer from a rendered "
                         "conversation, so where a turn ends cannot be checked. Fix: use a chat model whose template "
                         "renders assistant turns, or prompt_format: instruction")
    after = text.split(ANSWER_SENTINEL, 1)[1]
    # Whitespace before the EOS is allowed (Llama-2 style "answer </s>"): the turn still ends with the EOS.
    if not after.lstrip().startswith(eos):
        # What the template writes instead: a special token it starts with (an end-of-turn token), else the
        # text up to the line's end, else nothing at all.
        rest = after.lstrip()
        special = sorted((t for t in tokenizer.get_added_vocab() if t and rest.startswith(t)), key=len)
        ends_with = (repr(special[-1]) if special else repr(rest.split("\n", 1)[0][:40] or rest[:40]) if rest
                     else "nothing (the rendered text ends with the answer)")
        raise ModelError(f"model {model_id}: its chat template ends an assistant turn with {ends_with}, but its "
                         f"eos_token is {eos!r}, which TRL appends to every completion: training would teach the "
                         f"model to stop with a token its chat format never writes. Fix: {fix}")
    return after[: len(after) - len(after.lstrip()) + len(eos)]


def context_length(model_id: str) -> int | None:
    """The longest sequence the model has positions for (config.json max_position_embeddings, or n_positions
    for GPT-2-style configs); None when its config names neither."""
    from transformers import AutoConfig

    from finesweep.staging import local_source

    config = AutoConfig.from_pretrained(local_source("models", model_id))
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_trial_model(spec: TrialSpec, tokenizer=None) -> dict:
    """What a trial checks about its model before anything is built (trainer.recipe.Recipe): max_length fits
    the model's positions, and with prompt_format chat the template ends a turn with the EOS TRL appends."""
    limit = context_length(spec.model)
    if limit is not None and spec.max_length > limit:
        raise ModelError(f"max_length {spec.max_length} is longer than model {spec.model} has positions for "
                         f"(max_position_embeddings {limit} in its config.json): tokens past position {limit} get "
                         f"positions it was never trained on. Fix: set max_length to {limit} or less in the sweep "
                         "file (a new trial)")
    checked = {"max_length": spec.max_length, "max_position_embeddings": limit}
    if spec.prompt_format == "chat":
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.model)
        checked["turn_end"] = check_turn_end_is_eos(tokenizer, spec.model)
    return checked


def load_base_model(model_id: str, hw: Hardware, dtype=None):
    from transformers import AutoModelForCausalLM

    from finesweep.staging import local_source

    if dtype is None and hw.device == "cuda":
        dtype = hw.dtype
    return AutoModelForCausalLM.from_pretrained(local_source("models", model_id), dtype=dtype,
                                                attn_implementation=hw.attn_implementation)


def start_chain(spec: TrialSpec, store: ArtifactStore) -> list[TrialSpec]:
    """The trained trials `spec` builds on, oldest first (for a DPO trial: [its SFT trial])."""
    chain, ref = [], spec.start
    while ref is not None:
        key = f"{trial_prefix(ref.sweep, ref.trial_id)}/spec.json"
        try:
            parent = trial_from_dict(store.read_json(key))
        except StoreError:
            raise AdapterError(f"start point {ref.sweep}/{ref.trial_id} is not in store {store.url}") from None
        if parent.trial_id != ref.trial_id:
            raise AdapterError(f"{key} holds trial {parent.trial_id}, not {ref.trial_id}")
        chain.insert(0, parent)
        ref = parent.start
    return chain


def fetch_adapter(store: ArtifactStore, spec: TrialSpec, workdir: Path) -> Path:
    """Download a trained adapter, verifying every file against the checksums in its _TRAINED marker."""
    prefix = trial_prefix(spec.sweep, spec.trial_id)
    if not store.exists(f"{prefix}/{TRAINED}"):
        raise AdapterError(f"trial {spec.sweep}/{spec.trial_id} has no finished adapter in {store.url}")
    marker = store.verify_marker(f"{prefix}/{TRAINED}")
    local = workdir / spec.trial_id
    store.download_dir(f"{prefix}/adapter", local, checksums=marker["files"])
    return local


def adapter_report(peft_model, adapter_dir: Path | None = None) -> dict:
    """What the evaluator records to prove an adapter really loaded: every LoRA weight the model expects is
    in the file (PEFT itself only warns), and lora_B is not all zero (a zero B is exactly the base model)."""
    from safetensors.torch import load_file

    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    b_weights = [p for n, p in lora.items() if "lora_B" in n]
    missing: list[str] = []
    if adapter_dir is not None:
        saved = set(load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
        missing = [n for n in lora if n.replace(".default", "") not in saved]
    return {"lora_modules": len(b_weights), "lora_params": sum(p.numel() for p in lora.values()),
            "lora_B_nonzero": sum(int(p.detach().abs().sum().item() > 0) for p in b_weights),
            "missing_keys": missing}


def build_model(spec: TrialSpec, store: ArtifactStore, hw: Hardware, workdir: Path, with_own_adapter: bool):
    """Base model with the start chain merged in; with `with_own_adapter`, the trial's adapter on top
    (as a PeftModel, so `disable_adapter()` gives the start model back)."""
    import torch

    chain = start_chain(spec, store)
    base_id = chain[0].model if chain else spec.model
    # A start chain is merged in fp32 and only then cast to the training dtype: merging in bf16 rounds
    # W + BA to 8 mantissa bits, so the "SFT model" would not be the one the SFT trial trained and evaluated.
    model = load_base_model(base_id, hw, dtype=torch.float32 if chain else None)
    reports = []
    for parent in chain:
        adapter_dir = fetch_adapter(store, parent, workdir)
        peft_model, report = load_adapter_checked(model, adapter_dir)
        reports.append({"trial": parent.trial_id, **report})
        model = peft_model.merge_and_unload()
        log.info("merged start adapter %s/%s into %s (fp32)", parent.sweep, parent.trial_id, base_id)
    if chain and hw.device == "cuda" and hw.dtype != torch.float32:
        model = model.to(hw.dtype)
    own = None
    if with_own_adapter:
        adapter_dir = fetch_adapter(store, spec, workdir)
        model, own = load_adapter_checked(model, adapter_dir)
    return model, {"base": base_id, "chain": reports, "own": own}


def load_adapter_checked(model, adapter_dir: Path):
    """PeftModel.from_pretrained, but a missing or all-zero adapter is an error instead of a warning."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    report = adapter_report(peft_model, adapter_dir)
    if report["lora_modules"] == 0:
        raise AdapterError(f"{adapter_dir}: no LoRA modules were attached")
    if report["missing_keys"]:
        raise AdapterError(f"{adapter_dir}: adapter file lacks {len(report['missing_keys'])} LoRA weights "
                           f"the config targets, e.g. {report['missing_keys'][0]}")
    if report["lora_B_nonzero"] == 0:
        raise AdapterError(f"{adapter_dir}: every lora_B is zero, so the adapter changes nothing (untrained?)")
    return peft_model, report


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"finesweep-{prefix}-"))
