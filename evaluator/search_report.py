"""The report's search sections (no torch): held-out curves measured during training, and for a search sweep its
study: every trial with its state and where pruned ones stopped, best-so-far against trials and against training
steps / examples spent, parameter importances and a slice plot (Optuna's own importance and matplotlib plots).

Called from evaluator/report.py; writes heldout.png, search.png, importance.png, slice.png next to report.md.
"""

from __future__ import annotations

import logging

from finesweep.store import ArtifactStore, read_progress

log = logging.getLogger("finesweep")
# Below this many finished trials an importance estimate is mostly noise: the report says so next to it.
MIN_TRIALS_FOR_IMPORTANCE = 10
CURVE_METRICS = ("eval_loss", "eval_rewards/accuracies")


def search_md(store: ArtifactStore, sweep, specs: list, rows: list[dict]) -> list[str]:
    prefix = f"{sweep.name}/report"
    md: list[str] = []
    curves = plot_curves(store, [s for s in specs if s.trains], {r["trial_id"]: r["state"] for r in rows})
    if curves:
        store.write_bytes(f"{prefix}/heldout.png", curves)
        md += ["## Held-out during training", "",
               "Measured by the trainer's own eval loop on the held-out rows at fixed amounts of training data "
               "(examples seen); dashed: pruned, stopped at the cross.", "", "![heldout.png](heldout.png)", ""]
    if getattr(sweep, "search", None) is None:
        return md
    from finesweep.search import Search

    search = Search(sweep, store, specs[-1].start if specs else None)
    rows_ = search.rows()
    if not rows_:
        return md
    s, p = sweep.search, sweep.prune
    md += ["## Search", "",
           f"Method `{s.method}` (seed {s.seed}), budget {s.budget} trials ({len(search.fixed)} from `trials:`/`grid:`, "
           f"run first), {s.parallel} at a time; objective `{sweep.select.metric}` ({sweep.select.mode})"
           + (f"; pruner `{p.method}` evaluating every {p.every_examples} examples from {p.min_examples}"
              f" (reduction factor {p.reduction_factor})" if p else "; no pruning") + ". A pruned trial is not "
           "eligible as best; a trial breaking a `select` guardrail is told to the sampler with the worst value so "
           "far. Optuna's view of every trial:", ""]
    md.append("| # | trial | id | from | state | objective | told | stopped at (examples) | steps | params |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_:
        state = f"same config as #{r.alias_of}" if r.alias_of is not None else r.state
        if r.infeasible:
            state += f" (infeasible: {r.infeasible})"
        params = ", ".join(f"{k}={_short(v)}" for k, v in r.params.items())
        md.append(f"| {r.number} | {r.name} | `{r.trial_id}` | {r.origin} | {state} | {_num(r.objective)} | "
                  f"{_num(r.value)} | {r.pruned_at if r.pruned_at is not None else ''} | {r.steps or ''} | {params} |")
    md.append("")
    progress = search.best_so_far(rows_)
    plot = plot_best_so_far(progress, sweep.select.metric)
    if plot:
        store.write_bytes(f"{prefix}/search.png", plot)
        spent = progress[-1]
        md += [f"Training spent: {spent['steps']} optimizer steps, {spent['examples']} examples over "
               f"{sum(r.alias_of is None for r in rows_)} trials "
               f"({sum(r.state == 'pruned' and r.alias_of is None for r in rows_)} pruned).", "",
               "![search.png](search.png)", ""]
    md += _importance_md(store, search, rows_, prefix)
    return md


def _importance_md(store, search, rows_, prefix) -> list[str]:
    import optuna

    complete = [r for r in rows_ if r.state == "complete" and r.alias_of is None]
    if len(complete) < 2:
        return [f"Parameter importances: not computed ({len(complete)} finished trial(s); at least 2 needed).", ""]
    study = search.study(rows=rows_)
    md = []
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError) as err:  # e.g. every finished trial has the same parameters
        return [f"Parameter importances: not computed ({err}).", ""]
    md += ["### Parameter importances", "",
           "PED-ANOVA (Optuna) over the finished trials" + (
               f". **Warning: only {len(complete)} finished trials (fewer than {MIN_TRIALS_FOR_IMPORTANCE}); these "
               "importances are noise-level estimates, not a ranking to act on.**" if len(complete) <
               MIN_TRIALS_FOR_IMPORTANCE else "."), ""]
    md += [f"- `{k}`: {v:.3f}" for k, v in importances.items()] + [""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import plot_slice

        axes = plot_slice(study)
        fig = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        fig.set_size_inches(max(4.0, 3.2 * len(study.best_trial.params or {"x": 0})), 3.6)
        fig.tight_layout()
        store.write_bytes(f"{prefix}/slice.png", _png(fig, plt))
        md += ["Objective against each parameter (Optuna slice plot, finished trials):", "", "![slice.png](slice.png)",
               ""]
    except (ValueError, RuntimeError, ImportError) as err:
        md += [f"Slice plot: not drawn ({err}).", ""]
    return md


def curve_points(store: ArtifactStore, spec) -> tuple[list[dict], dict | None]:
    progress = read_progress(store, spec.sweep, spec.trial_id) or {}
    return progress.get("points") or [], progress.get("stopped")


def plot_curves(store: ArtifactStore, specs: list, states: dict) -> bytes | None:
    series = []
    for spec in specs:
        points, stopped = curve_points(store, spec)
        metric = next((m for m in CURVE_METRICS if points and m in points[0]["metrics"]), None)
        if metric:
            series.append((spec, metric, points, states.get(spec.trial_id) == "pruned"))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for _, m, _, _ in series})
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for spec, m, points, pruned in series:
            if m != metric:
                continue
            xs, ys = [p["examples"] for p in points], [p["metrics"][metric] for p in points]
            line, = ax.plot(xs, ys, marker=".", linestyle="--" if pruned else "-", label=spec.name)
            if pruned:
                ax.plot(xs[-1], ys[-1], marker="x", markersize=9, color=line.get_color())
        ax.set_xlabel("training examples seen")
        ax.set_ylabel(f"held-out {metric[5:]}")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("held-out figures during training")
    fig.tight_layout()
    return _png(fig, plt)


def plot_best_so_far(progress: list[dict], metric: str) -> bytes | None:
    if not any(p["best"] is not None for p in progress):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    pts = [p for p in progress if p["best"] is not None]
    a.step([p["number"] + 1 for p in pts], [p["best"] for p in pts], where="post", marker=".")
    a.set_xlabel("trials")
    b.step([p["steps"] for p in pts], [p["best"] for p in pts], where="post", marker=".")
    b.set_xlabel("optimizer steps spent (all trials, pruned included)")
    for ax in (a, b):
        ax.set_ylabel(f"best {metric} so far")
    fig.tight_layout()
    return _png(fig, plt)


def _png(fig, plt) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _num(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value).replace("_proj", "")
