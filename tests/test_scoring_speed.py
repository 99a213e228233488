"""Cheaper scoring, same figures (issue 20): evaluator.scoring batches sequences and prompts longest first and
computes logits only at the scored positions; every figure must stay what one-sequence-at-a-time scoring with a
full-vocabulary log_softmax gives, results in input order. Both tiny families ([llama], [chatml]), a LoRA adapter
that really changes the model, a few seconds each."""

from __future__ import annotations

import math

import pytest
import torch

from finesweep.prompts import render_prompt, user_turn
from trainer.sequences import dpo_pair, sft_sequence

from .conftest import FIXTURES

PREFS = FIXTURES / "datasets" / "preferences-local" / "train.jsonl"
# fp32 on CPU: a batch changes matmul shapes, hence the last bits of a sum of tens of log-probs.
REL, ABS = 1e-5, 1e-4


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


@pytest.fixture(scope="module")
def scorer(tiny_family):
    """(model with a random, nonzero LoRA adapter, tokenizer), fp32 on CPU."""
    from peft import get_peft_model

    from finesweep.spec import Hyper
    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config
    from trainer.runtime import detect_hardware

    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_family))
    model = get_peft_model(load_base_model(str(tiny_family), detect_hardware()), lora_config(Hyper(r=4, alpha=8)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), tok


def reference_logprobs(model, tok, sequences) -> list[tuple[float, int]]:
    """The plain definition: one sequence at a time (no padding), log_softmax over the full vocabulary at every
    position, summed over the completion tokens."""
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq.ids])
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token = logps.gather(-1, ids[0, 1:, None]).squeeze(-1)
            start = max(seq.prompt_len, 1) - 1  # token t (t >= prompt_len) is predicted at position t - 1
            out.append((float(token[start:].sum()), len(seq.ids) - max(seq.prompt_len, 1)))
    return out


def mixed_sequences(tok, max_length: int = 160):
    """SFT sequences of very different lengths, deliberately not in length order: one-word answers, long
    answers, and answers cut by max_length."""
    questions = ["Hi?", "What is the boiling point of water at sea level, in degrees Celsius and Fahrenheit?",
                 "Name a colour.", "Explain in detail how a steam engine turns heat into motion.", "2+2?",
                 "Why is the sky blue?", "List three prime numbers.", "Tell me a long story about a dragon.",
                 "Ok", "Describe photosynthesis step by step for a ten-year-old."]
    answers = ["Hello.", "Water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit, at sea level.",
               "Blue.", " ".join(["The piston moves as steam expands and the crank turns the wheel."] * 8), "4",
               "Rayleigh scattering: short wavelengths scatter more, so blue light reaches us from every direction.",
               "2, 3 and 5.", " ".join(["The dragon flew over the mountains and rested by a lake."] * 12), "Okay!",
               "Plants take in light, water and carbon dioxide and make sugar and oxygen."]
    seqs = [sft_sequence(tok, render_prompt(tok, "chat", user_turn(q)), a, max_length)
            for q, a in zip(questions, answers)]
    assert all(s is not None for s in seqs)
    return seqs


def test_sequence_logprobs_equal_one_at_a_time_full_softmax_in_input_order(scorer):
    from evaluator.scoring import longest_first, sequence_logprobs

    model, tok = scorer
    seqs = mixed_sequences(tok)
    lengths = [len(s.ids) for s in seqs]
    assert max(lengths) > 3 * min(lengths) and any(s.cut for s in seqs)
    assert longest_first(lengths) != list(range(len(seqs))), "the input is not already in length order"
    expected = reference_logprobs(model, tok, seqs)
    for batch_size in (1, 3, 4, 7, 32):  # 10 rows: batches that do not divide the count, and one batch for all
        got = sequence_logprobs(model, tok, seqs, batch_size)
        assert [n for _, n in got] == [n for _, n in expected], batch_size
        bad = [(i, g, e) for i, ((g, _), (e, _)) in enumerate(zip(got, expected)) if not close(g, e)]
        assert not bad, (batch_size, bad)
    # Any order in, the same order out.
    perm = [3, 0, 9, 5, 1, 8, 2, 7, 6, 4]
    shuffled = sequence_logprobs(model, tok, [seqs[i] for i in perm], 4)
    assert all(close(shuffled[j][0], expected[i][0]) and shuffled[j][1] == expected[i][1] for j, i in enumerate(perm))
    assert sequence_logprobs(model, tok, [], 4) == []


def test_logits_are_computed_at_scored_positions_only(scorer):
    """The vocabulary projection sees one row per scored token (none for the prompt or the padding), and a model
    that ignores logits_to_keep (full [B, T, V] logits) still gives the same figures."""
    from evaluator.scoring import sequence_logprobs

    model, tok = scorer
    seqs = mixed_sequences(tok)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    try:
        got = sequence_logprobs(model, tok, seqs, 4)
    finally:
        hook.remove()
    assert [shape[0] for shape in rows] and all(len(shape) == 2 for shape in rows), rows
    assert sum(shape[0] for shape in rows) == sum(n for _, n in got) == sum(s.completion_tokens for s in seqs)

    class FullLogits:  # drops logits_to_keep: every position's logits, as a model without the argument gives
        device = model.device

        def __call__(self, input_ids, attention_mask, logits_to_keep):
            return model(input_ids=input_ids, attention_mask=attention_mask)

    full = sequence_logprobs(FullLogits(), tok, seqs, 4)
    assert all(close(a[0], b[0]) and a[1] == b[1] for a, b in zip(full, got))


def reference_preference_scores(model, tok, pairs, beta, reference):
    """preference_scores' figures from one-at-a-time scoring: four separate passes, as it did before."""
    from evaluator.scoring import FIXED_BETA, _neg_logsigmoid

    chosen = reference_logprobs(model, tok, [c for c, _ in pairs])
    rejected = reference_logprobs(model, tok, [r for _, r in pairs])
    with reference():
        ref_c = reference_logprobs(model, tok, [c for c, _ in pairs])
        ref_r = reference_logprobs(model, tok, [r for _, r in pairs])
    logratio = [(c[0] - rc[0]) - (r[0] - rr[0]) for c, r, rc, rr in zip(chosen, rejected, ref_c, ref_r)]
    return chosen, {"logp_preference_accuracy": [int(c[0] > r[0]) for c, r in zip(chosen, rejected)],
                    "lennorm_preference_accuracy": [int(c[0] / max(c[1], 1) > r[0] / max(r[1], 1))
                                                    for c, r in zip(chosen, rejected)],
                    "preference_accuracy": [int(m > 0) for m in logratio],
                    "reward_margin": [beta * m for m in logratio], "logratio_margin": logratio,
                    "heldout_dpo_loss": [_neg_logsigmoid(FIXED_BETA * m) for m in logratio],
                    "chosen_change": [c[0] - rc[0] for c, rc in zip(chosen, ref_c)],
                    "rejected_change": [r[0] - rr[0] for r, rr in zip(rejected, ref_r)]}


def test_preference_scores_equal_four_one_at_a_time_passes(scorer):
    from evaluator.scoring import preference_scores
    from trainer.data import load_splits, render_dpo
    from finesweep.spec import DatasetSpec

    model, tok = scorer
    rows, _ = load_splits(DatasetSpec(str(PREFS), "preference"), None)
    pairs = [dpo_pair(tok, p["prompt"], p["chosen"], p["rejected"], 96) for p in render_dpo(rows, tok, "chat")]
    pairs = [p for p in pairs if p is not None][:11]
    assert len(pairs) == 11
    chosen, expected = reference_preference_scores(model, tok, pairs, 0.25, model.disable_adapter)
    got = preference_scores(model, tok, pairs, 4, 0.25, reference=model.disable_adapter)
    assert all(close(g[0], e[0]) and g[1] == e[1] for g, e in zip(got["chosen"], chosen))
    for metric, values in got["rows"].items():
        want = expected[metric]
        if metric.endswith("accuracy"):
            # A flip would need two scores within float noise of each other; none is here.
            assert values == want, metric
        else:
            assert all(close(g, e) for g, e in zip(values, want)), (metric, values, want)
    health = got["health"]
    assert health["pairs"] == 11
    for key in ("chosen_change", "rejected_change"):
        assert health[f"{key.split('_')[0]}_logp_change"] == pytest.approx(sum(expected[key]) / 11, abs=1e-4)
    # Without a reference: the log-prob preference alone, the same figures.
    plain = preference_scores(model, tok, pairs, 3, 0.25)
    assert plain["health"] is None and set(plain["rows"]) == {"logp_preference_accuracy",
                                                               "lennorm_preference_accuracy"}
    assert plain["rows"]["logp_preference_accuracy"] == expected["logp_preference_accuracy"]


def generation_prompts(tok):
    questions = ["Hi", "What is the capital of France? Answer with one word, please, and nothing else at all.",
                 "2+2?", "Write a short poem about the sea and the wind and the boats that sail on it at night.",
                 "Name a colour.", "Explain gravity.", "Tell me about the history of Rome in three sentences."]
    return [render_prompt(tok, "chat", user_turn(q)) for q in questions]


def test_generate_answers_in_input_order_equal_one_at_a_time(scorer):
    """Greedy answers batched longest first are the answers each prompt gets alone (no padding at all), in the
    order of the prompts; hit_limit_rows index the prompts as given."""
    from evaluator.scoring import generate, longest_first

    model, tok = scorer
    prompts = generation_prompts(tok)
    assert longest_first([len(tok(p)["input_ids"]) for p in prompts]) != list(range(len(prompts)))
    side = tok.padding_side
    alone, alone_record = generate(model, tok, prompts, max_new_tokens=10, batch_size=1)
    batched, record = generate(model, tok, prompts, max_new_tokens=10, batch_size=3)
    assert batched == alone
    assert record["hit_limit_rows"] == alone_record["hit_limit_rows"]
    assert record["new_tokens"] == alone_record["new_tokens"]
    assert record["batch_order"].startswith("longest prompt first")
    assert tok.padding_side == side


class _EchoLengthModel:
    """Stands in for a causal LM: each row's answer is `n` copies of a word, n = its prompt's token count, then
    a stop id when n is even; when n is odd, no stop id (the answer runs out of max_new_tokens)."""

    def __init__(self, word: int, eos: int, max_new: int):
        from transformers import GenerationConfig

        self.word, self.eos, self.max_new = word, eos, max_new
        self.device = torch.device("cpu")
        self.generation_config = GenerationConfig(eos_token_id=eos)
        self.batches = []

    def generate(self, input_ids, attention_mask, generation_config):
        lengths = attention_mask.sum(dim=1).tolist()
        self.batches.append(lengths)
        rows = [([self.word] * n + [self.eos] * (self.max_new - n)) if n % 2 == 0 else [self.word] * self.max_new
                for n in lengths]
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


def test_generate_batches_longest_first_and_maps_answers_and_hit_limit_rows_back(tiny_model):
    from evaluator.scoring import generate
    from trainer.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    word = tok("hello", add_special_tokens=False)["input_ids"][0]
    prompts = ["a b", "a b c d e f g h", "a", "a b c d", "a b c", "a b c d e f", "a b c d e"]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(lengths)
    model = _EchoLengthModel(word, tok.eos_token_id, max_new=max(lengths) + 1)
    answers, record = generate(model, tok, prompts, max_new_tokens=model.max_new, batch_size=3)
    flat = [n for batch in model.batches for n in batch]
    assert flat == sorted(lengths, reverse=True) and [len(b) for b in model.batches] == [3, 3, 1]
    text = lambda n: tok.decode([word] * n, skip_special_tokens=True).strip()  # noqa: E731
    assert answers == [text(n if n % 2 == 0 else model.max_new) for n in lengths]
    assert record["hit_limit_rows"] == [i for i, n in enumerate(lengths) if n % 2]
    assert record["hit_limit"] == len(record["hit_limit_rows"]) > 0


def test_a_set_named_twice_is_generated_once():
    from types import SimpleNamespace

    from evaluator.evaluate import set_names

    ev = SimpleNamespace(set="a", extra_sets=("b", "a", "c", "b"))
    assert set_names(ev) == ["a", "b", "c"]
    assert set_names(SimpleNamespace(set="a", extra_sets=())) == ["a"]
