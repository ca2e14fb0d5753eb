"""Uncertainty of the report's numbers: 95 % intervals of a score and of a paired difference.

With a handful of samples a benchmark score moves by tenths between two runs of the same
method, so "A beats B" is only said when the interval of the difference excludes zero.

One rule, used by every table and plot of the report (:func:`mean_interval`):

* **pass/fail means** (every per-sample value is 0 or 1: exact match, accuracy, RULER's
  pass rate): the Wilson score interval (:func:`wilson`). It stays inside [0, 1] and is never
  of zero width at n > 0 (0 of 20 passed gives [0, 0.161]);
* **continuous means** (F1, Rouge-L, a RULER score between 0 and 1, NLL): a seeded
  percentile bootstrap over the per-sample values (:func:`bootstrap_mean`), which never leaves
  the values' range. When every value is the same (a bootstrap of constants has zero width),
  the interval is the Wilson-style bound of :func:`constant_interval`: with 0 of n samples
  seen to differ, up to a share ``u = z²/(n + z²)`` of the population may differ, by at most
  the metric's range, so the mean lies in ``[v − u (v − low), v + u (high − v)]``; for 0s or
  1s this is the Wilson interval itself. A metric without a known range (NLL) gets no
  interval from constant values (NaN, shown as "n/a").

The range of a metric comes from its name (:data:`METRIC_RANGES`; a pass/fail metric is in
[0, 1] whatever its name) and intervals are clipped to it.

* :func:`score_interval`: the interval of a run's score from the record's per-sample values
  of its primary metric (only when their mean is the score; a corpus-level score has none).
  lm-eval's own standard error is not used: its normal interval leaves [0, 1] and has zero
  width when every sample passed or failed.
* :func:`paired_difference`: the mean of (run − reference) over the samples both runs
  scored, with a paired percentile bootstrap (the samples are resampled, each keeping its
  two values): the comparison a small n can still decide, since the variation between
  samples cancels.

Every bootstrap is seeded (:data:`SEED`), so the same values always give the same interval.
A bootstrap needs at least two samples (with one: the constant rule above). A verdict
("higher" / "lower" / "within noise") needs at least :data:`MIN_PAIRED` paired samples
(:func:`verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.record_values import is_number

LEVEL = 0.95
ITERATIONS = 4000
SEED = 20261130
Z95 = 1.959963984540054  # the normal distribution's 97.5 % quantile
# the fewest paired samples a verdict is given on (see :func:`verdict`)
MIN_PAIRED = 6
BOOTSTRAP = "bootstrap"
WILSON = "Wilson"
CONSTANT = "constant values (Wilson-style bound)"
UNBOUNDED = (-math.inf, math.inf)
UNIT = (0.0, 1.0)
# the range of a metric's per-sample values, by lm-eval's name (before ",filter")
METRIC_RANGES: dict[str, tuple[float, float]] = {
    name: UNIT
    for name in (
        "exact_match",
        "acc",
        "acc_norm",
        "f1",
        "qa_f1_score",
        "rouge_score",
        "score",  # RULER: the share of the expected values found
        "passed",
        "token_f1",
    )
}


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95 % interval over ``n`` samples (``lo``/``hi`` NaN when there is
    none); ``source`` is :data:`WILSON`, :data:`BOOTSTRAP` or :data:`CONSTANT`."""

    estimate: float
    lo: float
    hi: float
    n: int
    source: str = BOOTSTRAP

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (False when it is unknown)."""
        return (self.lo > 0 or self.hi < 0) and not math.isnan(self.lo)


NONE = Interval(math.nan, math.nan, math.nan, 0, "")


def metric_range(metric: str | None, values: Sequence[float] = ()) -> tuple[float, float]:
    """The range of ``metric``'s per-sample values (``"exact_match,strict-match"`` or the bare
    name): :data:`METRIC_RANGES`, [0, 1] for pass/fail values, else unbounded."""
    name = str(metric or "").partition(",")[0]
    if name in METRIC_RANGES:
        return METRIC_RANGES[name]
    return UNIT if values and is_binary(values) else UNBOUNDED


def is_binary(values: Sequence[float]) -> bool:
    """Whether every value is 0 or 1 (a pass/fail metric)."""
    return len(values) > 0 and all(v in (0.0, 1.0) for v in values)


def wilson(share: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a ``share`` of ``n`` pass/fail samples (NaN at n = 0)."""
    if n <= 0 or math.isnan(share):
        return math.nan, math.nan
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if share <= 0.0 else max(0.0, centre - half)
    return lo, 1.0 if share >= 1.0 else min(1.0, centre + half)


def constant_interval(value: float, n: int, bounds: tuple[float, float]) -> tuple[float, float]:
    """The interval of ``n`` samples that all gave ``value``, in a metric whose values lie in
    ``bounds``: up to a share ``u = z²/(n + z²)`` (Wilson's bound for 0 of n) may differ, by at
    most the range, so ``[v − u (v − low), v + u (high − v)]``. NaN for an unbounded metric."""
    low, high = bounds
    if n <= 0 or not (math.isfinite(low) and math.isfinite(high)):
        return math.nan, math.nan
    u = Z95 * Z95 / (n + Z95 * Z95)
    return value - u * (value - low), value + u * (high - value)


def bootstrap_mean(
    values: Sequence[float], *, iterations: int = ITERATIONS, seed: int = SEED
) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap 95 % interval: ``iterations``
    resamples of the values with replacement, the 2.5 % and 97.5 % quantiles of their means
    (NaN with fewer than two values)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return NONE
    mean = float(data.mean())
    if data.size < 2:
        return Interval(mean, math.nan, math.nan, int(data.size))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(iterations, data.size))].mean(axis=1)
    alpha = (1.0 - LEVEL) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(mean, float(lo), float(hi), int(data.size))


def mean_interval(
    values: Sequence[float], bounds: tuple[float, float] = UNBOUNDED, *, seed: int = SEED
) -> Interval:
    """The mean of ``values`` with its 95 % interval by the report's one rule: Wilson for
    pass/fail values, the bootstrap for continuous ones, :func:`constant_interval` when all
    values are equal; clipped to ``bounds`` (the metric's range)."""
    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        return NONE
    mean = sum(data) / n
    if is_binary(data) and bounds[0] <= 0.0 and bounds[1] >= 1.0:
        return Interval(mean, *wilson(mean, n), n, WILSON)
    if all(v == data[0] for v in data):
        return Interval(mean, *constant_interval(data[0], n, bounds), n, CONSTANT)
    boot = bootstrap_mean(data, seed=seed)
    low, high = bounds
    return Interval(mean, max(low, boot.lo), min(high, boot.hi), n, BOOTSTRAP)


def paired_difference(
    run: dict[Any, float],
    reference: dict[Any, float],
    bounds: tuple[float, float] = UNBOUNDED,
    *,
    seed: int = SEED,
) -> Interval:
    """Mean of ``run[k] - reference[k]`` over the keys both hold, with the bootstrap interval
    of that mean (resampling the paired samples); ``bounds`` is the range of the metric
    itself, so a difference lies in ``[low - high, high - low]`` (see :func:`mean_interval`
    for equal differences)."""
    shared = [k for k in run if k in reference]
    width = bounds[1] - bounds[0]
    differences = [run[k] - reference[k] for k in shared]
    if not differences:
        return NONE
    if any(d != differences[0] for d in differences):
        return _clipped(bootstrap_mean(differences, seed=seed), (-width, width))
    n, value = len(differences), differences[0]
    return Interval(value, *constant_interval(value, n, (-width, width)), n, CONSTANT)


def paired_pvalue(
    run: dict[Any, float],
    reference: dict[Any, float],
    bounds: tuple[float, float] = UNBOUNDED,
    *,
    seed: int = SEED,
) -> float:
    """Two-sided p-value of "the paired mean difference is 0", consistent with
    :func:`paired_difference`'s interval (its (1 − p) interval just reaches 0): twice the
    smaller share of the same bootstrap means on either side of 0; for equal differences,
    the level at which :func:`constant_interval`'s bound reaches 0. 1.0 below
    :data:`MIN_PAIRED` pairs (no verdict is given there)."""
    differences = [run[k] - reference[k] for k in run if k in reference]
    n = len(differences)
    if n < MIN_PAIRED:
        return 1.0
    if all(d == differences[0] for d in differences):
        value, width = abs(differences[0]), bounds[1] - bounds[0]
        if value == 0 or not math.isfinite(width):
            return 1.0 if value == 0 else 0.0
        share = value / (value + width)  # the bound reaches 0 when u = share
        return math.erfc(math.sqrt(n * share / (1 - share)) / math.sqrt(2))
    data = np.asarray(differences, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, n, size=(ITERATIONS, n))].mean(axis=1)
    return float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))


def holm(pvalues: Sequence[float], alpha: float = 1.0 - LEVEL) -> list[bool]:
    """Holm's step-down rejections of ``pvalues`` at family-wise level ``alpha``: the i-th
    smallest is rejected while every smaller one was and it is below alpha / (m − i)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = [False] * len(pvalues)
    for rank, index in enumerate(order):
        if pvalues[index] >= alpha / (len(pvalues) - rank):
            break
        rejected[index] = True
    return rejected


def _clipped(interval: Interval, bounds: tuple[float, float]) -> Interval:
    lo, hi = max(bounds[0], interval.lo), min(bounds[1], interval.hi)
    return Interval(interval.estimate, lo, hi, interval.n, interval.source)


def split_metric(primary_metric: str | None) -> tuple[str, str | None]:
    """``"exact_match,strict-match"`` -> ``("exact_match", "strict-match")``; a metric
    without a filter gives ``(metric, None)`` (any filter)."""
    metric, _, filt = str(primary_metric or "").partition(",")
    return metric, (filt or None)


def sample_scores(record: dict[str, Any]) -> dict[tuple[str, int], float]:
    """``{(lm-eval task, doc_id): the primary metric of that sample}`` from the record's
    ``samples`` (lm-eval logs one entry per filter; the primary metric's filter is used)."""
    metric, filt = split_metric((record.get("score") or {}).get("metric"))
    out: dict[tuple[str, int], float] = {}
    for s in record.get("samples") or []:
        if not isinstance(s, dict) or s.get("doc_id") is None:
            continue
        if filt is not None and s.get("filter") not in (filt, None):
            continue
        value = (s.get("metrics") or {}).get(metric)
        key = (str(s.get("task")), int(s["doc_id"]))
        if key not in out and is_number(value):
            out[key] = float(value)
    return out


def score_interval(record: dict[str, Any]) -> Interval:
    """The 95 % interval of the record's score by :func:`mean_interval` over the per-sample
    values of its primary metric, clipped to the metric's range; only when their mean is the
    score (a corpus-level metric's score gets no interval: lo/hi NaN, ``source`` empty);
    :data:`NONE` without a score."""
    score = (record.get("score") or {}).get("value")
    if not is_number(score):
        return NONE
    metric = (record.get("score") or {}).get("metric")
    values = list(sample_scores(record).values())
    interval = mean_interval(values, metric_range(metric, values))
    if interval.n and math.isclose(interval.estimate, score, rel_tol=1e-6, abs_tol=1e-9):
        return interval
    return Interval(float(score), math.nan, math.nan, interval.n, "")


def verdict(difference: Interval) -> str:
    """``"higher"`` / ``"lower"`` when the interval of a paired difference excludes 0 over
    at least :data:`MIN_PAIRED` samples, ``"within noise"`` when it holds 0, ``"too few
    (n<6)"`` below that: a percentile bootstrap of a handful of samples is far too narrow
    (two differences of the same sign give an interval that excludes 0), and no
    distribution-free 95 % test of a paired difference (sign test, Wilcoxon signed-rank)
    can reject 0 with fewer than 6 pairs."""
    if difference.n == 0:
        return ""
    if difference.n < MIN_PAIRED:
        return f"too few (n<{MIN_PAIRED})"
    if math.isnan(difference.lo):
        return "no interval"
    if difference.excludes_zero:
        return "higher" if difference.estimate > 0 else "lower"
    return "within noise"
