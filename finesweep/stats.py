"""Intervals and paired comparisons over per-row evaluation data (no torch): the one place these rules live.

Per-row data is what each trial's eval.json holds under "per_row":
    {metric: {"set": str, "kind": "text" | "logprob" | "binary" | "mean", "ids": [str], "values": [...]}}
- text:    [hypothesis, reference] per prompt; BLEU / chrF are corpus scores, recomputed on each resample.
- logprob: [sum_logp, n_tokens] per row; perplexity = exp(-sum logp / sum tokens), loss = -sum logp / sum tokens.
- binary:  0/1 per row; a proportion (Wilson interval; exact McNemar when two trials are compared).
- mean:    a float per row; the mean.

Every figure is a function of the column sums of a per-row statistics matrix (BLEU: sacrebleu's n-gram counts;
a mean: [x, 1]; perplexity: [logp, tokens]), so a bootstrap resample is a weighted column sum, and a paired
comparison applies the same resample to both trials' rows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Iterable

import numpy as np

BOOTSTRAP = "bootstrap percentile"
WILSON = "wilson"
PAIRED_BOOTSTRAP = "paired bootstrap"
MCNEMAR = "exact McNemar"
KINDS = ("text", "logprob", "binary", "mean")
SPLIT_RULE = ("row ids ordered by SHA-256 of the id; the first half (rounded up) is the validation part, used "
              "to choose; the rest is the test part, used to report")


class PerRowError(ValueError):
    """eval.json's per_row data for a metric is malformed; the message names the metric and the problem."""


@dataclass
class MetricRows:
    """One metric's rows for one trial: ids and the per-row statistics whose column sums give the figure."""

    metric: str
    kind: str
    ids: list[str]
    stats: np.ndarray  # (rows, k)
    statistic: Callable[[np.ndarray], np.ndarray]  # (..., k) column sums -> (...) figures

    def subset(self, ids: Iterable[str] | None) -> "MetricRows":
        if ids is None:
            return self
        keep = set(ids)
        index = [i for i, row_id in enumerate(self.ids) if row_id in keep]
        return MetricRows(self.metric, self.kind, [self.ids[i] for i in index], self.stats[index], self.statistic)

    def aligned(self, ids: list[str]) -> np.ndarray:
        """Statistics rows in the order of `ids` (every id must be present)."""
        where = {row_id: i for i, row_id in enumerate(self.ids)}
        return self.stats[[where[i] for i in ids]]

    def value(self) -> float | None:
        return float(self.statistic(self.stats.sum(axis=0))) if len(self.ids) else None


def metric_rows(metric: str, entry: dict) -> MetricRows:
    """Build a metric's per-row statistics from its eval.json entry."""
    kind, ids, values = entry.get("kind"), entry.get("ids"), entry.get("values")
    if kind not in KINDS:
        raise PerRowError(f"per_row.{metric}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values):
        raise PerRowError(f"per_row.{metric}: ids and values must be lists of the same length")
    if len(set(ids)) != len(ids):
        raise PerRowError(f"per_row.{metric}.ids: an id appears twice; each row needs its own id")
    ids = [str(i) for i in ids]
    if kind == "text":
        stats, statistic = _text_stats(metric, values)
    elif kind == "logprob":
        stats = np.array(values, dtype=float).reshape(len(values), 2)
        statistic = _logprob_statistic(metric, bool(entry.get("as_loss")))
    else:
        column = np.array(values, dtype=float).reshape(len(values))
        if kind == "binary" and not np.isin(column, (0.0, 1.0)).all():
            raise PerRowError(f"per_row.{metric}.values: a binary metric takes 0 or 1 per row")
        stats = np.stack([column, np.ones_like(column)], axis=1)
        statistic = _ratio
    return MetricRows(metric, kind, ids, stats, statistic)


def _ratio(sums: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return sums[..., 0] / sums[..., 1]


def _logprob_statistic(metric: str, as_loss: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """Perplexity exp(-sum logp / sum tokens), or the loss -sum logp / sum tokens for a loss metric (by name,
    or flagged `as_loss` by the evaluator)."""
    if as_loss or metric.endswith("loss"):
        return lambda sums: -_ratio(sums)
    if metric.endswith("perplexity"):
        def perplexity(sums):
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                return np.exp(-sums[..., 0] / sums[..., 1])
        return perplexity
    raise PerRowError(f"per_row.{metric}: a logprob metric is a perplexity or a loss (name ending in "
                      "'perplexity' or 'loss')")


def _text_stats(metric: str, values: list) -> tuple[np.ndarray, Callable]:
    from sacrebleu.metrics import BLEU, CHRF

    scorers = {"bleu": BLEU, "chrf": CHRF}
    if metric not in scorers:
        raise PerRowError(f"per_row.{metric}: text rows are scored as bleu or chrf, not {metric!r}")
    scorer = scorers[metric]()
    hyps, refs = [str(v[0]) for v in values], [str(v[1]) for v in values]
    # sacrebleu's segment statistics (n-gram matches and totals, lengths) sum to the corpus statistics, so a
    # resampled corpus score is its scoring function applied to a weighted column sum: no re-tokenizing.
    stats = np.array(scorer._extract_corpus_statistics(hyps, [refs]), dtype=float) if hyps else np.zeros((0, 1))

    def corpus_score(sums: np.ndarray) -> np.ndarray:
        flat = np.asarray(sums).reshape(-1, sums.shape[-1])
        scores = [scorer._compute_score_from_stats(row.tolist()).score for row in flat]
        return np.array(scores).reshape(np.shape(sums)[:-1])

    return stats, corpus_score


# ------------------------------------------------------------------------------------------ intervals

def wilson(successes: float, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval for a proportion: stays inside [0, 1] and is not degenerate at 0/n or n/n."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, center - half), min(1.0, center + half)]


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) multiplicities of each row in each resample of n rows drawn with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    offsets = draws + (np.arange(n_boot) * n)[:, None]
    return np.bincount(offsets.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The row indices behind bootstrap_counts (same seed, same resamples), for checking it by hand."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(samples: np.ndarray, level: float) -> list[float]:
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if not samples.size:
        return [math.nan, math.nan]
    lo, hi = np.quantile(samples, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def interval(rows: MetricRows, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> tuple[list | None, str]:
    """(interval, method): Wilson for proportions, bootstrap percentile (resampling rows) for the rest."""
    n = len(rows.ids)
    if rows.kind == "binary":
        return wilson(float(rows.stats[:, 0].sum()), n, level), WILSON
    if n == 0:
        return None, BOOTSTRAP
    samples = rows.statistic(bootstrap_counts(n, n_boot, seed) @ rows.stats)
    return percentile_interval(samples, level), BOOTSTRAP


def summarize(per_row: dict, level: float = 0.95, n_boot: int = 1000, seed: int = 0,
              ids: set | None = None) -> dict:
    """{metric: {"value", "ci": [lo, hi], "rows", "interval", "level", "set"}} over every row, or over the rows
    whose id is in `ids` (a validation or test part)."""
    out = {}
    for metric, entry in per_row.items():
        rows = metric_rows(metric, entry).subset(ids)
        ci, method = interval(rows, level, n_boot, seed)
        out[metric] = {"value": rows.value(), "ci": ci, "rows": len(rows.ids), "interval": method,
                       "level": level, "set": entry.get("set")}
    return out


# ------------------------------------------------------------------------------------------ comparisons

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: b rows only A got right, c only B."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: MetricRows, b: MetricRows, ids: Iterable[str] | None = None, level: float = 0.95,
            n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired comparison of two trials on the rows both have (restricted to `ids`): the difference a - b with
    its interval, and a two-sided p-value (exact McNemar for binary metrics, paired bootstrap otherwise)."""
    shared = set(a.ids) & set(b.ids)
    if ids is not None:
        shared &= set(ids)
    order = sorted(shared)
    sa, sb = a.aligned(order), b.aligned(order)
    n = len(order)
    result = {"rows": n, "difference": None, "ci": None, "p_value": 1.0}
    if n == 0:
        result["test"] = MCNEMAR if a.kind == "binary" else PAIRED_BOOTSTRAP
        return result
    result["difference"] = float(a.statistic(sa.sum(axis=0)) - b.statistic(sb.sum(axis=0)))
    counts = bootstrap_counts(n, n_boot, seed)
    diffs = a.statistic(counts @ sa) - b.statistic(counts @ sb)
    result["ci"] = percentile_interval(diffs, level)
    if a.kind == "binary":
        only_a = int(((sa[:, 0] == 1) & (sb[:, 0] == 0)).sum())
        only_b = int(((sa[:, 0] == 0) & (sb[:, 0] == 1)).sum())
        result.update(test=MCNEMAR, p_value=mcnemar_exact(only_a, only_b), discordant=[only_a, only_b])
    else:
        diffs = diffs[np.isfinite(diffs)]
        # Two-sided percentile-bootstrap p-value: 0 lies outside the (1 - p) percentile interval of the
        # difference. Identical trials give a difference of 0 on every resample, hence p = 1.
        below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
        p = min(1.0, 2 * (min(below, above) + 1) / (len(diffs) + 1)) if len(diffs) else 1.0
        result.update(test=f"{PAIRED_BOOTSTRAP} ({n_boot} resamples)", p_value=p)
    return result


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the order given: controls the family-wise error rate."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------------ split

def split_ids(ids: Iterable[str]) -> tuple[set[str], set[str]]:
    """(validation, test): a deterministic split of row ids by a hash of each id, so a row's part does not
    depend on its position in a file. The hash order is cut in half rather than thresholded: on a 6-row eval
    set a threshold can put 5 rows on one side."""
    ordered = sorted(set(map(str, ids)), key=lambda i: hashlib.sha256(f"finesweep-split:{i}".encode()).hexdigest())
    cut = (len(ordered) + 1) // 2
    return set(ordered[:cut]), set(ordered[cut:])
