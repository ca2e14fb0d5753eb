"""The leaderboard: one row per run label, a column group per task setting, paired verdicts
against the full cache and between methods at equal bytes, Holm-corrected, a rank that moves
only on differences outside noise, and runs without a reference named, never mixed in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from test_report import dump, make_record

from harness.report import load_report, write_report
from harness.report.leaderboard import leaderboard
from harness.report.stats import holm, paired_pvalue

N = 30


def scored(record: dict[str, Any], right: list[int]) -> dict[str, Any]:
    """``record`` whose samples in ``right`` are right, the score their mean."""
    for i, sample in enumerate(record["samples"]):
        sample["metrics"]["exact_match"] = float(i in right)
    record["score"]["value"] = len(right) / len(record["samples"])
    return record


def runs(root: Path) -> Any:
    """Full cache 30/30; SnapKV and PyramidKV at the same bytes (0.2), SnapKV 28/30 and
    PyramidKV 12/30; StreamingLLM at 0.2 with 27/30 (within noise of SnapKV); H2O at 0.4
    with 29/30."""
    outs = ["o"] * N
    every = list(range(N))
    for run_id, method, kv, right in [
        ("full", "full", 1.0, every),
        ("snap", "snapkv", 0.2, every[:28]),
        ("pyr", "pyramidkv", 0.205, every[:12]),
        ("stream", "streamingllm", 0.19, every[:27]),
        ("h2o", "h2o", 0.4, every[:29]),
    ]:
        ratio = {"ratio": 1.0 if method == "full" else round(kv, 1)}
        dump(root, scored(make_record(run_id, method, ratio, 0.0, kv, outs), right), run_id)
    return load_report(root)


def verdict(pairs: pd.DataFrame, a: str, b: str) -> str:
    """The verdict of ``a`` against ``b``, whichever way round the pair was made."""
    flip = {"higher": "lower", "lower": "higher"}
    for x, y, turn in ((a, b, False), (b, a, True)):
        found = pairs[(pairs["run"] == x) & (pairs["vs"] == y)]["verdict"]
        if len(found):
            return flip.get(found.iloc[0], found.iloc[0]) if turn else found.iloc[0]
    return "not compared"


def test_holm_and_pvalues_agree_with_the_intervals() -> None:
    assert holm([0.01, 0.04, 0.03, 0.5]) == [True, False, False, False]
    assert holm([0.001, 0.01, 0.02]) == [True, True, True]
    same = {i: 1.0 for i in range(10)}
    assert paired_pvalue(same, same, (0, 1)) == 1.0  # no difference
    assert paired_pvalue({i: 1.0 for i in range(5)}, {i: 0.0 for i in range(5)}, (0, 1)) == 1.0
    assert paired_pvalue({i: 1.0 for i in range(20)}, {i: 0.0 for i in range(20)}, (0, 1)) < 1e-4


def test_one_row_per_run_with_verdicts_and_a_rank_outside_noise(tmp_path: Path) -> None:
    report = runs(tmp_path / "results")
    board = leaderboard(report.runs, report.inputs)
    rows = board.rows.set_index("run")
    assert list(rows.index[:1]) == ["full"] and not board.warnings
    column = "gsm8k: vs full"
    assert rows.at["pyramidkv r=0.2", column] == "lower"  # 12 of 30: 18 losses
    assert rows.at["snapkv r=0.2", column] == "within noise"  # 2 losses
    assert rows.at["pyramidkv r=0.2", "gsm8k: n"] == N
    assert "[" in rows.at["snapkv r=0.2", "gsm8k: score (95% CI)"]
    pairs = board.pairs
    assert verdict(pairs, "snapkv r=0.2", "pyramidkv r=0.2") == "higher"  # same bytes
    assert verdict(pairs, "snapkv r=0.2", "streamingllm r=0.2") == "within noise"
    assert verdict(pairs, "h2o r=0.4", "snapkv r=0.2") == "not compared"  # other bytes
    # beaten outside noise by the full cache and SnapKV (and StreamingLLM), never beating them
    assert rows.at["pyramidkv r=0.2", "rank"] > rows.at["snapkv r=0.2", "rank"]
    assert rows.at["snapkv r=0.2", "rank"] == rows.at["full", "rank"] == 1
    assert rows.at["snapkv r=0.2", "kv_ratio"] == 0.2


def test_the_report_writes_the_leaderboard_and_the_page_shows_it(tmp_path: Path) -> None:
    report = runs(tmp_path / "results")
    paths = write_report(report.runs, tmp_path / "rep", report.requests, [], report.inputs)
    table = pd.read_csv(paths["leaderboard"])
    assert {"rank", "run", "kv_ratio", "gsm8k: score (95% CI)", "gsm8k: vs full"} <= set(table)
    text = paths["leaderboard_md"].read_text()
    assert "Holm" in text and "paired verdicts" in text and "pyramidkv r=0.2" in text
    assert "Leaderboard" in paths["html"].read_text()


def test_runs_without_a_reference_are_left_out_by_name(tmp_path: Path) -> None:
    root = tmp_path / "results"
    runs(root)
    lone = make_record("lone", "snapkv", {"ratio": 0.2}, 0.0, 0.2, ["o"] * 4)
    lone["config"]["task"]["limit"] = 4  # a slice no full-cache run has
    dump(root, lone, "lone")
    report = load_report(root)
    board = leaderboard(report.runs, report.inputs)
    assert len(board.warnings) == 1 and "lone" in board.warnings[0]
    assert "no full-cache run of its setting" in board.warnings[0]
    assert "lone" not in set(board.rows["run"])


def test_a_reference_alone_gives_a_leaderboard_without_pairs(tmp_path: Path) -> None:
    root = tmp_path / "results"
    dump(
        root, scored(make_record("full", "full", {"ratio": 1.0}, 0.0, 1.0, ["o"] * 6), [0]), "full"
    )
    report = load_report(root)
    paths = write_report(report.runs, tmp_path / "rep", report.requests, [], report.inputs)
    assert "paired verdicts" not in paths["leaderboard_md"].read_text()
    assert list(pd.read_csv(paths["leaderboard"])["run"]) == ["full"]


def test_every_score_equal_says_no_difference_is_possible(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for run_id, method, kv in [("full", "full", 1.0), ("snap", "snapkv", 0.2)]:
        ratio = {"ratio": 1.0 if method == "full" else kv}
        dump(root, scored(make_record(run_id, method, ratio, 0.0, kv, ["o"] * N), []), run_id)
    report = load_report(root)
    board = leaderboard(report.runs, report.inputs)
    rows = board.rows.set_index("run")
    assert rows.at["snapkv r=0.2", "gsm8k: vs full"] == "no differences possible: every score equal"
    assert set(board.pairs["verdict"]) == {"no differences possible: every score equal"}
    assert rows.at["snapkv r=0.2", "rank"] == rows.at["full", "rank"] == 1


def test_a_measured_ratio_off_the_requested_one_is_marked(tmp_path: Path) -> None:
    root = tmp_path / "results"
    runs(root)
    short = scored(make_record("spin", "spindlekv", {"ratio": 0.2}, 0.0, 0.121, ["o"] * N), [])
    dump(root, short, "spin")
    report = load_report(root)
    board = leaderboard(report.runs, report.inputs)
    rows = board.rows.set_index("run")
    assert not rows.at["spindlekv r=0.2", "kv_ratio_reachable"]
    assert rows.at["spindlekv r=0.2", "kv_ratio_shown"] == "0.121 (asked 0.2)"
    assert rows.at["snapkv r=0.2", "kv_ratio_reachable"]
    assert rows.at["pyramidkv r=0.2", "kv_ratio_shown"] == "0.205"
    paths = write_report(report.runs, tmp_path / "rep", report.requests, [], report.inputs)
    assert "kv_ratio_reachable" in set(pd.read_csv(paths["leaderboard"]))


def with_nll(record: dict[str, Any], nll: list[float]) -> dict[str, Any]:
    """``record`` whose samples carry ``reference_nll`` ``nll``."""
    for sample, value in zip(record["samples"], nll, strict=True):
        sample["requests"][0]["reference_nll"] = value
    return record


def floor_runs(root: Path) -> Any:
    """Scores all zero; the full cache, SnapKV and PyramidKV at 0.2 (same bytes) with NLLs
    near the full cache's, StreamingLLM at 0.2 with every NLL 0.5 higher."""
    base = [2.0 + 0.01 * (i % 7) for i in range(N)]
    for run_id, method, kv, shift in [
        ("full", "full", 1.0, [0.0] * N),
        ("snap", "snapkv", 0.2, [0.01 * ((i % 3) - 1) for i in range(N)]),
        ("pyr", "pyramidkv", 0.2, [0.01 * ((i % 5) - 2) for i in range(N)]),
        ("stream", "streamingllm", 0.2, [0.5 + 0.01 * (i % 4) for i in range(N)]),
    ]:
        ratio = {"ratio": kv}
        record = scored(make_record(run_id, method, ratio, 0.0, kv, ["o"] * N), [])
        nll = [b + s for b, s in zip(base, shift, strict=True)]
        dump(root, with_nll(record, nll), run_id)
    return load_report(root)


def test_nll_verdicts_rank_methods_where_every_score_is_zero(tmp_path: Path) -> None:
    report = floor_runs(tmp_path / "results")
    board = leaderboard(report.runs, report.inputs)
    rows = board.rows.set_index("run")
    stream, snap = "streamingllm r=0.2", "snapkv r=0.2"
    assert rows.at[stream, "gsm8k: vs full"] == "no differences possible: every score equal"
    assert rows.at[stream, "gsm8k: NLL vs full"] == "higher NLL (worse)"
    assert rows.at[snap, "gsm8k: NLL vs full"] == "within noise"
    assert rows.at[stream, "gsm8k: NLL n"] == N and rows.at["full", "gsm8k: NLL n"] == N
    assert rows.at[stream, "gsm8k: NLL increase (95% CI)"].startswith("0.5")
    assert rows.at[stream, "rank"] > rows.at[snap, "rank"] == rows.at["full", "rank"] == 1
    nll = board.pairs[board.pairs["metric"] == "NLL increase"]
    assert verdict(nll, snap, stream) == "lower NLL (better)"  # same bytes, other method


def test_holm_is_applied_per_metric(tmp_path: Path) -> None:
    """The NLL family holds only NLL comparisons: its p-values, Holm-corrected alone, give
    its verdicts, whatever the score comparisons of the same setting are."""
    report = floor_runs(tmp_path / "results")
    pairs = leaderboard(report.runs, report.inputs).pairs
    assert set(pairs["metric"]) == {"score", "NLL increase"}
    for metric, family in pairs.groupby("metric"):
        assert len(family) == 6  # 3 vs the full cache, 3 between methods at 0.2
        if metric == "NLL increase":
            rejected = holm(list(family["p"]))
            worse = family["verdict"].str.contains("NLL \\(")
            assert list(worse) == rejected


def test_runs_without_reference_nll_are_named_and_the_nll_group_left_out(
    tmp_path: Path,
) -> None:
    root = tmp_path / "results"
    floor_runs(root)
    h2o = scored(make_record("h2o", "h2o", {"ratio": 0.4}, 0.0, 0.4, ["o"] * N), [])
    dump(root, h2o, "h2o")  # no reference_nll
    report = load_report(root)
    board = leaderboard(report.runs, report.inputs)
    assert len(board.warnings) == 1 and "h2o r=0.4" in board.warnings[0]
    assert "no reference_nll" in board.warnings[0]
    assert "gsm8k: NLL vs full" not in board.rows


def test_the_verdict_rule_is_written_out() -> None:
    """The rule printed above the leaderboard names its numbers, no template left unfilled."""
    from harness.report.leaderboard import RULE
    from harness.report.stats import MIN_PAIRED

    assert "{" not in RULE and f"no verdict below {MIN_PAIRED} pairs" in RULE
