"""What a sweep cost, in device-hours, from what its trials recorded (no torch): per trial (training, evaluation)
and per sweep, and what the shared DPO reference log-probs saved (trainer/reference_logps.py).

device-hours = wall seconds x devices used / 3600, in GPU-hours where the part ran on CUDA (hardware.device),
CPU-hours otherwise (a CPU "device" is a process, whatever threads it runs: not core-hours).
- training: train.json `wall_time_s` (the training loop) plus `reference_logps.seconds` (the reference pass a DPO
  trial ran before training, outside that loop; 0 when it reused another trial's), times `processes` (one GPU, or
  one CPU process, each).
- evaluation: eval.json `wall_time_s` (the whole evaluation) on one device (the evaluator runs one process on one
  GPU or the CPU).
- saved: `reference_logps.saved_s` (what the pass took the trial that computed it, less this trial's hashing and
  reading) times this trial's processes.
What a trial did not record is not counted: model loading before training, attempts that failed or were
preempted before writing train.json / eval.json, trials not yet trained or evaluated.
"""

from __future__ import annotations

HOUR = 3600.0
GPU, CPU = "GPU-hours", "CPU-hours"


def unit_of(record: dict) -> str:
    return GPU if ((record.get("hardware") or {}).get("device") == "cuda") else CPU


def _hours(seconds: float) -> float:
    return round(seconds / HOUR, 6)


def trial_cost(row: dict) -> dict:
    """{"training": {...}, "evaluation": {...}, "total": {unit: hours}, "saved": {unit: hours}} for one report row
    (evaluator.report.collect_rows: "train" is train.json, "eval" is eval.json); parts the row lacks are absent."""
    out: dict = {"total": {}, "saved": {}}
    train = row.get("train")
    if train and isinstance(train.get("wall_time_s"), (int, float)):
        ref = train.get("reference_logps") or {}
        processes = int(train.get("processes") or 1)
        unit = unit_of(train)
        reference_s = float(ref.get("seconds") or 0.0)
        seconds = (float(train["wall_time_s"]) + reference_s) * processes
        out["training"] = {"unit": unit, "hours": _hours(seconds), "wall_s": float(train["wall_time_s"]),
                           "reference_s": reference_s, "devices": processes}
        out["total"][unit] = out["total"].get(unit, 0.0) + _hours(seconds)
        if ref.get("source"):
            out["reference_logps"] = ref.get("source")
        if ref.get("source") == "reused":
            saved = _hours(float(ref.get("saved_s") or 0.0) * processes)
            out["saved"][unit] = saved
    ev = row.get("eval")
    if ev and isinstance(ev.get("wall_time_s"), (int, float)):
        unit = unit_of(ev)
        seconds = float(ev["wall_time_s"])
        out["evaluation"] = {"unit": unit, "hours": _hours(seconds), "wall_s": seconds, "devices": 1}
        out["total"][unit] = out["total"].get(unit, 0.0) + _hours(seconds)
    out["total"] = {u: round(h, 6) for u, h in out["total"].items()}
    return out


def sweep_cost(costs: dict[str, dict]) -> dict:
    """Sums over the trials ({name: trial_cost}): training, evaluation, total and saved, each {unit: hours}; plus
    how many trials computed and reused their reference log-probs."""
    out: dict = {"training": {}, "evaluation": {}, "total": {}, "saved": {}, "trials": len(costs),
                 "reference_logps": {"computed": 0, "reused": 0, "recomputed": 0}}
    for cost in costs.values():
        for part in ("training", "evaluation"):
            if part in cost:
                unit = cost[part]["unit"]
                out[part][unit] = out[part].get(unit, 0.0) + cost[part]["hours"]
        for part in ("total", "saved"):
            for unit, hours in cost[part].items():
                out[part][unit] = out[part].get(unit, 0.0) + hours
        if cost.get("reference_logps") in out["reference_logps"]:
            out["reference_logps"][cost["reference_logps"]] += 1
    for part in ("training", "evaluation", "total", "saved"):
        out[part] = {u: round(h, 6) for u, h in out[part].items()}
    out["without_sharing"] = {u: round(out["total"].get(u, 0.0) + out["saved"].get(u, 0.0), 6)
                              for u in set(out["total"]) | set(out["saved"])}
    return out


def format_hours(by_unit: dict, empty: str = "0") -> str:
    """{unit: hours} as "0.0123 CPU-hours, 0.5 GPU-hours" (`empty` when there are none)."""
    return ", ".join(f"{h:.4g} {u}" for u, h in sorted(by_unit.items())) or empty


def _fmt_part(part: dict | None) -> str:
    if not part:
        return ""
    return f"{part['hours']:.4g} {part['unit']}"


def cost_md(rows: list[dict], costs: dict[str, dict], total: dict) -> list[str]:
    """The report's Cost section: one line per row that recorded anything, then the sweep's sums."""
    lines = ["## Cost", "",
             "Device-hours = wall seconds x devices used (training: its processes, one GPU or CPU process each; "
             "evaluation: one), from train.json / eval.json. Training counts the training loop and the DPO "
             "reference pass; model loading and failed attempts are not recorded, so not counted.", "",
             "| trial | training wall | reference pass | devices | training | evaluation wall | evaluation | total | "
             "reference log-probs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cost = costs.get(r["name"]) or {}
        if "training" not in cost and "evaluation" not in cost:
            continue
        train, ev = cost.get("training"), cost.get("evaluation")
        ref = cost.get("reference_logps") or ""
        if ref == "reused":
            ref += f" (saved {format_hours(cost['saved'])})"
        lines.append("| " + " | ".join([
            r["name"], f"{train['wall_s']:.0f}s" if train else "", f"{train['reference_s']:.1f}s" if train else "",
            str(train["devices"]) if train else "", _fmt_part(train), f"{ev['wall_s']:.0f}s" if ev else "",
            _fmt_part(ev), format_hours(cost["total"]), ref]) + " |")
    refs = total["reference_logps"]
    lines += ["", f"Sweep total: {format_hours(total['total'])} (training {format_hours(total['training'])}; evaluation "
                  f"{format_hours(total['evaluation'])}) over {total['trials']} rows."]
    if any(refs.values()):
        lines.append(f"Shared reference log-probs: computed by {refs['computed'] + refs['recomputed']} trial(s), "
                     f"reused by {refs['reused']}; saved {format_hours(total['saved'])} (the sweep would have taken "
                     f"{format_hours(total['without_sharing'])} without sharing).")
    return lines + [""]
