"""The benchmark model: TinyLlama-1.1B's architecture, randomly initialised, with the real Llama-2 tokenizer
(../shared/data/tokenizer-llama2), saved so the trainer loads it with `from_pretrained` like a real model.

    python -m bench.model [--size full|cpu] [--out DIR]

`full` is TinyLlama-1.1B (trainer.tiny_model.TINYLLAMA_1B) for CUDA machines. `cpu` is a scaled-down variant
with the same shape ratios (intermediate = 2.75 x hidden, head_dim 64, 8 query heads per key-value head) and
the same 32,000-token vocabulary, small enough for a few-minute CPU run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.tiny_model import SHARED_TOKENIZER, TINYLLAMA_1B

ROOT = Path(__file__).resolve().parent.parent
# hidden 512 = 8 heads x 64; 1 key-value head (TinyLlama: 32 heads / 4 kv heads); 1408 = 2.75 x 512; 4 layers.
CPU_DIMS = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=1, max_position_embeddings=2048)
SIZES = {"full": TINYLLAMA_1B, "cpu": CPU_DIMS}


def model_dir(size: str) -> Path:
    return ROOT / "build" / f"bench-{size}"


def build_model(size: str, out: Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the model folder. Needs the shared Llama-2 tokenizer: the benchmark's point is
    realistic token counts."""
    from trainer.tiny_model import build

    if not SHARED_TOKENIZER.is_file():
        raise SystemExit(f"bench: {SHARED_TOKENIZER} is absent; the benchmark needs the real Llama-2 tokenizer "
                         "(../shared/data/tokenizer-llama2) for realistic lengths")
    out = Path(out) if out else model_dir(size)
    dims = SIZES[size]
    marker = out / "finesweep-tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("dims") == dims:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return build(out, dims=dims, seed=seed, tokenizer_model=SHARED_TOKENIZER)


def build_real_architecture(source: Path, out: Path, seed: int = 0) -> Path:
    """SmolLM2-135M-Instruct's architecture, tokenizer, chat template and generation config from `source` (a
    `make real-model` folder without its weights), with randomly initialised weights, into `out`. For a machine
    the 514 MB of real weights cannot reach (the GPU lease carries at most 64 MiB): training speed and memory
    depend on the shapes and the token counts, not on the weights' values; no quality figure comes from it."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "config.json":
            shutil.copy2(path, tmp / path.name)
    record = json.loads((tmp / "finesweep-real.json").read_text()) if (tmp / "finesweep-real.json").exists() else {}
    record["weights"] = f"random-init (seed {seed}): the architecture only, for speed and memory"
    (tmp / "finesweep-real.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def model_shape(config) -> dict:
    """Parameter counts the FLOP formula uses (docs/benchmarks.md)."""
    d, L = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    d_kv = config.num_key_value_heads * head_dim
    d_ff = config.intermediate_size
    body = L * (d * d_attn + d_attn * d + 2 * d * d_kv + 3 * d * d_ff)  # q, o, k, v, gate, up, down
    return {"layers": L, "hidden": d, "d_attn": d_attn, "d_kv": d_kv, "intermediate": d_ff,
            "vocab": config.vocab_size, "n_body": body, "n_head": d * config.vocab_size,
            "n_embed": d * config.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(build_model(args.size, args.out))


if __name__ == "__main__":
    main()
