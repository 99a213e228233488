"""The real SmolLM2-135M-Instruct (trainer/real_model.py, build/smollm2-135m-instruct): its tokenizer and template
are the ones the chatml tiny fixture copies, and what the evaluator scores is what TRL trains on, on real rows:
the same token ids and masks for 16 GSM8K training rows (SFT) and 8 HH-RLHF pairs (DPO), and the same per-row
loss and per-sequence log-probs.

Real rows come from ../shared/data (GSM8K train, HH-RLHF harmless-base test) and from tests/fixtures when it is
absent. Each test takes seconds on 2 CPU cores: the model is loaded a few times (about 1 s each) and only a few
short rows go through it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from finesweep.prompts import render_prompt, user_turn
from finesweep.spec import parse_sweep
from finesweep.store import LocalStore
from trainer.sequences import dpo_pair, prompt_ids, sft_sequence
from trainer.tiny_model import SMOLLM2_CHAT_TEMPLATE, SMOLLM2_DEFAULT_SYSTEM, SMOLLM2_SPECIAL_TOKENS

from .conftest import FIXTURES, SHARED_DATA

pytestmark = pytest.mark.real_model

GSM8K_ROWS = 16
HH_PAIRS = 8
# 192 tokens: of the first 16 GSM8K training rows (prompt with SmolLM2's system prompt, 57-142 tokens; whole rows
# 131-467 tokens) some are kept whole and some are cut (their EOS lost), so both of TRL's cases are compared.
SFT_MAX_LENGTH = 192
DPO_MAX_LENGTH = 256
LOSS_ROWS = 3  # rows whose loss goes through the 135M model twice (TRL's compute_loss and the evaluator's)
LOGP_PAIRS = 2  # pairs whose log-probs do


def gsm8k_dataset() -> dict:
    shared = SHARED_DATA / "gsm8k" / "train.jsonl"
    if shared.is_file():
        return {"path": str(shared), "format": "gsm8k", "split": f"train[:{GSM8K_ROWS}]"}
    return {"path": str(FIXTURES / "datasets" / "gsm8k"), "format": "gsm8k", "name": "main",
            "split": f"train[:{GSM8K_ROWS}]"}


def hh_rows():
    from finesweep.spec import DatasetSpec
    from trainer.data import load_splits

    shared = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    spec = (DatasetSpec(str(shared), "hh-rlhf") if shared.is_file()
            else DatasetSpec(str(FIXTURES / "datasets" / "hh-rlhf"), "hh-rlhf"))
    rows, _ = load_splits(spec)
    return rows.select(range(min(HH_PAIRS, len(rows))))


@pytest.fixture(scope="module")
def real_tok(real_model):
    from trainer.modeling import load_tokenizer

    return load_tokenizer(str(real_model))


def test_real_tokenizer_has_smollm2s_template_and_special_tokens(real_tok, real_model):
    tok = real_tok
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert len(tok) == 49152
    assert [tok.convert_tokens_to_ids(t) for t in SMOLLM2_SPECIAL_TOKENS] == list(range(len(SMOLLM2_SPECIAL_TOKENS)))
    # No BOS (nor EOS) on plain text (../shared/reference/real-model.md).
    assert tok("hello world")["input_ids"] == [28120, 905]
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    prompt = render_prompt(tok, "chat", user_turn("What is 12 times 7?"))
    assert prompt == (f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
                      "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n")
    ids = prompt_ids(tok, prompt)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 3, "<|im_start|> only where written"
    # An assistant turn ends with the EOS that TRL appends to every completion.
    full = tok.apply_chat_template(user_turn("Q") + [{"role": "assistant", "content": "A"}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nA<|im_end|>\n")
    config = json.loads((real_model / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((real_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2


def test_chatml_fixture_copies_the_real_tokenizers_pipeline(real_model, tiny_chatml_model):
    """Everything but the vocabulary: normalizer, pre-tokenizer, post-processor (adds nothing), decoder, BPE
    settings, special tokens and their ids, tokenizer_config, chat template, tied embeddings, token ids."""
    def pipeline(folder):
        data = json.loads((folder / "tokenizer.json").read_text())
        model = {k: v for k, v in data["model"].items() if k not in ("vocab", "merges")}
        return {**{k: data[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens")},
                "model": model}

    assert pipeline(tiny_chatml_model) == pipeline(real_model)
    def read(name):
        return (json.loads((f / name).read_text()) for f in (tiny_chatml_model, real_model))

    tiny_cfg, real_cfg = read("tokenizer_config.json")
    keys = ("bos_token", "eos_token", "pad_token", "unk_token", "tokenizer_class", "model_max_length")
    assert {k: tiny_cfg.get(k) for k in keys} == {k: real_cfg.get(k) for k in keys}
    assert (tiny_chatml_model / "chat_template.jinja").read_text() == (real_model / "chat_template.jinja").read_text()
    tiny_model_cfg, real_model_cfg = read("config.json")
    keys = ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "model_type")
    assert {k: tiny_model_cfg.get(k) for k in keys} == {k: real_model_cfg.get(k) for k in keys}


def _sft_spec(real_model):
    raw = yaml.safe_load(yaml.safe_dump({
        "name": "real-sft", "stage": "sft", "model": str(real_model), "max_length": SFT_MAX_LENGTH,
        "prompt_format": "chat", "dataset": gsm8k_dataset(), "eval": {"set": "math-word-problems"},
        "trials": [{"name": "s", "r": 8, "alpha": 16, "dropout": 0.0, "lr": 1e-4, "batch_size": 4,
                    "max_steps": 1}]}))
    return parse_sweep(raw, "test", "", None).trial_specs()[0]


@pytest.fixture(scope="module")
def real_sft(real_model, tmp_path_factory):
    """The SFT recipe set up (TRL's SFTTrainer, its dataset prepared) on 16 GSM8K rows; nothing trained."""
    from trainer.sft import SFTRecipe

    spec = _sft_spec(real_model)
    recipe = SFTRecipe(spec, LocalStore(tmp_path_factory.mktemp("store")))
    recipe.setup()
    yield spec, recipe
    recipe.cleanup()


def _our_sft_sequences(spec, tok):
    from trainer.data import load_splits, render_sft

    train, _ = load_splits(spec.dataset, spec.hyper)
    assert len(train) == GSM8K_ROWS
    return [sft_sequence(tok, r["prompt"], r["completion"], SFT_MAX_LENGTH) for r in render_sft(train, tok, "chat")]


def test_real_sft_sequences_are_trls_token_for_token(real_sft):
    spec, recipe = real_sft
    tok = recipe.trainer.processing_class
    ours = _our_sft_sequences(spec, tok)
    kept = [s for s in ours if s is not None]
    prepared = recipe.trainer.train_dataset
    assert len(prepared) == len(kept) == GSM8K_ROWS, "no GSM8K prompt fills 192 tokens"
    mismatches = 0
    for seq, row in zip(kept, prepared):
        same_ids = list(seq.ids) == row["input_ids"]
        same_mask = [int(i >= seq.prompt_len) for i in range(len(seq.ids))] == [int(x != -100) for x in row["labels"]]
        mismatches += int(not (same_ids and same_mask))
    assert mismatches == 0
    # Both of TRL's cases are covered: rows kept whole (ending with <|im_end|>) and rows cut at max_length.
    cut = [s for s in kept if s.cut]
    assert 0 < len(cut) < len(kept)
    assert all(s.ids[-1] == tok.eos_token_id for s in kept if not s.cut)
    assert all(len(s.ids) == SFT_MAX_LENGTH for s in cut)
    # No BOS is added: each sequence starts with the <|im_start|> of the injected system turn, and the scored
    # part starts right after the template's "<|im_start|>assistant\n".
    for seq in kept:
        assert seq.ids[0] == tok.bos_token_id and seq.ids[1] != tok.bos_token_id
        assert tok.decode(list(seq.ids[: seq.prompt_len])).startswith(f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}")
        assert tok.decode(list(seq.ids[: seq.prompt_len])).endswith("<|im_start|>assistant\n")
    assert recipe.rows["kept"] == len(kept) and recipe.rows["cut"] == len(cut)


def test_real_per_row_loss_equals_the_trainers_loss(real_sft):
    """The evaluator's -sum(log p)/n against TRL's own compute_loss, one row at a time, fp32 on CPU, with a LoRA
    adapter that changes the model, on rows kept whole and rows cut at max_length."""
    from evaluator.scoring import sequence_logprobs

    spec, recipe = real_sft
    trainer = recipe.trainer
    model, tok = trainer.model, trainer.processing_class
    seqs = [s for s in _our_sft_sequences(spec, tok) if s is not None]
    prepared = trainer.train_dataset
    # The shortest whole rows and the first cut ones: both kinds, little compute.
    whole = sorted((i for i, s in enumerate(seqs) if not s.cut), key=lambda i: len(seqs[i].ids))
    cut = [i for i, s in enumerate(seqs) if s.cut]
    rows = whole[: LOSS_ROWS - 1] + cut[:1]
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        model.eval()
        ours = sequence_logprobs(model, tok, [seqs[i] for i in rows], batch_size=len(rows))
        for i, (logp, n) in zip(rows, ours):
            batch = trainer.data_collator([prepared[i]])
            with torch.no_grad():
                trl_loss = float(trainer.compute_loss(model, batch))
            assert n == sum(1 for x in prepared[i]["labels"][1:] if x != -100)
            assert -logp / n == pytest.approx(trl_loss, abs=1e-5), f"row {i}"
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


def test_real_dpo_pairs_and_logps_are_trls(real_model, real_tok, tmp_path):
    """8 HH-RLHF pairs: the pairs trainer.sequences.dpo_pair builds are the ids and completion masks TRL's
    DPOTrainer feeds its model (its prepared dataset through its collator, which cuts to max_length), and the
    evaluator's per-sequence log-probs are the reference log-probs TRL computes for the same pairs."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from evaluator.scoring import sequence_logprobs
    from trainer.data import render_dpo

    tok = real_tok
    rendered = render_dpo(hh_rows(), tok, "chat")
    assert len(rendered) == HH_PAIRS
    ours = [dpo_pair(tok, p["prompt"], p["chosen"], p["rejected"], DPO_MAX_LENGTH) for p in rendered]
    kept = [pair for pair in ours if pair is not None]
    model = AutoModelForCausalLM.from_pretrained(str(real_model), dtype=torch.float32)
    assert model.lm_head.weight is model.get_input_embeddings().weight, "tied embeddings"
    # bf16=False as the recipe sets it on CPU (trainer.recipe.training_kwargs): TRL 1.16's configs default to
    # bf16=True, which autocasts TRL's forward passes to bfloat16 even with use_cpu (log-probs off by ~0.1 nat).
    args = DPOConfig(output_dir=str(tmp_path / "o"), max_length=DPO_MAX_LENGTH, report_to="none", use_cpu=True,
                     bf16=False, per_device_train_batch_size=2, max_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=rendered, processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    prepared = trainer.train_dataset
    assert len(prepared) == len(kept) > 0
    mismatches = 0
    batches = []
    for (chosen, rejected), row in zip(kept, prepared):
        batch = trainer.data_collator([row])
        batches.append(batch)
        for j, seq in enumerate((chosen, rejected)):
            n = int(batch["attention_mask"][j].sum())
            same_ids = batch["input_ids"][j, :n].tolist() == list(seq.ids)
            same_mask = batch["completion_mask"][j, :n].tolist() == [int(i >= seq.prompt_len)
                                                                     for i in range(len(seq.ids))]
            mismatches += int(not (same_ids and same_mask))
    assert mismatches == 0
    assert all(pair[0].ids[0] == tok.bos_token_id and pair[0].ids[1] != tok.bos_token_id for pair in kept)

    # Log-probs of the shortest pairs: TRL's reference pass (adapter disabled) vs the evaluator's.
    trainer.model.eval()
    shortest = sorted(range(len(kept)), key=lambda i: max(len(kept[i][0].ids), len(kept[i][1].ids)))[:LOGP_PAIRS]
    with trainer.model.disable_adapter():
        mine = sequence_logprobs(trainer.model, tok, [s for i in shortest for s in kept[i]], batch_size=2)
    for k, i in enumerate(shortest):
        with torch.no_grad():
            trl_logps = trainer.compute_ref_log_probs(trainer.model, batches[i])
        for j, name in enumerate(("chosen", "rejected")):
            logp, n = mine[2 * k + j]
            assert n == int(batches[i]["completion_mask"][j, 1:].sum())
            # Equal per token within 1e-5 relative (TRL's chunked fused LM head and the evaluator's full
            # log-softmax over 49,152 logits round differently in fp32: ~1e-5 nat per token at ~3 nats per token).
            assert logp / n == pytest.approx(float(trl_logps[j][0]) / n, abs=1e-5, rel=1e-5), f"pair {i} {name}"
