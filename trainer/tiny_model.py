"""Build a tiny random-init Llama offline, loadable with `from_pretrained` like a real model.

    python -m trainer.tiny_model build/tiny-llama                       (family llama, the default)
    python -m trainer.tiny_model build/tiny-chatml --family chatml      (a SmolLM2-135M-Instruct look-alike)

Family `llama` (TinyLlama-1.1B-Chat): the real Llama-2 SentencePiece model from ../shared/data when present (the
vocabulary TinyLlama uses), otherwise a small BPE trained on the project's fixture text; BOS on every text,
pad = eos = </s>, untied embeddings, TinyLlama-Chat's chat template.

Family `chatml` (SmolLM2-135M-Instruct, ../shared/reference/real-model.md): a GPT-2 style byte-level BPE trained
here, offline and deterministically, on the project's fixture text, with SmolLM2's 17 special tokens at the same
ids (<|endoftext|> 0 = unk, <|im_start|> 1 = bos, <|im_end|> 2 = eos = pad); NO BOS added to plain text (like the
real tokenizer, whose post-processor adds nothing); SmolLM2's ChatML template, which injects a default system
prompt when none is given; tied embeddings (lm_head is the embedding matrix); rope theta 100,000.

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


def llama_config(vocab_size: int, dims: dict, bos: int = 1, eos: int = 2, tie: bool = False,
                 rope_theta: float = 10000.0):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=rope_theta, tie_word_embeddings=tie,
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


# ---------------------------------------------------------------------------------------------------------------
# Family chatml: SmolLM2-135M-Instruct's tokenizer and template on a tiny model.

# SmolLM2-135M-Instruct's chat_template, exactly as build/smollm2-135m-instruct/chat_template.jinja stores it
# (trainer.real_model; tests/test_real_model.py checks the two are equal). With no system message first, it
# writes SmolLM2's default one; every turn is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt
# is "<|im_start|>assistant\n".
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2's added tokens, ids 0..16 in this order (the real tokenizer.json's added_tokens).
SMOLLM2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                          "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                          "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
                          "<jupyter_script>", "<empty_output>"]
# 256 byte-level symbols + 17 specials + 1,775 merges. On the fixture rows it gives ~1.4x the real 49,152-token
# vocabulary's lengths (Dolly rows rendered with the chat template: 79-281 tokens against 58-224); a vocabulary as
# large as this small corpus would be a kinder fixture (whole words, short rows).
CHATML_VOCAB_SIZE = 2048
CHATML_ROPE_THETA = 100000.0  # SmolLM2's


def _fixture_strings() -> list[str]:
    """Every text value of the project's fixture data (tests/fixtures: .jsonl, .jsonl.gz, .parquet) and eval sets,
    in a fixed order: the corpus the chatml tokenizer is trained on."""
    import gzip

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    files = sorted((ROOT / "tests" / "fixtures").rglob("*")) + sorted((ROOT / "evaluator" / "evalsets").glob("*"))
    out: list[str] = []
    for path in files:
        name = path.name
        if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        try:
                            out.extend(strings(json.loads(line)))
                        except ValueError:  # a deliberately malformed fixture line is still text
                            out.append(line)
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            for column in table.column_names:
                out.extend(strings(table.column(column).to_pylist()))
    return out


def build_chatml_tokenizer(vocab_size: int = CHATML_VOCAB_SIZE):
    """SmolLM2's tokenizer pipeline (GPT-2 byte-level BPE, no normalizer, nothing added to plain text) with a
    vocabulary trained on the fixture text. Returns (tokenizer, source, corpus sha256)."""
    import hashlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    # The role names and the default system prompt are ordinary text in ChatML, as in the real vocabulary.
    texts = _fixture_strings() + [f"system\n{SMOLLM2_DEFAULT_SYSTEM}", "user\n", "assistant\n"]
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    tokenizer = Tokenizer(models.BPE())  # as the real model: no unk in its BPE (byte-level covers every byte)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SMOLLM2_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The real tokenizer.json spells "no subword prefix/suffix" as "" (training leaves null): the same behaviour,
    # written the same way, so tests/test_real_model.py can compare the two pipelines field by field.
    spelled = json.loads(tokenizer.to_str())
    spelled["model"].update(continuing_subword_prefix="", end_of_word_suffix="")
    tokenizer = Tokenizer.from_str(json.dumps(spelled))
    # As the real tokenizer.json: a TemplateProcessing that adds nothing, so tok(text) has no BOS and no EOS.
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    for i, token in enumerate(SMOLLM2_SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tok, f"byte-level bpe ({len(tok)} tokens) trained on tests/fixtures and evaluator/evalsets text", digest


FAMILIES = ("llama", "chatml")


def build(out_dir: str | Path, dims: dict | None = None, seed: int = 0,
          tokenizer_model: Path | None = SHARED_TOKENIZER, family: str = "llama") -> Path:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    extra: dict = {}
    if family == "llama":
        tok, source = build_tokenizer(tokenizer_model)
        config = llama_config(len(tok), dims or TINY, bos=tok.bos_token_id, eos=tok.eos_token_id)
    elif family == "chatml":
        tok, source, extra["corpus_sha256"] = build_chatml_tokenizer()
        config = llama_config(len(tok), dims or TINY, bos=tok.bos_token_id, eos=tok.eos_token_id, tie=True,
                              rope_theta=CHATML_ROPE_THETA)
    else:
        raise ValueError(f"unknown tiny model family {family!r} (one of {', '.join(FAMILIES)})")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if family == "llama":
        _record_tokenizer_settings(tmp / "tokenizer_config.json")
    (tmp / "finesweep-tiny.json").write_text(json.dumps({"family": family, "tokenizer": source, "seed": seed,
                                                         "dims": dims or TINY, **extra}))
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
    parser.add_argument("--family", choices=FAMILIES, default="llama",
                        help="llama: TinyLlama-Chat-like (default); chatml: SmolLM2-135M-Instruct-like")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args()
    out = Path(args.out_dir)
    marker = out / "finesweep-tiny.json"
    # A folder built before families existed has no "family" in its marker: it is a llama one.
    if marker.exists() and not args.force and json.loads(marker.read_text()).get("family", "llama") == args.family:
        print(f"tiny model: {out} already built")
        return
    build(out, seed=args.seed, family=args.family)
    print(f"tiny model: built {out} ({args.family}; {json.loads(marker.read_text())['tokenizer']})")


if __name__ == "__main__":
    main()
