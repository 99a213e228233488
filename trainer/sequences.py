"""The token sequences a trial trains on, built once by TRL's rules, so the evaluator scores exactly them.

TRL 1.16 (checked in trl/trainer/sft_trainer.py and dpo_trainer.py, prompt/completion text rows):
- the completion gets the tokenizer's EOS appended unless it already ends with it;
- `prompt` and `prompt + completion` are tokenized with the tokenizer's special tokens (TinyLlama: BOS first;
  SmolLM2 adds none to plain text, its chat prompt starts with the <|im_start|> the template writes),
  and the completion is what follows their common prefix (`trl.data_utils.common_prefix_length`), so the
  answer's first token is the one it gets in context, not the one it gets alone;
- SFT: the sequence is cut to `max_length` from the end (truncation_mode keep_start) and dropped when no
  completion token is left;
- DPO: the prompt is the shorter common prefix of the two pairs; a pair whose prompt alone has `max_length`
  tokens or more is dropped; each of prompt+chosen and prompt+rejected is cut to `max_length`.
The trainers themselves run TRL's code; tests/test_scoring.py checks these functions give the same ids and
masks as the datasets TRL prepared. The EOS appended here is what ends an answer, so generation stops on it too
(stop_token_ids), and trainer.modeling.check_turn_end_is_eos refuses a chat template that ends turns otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scored:
    """One scored sequence: token ids and how many of the first ids are prompt (the rest is scored)."""

    ids: tuple[int, ...]
    prompt_len: int
    cut: bool  # tokens of the completion were cut by max_length (EOS lost)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]  # special tokens on, as TRL's _tokenize does for text


def _common_prefix(a: list[int], b: list[int]) -> int:
    from trl.data_utils import common_prefix_length

    return common_prefix_length(a, b)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a prompt is fed as, for training and generation alike (BOS included where the tokenizer adds it)."""
    return _ids(tokenizer, prompt)


def sft_sequence(tokenizer, prompt: str, completion: str, max_length: int | None) -> Scored | None:
    """SFTTrainer's sequence for a prompt/completion row; None when TRL drops it (nothing left to learn)."""
    full = _ids(tokenizer, prompt + _with_eos(completion, tokenizer.eos_token))
    start = _common_prefix(_ids(tokenizer, prompt), full)
    cut = max_length is not None and len(full) > max_length
    if cut:
        full = full[:max_length]
    if start >= len(full):
        return None
    return Scored(tuple(full), start, cut)


def dpo_pair(tokenizer, prompt: str, chosen: str, rejected: str,
             max_length: int | None) -> tuple[Scored, Scored] | None:
    """DPOTrainer's (chosen, rejected) sequences for a pair; None when TRL drops it (prompt fills max_length)."""
    eos = tokenizer.eos_token
    p = _ids(tokenizer, prompt)
    c = _ids(tokenizer, prompt + _with_eos(chosen, eos))
    r = _ids(tokenizer, prompt + _with_eos(rejected, eos))
    start = min(_common_prefix(p, c), _common_prefix(p, r))
    if max_length is not None and start >= max_length:
        return None
    out = []
    for full in (c, r):
        cut = max_length is not None and len(full) > max_length
        out.append(Scored(tuple(full[:max_length] if cut else full), start, cut))
    return out[0], out[1]


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's own generation_config eos_token_id (an int or a list: a chat
    model may stop on an end-of-turn token that is not the tokenizer's EOS) plus the tokenizer's EOS, which is
    what training appended to every completion. Sorted, without duplicates or None."""
    ids: set[int] = set()
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (own, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return sorted(ids)
