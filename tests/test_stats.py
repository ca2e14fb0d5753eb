"""harness.report.stats: the bootstrap and Wilson intervals against cases with a known
answer, the paired difference, and which interval a score gets (one rule for every table)."""

from __future__ import annotations

import math

import pytest

from harness.report.stats import (
    BOOTSTRAP,
    CONSTANT,
    UNIT,
    WILSON,
    Z95,
    bootstrap_mean,
    mean_interval,
    metric_range,
    paired_difference,
    sample_scores,
    score_interval,
    verdict,
    wilson,
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
    # samples differ a lot from each other, but the run is every sample's reference + 0.05
    # (± 0.005): the paired interval is within 0.005 of 0.05, an unpaired comparison could not
    # tell them apart
    reference = {i: v for i, v in enumerate([0.0, 1.0, 0.2, 0.9, 0.5, 0.1, 0.8, 0.3])}
    run = {i: v + 0.05 + (0.005 if i % 2 else -0.005) for i, v in reference.items()}
    diff = paired_difference(run, reference, UNIT)
    assert diff.estimate == pytest.approx(0.05) and diff.source == BOOTSTRAP
    assert 0.045 <= diff.lo < diff.hi <= 0.055
    assert verdict(diff) == "higher"
    unpaired = bootstrap_mean(list(reference.values()))
    assert unpaired.hi - unpaired.lo > 0.3
    # only the samples both runs scored are paired
    assert paired_difference({0: 1.0, 99: 5.0}, reference).n == 1


def test_wilson_stays_in_range_and_is_never_of_zero_width() -> None:
    # 0 and 20 of 20 passed: [0, z²/(n+z²)] and [n/(n+z²), 1], not lm-eval's [0, 0] / [1, 1]
    zero, all_passed = mean_interval([0.0] * 20), mean_interval([1.0] * 20)
    bound = Z95**2 / (20 + Z95**2)
    assert zero.source == WILSON and (zero.lo, zero.hi) == (0.0, pytest.approx(bound))
    assert (all_passed.lo, all_passed.hi) == (pytest.approx(1 - bound), 1.0)
    # 17 of 20: the textbook Wilson interval [0.640, 0.948], inside [0, 1] (the normal
    # interval of lm-eval's stderr, 0.85 ± 0.16, reaches 1.011)
    passed = mean_interval([1.0] * 17 + [0.0] * 3)
    assert passed.lo == pytest.approx(0.6396, abs=1e-4) and passed.hi == pytest.approx(
        0.9476, abs=1e-4
    )
    assert wilson(0.85, 20) == (passed.lo, passed.hi)
    for n in (1, 2, 5, 100):
        for k in range(n + 1):
            lo, hi = wilson(k / n, n)
            assert 0.0 <= lo < hi <= 1.0


def test_continuous_values_get_a_clipped_bootstrap_and_constants_a_wilson_style_bound() -> None:
    values = [0.2, 0.5, 0.9, 0.4, 0.7]
    interval = mean_interval(values, UNIT)
    assert interval.source == BOOTSTRAP and interval == mean_interval(values, UNIT)  # seeded
    assert 0.0 <= interval.lo < interval.estimate < interval.hi <= 1.0
    # equal F1s of 0.5 over 10 samples: up to u = z²/(n+z²) of the population may differ,
    # by at most the range: [0.5 - u * 0.5, 0.5 + u * 0.5]
    constant = mean_interval([0.5] * 10, UNIT)
    u = Z95**2 / (10 + Z95**2)
    assert constant.source == CONSTANT
    assert (constant.lo, constant.hi) == (pytest.approx(0.5 - u / 2), pytest.approx(0.5 + u / 2))
    # ... the Wilson interval itself for constant 1s of a continuous metric
    assert (mean_interval([1.0] * 10, UNIT).lo) == pytest.approx(wilson(1.0, 10)[0])
    # an unbounded metric's constants (NLL) give no interval rather than a zero-width one
    nll = mean_interval([2.5, 2.5, 2.5])
    assert nll.source == CONSTANT and math.isnan(nll.lo) and math.isnan(nll.hi)
    # one continuous value in [0, 1]: the constant rule, not NaN
    one = mean_interval([0.3], UNIT)
    assert one.n == 1 and 0.0 <= one.lo < 0.3 < one.hi <= 1.0


def test_equal_paired_differences_get_a_symmetric_bound_not_zero_width() -> None:
    # a run that passed and failed exactly the reference's samples: Δ = 0 over 12 pairs
    same = paired_difference(
        {i: float(i % 2) for i in range(12)}, {i: float(i % 2) for i in range(12)}, UNIT
    )
    u = Z95**2 / (12 + Z95**2)
    assert same.estimate == 0.0 and same.source == CONSTANT
    assert (same.lo, same.hi) == (pytest.approx(-u), pytest.approx(u))
    assert verdict(same) == "within noise"
    # differences of a pass/fail metric stay inside [-1, 1]
    wide = paired_difference({0: 1.0, 1: 1.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0}, UNIT)
    assert -1.0 <= wide.lo and wide.hi <= 1.0


def test_metric_ranges_come_from_the_name_or_pass_fail_values() -> None:
    assert metric_range("exact_match,strict-match") == UNIT
    assert metric_range("score,none") == UNIT  # RULER: share of the values found
    assert metric_range("custom", [0.0, 1.0, 1.0]) == UNIT
    assert metric_range("custom", [0.5, 3.0]) == (-math.inf, math.inf)


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


def test_score_interval_is_wilson_for_pass_fail_and_the_bootstrap_otherwise() -> None:
    values = [0.0, 0.5, 1.0, 0.5]
    # lm-eval's stderr, where the record has one, is not used: one rule for every table
    for stderr in (0.1, None, "N/A"):
        boot = score_interval(record(values, stderr=stderr))
        assert boot.source == BOOTSTRAP and boot == mean_interval(values, UNIT)
    passed = score_interval(record([1.0, 1.0, 0.0, 1.0], stderr=0.25))
    assert passed.source == WILSON and (passed.lo, passed.hi) == wilson(0.75, 4)
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
