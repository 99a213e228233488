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

from .runtime import Hardware

log = logging.getLogger("finesweep")


class AdapterError(RuntimeError):
    pass


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    from finesweep.staging import local_source

    tok = AutoTokenizer.from_pretrained(local_source("models", model_id))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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
