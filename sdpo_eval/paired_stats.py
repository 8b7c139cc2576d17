"""Paired comparisons of two models scored on the same rows: bootstrap intervals, McNemar's test, Holm's correction.

Used by the replication report (``examples/reproduce_report.py``) and usable on any per-row results: ``diffs`` is a
list with one array per repetition (per-row differences, model A minus model B, on the rows both were scored on).
A repetition's rows were evaluated by models of the same cross-fitting run, so the bootstrap resamples
repetitions (when there are several) and then rows within each resampled repetition.

Assumptions:
    rows within a repetition are treated as exchangeable (the fold models they share are not resampled); with a
    single repetition the interval covers the row sampling only.
"""

from __future__ import annotations

import math

import numpy as np


def paired_bootstrap(diffs: list, levels=(0.95,), resamples: int = 10000, seed: int = 0) -> dict:
    """Mean paired difference, percentile intervals at each level, and a two-sided bootstrap p-value.

    Returns ``{"mean", "n", "intervals": {level: (low, high)}, "p_value"}``; the p-value is
    ``2 * min(P(boot <= 0), P(boot >= 0))``, at least ``1 / resamples``.
    """
    reps = [np.asarray(d, dtype=np.float64) for d in diffs if len(d)]
    if not reps:
        raise ValueError("no rows to compare")
    rng = np.random.default_rng(seed)
    n_total = sum(len(d) for d in reps)
    totals = np.zeros(resamples)
    counts = np.zeros(resamples)
    picks = rng.integers(0, len(reps), size=(resamples, len(reps))) if len(reps) > 1 else \
        np.zeros((resamples, 1), dtype=np.int64)
    for r, d in enumerate(reps):
        times = (picks == r).sum(axis=1)  # how often repetition r was drawn in each resample
        for m in np.unique(times[times > 0]):
            rows = np.flatnonzero(times == m)
            idx = rng.integers(0, len(d), size=(len(rows), m * len(d)))
            totals[rows] += d[idx].sum(axis=1)
            counts[rows] += m * len(d)
    boot = totals / np.maximum(counts, 1)
    mean = float(np.concatenate(reps).mean())
    intervals = {}
    for level in levels:
        lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
        intervals[level] = (float(lo), float(hi))
    p = 2 * min((boot <= 0).mean(), (boot >= 0).mean())
    return {"mean": mean, "n": n_total, "intervals": intervals, "p_value": float(min(1.0, max(p, 1 / resamples)))}


def mcnemar(a, b) -> dict:
    """McNemar's exact test of two paired 0/1 outcomes: ``{"a_only", "b_only", "p_value"}`` (two-sided binomial
    test of the discordant pairs at 1/2)."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    n, k = n10 + n01, min(n10, n01)
    if n == 0:
        return {"a_only": n10, "b_only": n01, "p_value": 1.0}
    log_tail = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                for i in range(k + 1)]
    top = max(log_tail)
    tail = math.exp(top) * sum(math.exp(x - top) for x in log_tail)
    return {"a_only": n10, "b_only": n01, "p_value": float(min(1.0, 2 * tail))}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): reject where the adjusted p < alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def cluster_bootstrap(clusters: list, levels=(0.95,), resamples: int = 100_000, seed: int = 0,
                      resample_clusters: bool = True, chunk: int = 5000) -> dict:
    """Two-stage bootstrap of a stratified mean of paired differences, for results grouped into independent runs.

    ``clusters`` holds one entry per run (e.g. a (repetition, fold) training run): a list with one array of per-row
    differences per stratum, the same strata in every run. The statistic is the mean over strata of the stratum's
    pooled row mean (strata equally weighted). Each resample draws the runs with replacement (or keeps them all,
    ``resample_clusters=False``: the row-only interval), then rows with replacement within each drawn run and
    stratum. Returns ``{"mean", "n", "runs", "run_values", "between_run_sd", "intervals": {level: (low, high)},
    "p_value"}``; the p-value is ``2 * min(P(boot <= 0), P(boot >= 0))``, at least ``1 / resamples``.

    Assumptions:
        runs are exchangeable and independent (separately trained models on their own folds / seeds); with few runs
        (4 here) the run stage has few distinct draws and the interval is approximate.
    """
    runs = [[np.asarray(d, dtype=np.float64) for d in strata] for strata in clusters]
    runs = [r for r in runs if all(len(d) for d in r)]
    if not runs:
        raise ValueError("no rows to compare")
    n_strata = len(runs[0])

    def statistic(chosen: list) -> float:
        return float(np.mean([np.concatenate([r[s] for r in chosen]).mean() for s in range(n_strata)]))

    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        picks = rng.integers(0, len(runs), size=(m, len(runs))) if resample_clusters else \
            np.tile(np.arange(len(runs)), (m, 1))
        stat = np.zeros(m)
        for s in range(n_strata):
            totals, counts = np.zeros(m), np.zeros(m)
            for c, r in enumerate(runs):
                d = r[s]
                times = (picks == c).sum(axis=1)
                for t in np.unique(times[times > 0]):
                    rows = np.flatnonzero(times == t)
                    idx = rng.integers(0, len(d), size=(len(rows), int(t) * len(d)))
                    totals[rows] += d[idx].sum(axis=1)
                    counts[rows] += int(t) * len(d)
            stat += totals / counts
        boot[start:start + m] = stat / n_strata
    run_values = [statistic([r]) for r in runs]
    intervals = {}
    for level in levels:
        lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
        intervals[level] = (float(lo), float(hi))
    p = 2 * min((boot <= 0).mean(), (boot >= 0).mean())
    return {"mean": statistic(runs), "n": int(sum(len(d) for r in runs for d in r)), "runs": len(runs),
            "run_values": run_values,
            "between_run_sd": float(np.std(run_values, ddof=1)) if len(runs) > 1 else 0.0,
            "intervals": intervals, "p_value": float(min(1.0, max(p, 1 / resamples)))}
