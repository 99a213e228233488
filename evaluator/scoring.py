"""Model-side scoring: batched greedy generation, log-probs of answers given prompts, DPO rewards."""

from __future__ import annotations

import logging
import math
import time

import torch

from trainer.sequences import Scored, stop_token_ids

log = logging.getLogger("finesweep")


# The settings a generation that ran out of room is fixed by (eval.max_new_tokens for the eval sets,
# eval.benchmark.max_new_tokens for the GSM8K benchmark); the evaluator names the one it used.
MAX_NEW_TOKENS_SETTINGS = "eval.max_new_tokens (eval.benchmark.max_new_tokens for the benchmark)"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             setting: str = MAX_NEW_TOKENS_SETTINGS) -> tuple[list[str], dict]:
    """Greedy, batched, KV cache on; left padding so every prompt ends where generation starts. Prompts are
    batched longest first (by token count; ties keep their order), so a batch holds prompts of similar length and
    pads little, and the first batch is the largest; answers and hit_limit_rows come back in the order of
    `prompts`. An answer ends at the first stop id (stop_token_ids); one that reaches max_new_tokens without any is
    counted in the record's hit_limit (its rows, indexes into `prompts`, in hit_limit_rows) and a warning names
    `setting`, the knob to raise."""
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
    stop_set = torch.tensor(stops, dtype=torch.long)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str | None] = [None] * len(prompts)
    new_tokens, hit_limit, start = 0, [], time.time()
    # Special tokens on: the prompt ids the trainer used (BOS first where the tokenizer adds one), see
    # trainer.sequences.prompt_ids. The same call per batch below gives the same ids.
    order = longest_first([len(ids) for ids in tokenizer(list(prompts))["input_ids"]]) if prompts else []
    try:
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            batch = tokenizer([prompts[k] for k in rows], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**batch, generation_config=config)
            gen = out[:, batch["input_ids"].shape[1]:].cpu()
            for k, row in zip(rows, gen):
                # Cut at the first stop id: generate pads a finished row after its stop token, and a pad id may
                # be a stop id (pad == eos, e.g. SmolLM2) or an ordinary one, so padding is never looked for.
                # A row with no stop id ran all max_new_tokens (nothing else ends a greedy generation).
                row, stopped = _until_stop(row, stop_set)
                if not stopped:
                    hit_limit.append(k)
                new_tokens += int(row.numel())
                answers[k] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    hit_limit.sort()
    elapsed = time.time() - start
    record = {k: v for k, v in config.to_diff_dict().items() if not k.startswith("transformers")}
    record.update(batch_size=batch_size, batch_order="longest prompt first (answers in input order)",
                  new_tokens=new_tokens, seconds=round(elapsed, 3),
                  tokens_per_s=round(new_tokens / elapsed, 2) if elapsed else None,
                  stop_token_ids=stops, stop_tokens=tokenizer.convert_ids_to_tokens(stops),
                  hit_limit=len(hit_limit), hit_limit_rows=hit_limit)
    own = getattr(model, "generation_config", None)
    if own is not None:  # transformers fills what the config above leaves unset (None) from the model's own
        record["model_generation_config"] = {k: v for k, v in own.to_diff_dict().items()
                                             if not k.startswith("transformers")}
    if hit_limit:
        log.warning("%d of %d generations reached max_new_tokens=%d without a stop token (ids %s): their answers are "
                    "cut short, which lowers BLEU/accuracy for length rather than quality. Fix: raise %s in the "
                    "sweep file", len(hit_limit), len(prompts), max_new_tokens, ", ".join(map(str, stops)) or "none",
                    setting)
    return answers, record


def longest_first(lengths: list[int]) -> list[int]:
    """Indexes ordered by length, longest first; equal lengths keep their order (a stable sort)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _until_stop(row: torch.Tensor, stop_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The row up to (not including) its first stop id, and whether there was one."""
    hits = torch.isin(row, stop_ids).nonzero()
    return (row[: hits[0, 0]], True) if len(hits) else (row, False)


# Scored positions whose full-vocabulary fp32 log_softmax is computed at once: bounds the fp32 temporaries to
# LOGSOFTMAX_CHUNK x vocab (50 MB at SmolLM2's 49,152 tokens).
LOGSOFTMAX_CHUNK = 256


@torch.no_grad()
def sequence_logprobs(model, tokenizer, sequences: list[Scored], batch_size: int) -> list[tuple[float, int]]:
    """(sum of log p(completion tokens | everything before them), completion token count) per sequence, for
    sequences built by trainer.sequences: the tokens and the mask the trainer's loss is over. Results are in the
    order of `sequences`.

    Sequences are batched longest first (a row's score does not depend on its batch: sorting only removes padding,
    and the first batch shows the peak memory). The logits are computed at the scored positions only (the model's
    `logits_to_keep` mask: the vocabulary projection and the fp32 log_softmax skip the prompt and the padding),
    log p(token) = log_softmax(logits)[token] in fp32, LOGSOFTMAX_CHUNK positions at a time."""
    results: list[tuple[float, int] | None] = [None] * len(sequences)
    order = longest_first([len(s.ids) for s in sequences])
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        batch = [sequences[k] for k in rows]
        width = max(len(s.ids) for s in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for j, seq in enumerate(batch):  # right padding: positions stay aligned with training
            input_ids[j, : len(seq.ids)] = torch.tensor(seq.ids)
            attention[j, : len(seq.ids)] = 1
            scored[j, seq.prompt_len: len(seq.ids)] = True
        target = scored[:, 1:]  # token t is predicted from the tokens before it: by the logits at position t-1
        keep = torch.zeros_like(scored)
        keep[:, :-1] = target
        labels = input_ids[:, 1:][target]  # the scored tokens, row by row: the order of the kept logits
        input_ids, attention, keep = (t.to(model.device) for t in (input_ids, attention, keep))
        logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep).logits
        if logits.dim() == 3:  # a model that computed every position anyway
            logits = logits[keep]
        token_logps = _token_logprobs(logits, labels.to(logits.device)).cpu()
        for k, row_logps in zip(rows, torch.split(token_logps, target.sum(dim=1).tolist())):
            results[k] = (float(row_logps.sum()), int(row_logps.numel()))
    return results


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[label] per row of [N, vocab] logits, in fp32, LOGSOFTMAX_CHUNK rows at a time (the
    same fp32 log_softmax as over the whole batch, so the same roundings)."""
    out = torch.empty(len(labels), dtype=torch.float32, device=logits.device)
    for s in range(0, len(labels), LOGSOFTMAX_CHUNK):
        chunk = torch.log_softmax(logits[s:s + LOGSOFTMAX_CHUNK].float(), dim=-1)
        out[s:s + LOGSOFTMAX_CHUNK] = chunk.gather(-1, labels[s:s + LOGSOFTMAX_CHUNK, None]).squeeze(-1)
    return out


def perplexity(scores: list[tuple[float, int]]) -> float | None:
    """Token-weighted perplexity over rows: exp(-sum log p / sum tokens)."""
    tokens = sum(n for _, n in scores)
    return math.exp(-sum(lp for lp, _ in scores) / tokens) if tokens else None


# Held-out DPO loss is recomputed at this beta for every trial, so a beta sweep is compared on one scale.
FIXED_BETA = 0.1


def preference_scores(model, tokenizer, pairs: list[tuple[Scored, Scored]], batch_size: int, beta: float,
                      reference=None) -> dict:
    """Per-pair figures over pairs built by trainer.sequences.dpo_pair (TRL's drops already applied): log-prob
    preference (raw and length-normalised) and, given a reference context, the DPO implicit reward. Chosen and
    rejected answers are scored together (one length-sorted pass over the 2N sequences), once with the model and
    once in the reference context."""
    chosen, rejected = _pair_logprobs(model, tokenizer, pairs, batch_size)
    rows = {"logp_preference_accuracy": [int(c[0] > r[0]) for c, r in zip(chosen, rejected)],
            "lennorm_preference_accuracy": [int(c[0] / max(c[1], 1) > r[0] / max(r[1], 1))
                                            for c, r in zip(chosen, rejected)]}
    health = None
    if reference is not None:
        with reference():
            ref_c, ref_r = _pair_logprobs(model, tokenizer, pairs, batch_size)
        logratio = [(c[0] - rc[0]) - (r[0] - rr[0]) for c, r, rc, rr in zip(chosen, rejected, ref_c, ref_r)]
        rows.update(preference_accuracy=[int(m > 0) for m in logratio],
                    reward_margin=[beta * m for m in logratio],
                    logratio_margin=logratio,
                    heldout_dpo_loss=[_neg_logsigmoid(FIXED_BETA * m) for m in logratio])
        chosen_change = [c[0] - rc[0] for c, rc in zip(chosen, ref_c)]
        rejected_change = [r[0] - rr[0] for r, rr in zip(rejected, ref_r)]
        health = {"pairs": len(pairs), "chosen_logp_change": _mean(chosen_change),
                  "rejected_logp_change": _mean(rejected_change),
                  # Both falling is DPO's known failure: the margin grows while chosen answers get less likely.
                  "both_falling": bool(pairs) and _mean(chosen_change) < 0 and _mean(rejected_change) < 0}
    return {"rows": rows, "chosen": chosen, "health": health}


def _pair_logprobs(model, tokenizer, pairs, batch_size: int) -> tuple[list, list]:
    """(chosen scores, rejected scores): the 2N sequences in one sequence_logprobs call, so they share its
    length-sorted batches."""
    scores = sequence_logprobs(model, tokenizer, [c for c, _ in pairs] + [r for _, r in pairs], batch_size)
    return scores[: len(pairs)], scores[len(pairs):]


def _neg_logsigmoid(x: float) -> float:
    return math.log1p(math.exp(-x)) if x > -30 else -x


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else None


@torch.no_grad()
def max_logit_diff(model, tokenizer, prompts: list[str], disabled) -> float:
    """Largest |logit difference| between the model and `disabled()` context on the prompts: 0 means the
    adapter does nothing."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with_adapter = model(**batch).logits.float()
    with disabled():
        without = model(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    return float((with_adapter - without).abs()[mask].max())

