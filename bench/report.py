"""Benchmark results -> results.md (markdown tables), plot.png, meta.json, and the T4 estimate."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "docs" / "benchmarks"
# Report 2 (user-sweeps.md), one T4: SFT 45-75 min per trial, DPO 16-25 min per trial.
USERS_T4_MINUTES = {"sft": (45, 75), "dpo": (16, 25)}
T4_PEAK_TFLOPS = 65.0
TWO_T4_SPEEDUP = 1.9  # DDP, same per-device batch; the all-reduce is the LoRA gradients only (~8 MB a step)


def device_tag() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def default_out_dir(model: str = "tiny") -> Path:
    """docs/benchmarks/<device>/ (TinyLlama architecture) or docs/benchmarks/<device>-smollm2/ (--model real)."""
    return BENCH_DIR / (device_tag() + ("-smollm2" if model == "real" else ""))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def meta(command: str) -> dict:
    import torch

    from trainer.runtime import library_versions

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    info = {"command": command, "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "git_commit": commit, "versions": library_versions(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        try:
            import flash_attn

            info["flash_attn"] = flash_attn.__version__
        except ImportError:
            info["flash_attn"] = None
    try:
        import liger_kernel  # noqa: F401

        from importlib import metadata

        info["liger_kernel"] = metadata.version("liger-kernel")
    except ImportError:
        info["liger_kernel"] = None
    return info


# ------------------------------------------------------------------------------------------------ T4 estimate
def full_size_shape() -> tuple[dict, int]:
    from trainer.tiny_model import TINYLLAMA_1B, llama_config

    from .bench_train import TARGETS
    from .model import model_shape

    shape = model_shape(llama_config(32000, TINYLLAMA_1B))
    d, ff, r = shape["hidden"], shape["intermediate"], 4
    dims = {"q_proj": (d, shape["d_attn"]), "k_proj": (d, shape["d_kv"]), "v_proj": (d, shape["d_kv"]),
            "o_proj": (shape["d_attn"], d), "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    n_lora = shape["layers"] * sum(r * (i + o) for i, o in (dims[t] for t in TARGETS))
    return shape, n_lora


def hardware_flops(shape: dict, n_lora: int, tokens: int, squares: int, scored: int, checkpointing: bool,
                   train: bool = True) -> float:
    """FLOPs the GPU executes for sequences padded to their batch's length (padding included): tokens = sum of
    padded lengths, squares = sum of padded length^2. Attention with a padding mask runs the full square (no
    causal skipping); checkpointing re-runs the forward of the blocks."""
    body, head, L, d = shape["n_body"], shape["n_head"], shape["layers"], shape["d_attn"]
    if not train:
        return 2 * body * tokens + 2 * head * scored + 4 * L * d * squares
    fwd_passes = 2 if checkpointing else 1
    return ((2 * fwd_passes + 2) * body * tokens + 4 * head * scored + (2 * fwd_passes + 4) * n_lora * tokens
            + (4 * fwd_passes + 8) * L * d * squares)


def t4_estimate(train: list[dict]) -> dict:
    """Trial times on T4s from the FLOPs each recipe's batches cost on the full-size model (token lengths from the
    real tokenizer, so they do not depend on the device the benchmark ran on), at the FLOP rate the users' own
    SFT timing on one T4 implies."""
    shape, n_lora = full_size_shape()
    by = {(r["stage"], r["recipe"]): r for r in train}
    if ("sft", "users") not in by:
        return {}
    u = by[("sft", "users")]["trial"]
    users_sft = hardware_flops(shape, n_lora, u["padded_tokens"], u["padded_length_sq"], u["scored_tokens"], True)
    lo, hi = USERS_T4_MINUTES["sft"]
    rate = (users_sft / (hi * 60), users_sft / (lo * 60))  # achieved FLOP/s, slow and fast end
    rows = []
    for (stage, recipe), res in sorted(by.items(), key=lambda kv: (kv[0][0] != "sft", kv[0][1] != "users")):
        t = res["trial"]
        variants = [("on", True, "max_length")] if recipe == "users" else [
            ("on (auto below 24 GB)", True, "grouped"), ("off", False, "grouped")]
        if stage == "dpo" and recipe == "users":  # their DPO timing implies they did not pad to 512
            variants.append(("on", True, "longest"))
        for label, ckpt, policy in variants:
            tokens, squares = t["padded_tokens"], t["padded_length_sq"]
            if policy == "longest":
                p = t["per_epoch_by_policy"]["longest"]
                tokens, squares = p["padded_tokens"] * t["epochs"], p["padded_length_sq"] * t["epochs"]
            flops = hardware_flops(shape, n_lora, tokens, squares, t["scored_tokens"], ckpt)
            if stage == "dpo" and recipe == "users":  # reference forward every step, same padded batches
                flops += hardware_flops(shape, 0, tokens, squares, t["scored_tokens"], False, train=False)
            if stage == "dpo" and recipe == "finesweep":  # reference forward once, length-sorted batches
                g = t["per_epoch_by_policy"]["grouped"]
                flops += hardware_flops(shape, 0, g["padded_tokens"], g["padded_length_sq"],
                                        t["scored_tokens_per_epoch"], False, train=False)
            minutes = (flops / rate[1] / 60, flops / rate[0] / 60)
            padding = {"max_length": "to 512", "longest": "to longest in batch", "grouped": "length-grouped"}[policy]
            rows.append({"stage": stage, "recipe": recipe, "checkpointing": label, "padding": padding,
                         "pflops": round(flops / 1e15, 2),
                         "one_t4_minutes": [round(m, 1) for m in minutes],
                         "two_t4_minutes": [round(m / TWO_T4_SPEEDUP, 1) for m in minutes]})
    return {"calibration": {"users_sft_pflops": round(users_sft / 1e15, 2), "users_sft_minutes": [lo, hi],
                            "achieved_tflops": [round(x / 1e12, 1) for x in rate],
                            "mfu_vs_65_tflops": [round(x / 1e12 / T4_PEAK_TFLOPS, 3) for x in rate]},
            "rows": rows, "users_reported_minutes": USERS_T4_MINUTES, "two_t4_speedup": TWO_T4_SPEEDUP}


# ------------------------------------------------------------------------------------------------ output
def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def markdown(train: list[dict], evaluation: dict | None, info: dict, estimate: dict) -> str:
    lines = []
    dev = info.get("gpu") or f"CPU: {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    size = (train[0]["model_size"] if train else (evaluation or {}).get("model_size", "?"))
    lines += [f"Device: {dev}. Model: `{size}` ({'TinyLlama-1.1B architecture' if size == 'full' else 'scaled-down'}"
              f", random init, Llama-2 tokenizer). {info['date_utc']} UTC, commit {info['git_commit']}. Clock: "
              f"{(train[0] if train else evaluation or {}).get('clock', 'wall')}.", ""]
    if train:
        lines += ["| stage | recipe | precision, attention | grad. ckpt | padding in timed steps | useful tok/s "
                  "| tok/s incl. padding | MFU | peak memory | trial time (extrapolated) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['stage']} | {r['recipe']} | {r['precision']}, {r['attention']} | "
                         f"{'on' if r['gradient_checkpointing'] else 'off'} | {100 * r['padding_share']:.0f}% | "
                         f"{r['useful_tokens_per_s']:,.0f} | {r['padded_tokens_per_s']:,.0f} | {mfu} | "
                         f"{r['peak_memory_gb']:.2f} GB | {_hours(r['trial']['seconds_extrapolated'])} |")
        lines.append("")
        by = {(r["stage"], r["recipe"]): r for r in train}
        for stage in ("sft", "dpo"):
            u, f = by.get((stage, "users")), by.get((stage, "finesweep"))
            if u and f:
                lines.append(f"- {stage.upper()}: finesweep {f['useful_tokens_per_s'] / u['useful_tokens_per_s']:.2f}x "
                             f"useful tokens/s, trial {u['trial']['seconds_extrapolated'] / f['trial']['seconds_extrapolated']:.2f}x "
                             f"faster ({_hours(u['trial']['seconds_extrapolated'])} -> "
                             f"{_hours(f['trial']['seconds_extrapolated'])}; {f['trial']['rows']} "
                             f"{'rows' if stage == 'sft' else 'pairs'} x "
                             f"{f['trial']['epochs']} epochs"
                             + (f", incl. reference precompute {_hours(f['precompute']['trial_seconds_extrapolated'])}"
                                if f["precompute"]["pairs"] else "") + ")")
        lines += ["", "Padding over a whole epoch (real token lengths, Llama-2 tokenizer), share of tokens that are "
                  "padding:", "", "| stage | pad to 512 (users) | longest in random batch (TRL default) | "
                  "length-grouped (finesweep) |", "|---|---|---|---|"]
        for stage in ("sft", "dpo"):
            r = by.get((stage, "finesweep")) or by.get((stage, "users"))
            if r:
                p = r["trial"]["per_epoch_by_policy"]
                lines.append(f"| {stage} | {100 * p['max_length']['padding_share']:.1f}% | "
                             f"{100 * p['longest']['padding_share']:.1f}% | {100 * p['grouped']['padding_share']:.1f}% |")
        lines.append("")
    if evaluation:
        g, p = evaluation["generation"], evaluation["perplexity"]
        srt = p.get("batched_length_sorted")
        lines += ["| evaluator | one at a time | batched (12) | batched, adapter merged / rows sorted by length |",
                  "|---|---|---|---|",
                  f"| generation, new tok/s (greedy, KV cache, {g['batched']['max_new_tokens']} new tokens, "
                  f"{g['batched']['prompts']} prompts) | {g['one_at_a_time']['tokens_per_s']:,.1f} | "
                  f"{g['batched']['tokens_per_s']:,.1f} | {g['batched_merged_adapter']['tokens_per_s']:,.1f} (merged) |",
                  f"| perplexity scoring, rows/s ({p['batched']['rows']} GSM8K answers) | "
                  f"{p['one_at_a_time']['rows_per_s']:,.2f} | {p['batched']['rows_per_s']:,.2f} | "
                  + (f"{srt['rows_per_s']:,.2f} (sorted) |" if srt else "- |"),
                  f"| perplexity scoring, scored tok/s | {p['one_at_a_time']['scored_tokens_per_s']:,.0f} | "
                  f"{p['batched']['scored_tokens_per_s']:,.0f} | "
                  + (f"{srt['scored_tokens_per_s']:,.0f} (sorted) |" if srt else "- |"), ""]
    if estimate:
        c = estimate["calibration"]
        lines += [f"T4 estimate (full-size model FLOPs of each recipe's real batches, at the rate the users' SFT "
                  f"timing implies: {c['achieved_tflops'][0]}-{c['achieved_tflops'][1]} TFLOPS, "
                  f"{100 * c['mfu_vs_65_tflops'][0]:.0f}-{100 * c['mfu_vs_65_tflops'][1]:.0f}% of 65):", "",
                  "| stage | recipe | padding | grad. ckpt | PFLOPs | 1 T4 (min) | 2 T4 (min) |",
                  "|---|---|---|---|---|---|---|"]
        for r in estimate["rows"]:
            lo, hi = r["one_t4_minutes"]
            lo2, hi2 = r["two_t4_minutes"]
            lines.append(f"| {r['stage']} | {r['recipe']} | {r['padding']} | {r['checkpointing']} | {r['pflops']} | "
                         f"{lo:.0f}-{hi:.0f} | {lo2:.0f}-{hi2:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(train: list[dict], evaluation: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = {"users": "#b0b0b0", "finesweep": "#2a7ab9"}
    by = {(r["stage"], r["recipe"]): r for r in train}

    def bars(ax, key, ylabel, fmt):
        stages = [s for s in ("sft", "dpo") if (s, "users") in by or (s, "finesweep") in by]
        for j, recipe in enumerate(("users", "finesweep")):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(stages))]
            vals = [key(by[(s, recipe)]) if (s, recipe) in by else 0 for s in stages]
            b = ax.bar(xs, vals, width=0.36, color=colors[recipe], label=recipe)
            ax.bar_label(b, labels=[fmt(v) for v in vals], fontsize=8)
        ax.set_xticks(range(len(stages)), [s.upper() for s in stages])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    bars(axes[0, 0], lambda r: r["useful_tokens_per_s"], "useful (non-padding) tokens/s", lambda v: f"{v:,.0f}")
    axes[0, 0].set_title("training throughput")
    bars(axes[0, 1], lambda r: r["trial"]["seconds_extrapolated"] / 3600, "hours (extrapolated)",
         lambda v: f"{v:.2f}")
    axes[0, 1].set_title("one trial (SFT 5,000 rows x 3; DPO pairs x 3)")
    bars(axes[1, 0], lambda r: r["peak_memory_gb"], "GB", lambda v: f"{v:.2f}")
    axes[1, 0].set_title("peak memory (" + ("CUDA allocated" if train and train[0]["device_kind"] == "cuda"
                                            else "process RSS") + ")")
    ax = axes[1, 1]
    if evaluation:
        g, p = evaluation["generation"], evaluation["perplexity"]
        labels = ["gen\n1 at a time", "gen\nbatched", "gen batched\nmerged", "ppl\n1 at a time", "ppl\nbatched"]
        base_g, base_p = g["one_at_a_time"]["tokens_per_s"], p["one_at_a_time"]["rows_per_s"]
        vals = [1.0, g["batched"]["tokens_per_s"] / base_g, g["batched_merged_adapter"]["tokens_per_s"] / base_g,
                1.0, p["batched"]["rows_per_s"] / base_p]
        if "batched_length_sorted" in p:
            labels.append("ppl batched\nsorted")
            vals.append(p["batched_length_sorted"]["rows_per_s"] / base_p)
        b = ax.bar(range(len(vals)), vals, color=["#b0b0b0", "#2a7ab9", "#2a7ab9", "#b0b0b0", "#2a7ab9", "#2a7ab9"][
            :len(vals)])
        ax.bar_label(b, labels=[f"{v:.1f}x" for v in vals], fontsize=8)
        ax.set_xticks(range(len(vals)), labels, fontsize=7)
        ax.set_ylabel("speed-up vs one at a time")
        ax.set_title("evaluator")
    else:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: Path, train: list[dict], evaluation: dict | None, command: str, info: dict | None = None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = info or meta(command)
    command = info["command"]
    estimate = t4_estimate(train) if train else {}
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2))
    if estimate:
        (out_dir / "t4-estimate.json").write_text(json.dumps(estimate, indent=2))
    text = markdown(train, evaluation, info, estimate)
    header = (f"# Benchmark results: {out_dir.name}\n\nCommand: `{command}`. Versions: "
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".\n\n")
    (out_dir / "results.md").write_text(header + text + "\n![plot](plot.png)\n")
    dev = info.get("gpu") or f"CPU ({info['cpu_count']} cores; 1 thread, CPU-time clock)"
    size = train[0]["model_size"] if train else (evaluation or {}).get("model_size", "")
    plot(train, evaluation, out_dir / "plot.png", f"finesweep vs the users' recipe - {dev}, "
         f"{'TinyLlama-1.1B architecture' if size == 'full' else 'scaled-down model'}, {info['date_utc']} UTC")
    return text


# ------------------------------------------------------------------------------------------------ real model
REAL_GOALS = {"sft": 4.0, "dpo": 3.0}


def _median(values):
    import statistics

    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def real_summary(train: list[dict]) -> dict:
    """Per (stage, configuration): medians over the repeats; per stage: the goals (finesweep vs users) and each
    lever's share (each rung vs the one before it)."""
    from .bench_train import LADDER, RUNG_LABELS

    configs = {}
    for stage, names in LADDER.items():
        for name in names:
            runs = [r for r in train if r["stage"] == stage and r["recipe"] == name]
            if not runs:
                continue
            trial_useful = [r["trial"]["useful_tokens"] / r["trial"]["seconds_extrapolated"] for r in runs]
            configs[(stage, name)] = {
                "stage": stage, "config": name, "label": RUNG_LABELS[name], "repeats": len(runs),
                "useful_tokens_per_s": _median([r["useful_tokens_per_s"] for r in runs]),
                "useful_tokens_per_s_runs": [r["useful_tokens_per_s"] for r in runs],
                "trial_useful_tokens_per_s": round(_median(trial_useful), 1),
                "padded_tokens_per_s": _median([r["padded_tokens_per_s"] for r in runs]),
                "seconds_per_step": _median([r["seconds_per_step"] for r in runs]),
                "padding_share": _median([r["padding_share"] for r in runs]),
                "peak_memory_gb": _median([r["peak_memory_gb"] for r in runs]),
                "peak_memory_gb_runs": [r["peak_memory_gb"] for r in runs],
                "peak_before_train_gb": _median([r.get("max_rss_before_train_gb") for r in runs]),
                "trial_hours": round(_median([r["trial"]["seconds_extrapolated"] for r in runs]) / 3600, 2),
                "precompute_trial_minutes": round(_median([r["precompute"]["trial_seconds_extrapolated"]
                                                           for r in runs]) / 60, 1),
                "gradient_checkpointing": runs[0]["gradient_checkpointing"],
                "reference_log_probs": runs[0]["reference_log_probs"], "lm_head": runs[0].get("lm_head"),
                "levers": runs[0].get("levers"), "mfu": _median([r["mfu"] for r in runs]),
                "load_average": [r["load_average"][0] for r in runs],
                "wall_vs_cpu": _median([r["timed_wall_seconds"] / r["timed_seconds"] for r in runs]),
            }
    goals, shares = {}, {}
    for stage, names in LADDER.items():
        u, f = configs.get((stage, "users")), configs.get((stage, "finesweep"))
        if u and f:
            speed = f["useful_tokens_per_s"] / u["useful_tokens_per_s"]
            trial = f["trial_useful_tokens_per_s"] / u["trial_useful_tokens_per_s"]
            # Paired by round: both ran in the same round, minutes apart, so a change of the machine's speed between
            # rounds cancels out of their ratio.
            paired, paired_trial = [], []
            for rep in sorted({r["repeat"] for r in train}):
                a = [r for r in train if r["stage"] == stage and r["recipe"] == "users" and r["repeat"] == rep]
                b = [r for r in train if r["stage"] == stage and r["recipe"] == "finesweep" and r["repeat"] == rep]
                if a and b:
                    paired.append(round(b[0]["useful_tokens_per_s"] / a[0]["useful_tokens_per_s"], 2))
                    paired_trial.append(round(a[0]["trial"]["seconds_extrapolated"]
                                              / b[0]["trial"]["seconds_extrapolated"], 2))
            goals[stage] = {"goal": REAL_GOALS[stage], "speedup_timed_steps": round(speed, 2),
                            "speedup_by_round": paired, "speedup_whole_trial_by_round": paired_trial,
                            "speedup_whole_trial": round(trial, 2),
                            "speed_met": speed >= REAL_GOALS[stage] and trial >= REAL_GOALS[stage],
                            "users_peak_gb": u["peak_memory_gb"], "finesweep_peak_gb": f["peak_memory_gb"],
                            "memory_met": f["peak_memory_gb"] <= u["peak_memory_gb"]}
        # Lever shares within one round (the first, where every rung ran): the machine's per-core speed drifted
        # between rounds (users' SFT 35-53 tok/s), so rungs are compared only with rungs measured minutes apart.
        import math

        first = {r["recipe"]: r for r in train if r["stage"] == stage and r["repeat"] == 0}
        present = [n for n in names if n in first]
        rows = []
        total = None
        if "users" in first and "finesweep" in first:
            total = math.log(first["finesweep"]["useful_tokens_per_s"] / first["users"]["useful_tokens_per_s"])

        def trial_rate(r):
            return r["trial"]["useful_tokens"] / r["trial"]["seconds_extrapolated"]

        for prev, cur in zip(present, present[1:]):
            a, b = first[prev], first[cur]
            ratio = b["useful_tokens_per_s"] / a["useful_tokens_per_s"]
            rows.append({"lever": cur, "label": RUNG_LABELS[cur], "round": 1,
                         "useful_tokens_per_s": [a["useful_tokens_per_s"], b["useful_tokens_per_s"]],
                         "speedup": round(ratio, 3), "trial_speedup": round(trial_rate(b) / trial_rate(a), 3),
                         "share_of_log_speedup": round(math.log(ratio) / total, 3) if total else None,
                         "peak_memory_gb": [a["peak_memory_gb"], b["peak_memory_gb"]],
                         "peak_memory_change_gb": round(b["peak_memory_gb"] - a["peak_memory_gb"], 2)})
        shares[stage] = rows
    return {"configs": list(configs.values()), "goals": goals, "levers": shares}


def real_markdown(train: list[dict], summary: dict, info: dict) -> str:
    from .bench_train import REAL_MODEL

    r0 = train[0]
    loads = [r["load_average"][0] for r in train]
    lines = [f"Model: SmolLM2-135M-Instruct (`{REAL_MODEL.relative_to(ROOT)}`: 30 layers, hidden 576, vocabulary "
             f"49,152, tied embeddings), its own tokenizer and ChatML template (`prompt_format: chat`, rows rendered "
             f"by `trainer.data`). Device: CPU {info['cpu']} ({info['cpu_count']} cores, shared), "
             f"{r0['precision']}, {r0['attention']}; clock: {r0['clock']}. {info['date_utc']} UTC, commit "
             f"{info['git_commit']}. Load average (1 min) at each child's end: {min(loads):.1f}-{max(loads):.1f}; "
             f"at the start: {info['load_average'][0]:.1f}.", "",
             "Rows: GSM8K `train[:5000]` (SFT, batch 2), HH-RLHF harmless-base first 2,000 pairs (DPO, batch 4 "
             "pairs; 32 in the child, the trial's lengths from all), max_length 512, LoRA r=4 alpha 8 on "
             "q,v,gate,down (report 2's recipe). Each configuration in its own process; values are medians over "
             "the repeats.", "",
             "| stage | configuration | repeats | grad. ckpt | padding (timed) | useful tok/s (timed steps) | "
             "useful tok/s (whole trial, extrapolated) | s/step | peak RSS (GB) | trial (extrapolated) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in summary["configs"]:
        runs = ", ".join(f"{v:.0f}" for v in c["useful_tokens_per_s_runs"])
        lines.append(f"| {c['stage']} | {c['config']} | {c['repeats']} | "
                     f"{'on' if c['gradient_checkpointing'] else 'off'} | {100 * c['padding_share']:.0f}% | "
                     f"**{c['useful_tokens_per_s']:.1f}** ({runs}) | {c['trial_useful_tokens_per_s']:.1f} | "
                     f"{c['seconds_per_step']:.2f} | {c['peak_memory_gb']:.2f} | {c['trial_hours']:.2f} h"
                     + (f" (incl. {c['precompute_trial_minutes']:.0f} min reference)" if c["precompute_trial_minutes"]
                        else "") + " |")
    lines += ["", "Goals (finesweep vs users, same run):", "",
              "| stage | goal | useful tok/s, timed steps (ratio of medians; per round) | useful tok/s, whole trial "
              "(ratio of medians; per round) | speed goal | peak RSS users / finesweep (medians) | memory goal |",
              "|---|---|---|---|---|---|---|"]
    for stage, g in summary["goals"].items():
        rounds = ", ".join(f"{x:.2f}" for x in g.get("speedup_by_round", []))
        rounds_trial = ", ".join(f"{x:.2f}" for x in g.get("speedup_whole_trial_by_round", []))
        lines.append(f"| {stage.upper()} | {g['goal']:.0f}x | {g['speedup_timed_steps']:.2f}x ({rounds}) | "
                     f"{g['speedup_whole_trial']:.2f}x ({rounds_trial}) | {'met' if g['speed_met'] else 'NOT met'} | "
                     f"{g['users_peak_gb']:.2f} / {g['finesweep_peak_gb']:.2f} GB | "
                     f"{'met' if g['memory_met'] else 'NOT met'} |")
    lines += ["", "Each lever's share, within round 1 (every configuration ran in it, minutes apart; one lever on top "
              "of the previous; speed-up of useful tok/s in the timed steps and over the whole trial; share = "
              "log(speed-up) / log(round 1's total speed-up)):", "",
              "| stage | lever | useful tok/s before -> after | speed-up (timed) | speed-up (trial) | share | peak RSS "
              "before -> after |", "|---|---|---|---|---|---|---|"]
    for stage, rows in summary["levers"].items():
        for row in rows:
            share = f"{100 * row['share_of_log_speedup']:.0f}%" if row["share_of_log_speedup"] is not None else "-"
            before, after = row["useful_tokens_per_s"]
            m0, m1 = row["peak_memory_gb"]
            lines.append(f"| {stage.upper()} | {row['label']} | {before:.1f} -> {after:.1f} | {row['speedup']:.2f}x | "
                         f"{row['trial_speedup']:.2f}x | {share} | {m0:.2f} -> {m1:.2f} GB |")
    return "\n".join(lines) + "\n"


def real_plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, stage in enumerate(("sft", "dpo")):
        cs = [c for c in summary["configs"] if c["stage"] == stage]
        if not cs:
            continue
        names = [c["config"] for c in cs]
        colors = ["#b0b0b0"] + ["#8fb9dd"] * (len(cs) - 2) + ["#2a7ab9"]
        ax = axes[0, col]
        b = ax.bar(range(len(cs)), [c["useful_tokens_per_s"] for c in cs], color=colors[:len(cs)])
        ax.bar_label(b, labels=[f"{c['useful_tokens_per_s']:.0f}" for c in cs], fontsize=8)
        goal = summary["goals"].get(stage)
        if goal:
            ax.axhline(cs[0]["useful_tokens_per_s"] * goal["goal"], color="#c0392b", ls="--", lw=1,
                       label=f"goal {goal['goal']:.0f}x users")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(cs)), names, fontsize=8, rotation=20)
        ax.set_ylabel("useful (non-padding) tokens/s, median")
        ax.set_title(f"{stage.upper()}: each lever on top of the previous\n(users, finesweep: median of "
                     f"{cs[0]['repeats']} rounds; between them: round 1)", fontsize=9)
        ax = axes[1, col]
        b = ax.bar(range(len(cs)), [c["peak_memory_gb"] for c in cs], color=colors[:len(cs)])
        ax.bar_label(b, labels=[f"{c['peak_memory_gb']:.2f}" for c in cs], fontsize=8)
        ax.axhline(cs[0]["peak_memory_gb"], color="#c0392b", ls="--", lw=1, label="users' peak")
        ax.legend(fontsize=8)
        ax.set_xticks(range(len(cs)), names, fontsize=8, rotation=20)
        ax.set_ylabel("peak RSS (GB), median")
        ax.set_title(f"{stage.upper()}: peak memory")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_real(out_dir: Path, train: list[dict], command: str, info: dict | None = None,
               pipeline_eval: dict | None = None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = info or meta(command)
    info["model"] = "SmolLM2-135M-Instruct (build/smollm2-135m-instruct)"
    info["device"] = f"CPU {info['cpu']}, {info['cpu_count']} cores shared, 1 torch thread per child"
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2))
    summary = real_summary(train)
    if pipeline_eval:
        summary["evaluation"] = pipeline_eval["summary"]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    text = real_markdown(train, summary, info)
    if pipeline_eval:
        from . import pipeline_eval as pe

        text += ("\nEvaluation against training (goal: at most 20%), the shipped pipeline's trials "
                 f"(`{pipeline_eval['sweep']}`, first trial of each stage, trained and evaluated by the local runner "
                 "in a fresh store each repeat; `bench/pipeline_eval.py`, every run in `pipeline_eval.json`):\n\n"
                 + pe.markdown(pipeline_eval["summary"]) + "\n")
    header = (f"# Benchmark results: {out_dir.name} (real model)\n\nCommand: `{info['command']}`. Versions: "
              + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".\n\n")
    (out_dir / "results.md").write_text(header + text + "\n![plot](plot.png)\n")
    real_plot(summary, out_dir / "plot.png", f"SmolLM2-135M-Instruct on CPU ({info['cpu_count']} shared cores, 1 "
              f"thread, CPU-time clock): finesweep vs the users' recipe - {info['date_utc']} UTC, commit "
              f"{info['git_commit']}")
    return text
