"""harness.report.stats: the bootstrap against cases with a known answer, the paired
difference, and which interval a score gets."""

from __future__ import annotations

import math

import pytest

from harness.report.stats import (
    BOOTSTRAP,
    LM_EVAL_STDERR,
    Z95,
    bootstrap_mean,
    paired_difference,
    sample_scores,
    score_interval,
    verdict,
)


def test_bootstrap_of_bernoulli_samples_matches_the_normal_approximation() -> None:
    # 120 successes in 400: the normal-approximation interval is p ± 1.96 sqrt(p(1-p)/n)
    values = [1.0] * 120 + [0.0] * 280
    p, n = 0.3, 400
    half = Z95 * math.sqrt(p * (1 - p) / n)  # 0.0449
    interval = bootstrap_mean(values)
    assert interval.estimate == pytest.approx(p) and interval.n == n
    assert interval.lo == pytest.approx(p - half, abs=0.006)
    assert interval.hi == pytest.approx(p + half, abs=0.006)


def test_bootstrap_of_two_samples_is_the_exact_resampling_distribution() -> None:
    # resampling {0, 1} twice gives a mean of 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4:
    # the 2.5 % and 97.5 % quantiles are exactly 0 and 1
    interval = bootstrap_mean([0.0, 1.0])
    assert (interval.lo, interval.estimate, interval.hi) == (0.0, 0.5, 1.0)


def test_bootstrap_is_seeded_and_needs_two_samples() -> None:
    values = [0.1, 0.7, 0.3, 0.9, 0.2]
    assert bootstrap_mean(values) == bootstrap_mean(values)
    assert bootstrap_mean(values, seed=1) != bootstrap_mean(values, seed=2)
    one = bootstrap_mean([0.4])
    assert one.estimate == 0.4 and one.n == 1 and math.isnan(one.lo) and math.isnan(one.hi)
    assert bootstrap_mean([]).n == 0
    assert verdict(one) == "too few (n<6)"


def test_paired_difference_cancels_the_variation_between_samples() -> None:
    # samples differ a lot from each other, but the run is every sample's reference + 0.05:
    # the paired interval is exactly 0.05, an unpaired comparison could not tell them apart
    reference = {i: v for i, v in enumerate([0.0, 1.0, 0.2, 0.9, 0.5, 0.1, 0.8, 0.3])}
    run = {i: v + 0.05 for i, v in reference.items()}
    diff = paired_difference(run, reference)
    assert diff.estimate == pytest.approx(0.05)
    assert diff.lo == pytest.approx(0.05) and diff.hi == pytest.approx(0.05)
    assert verdict(diff) == "higher"
    unpaired = bootstrap_mean(list(reference.values()))
    assert unpaired.hi - unpaired.lo > 0.3
    # only the samples both runs scored are paired
    assert paired_difference({0: 1.0, 99: 5.0}, reference).n == 1


def record(values: list[float], stderr: object = None, filt: str = "none") -> dict:
    results = {"sample_len": len(values), f"f1,{filt}": sum(values) / len(values)}
    if stderr is not None:
        results[f"f1_stderr,{filt}"] = stderr
    samples = []
    for i, v in enumerate(values):
        samples.append({"task": "t", "doc_id": i, "filter": filt, "metrics": {"f1": v}})
        samples.append({"task": "t", "doc_id": i, "filter": "other", "metrics": {"f1": -9.0}})
    return {
        "task": {"lm_eval_tasks": ["t"]},
        "metrics": {"t": results},
        "score": {"metric": f"f1,{filt}", "value": sum(values) / len(values)},
        "samples": samples,
    }


def test_score_interval_uses_lm_evals_stderr_where_it_has_one_else_the_bootstrap() -> None:
    values = [0.0, 0.5, 1.0, 0.5]
    with_stderr = score_interval(record(values, stderr=0.1))
    assert with_stderr.source == LM_EVAL_STDERR and with_stderr.n == 4
    assert with_stderr.lo == pytest.approx(0.5 - Z95 * 0.1)
    assert with_stderr.hi == pytest.approx(0.5 + Z95 * 0.1)
    for missing in (None, "N/A"):
        boot = score_interval(record(values, stderr=missing))
        assert boot.source == BOOTSTRAP and boot == bootstrap_mean(values)
    # the per-sample values of the primary metric's filter only
    assert sample_scores(record(values, filt="strict")) == {
        ("t", i): v for i, v in enumerate(values)
    }


def test_no_bootstrap_when_the_score_is_not_the_mean_of_the_samples() -> None:
    rec = record([0.0, 1.0])
    rec["score"]["value"] = 0.9  # e.g. a corpus-level metric
    interval = score_interval(rec)
    assert interval.estimate == 0.9 and math.isnan(interval.lo) and interval.source == ""


def test_no_verdict_on_fewer_than_six_pairs() -> None:
    # two differences of the same sign: the bootstrap interval excludes 0, yet a sign test
    # on 2 pairs has p = 0.5; below 6 pairs no distribution-free 95 % test can reject 0
    small = paired_difference({0: 0.2, 1: 0.3}, {0: 0.0, 1: 0.0})
    assert small.excludes_zero and verdict(small) == "too few (n<6)"
    six = paired_difference({i: 0.2 + i / 100 for i in range(6)}, {i: 0.0 for i in range(6)})
    assert verdict(six) == "higher"
