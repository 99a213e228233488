"""Evaluator benchmark: evaluator.scoring on the benchmark model, the way evaluator/evaluate.py calls it.

    python -m bench.bench_eval [--size auto|full|cpu] [--out docs/benchmarks/<device>]
    python -m bench.bench_eval --compare [--rows 48] [--generations 16] [--max-new-tokens 128] [--pairs 0] [--json F]

--compare (issue 20): the scoring before and after issue 20 side by side on the real SmolLM2-135M-Instruct
(build/smollm2-135m-instruct, a random nonzero LoRA adapter attached as the evaluator has it), on the same rows:
held-out GSM8K rows (../shared/data/gsm8k train[7000:7000+rows], chat template, max_length 320, jobs/real.yaml's
held-out) scored by sequence_logprobs, greedy generation on the first `generations` of their prompts, and with
--pairs, HH-RLHF held-out pairs (train[2000:2000+pairs]) by preference_scores with the adapter-disabled reference.
`reference_*` below are the functions as they were (evaluator/scoring.py at 2e78ca9): file-order batches, an fp32
log_softmax over the full vocabulary at every position, four passes per preference set. Prints wall and CPU
seconds and peak RSS (and CUDA peak) of each, their ratios, and whether the figures agree.

The model carries a LoRA adapter (r=4 on q,v,gate,down), attached as the evaluator has it (a PeftModel, not
merged). Prompts: GSM8K test questions in the `### Instruction:` format; references: their answers.
- generation (scoring.generate, greedy, KV cache): the same prompts one at a time (batch 1) and batched
  (batch 12, jobs/gsm8k-sft.yaml's eval batch), and batched with the adapter merged into the weights
  (PEFT merge_adapter: fewer kernels per token; shows what attaching the adapter costs);
- perplexity (scoring.sequence_logprobs over trainer.sequences.sft_sequence rows, the reference-perplexity and
  held-out scoring path): one row at a time and batched (batches are length-sorted inside sequence_logprobs).
Reported: new tokens/s (generation), rows/s and scored tokens/s (perplexity), peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
REAL_MODEL = ROOT / "build" / "smollm2-135m-instruct"
BATCH = 12
SIZES = {  # prompts generated, new tokens per prompt, rows scored for perplexity
    "cpu": dict(gen_prompts=12, max_new_tokens=48, ppl_rows=36),
    "cuda": dict(gen_prompts=24, max_new_tokens=128, ppl_rows=500),
}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(size: str, out_dir: Path) -> dict:
    import torch
    from peft import get_peft_model

    from evaluator import scoring
    from finesweep.prompts import render_prompt, user_turn
    from finesweep.spec import Hyper
    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config
    from trainer.runtime import detect_hardware, peak_memory_gb, setup_logging

    from .bench_train import CPU_THREADS, TARGETS
    from .model import build_model

    setup_logging()
    hw = detect_hardware()
    if hw.device == "cpu":  # one thread, timed by process CPU time (bench_train.CPU_THREADS explains why)
        torch.set_num_threads(CPU_THREADS)
    clock = time.perf_counter if hw.device == "cuda" else time.process_time
    if size == "auto":
        size = "full" if hw.device == "cuda" else "cpu"
    sizes = SIZES[hw.device]
    model_dir = build_model(size)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_base_model(str(model_dir), hw)
    model = get_peft_model(model, lora_config(Hyper(r=4, alpha=8, dropout=0.05, target_modules=TARGETS)))
    model.eval()
    if hw.device == "cuda":
        model.to("cuda")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[: max(sizes["gen_prompts"],
                                                                                     sizes["ppl_rows"])]]
    prompts = [render_prompt(tokenizer, "instruction", user_turn(r["question"])) for r in rows]
    answers = [r["answer"] for r in rows]
    gen_prompts = prompts[: sizes["gen_prompts"]]
    max_new = sizes["max_new_tokens"]
    scoring.generate(model, tokenizer, gen_prompts[:2], 4, 2)  # warm-up (kernels, allocator)

    result = {"device": hw.name, "device_kind": hw.device, "precision": hw.precision,
              "attention": hw.attn_implementation, "model_size": size, "batch_size": BATCH,
              "clock": "wall" if hw.device == "cuda" else f"process CPU time, {CPU_THREADS} thread(s)",
              "generation": {}, "perplexity": {}}

    def gen(label, batch_size):
        if hw.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync()
        start = clock()
        _, record = scoring.generate(model, tokenizer, gen_prompts, max_new, batch_size)
        _sync()
        seconds = clock() - start
        result["generation"][label] = {
            "prompts": len(gen_prompts), "batch_size": batch_size, "max_new_tokens": max_new,
            "new_tokens": record["new_tokens"], "seconds": round(seconds, 3), "wall_seconds": record["seconds"],
            "tokens_per_s": round(record["new_tokens"] / seconds, 2), "peak_memory_gb": round(peak_memory_gb(hw), 3)}
        print(f"bench eval: generation {label}: {record['new_tokens'] / seconds:.1f} new tok/s", flush=True)

    gen("one_at_a_time", 1)
    gen("batched", BATCH)
    model.merge_adapter()
    gen("batched_merged_adapter", BATCH)
    model.unmerge_adapter()

    from trainer.sequences import sft_sequence

    seqs = [sft_sequence(tokenizer, p, a, 512) for p, a in zip(prompts[: sizes["ppl_rows"]], answers)]
    seqs = [s for s in seqs if s is not None]
    for label, batch_size in (("one_at_a_time", 1), ("batched", BATCH)):
        if hw.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync()
        start = clock()
        scores = scoring.sequence_logprobs(model, tokenizer, seqs, batch_size)
        _sync()
        seconds = clock() - start
        tokens = sum(n for _, n in scores)
        result["perplexity"][label] = {
            "rows": len(scores), "batch_size": batch_size, "scored_tokens": tokens, "seconds": round(seconds, 3),
            "rows_per_s": round(len(scores) / seconds, 2), "scored_tokens_per_s": round(tokens / seconds, 1),
            "perplexity": round(scoring.perplexity(scores), 3), "peak_memory_gb": round(peak_memory_gb(hw), 3)}
        print(f"bench eval: perplexity {label}: {len(scores) / seconds:.1f} rows/s", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------ --compare: issue 20, before vs after
# The scoring functions as they were before issue 20 (evaluator/scoring.py at 2e78ca9), kept only here so the
# comparison runs side by side in one process. Their figures are what the new functions must reproduce.

def reference_sequence_logprobs(model, tokenizer, sequences, batch_size: int) -> list[tuple[float, int]]:
    """Before issue 20: batches in file order, fp32 log_softmax over the full vocabulary at every position of the
    padded batch (prompt and padding included), then gathered."""
    import torch

    results = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            batch = sequences[i:i + batch_size]
            width = max(len(s.ids) for s in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for j, seq in enumerate(batch):
                input_ids[j, : len(seq.ids)] = torch.tensor(seq.ids)
                attention[j, : len(seq.ids)] = 1
                scored[j, seq.prompt_len: len(seq.ids)] = True
            input_ids, attention, scored = (t.to(model.device) for t in (input_ids, attention, scored))
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
            logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            target = scored[:, 1:]
            for j in range(len(batch)):
                results.append((float(logps[j][target[j]].sum()), int(target[j].sum())))
    return results


def reference_preference_scores(model, tokenizer, pairs, batch_size: int, beta: float, reference=None) -> dict:
    """Before issue 20: chosen, rejected, reference chosen, reference rejected as four separate passes."""
    from evaluator.scoring import FIXED_BETA, _neg_logsigmoid

    chosen = reference_sequence_logprobs(model, tokenizer, [c for c, _ in pairs], batch_size)
    rejected = reference_sequence_logprobs(model, tokenizer, [r for _, r in pairs], batch_size)
    rows = {"logp_preference_accuracy": [int(c[0] > r[0]) for c, r in zip(chosen, rejected)],
            "lennorm_preference_accuracy": [int(c[0] / max(c[1], 1) > r[0] / max(r[1], 1))
                                            for c, r in zip(chosen, rejected)]}
    if reference is not None:
        with reference():
            ref_c = reference_sequence_logprobs(model, tokenizer, [c for c, _ in pairs], batch_size)
            ref_r = reference_sequence_logprobs(model, tokenizer, [r for _, r in pairs], batch_size)
        logratio = [(c[0] - rc[0]) - (r[0] - rr[0]) for c, r, rc, rr in zip(chosen, rejected, ref_c, ref_r)]
        rows.update(preference_accuracy=[int(m > 0) for m in logratio], reward_margin=[beta * m for m in logratio],
                    logratio_margin=logratio, heldout_dpo_loss=[_neg_logsigmoid(FIXED_BETA * m) for m in logratio])
    return {"rows": rows, "chosen": chosen}


def reference_generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int) -> tuple[list[str], dict]:
    """Before issue 20: greedy, left padding, batches in file order."""
    import torch
    from transformers import GenerationConfig

    from evaluator.scoring import _until_stop
    from trainer.sequences import stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
    stop_set = torch.tensor(stops, dtype=torch.long)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers, new_tokens, hit_limit = [], 0, []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(model.device)
                out = model.generate(**batch, generation_config=config)
                for j, row in enumerate(out[:, batch["input_ids"].shape[1]:].cpu()):
                    row, stopped = _until_stop(row, stop_set)
                    if not stopped:
                        hit_limit.append(i + j)
                    new_tokens += int(row.numel())
                    answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return answers, {"new_tokens": new_tokens, "hit_limit_rows": hit_limit}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measure(label: str, fn) -> tuple[object, dict]:
    """fn() timed (wall and process CPU seconds) with its peak RSS: the kernel's high-water mark reset first
    (/proc/self/clear_refs 5), so the peak is this call's own; and the CUDA peak where there is a GPU."""
    import gc

    import torch

    gc.collect()
    try:  # freed heap memory back to the OS, so the previous variant's leftovers do not lower this one's peak
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:  # no reset: the process's peak so far (then the later of two variants may read too high)
        reset = False
    before = _rss_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    record = {"seconds": round(time.perf_counter() - wall, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
              "peak_rss_gb": round(_rss_kib("VmHWM") / 2**20, 3),
              "peak_rss_above_start_gb": round((_rss_kib("VmHWM") - before) / 2**20, 3), "peak_rss_reset": reset}
    if cuda:
        record["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    print(f"bench compare: {label}: {record['seconds']:.2f} s wall, {record['cpu_seconds']:.2f} s CPU, peak RSS "
          f"{record['peak_rss_gb']:.2f} GB (+{record['peak_rss_above_start_gb']:.2f} GB)"
          + (f", CUDA peak {record['cuda_peak_gb']:.2f} GB" if cuda else ""), flush=True)
    return out, record


def _ratio(old: dict, new: dict) -> dict:
    def r(key):
        return round(old[key] / new[key], 2) if new.get(key) else None

    return {"speedup_wall": r("seconds"), "speedup_cpu": r("cpu_seconds"),
            "peak_rss_old_over_new": r("peak_rss_above_start_gb"),
            **({"cuda_peak_old_over_new": r("cuda_peak_gb")} if "cuda_peak_gb" in new else {})}


def compare(args) -> dict:
    """Issue 20's measurement (see the module docstring): each part old then new on the same rows."""
    import torch
    from peft import get_peft_model

    from evaluator import scoring
    from finesweep.spec import DatasetSpec, Hyper
    from trainer.data import load_splits, render_dpo, render_sft
    from trainer.modeling import load_base_model, load_tokenizer
    from trainer.recipe import lora_config
    from trainer.runtime import detect_hardware
    from trainer.sequences import dpo_pair, sft_sequence

    if args.threads:
        torch.set_num_threads(args.threads)
    hw = detect_hardware()
    tok = load_tokenizer(str(args.model))
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(args.model), hw), lora_config(Hyper(
        r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))))
    with torch.no_grad():  # a trained-looking adapter: nonzero, so the disabled reference differs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.eval()
    if hw.device == "cuda":
        model.to("cuda")
    rows, _ = load_splits(DatasetSpec(str(GSM8K), "gsm8k", split=f"train[7000:{7000 + args.rows}]"))
    rendered = list(render_sft(rows, tok, "chat"))
    seqs = [s for s in (sft_sequence(tok, r["prompt"], r["completion"], args.max_length) for r in rendered) if s]
    prompts = [r["prompt"] for r in rendered[: args.generations]]
    result = {"device": hw.name, "precision": hw.precision, "threads": torch.get_num_threads(),
              "order": "new first" if args.new_first else "old first",
              "model": str(args.model), "batch_size": args.batch_size, "parts": {}}
    print(f"bench compare: {hw.name}, {torch.get_num_threads()} thread(s), batch {args.batch_size}: {len(seqs)} "
          f"held-out rows ({sum(len(s.ids) for s in seqs)} tokens, {sum(s.completion_tokens for s in seqs)} scored, "
          f"max_length {args.max_length}), {len(prompts)} generations of up to {args.max_new_tokens} tokens",
          flush=True)
    scoring.sequence_logprobs(model, tok, seqs[:2], 2)  # warm-up (kernels, allocator), both paths
    reference_sequence_logprobs(model, tok, seqs[:2], 2)

    def part(name, old_fn, new_fn, agree):
        if args.new_first:
            new, new_rec = _measure(f"{name} new", new_fn)
            old, old_rec = _measure(f"{name} old", old_fn)
        else:
            old, old_rec = _measure(f"{name} old", old_fn)
            new, new_rec = _measure(f"{name} new", new_fn)
        result["parts"][name] = {"old": old_rec, "new": new_rec, **_ratio(old_rec, new_rec), **agree(old, new)}
        shown = {k: v for k, v in result["parts"][name].items() if k not in ("old", "new")}
        print(f"bench compare: {name}: {json.dumps(shown)}", flush=True)

    def logprobs_agree(old, new):
        diffs = [abs(a[0] - b[0]) for a, b in zip(old, new)]
        return {"rows": len(new), "max_abs_diff": max(diffs, default=0.0),
                "within_tolerance": all(math.isclose(a[0], b[0], rel_tol=1e-5, abs_tol=1e-4) and a[1] == b[1]
                                        for a, b in zip(old, new)),
                "perplexity": [scoring.perplexity(old), scoring.perplexity(new)]}

    part("heldout_scoring", lambda: reference_sequence_logprobs(model, tok, seqs, args.batch_size),
         lambda: scoring.sequence_logprobs(model, tok, seqs, args.batch_size), logprobs_agree)

    if args.pairs:
        pref_rows, _ = load_splits(DatasetSpec(str(HH_RLHF), "hh-rlhf", split=f"train[2000:{2000 + args.pairs}]",
                                               min_answer_chars=10))
        pairs = [p for p in (dpo_pair(tok, r["prompt"], r["chosen"], r["rejected"], args.max_length)
                             for r in render_dpo(pref_rows, tok, "chat")) if p is not None]

        def prefs_agree(old, new):
            out = {"pairs": len(pairs), "binary_rows_equal": all(old["rows"][m] == new["rows"][m] for m in old["rows"]
                                                                 if m.endswith("accuracy"))}
            margins = zip(old["rows"]["logratio_margin"], new["rows"]["logratio_margin"])
            out["max_abs_diff_logratio"] = max((abs(a - b) for a, b in margins), default=0.0)
            return out

        part("heldout_preferences",
             lambda: reference_preference_scores(model, tok, pairs, args.batch_size, 0.1, model.disable_adapter),
             lambda: scoring.preference_scores(model, tok, pairs, args.batch_size, 0.1, model.disable_adapter),
             prefs_agree)

    scoring.generate(model, tok, prompts[:2], 2, 2)  # warm-up

    def answers_agree(old, new):
        (a_old, r_old), (a_new, r_new) = old, new
        return {"prompts": len(a_new), "answers_equal": a_old == a_new,
                "answers_differing": [i for i, (a, b) in enumerate(zip(a_old, a_new)) if a != b],
                "hit_limit_rows_equal": r_old["hit_limit_rows"] == r_new["hit_limit_rows"],
                "new_tokens": [r_old["new_tokens"], r_new["new_tokens"]]}

    part("generation", lambda: reference_generate(model, tok, prompts, args.max_new_tokens, args.batch_size),
         lambda: scoring.generate(model, tok, prompts, args.max_new_tokens, args.batch_size), answers_agree)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["auto", "full", "cpu"], default="auto")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", action="store_true", help="issue 20: scoring before vs after, real model")
    parser.add_argument("--model", type=Path, default=REAL_MODEL, help="--compare: the model folder")
    parser.add_argument("--rows", type=int, default=48, help="--compare: held-out GSM8K rows scored")
    parser.add_argument("--max-length", type=int, default=320, help="--compare: max_length of scored rows")
    parser.add_argument("--generations", type=int, default=16, help="--compare: prompts generated")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="--compare: new tokens per generation")
    parser.add_argument("--pairs", type=int, default=0, help="--compare: HH-RLHF held-out pairs (0: none)")
    parser.add_argument("--batch-size", type=int, default=16, help="--compare: eval.batch_size (jobs/real.yaml)")
    parser.add_argument("--threads", type=int, help="--compare: torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="--compare: also write the results here")
    parser.add_argument("--new-first", action="store_true", help="--compare: run the new function of each part first "
                                                                   "(to see what the order does to the figures)")
    args = parser.parse_args()
    if args.compare:
        compare(args)
        return
    from .report import default_out_dir

    run(args.size, args.out or default_out_dir())


if __name__ == "__main__":
    main()
