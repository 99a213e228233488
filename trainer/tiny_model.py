"""Build a tiny random-init Llama offline, loadable with `from_pretrained` like a real model.

    python -m trainer.tiny_model build/tiny-llama

Tokenizer: the real Llama-2 SentencePiece model from ../shared/data when present (the vocabulary TinyLlama
uses), otherwise a small BPE trained on the project's fixture text. Chat template: TinyLlama-Chat's.
The same module builds the full TinyLlama-1.1B architecture for LoRA parameter checks and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from finesweep.prompts import TINYLLAMA_CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer-llama2" / "tokenizer.model"

# initializer_range 0.1 (not 0.02): with a 128-wide model, 0.02 caps how far LoRA can move the logits of a
# frozen random lm_head, and tests need a model that can visibly memorise a few rows.
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)
# TinyLlama-1.1B (user-sweeps.md): the architecture the users fine-tune.
TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, max_position_embeddings=2048)


def llama_config(vocab_size: int, dims: dict, bos: int = 1, eos: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=bos, eos_token_id=eos, **dims)


# TinyLlama-1.1B-Chat-v1.0's tokenizer settings (../shared/reference/tinyllama-tokenizer.md): every tokenizer(text)
# starts with <s> and none ends with </s>; legacy=False, so no space is inserted after a special token.
TINYLLAMA_TOKENIZER = dict(add_bos_token=True, add_eos_token=False, legacy=False, model_max_length=2048)


def build_tokenizer(tokenizer_model: Path | None = SHARED_TOKENIZER):
    if tokenizer_model is not None and Path(tokenizer_model).is_file():
        from transformers import LlamaTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(tokenizer_model, Path(tmp) / "tokenizer.model")
            tok = LlamaTokenizer.from_pretrained(tmp, **TINYLLAMA_TOKENIZER)
        source = f"llama-2 sentencepiece ({tokenizer_model})"
    else:
        tok = _train_fallback_tokenizer()
        source = "bpe trained on tests/fixtures text (no ../shared/data tokenizer found)"
    tok.chat_template = TINYLLAMA_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as TinyLlama-Chat and the users' notebooks do
    return tok, source


def _train_fallback_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8", errors="ignore")
             for p in sorted((ROOT / "tests" / "fixtures").rglob("*.jsonl"))]
    texts += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "evaluator" / "evalsets").glob("*.jsonl"))]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts or ["hello world"], trainer=trainer)
    # BOS first, no EOS, as TinyLlama's tokenizer does (a kinder fixture would hide BOS bugs).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=TINYLLAMA_TOKENIZER["model_max_length"])


def build(out_dir: str | Path, dims: dict | None = None, seed: int = 0,
          tokenizer_model: Path | None = SHARED_TOKENIZER) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok, source = build_tokenizer(tokenizer_model)
    config = llama_config(len(tok), dims or TINY, bos=tok.bos_token_id, eos=tok.eos_token_id)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _record_tokenizer_settings(tmp / "tokenizer_config.json")
    (tmp / "finesweep-tiny.json").write_text(json.dumps({"tokenizer": source, "seed": seed, "dims": dims or TINY}))
    for path in tmp.iterdir():  # readable by the non-root user of the images when mounted into a container
        path.chmod(0o644)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # a half-built model folder never looks finished
    return out_dir


def _record_tokenizer_settings(config_path: Path) -> None:
    """Spell TinyLlama's settings out in tokenizer_config.json as its Hub files do (transformers keeps BOS in the
    tokenizer.json post-processor and would otherwise leave them implicit)."""
    config = json.loads(config_path.read_text())
    config.update({k: v for k, v in TINYLLAMA_TOKENIZER.items()})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args()
    out = Path(args.out_dir)
    if (out / "finesweep-tiny.json").exists() and not args.force:
        print(f"tiny model: {out} already built")
        return
    build(out, seed=args.seed)
    print(f"tiny model: built {out} ({json.loads((out / 'finesweep-tiny.json').read_text())['tokenizer']})")


if __name__ == "__main__":
    main()
