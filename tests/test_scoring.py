"""Score exactly what was trained (issue 10): the tiny model's tokenizer behaves like TinyLlama's (BOS, chat
template, special tokens), the evaluator's sequences are TRL's (same ids, same mask, same truncation and drop
rules), and its per-row loss is the trainer's loss on the same rows.

The sequence and loss tests run on both tiny families (`tiny_family`, ids [llama] and [chatml]): TinyLlama's
conventions (BOS added to every text, SentencePiece, untied embeddings) and SmolLM2's (ChatML with an injected
system prompt, no BOS on plain text, byte-level BPE, tied embeddings). tests/test_real_model.py repeats the
fidelity checks on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import torch

from finesweep.prompts import TINYLLAMA_CHAT_TEMPLATE, render_prompt, user_turn
from finesweep.spec import StartRef
from finesweep.store import LocalStore
from trainer.sequences import dpo_pair, prompt_ids, sft_sequence

from .conftest import FIXTURES, model_family, shared_file
from .test_training import PREFS, sweep_spec

# ../shared/reference/tinyllama-tokenizer.md: the published template's rendering of this conversation.
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
PUBLISHED_RENDERING = ("<|system|>\nYou are terse.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n"
                       "<|user|>\n2+2?</s>\n<|assistant|>\n")


def published_template() -> str:
    """The chat_template JSON string exactly as ../shared/reference/tinyllama-tokenizer.md quotes it."""
    doc = shared_file("..", "reference", "tinyllama-tokenizer.md").read_text(encoding="utf-8")
    line = next(line for line in doc.splitlines() if line.startswith('"{% for message'))
    return json.loads(line)


# max_length per family at which the fixture rows show TRL's cut and drop rules (some rows kept, some dropped, some
# cut): the chatml prompts are longer (SmolLM2's injected system prompt, a 2,048-token vocabulary).
SFT_CUT_LENGTH = {"llama": 48, "chatml": 80}
DPO_CUT_LENGTH = {"llama": 26, "chatml": 54}


@pytest.fixture(scope="module")
def tok(tiny_model):
    from trainer.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def family_tok(tiny_family):
    from trainer.modeling import load_tokenizer

    return load_tokenizer(str(tiny_family))


def sentencepiece_reference_ids(text: str) -> list[int]:
    """Token ids of `text` from the real Llama-2 SentencePiece model under TinyLlama's settings, computed
    without transformers: BOS first, `</s>` as the special id 2, and (legacy=False) no dummy-prefix space for
    text that follows a special token, only at the very start of the text."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(shared_file("tokenizer-llama2", "tokenizer.model")))
    unk_len = len(sp.encode("<unk>"))
    ids, at_start = [1], True
    for part in re.split(r"(</s>)", text):
        if part == "</s>":
            ids.append(2)
        elif part:
            ids += sp.encode(part) if at_start else sp.encode("<unk>" + part)[unk_len:]
        at_start = False if part else at_start
    return ids


def test_tiny_tokenizer_renders_tinyllama_template_byte_for_byte(tok):
    assert published_template() == TINYLLAMA_CHAT_TEMPLATE == tok.chat_template
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == PUBLISHED_RENDERING
    # Regression (bug 2): render_prompt appended an extra "\n", so prompts ended "<|assistant|>\n\n".
    prompt = render_prompt(tok, "chat", CONVERSATION)
    assert prompt == PUBLISHED_RENDERING and prompt.endswith("</s>\n<|assistant|>\n")


def test_tiny_tokenizer_ids_match_sentencepiece_under_tinyllama_settings(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert len(tok) == 32000 and tok.model_max_length == 2048
    assert tok("Hi")["input_ids"][0] == 1 and tok("Hi")["input_ids"][-1] != 2, "BOS on, EOS off"
    text = PUBLISHED_RENDERING + "Four, since 2+2 = 4.</s>"
    assert tok(text)["input_ids"] == sentencepiece_reference_ids(text)
    assert "<|assistant|>" not in tok.get_vocab() and "<|user|>" not in tok.all_special_tokens


def test_scored_sequence_has_bos_and_the_answers_in_context_first_token(family_tok, tiny_family):
    """Regression (bug 1): the evaluator tokenized without special tokens and the answer on its own, so the
    scored sequence had no <s> and the answer began with '▁Hello' where training saw 'Hello'.
    ChatML (no BOS added to text): the sequence starts with the <|im_start|> the template writes, once."""
    tok = family_tok
    prompt = render_prompt(tok, "chat", user_turn("Say hello"))
    seq = sft_sequence(tok, prompt, "Hello there", 512)
    assert seq.ids[0] == tok.bos_token_id and seq.ids[-1] == tok.eos_token_id
    assert list(seq.ids[: seq.prompt_len]) == prompt_ids(tok, prompt)
    # The whole sequence is the tokenizer's one pass over prompt + answer + EOS, as TRL tokenizes it.
    assert list(seq.ids) == tok(prompt + "Hello there" + tok.eos_token)["input_ids"]
    in_context = tok.convert_ids_to_tokens([seq.ids[seq.prompt_len]])[0]
    alone = tok.convert_ids_to_tokens(tok("Hello there", add_special_tokens=False)["input_ids"][:1])[0]
    if model_family(tiny_family) == "llama":
        assert (in_context, alone) == ("Hello", "▁Hello")
    else:
        # Byte-level BPE, no BOS: the template's <|im_start|> is the first id and nothing adds a second one.
        assert tok("Hello there")["input_ids"] == tok("Hello there", add_special_tokens=False)["input_ids"]
        assert seq.ids[1] != tok.bos_token_id and seq.ids.count(tok.bos_token_id) == prompt.count(tok.bos_token)
        assert tok.decode(list(seq.ids[seq.prompt_len:])) == "Hello there" + tok.eos_token
        assert in_context.startswith("H")


def _sft_recipe(tiny_model, tmp_path, max_length: int):
    from trainer.sft import SFTRecipe

    trial = {"name": "s", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 1e-3, "batch_size": 4, "max_steps": 1}
    spec = sweep_spec(tiny_model, "sft", trial, str(FIXTURES / "datasets" / "databricks-dolly-15k"), "dolly",
                      max_length=max_length)
    spec = spec.__class__(**{**spec.__dict__, "dataset": spec.dataset.__class__(
        **{**spec.dataset.__dict__, "split": "train"})})
    recipe = SFTRecipe(spec, LocalStore(tmp_path))
    recipe.setup()
    return spec, recipe


def test_sft_sequences_are_the_ones_trl_trains_on_with_its_cut_and_drop_rules(tiny_family, tmp_path):
    from trainer.data import load_splits, render_sft

    length = SFT_CUT_LENGTH[model_family(tiny_family)]
    spec, recipe = _sft_recipe(tiny_family, tmp_path, max_length=length)
    try:
        tok = recipe.trainer.processing_class
        train, _ = load_splits(spec.dataset, spec.hyper)
        ours = [sft_sequence(tok, r["prompt"], r["completion"], length) for r in render_sft(train, tok, "chat")]
        kept = [s for s in ours if s is not None]
        prepared = recipe.trainer.train_dataset
        assert len(prepared) == len(kept) and len(kept) < len(ours), f"some rows must be dropped at {length} tokens"
        for seq, row in zip(kept, prepared):
            assert list(seq.ids) == row["input_ids"]
            assert [int(i >= seq.prompt_len) for i in range(len(seq.ids))] == [int(x != -100) for x in row["labels"]]
        assert recipe.rows["kept"] == len(kept)
        assert recipe.rows["dropped_by_max_length"] == len(ours) - len(kept)
        assert recipe.rows["cut"] == sum(s.cut for s in kept) > 0, "rows that lose their EOS are counted"
    finally:
        recipe.cleanup()


def test_evaluator_per_row_loss_equals_the_trainers_loss(tiny_family, tmp_path):
    """Same tokens, same mask, same number: the trainer's own compute_loss on one row at a time vs the
    evaluator's -sum(log p)/n, fp32 on CPU, with a LoRA adapter that really changes the model."""
    from evaluator.scoring import sequence_logprobs
    from trainer.data import load_splits, render_sft

    spec, recipe = _sft_recipe(tiny_family, tmp_path, max_length=128)
    try:
        trainer = recipe.trainer
        model, tok = trainer.model, trainer.processing_class
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        model.eval()
        prepared = trainer.train_dataset
        train, _ = load_splits(spec.dataset, spec.hyper)
        seqs = [s for s in (sft_sequence(tok, r["prompt"], r["completion"], 128)
                            for r in render_sft(train, tok, "chat")) if s is not None]
        ours = sequence_logprobs(model, tok, seqs, batch_size=5)
        checked = 0
        for i in range(0, len(prepared), 3):
            batch = trainer.data_collator([prepared[i]])
            with torch.no_grad():
                trl_loss = float(trainer.compute_loss(model, batch))
            logp, n = ours[i]
            assert -logp / n == pytest.approx(trl_loss, abs=1e-4), f"row {i}"
            checked += 1
        assert checked >= 8
    finally:
        recipe.cleanup()


@pytest.fixture(scope="module")
def sft_start(tiny_family, tmp_path_factory):
    """A 2-step SFT trial in a store: a real (nonzero) start adapter for DPO recipes built in these tests."""
    from trainer.sft import SFTRecipe

    store = LocalStore(tmp_path_factory.mktemp("store"))
    trial = {"name": "s", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 1e-2, "batch_size": 4, "max_steps": 2}
    spec = sweep_spec(tiny_family, "sft", trial, str(FIXTURES / "datasets" / "instructions-local" / "train.jsonl"),
                      "instruction")
    SFTRecipe(spec, store).run()
    return spec, store


def _dpo_recipe(tiny_model, sft_start, max_length: int):
    from trainer.dpo import DPORecipe

    sft, store = sft_start
    trial = {"name": "d", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 1e-3, "beta": 0.1, "batch_size": 4,
             "max_steps": 1}
    spec = sweep_spec(tiny_model, "dpo", trial, PREFS, "preference", start=StartRef(sft.sweep, sft.trial_id),
                      max_length=max_length)
    spec = spec.__class__(**{**spec.__dict__, "dataset": spec.dataset.__class__(
        **{**spec.dataset.__dict__, "split": "train"})})
    recipe = DPORecipe(spec, store)
    recipe.setup()
    return spec, recipe


def test_dpo_pairs_are_trls_and_truncated_pairs_are_dropped_not_failed(tiny_family, sft_start):
    """Regression (bug 3): a pair whose prompt fills max_length scored (0, 0) tokens and counted as a wrong
    preference; TRL drops it from training, and so does the evaluator now."""
    from trainer.data import load_splits, render_dpo

    length = DPO_CUT_LENGTH[model_family(tiny_family)]
    spec, recipe = _dpo_recipe(tiny_family, sft_start, max_length=length)
    try:
        tok = recipe.trainer.processing_class
        train, _ = load_splits(spec.dataset, spec.hyper)
        ours = [dpo_pair(tok, p["prompt"], p["chosen"], p["rejected"], length)
                for p in render_dpo(train, tok, "chat")]
        kept = [pair for pair in ours if pair is not None]
        prepared = recipe.trainer.train_dataset
        assert 0 < len(kept) < len(ours) and len(prepared) == len(kept)
        # TRL's collator cuts prompt+answer to max_length at batch time; ours are cut when built. The recipe
        # feeds pairs longest first (speed.order_rows), so compare as sorted lists.
        trl = sorted((tuple((r["prompt_ids"] + r["chosen_ids"])[:length]),
                      tuple((r["prompt_ids"] + r["rejected_ids"])[:length]), len(r["prompt_ids"])) for r in prepared)
        mine = sorted((c.ids, r.ids, c.prompt_len) for c, r in kept)
        assert trl == mine
        assert all(c.prompt_len == r.prompt_len for c, r in kept)
        assert recipe.rows["dropped_by_max_length"] == len(ours) - len(kept)
    finally:
        recipe.cleanup()


def test_real_hh_rlhf_pairs_dropped_by_trl_rules_and_bad_histories(tiny_family, tmp_path):
    """The real HH-RLHF harmless-base test file: the evaluator drops exactly the pairs TRL drops at 256
    tokens, and the loader drops rows whose chosen/rejected histories differ or whose answer is empty."""
    from finesweep.spec import DatasetSpec
    from trainer.data import load_splits, render_dpo

    source = shared_file("hh-rlhf", "harmless-base-test.jsonl.gz")
    with gzip.open(source, "rt") as f:
        raw_rows = sum(1 for line in f if line.strip())
    report: dict = {}
    rows, _ = load_splits(DatasetSpec(str(source), "hh-rlhf"), None, report)
    dropped = report["dropped"]
    assert dropped.get("chosen and rejected dialogues differ before the final answer", 0) >= 1
    assert sum(dropped.values()) + len(rows) == raw_rows

    from trainer.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_family))
    rendered = list(render_dpo(rows, tok, "chat"))
    at_256 = sum(dpo_pair(tok, p["prompt"], p["chosen"], p["rejected"], 256) is None for p in rendered)
    at_512 = sum(dpo_pair(tok, p["prompt"], p["chosen"], p["rejected"], 512) is None for p in rendered)
    assert 0 < at_512 < at_256 < len(rendered)
    # TRL's own preprocessing of the same rows drops the same number at 256 (DPOTrainer's dataset prep).
    from trl import DPOConfig, DPOTrainer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_family))
    args = DPOConfig(output_dir=str(tmp_path / "o"), max_length=256, report_to="none", use_cpu=True,
                     per_device_train_batch_size=2, max_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=render_dpo(rows, tok, "chat"), processing_class=tok)
    assert len(rendered) - len(trainer.train_dataset) == at_256
    print(f"HH-RLHF harmless-base test: {raw_rows} rows, dropped in loading {dropped}, "
          f"{len(rendered)} pairs; TRL drops {at_512} at 512 tokens and {at_256} at 256")
