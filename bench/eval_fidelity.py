"""What issue 10's scoring bugs did to the figures, measured on real rows (docs/evaluation.md).

    .venv/bin/python -m bench.eval_fidelity [--rows 64] [--steps 40] [--out docs/evaluation]

1. Perplexity of training rows after a short SFT (tiny model, real Llama-2 tokenizer with BOS, real GSM8K
   rows): the sequence the trainer trained on (trainer.sequences, what the evaluator scores now) against the
   evaluator's old tokenization (no special tokens, the answer tokenized on its own, for `chat` prompts an
   extra "\\n" after the generation prompt).
2. HH-RLHF harmless-base test pairs that TRL drops at 512 and 256 tokens, which the old evaluator scored as
   (0, 0)-token pairs, i.e. wrong preferences with margin 0.
3. BLEU's old "95% CI" (sacrebleu's mean +- half-width, clipped at 0) against the bootstrap percentile interval,
   on answers of the trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def v1_scores(model, tok, prompts, answers, max_length, batch_size, extra_newline):
    """The evaluator's scoring before issue 10 (evaluator/scoring.py at a4721b5), kept here to measure it."""
    import torch

    out = []
    for i in range(0, len(prompts), batch_size):
        ids, masks = [], []
        for prompt, answer in zip(prompts[i:i + batch_size], answers[i:i + batch_size]):
            p = tok(prompt + ("\n" if extra_newline else ""), add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append((p + a)[:max_length])
            masks.append(([0] * len(p) + [1] * len(a))[:max_length])
        width = max(len(s) for s in ids)
        x = torch.full((len(ids), width), tok.pad_token_id)
        att = torch.zeros((len(ids), width), dtype=torch.long)
        m = torch.zeros((len(ids), width), dtype=torch.bool)
        for j, (s, k) in enumerate(zip(ids, masks)):
            x[j, :len(s)], att[j, :len(s)], m[j, :len(s)] = torch.tensor(s), 1, torch.tensor(k, dtype=torch.bool)
        with torch.no_grad():
            logits = model(input_ids=x, attention_mask=att).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        for j in range(len(ids)):
            out.append((float(lp[j][m[j, 1:]].sum()), int(m[j, 1:].sum())))
    return out


def perplexity_gap(prompt_format: str, rows: int, steps: int) -> dict:
    import yaml

    from evaluator.scoring import perplexity, sequence_logprobs
    from finesweep.spec import parse_sweep
    from finesweep.store import LocalStore
    from trainer.data import load_splits, render_sft
    from trainer.modeling import build_model, load_tokenizer
    from trainer.runtime import detect_hardware
    from trainer.sequences import sft_sequence
    from trainer.sft import SFTRecipe

    model_dir = ROOT / "build" / "tiny-llama"
    raw = yaml.safe_load(f"""
        stage: sft
        model: {model_dir}
        dataset: {{path: {SHARED / 'gsm8k' / 'train.jsonl'}, format: gsm8k, split: "train[:{rows}]"}}
        prompt_format: {prompt_format}
        max_length: 256
        eval: {{set: math-word-problems}}
        trials: [{{name: t, r: 16, alpha: 32, dropout: 0.0, lr: 5.0e-3, batch_size: 8, max_steps: {steps},
                   warmup_ratio: 0.0, scheduler: constant, target_modules: [q_proj, v_proj, gate_proj, down_proj]}}]
    """)
    spec = parse_sweep(raw, "bench", "", "fidelity").trial_specs()[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        SFTRecipe(spec, store).run()
        tok = load_tokenizer(spec.model)
        model, _ = build_model(spec, store, detect_hardware(), Path(tmp) / "w", with_own_adapter=True)
        model.eval()
        train, _ = load_splits(spec.dataset, spec.hyper)
        rendered = list(render_sft(train, tok, prompt_format))
        seqs = [sft_sequence(tok, r["prompt"], r["completion"], 256) for r in rendered]
        kept = [(r, s) for r, s in zip(rendered, seqs) if s is not None]
        trained = perplexity(sequence_logprobs(model, tok, [s for _, s in kept], 8))
        old = perplexity(v1_scores(model, tok, [r["prompt"] for r, _ in kept], [r["completion"] for r, _ in kept],
                                   256, 8, extra_newline=prompt_format == "chat"))
    return {"prompt_format": prompt_format, "rows": len(kept), "steps": steps,
            "perplexity_of_trained_sequences": round(trained, 4), "old_evaluator_perplexity": round(old, 4),
            "old_over_trained": round(old / trained - 1, 4)}


def hh_drops() -> dict:
    from finesweep.spec import DatasetSpec
    from trainer.data import load_splits, render_dpo
    from trainer.modeling import load_tokenizer
    from trainer.sequences import dpo_pair

    tok = load_tokenizer(str(ROOT / "build" / "tiny-llama"))
    report: dict = {}
    rows, _ = load_splits(DatasetSpec(str(SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "hh-rlhf"), None,
                          report)
    rendered = list(render_dpo(rows, tok, "chat"))
    out = {"pairs": len(rendered), "dropped_in_loading": report.get("dropped", {})}
    for length in (512, 256):
        out[f"dropped_at_{length}"] = sum(dpo_pair(tok, p["prompt"], p["chosen"], p["rejected"], length) is None
                                          for p in rendered)
    return out


def bleu_intervals(answers: list[str], refs: list[str]) -> dict:
    from sacrebleu.metrics import BLEU

    from evaluator.metrics import bleu_chrf

    score = BLEU().corpus_score(answers, [refs], n_bootstrap=1000)
    mean, half = float(score._mean), float(score._ci)
    new = bleu_chrf(answers, refs, 1000)
    return {"rows": len(answers), "bleu": new["bleu"], "old_ci": [round(max(0.0, mean - half), 3),
                                                                  round(mean + half, 3)],
            "percentile_ci": new["bleu_ci95"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "docs" / "evaluation"))
    args = parser.parse_args()
    from trainer.runtime import setup_logging

    setup_logging()
    started = time.time()
    result = {"perplexity": [perplexity_gap(fmt, args.rows, args.steps) for fmt in ("instruction", "chat")],
              "hh_rlhf": hh_drops()}
    gsm = [json.loads(line) for line in (SHARED / "gsm8k" / "test.jsonl").open()][:40]
    # BLEU of near-miss answers: the reference with its last sentence dropped (a stand-in for model output
    # that is partly right), so the corpus BLEU is low and clipping at 0 shows.
    answers = [" ".join(r["answer"].split()[: max(3, len(r["answer"].split()) // 6)]) for r in gsm]
    result["bleu"] = bleu_intervals(answers, [r["answer"] for r in gsm])
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
