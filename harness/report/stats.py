"""Uncertainty of the report's numbers: 95 % intervals of a score and of a paired difference.

With a handful of samples a benchmark score moves by tenths between two runs of the same
method, so "A beats B" is only said when the interval of the difference excludes zero.

* :func:`score_interval`: the interval of a run's score: lm-eval's own standard error when
  the record has one (``<metric>_stderr,<filter>``; a normal interval, score ± 1.96 se),
  otherwise a percentile bootstrap over the run's per-sample metric values. The ``source``
  field says which was used.
* :func:`paired_difference`: the mean of (run − reference) over the samples both runs
  scored, with a paired percentile bootstrap (the samples are resampled, each keeping its
  two values): the comparison a small n can still decide, since the variation between
  samples cancels.

Every bootstrap is seeded (:data:`SEED`), so the same values always give the same interval.
An interval needs at least two samples: with fewer it is NaN. A verdict ("higher" / "lower"
/ "within noise") needs at least :data:`MIN_PAIRED` paired samples (:func:`verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
ITERATIONS = 4000
SEED = 20261130
Z95 = 1.959963984540054  # the normal distribution's 97.5 % quantile
# the fewest paired samples a verdict is given on (see :func:`verdict`)
MIN_PAIRED = 6
BOOTSTRAP = "bootstrap"
LM_EVAL_STDERR = "lm-eval stderr"


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95 % interval over ``n`` samples (``lo``/``hi`` NaN when
    ``n`` < 2); ``source`` is :data:`BOOTSTRAP` or :data:`LM_EVAL_STDERR`."""

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


def bootstrap_mean(
    values: Sequence[float], *, iterations: int = ITERATIONS, seed: int = SEED
) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap 95 % interval: ``iterations``
    resamples of the values with replacement, the 2.5 % and 97.5 % quantiles of their means."""
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


def normal_interval(estimate: float, stderr: float, n: int) -> Interval:
    """``estimate`` ± 1.96 ``stderr`` (lm-eval's standard error of the mean)."""
    if n < 2:
        return Interval(estimate, math.nan, math.nan, n, LM_EVAL_STDERR)
    return Interval(estimate, estimate - Z95 * stderr, estimate + Z95 * stderr, n, LM_EVAL_STDERR)


def paired_difference(
    run: dict[Any, float], reference: dict[Any, float], *, seed: int = SEED
) -> Interval:
    """Mean of ``run[k] - reference[k]`` over the keys both hold, with the bootstrap interval
    of that mean (resampling the paired samples)."""
    shared = [k for k in run if k in reference]
    return bootstrap_mean([run[k] - reference[k] for k in shared], seed=seed)


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
        if key not in out and _is_number(value):
            out[key] = float(value)
    return out


def lm_eval_stderr(record: dict[str, Any]) -> tuple[float, int] | None:
    """(stderr, n) of the primary metric as lm-eval computed it, or None when it has none
    (``"N/A"``, absent, or a task without ``sample_len``)."""
    metric, filt = split_metric((record.get("score") or {}).get("metric"))
    key = f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr"
    for name in (record.get("task") or {}).get("lm_eval_tasks") or []:
        results = (record.get("metrics") or {}).get(name) or {}
        stderr, n = results.get(key), results.get("sample_len")
        if _is_number(stderr) and stderr >= 0:
            return float(stderr), int(n) if _is_number(n) else len(sample_scores(record))
    return None


def score_interval(record: dict[str, Any]) -> Interval:
    """The 95 % interval of the record's score: lm-eval's stderr where it has one, else the
    bootstrap over the per-sample values (only when their mean is the score, i.e. the
    metric is a mean over samples); :data:`NONE` when neither applies."""
    score = (record.get("score") or {}).get("value")
    if not _is_number(score):
        return NONE
    from_lm_eval = lm_eval_stderr(record)
    if from_lm_eval is not None:
        return normal_interval(float(score), *from_lm_eval)
    values = list(sample_scores(record).values())
    interval = bootstrap_mean(values)
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
    if difference.n < MIN_PAIRED or math.isnan(difference.lo):
        return f"too few (n<{MIN_PAIRED})"
    if difference.excludes_zero:
        return "higher" if difference.estimate > 0 else "lower"
    return "within noise"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
