"""One leaderboard over every task: a row per run label, a column group per task setting.

``leaderboard.csv`` and ``leaderboard.md`` (:func:`write_leaderboard`), per model:

* a row per run label (:mod:`harness.report.labels`: the method and the size it was asked
  for, e.g. ``snapkv r=0.2``); the full cache is the reference row;
* per task setting (a full-cache reference run: same task, slice, lengths, window and data),
  the score with its 95 % interval and n, and the paired verdict against the full cache
  (higher score is better); where every run of the setting recorded ``reference_nll`` per
  sample, an ``NLL increase`` group too: the paired mean per-token NLL increase of the
  reference answer vs the full cache with its interval, n and verdict (lower NLL is better);
  where every run scored the same on every sample, the score verdicts say :data:`ALL_EQUAL`;
* the measured KV ratio, ``kv_ratio_shown`` (``0.121 (asked 0.2)`` where it is more than
  :data:`REACHABLE` off the requested one) and ``kv_ratio_reachable``;
* paired verdicts between methods: every two rows of one task setting whose measured KV
  ratios are within :data:`EQUAL_BYTES` of each other (the same bytes stored), over the
  samples both scored (same document, same prompt), with the interval of their difference,
  on the score and on the NLL;
* the verdict rule (:data:`RULE`): a paired percentile bootstrap, two-sided p-values
  (:func:`stats.paired_pvalue`), Holm's correction per (task setting, metric) over all its
  comparisons at a family-wise 5 %, and at least ``stats.MIN_PAIRED`` pairs;
* ``rank``: 1 + the number of rows that beat this one outside noise in some (task setting,
  metric) and lose to it in none. Differences inside noise never move a rank.

Runs without a full-cache reference of their setting are left out, each named in a warning.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report import stats
from harness.report.fidelity import FidelityInputs, paired_keys
from harness.report.tables import fmt_interval, markdown

EQUAL_BYTES = 0.02  # measured KV ratios this close count as the same bytes stored
REACHABLE = 0.01  # a measured KV ratio this close to the requested one reached it
ALL_EQUAL = "no differences possible: every score equal"
SCORE, NLL = "score", "nll"  # the metrics compared: higher score is better, lower NLL is better
RULE = (
    "Verdict rule: paired differences (run − other) over the samples both runs scored (same "
    "document, same prompt), with a seeded percentile-bootstrap 95 % interval and two-sided "
    "p-value; the same for the per-token NLL of the reference answer where every run of a task "
    "setting recorded it (`NLL increase`: run − full cache; lower NLL is better, higher score is "
    "better). Holm's correction per (task setting, metric) over all its comparisons (each run vs "
    f"the full cache, and every two runs within {EQUAL_BYTES} of each other's measured KV ratio) "
    f"at a family-wise 5 %; no verdict below {stats.MIN_PAIRED} pairs; where every run scored the "
    f"same on every sample: '{ALL_EQUAL}'. A measured KV ratio more than {REACHABLE} from the "
    "requested one is marked `(asked r)` and `kv_ratio_reachable` is false. `rank`: 1 + the rows that beat "
    "this one outside noise in some (task setting, metric) and lose to it in none."
)


@dataclass
class Leaderboard:
    rows: pd.DataFrame
    pairs: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def _settings(table: pd.DataFrame) -> pd.Series:
    """Each run's task setting, named by its task and what its reference's label adds to
    ``full`` where one task has several settings (``ruler_niah_single_1 [40 per length]``)."""
    labels = dict(zip(table["run_id"], table["label"], strict=True))

    def name(run: pd.Series) -> str:
        extra = str(labels.get(run["reference"]) or "").removeprefix("full").strip()
        return f"{run['task']} {extra}".strip()

    return table.apply(name, axis=1)


def _values(run: FidelityInputs, metric: str) -> dict[Any, float]:
    return run.scores if metric == SCORE else run.nll


def _compare(a: FidelityInputs, b: FidelityInputs, metric: str) -> tuple[stats.Interval, float]:
    keys = paired_keys(a, b)
    mine = {k: v for k, v in _values(a, metric).items() if k in keys}
    theirs = _values(b, metric)
    bounds = b.bounds if metric == SCORE else stats.UNBOUNDED
    return (
        stats.paired_difference(mine, theirs, bounds),
        stats.paired_pvalue(mine, theirs, bounds),
    )


def _comparisons(
    runs: pd.DataFrame, inputs: dict[str, FidelityInputs], metric: str
) -> list[dict[str, Any]]:
    """Every comparison of one task setting's runs on ``metric``, Holm-corrected together.
    ``winner``: the run better outside noise (higher score, lower NLL), else None."""
    found = []
    full = runs[runs["verdict"] == "reference"]
    others = runs[runs["verdict"] != "reference"]
    pairs = [(r, f) for _, r in others.iterrows() for _, f in full.iterrows()]
    for (_, a), (_, b) in itertools.combinations(others.iterrows(), 2):
        if abs(a["kv_ratio"] - b["kv_ratio"]) <= EQUAL_BYTES:
            pairs.append((a, b))
    for a, b in pairs:
        difference, p = _compare(inputs[a["path"]], inputs[b["path"]], metric)
        found.append({"a": a["label"], "b": b["label"], "difference": difference, "p": p})
    for item, rejected in zip(found, stats.holm([c["p"] for c in found]), strict=True):
        d = item["difference"]
        item["winner"] = None
        item["verdict"] = stats.verdict(d)
        if item["verdict"] in ("higher", "lower") and not rejected:
            item["verdict"] = "within noise (Holm)"
        elif item["verdict"] in ("higher", "lower"):
            higher_wins = metric == SCORE
            item["winner"] = (
                item["a"] if (item["verdict"] == "higher") == higher_wins else item["b"]
            )
            if metric == NLL:
                item["verdict"] += (
                    " NLL (worse)" if item["verdict"] == "higher" else " NLL (better)"
                )
    return found


def _all_equal(runs: pd.DataFrame, inputs: dict[str, FidelityInputs]) -> bool:
    """Whether every run of one task setting has the same score on every sample (all zero at
    the floor, say): no comparison of them can show a difference."""
    values = {v for path in runs["path"] for v in inputs[path].scores.values()}
    return len(values) <= 1


def _mark_reachable(row: dict[str, Any]) -> None:
    """``kv_ratio_reachable``: the measured KV ratio within :data:`REACHABLE` of the requested
    one; ``kv_ratio_shown`` says ``0.121 (asked 0.2)`` where it is not."""
    asked = [a for a in row.pop("kv_ratio_requested") if a is not None and not pd.isna(a)]
    if not asked:
        row["kv_ratio_reachable"] = True
        row["kv_ratio_shown"] = f"{row['kv_ratio']:.3g}"
        return
    wanted = sum(asked) / len(asked)
    row["kv_ratio_reachable"] = bool(abs(row["kv_ratio"] - wanted) <= REACHABLE + 1e-9)
    row["kv_ratio_shown"] = f"{row['kv_ratio']:.3g}" + (
        "" if row["kv_ratio_reachable"] else f" (asked {wanted:.3g})"
    )


def _metrics(group: pd.DataFrame, inputs: dict[str, FidelityInputs]) -> list[str]:
    """The score, and the NLL where every run of the setting recorded ``reference_nll``."""
    has_nll = all(inputs[path].nll for path in group["path"])
    return [SCORE, NLL] if has_nll else [SCORE]


def _nll_missing(
    model: str, setting: str, group: pd.DataFrame, inputs: dict[str, FidelityInputs]
) -> list[str]:
    """One warning naming the runs without ``reference_nll`` where others of the setting have
    it: the setting then gets no NLL group rather than one over some of its runs."""
    without = [r["label"] for _, r in group.iterrows() if not inputs[r["path"]].nll]
    if not without or len(without) == len(group):
        return []
    return [
        f"leaderboard: no NLL group for {setting} ({model}): no reference_nll recorded by "
        + ", ".join(without)
    ]


def _setting(
    model: str,
    setting: str,
    group: pd.DataFrame,
    inputs: dict[str, FidelityInputs],
    cells: dict[str, dict[str, Any]],
    beats: dict[str, set[str]],
) -> list[dict[str, Any]]:
    """Fill ``cells`` (a row per label) with one task setting's column groups, add its wins
    outside noise to ``beats``, and return its paired comparisons (one Holm family per metric)."""
    pairs, versus_full = [], {}
    full = set(group.loc[group["verdict"] == "reference", "label"])
    flat = _all_equal(group, inputs)
    for metric in _metrics(group, inputs):
        for c in _comparisons(group, inputs, metric):
            if flat and metric == SCORE:
                c["verdict"], c["winner"] = ALL_EQUAL, None
            d = c["difference"]
            pairs.append(
                {
                    "model": model,
                    "setting": setting,
                    "metric": "NLL increase" if metric == NLL else "score",
                    "run": c["a"],
                    "vs": c["b"],
                    "n": d.n,
                    "difference (95% CI)": fmt_interval(d.estimate, d.lo, d.hi, 3),
                    "p": c["p"],
                    "verdict": c["verdict"],
                }
            )
            if c["b"] in full:
                versus_full[(metric, c["a"])] = (c["verdict"], d)
            if c["winner"]:
                loser = c["b"] if c["winner"] == c["a"] else c["a"]
                beats.setdefault(c["winner"], set()).add(loser)
    for _, run in group.iterrows():
        row = cells.setdefault(run["label"], {"model": model, "run": run["label"]})
        row["method"] = run["method"]
        row.setdefault("kv_ratio", []).append(run["kv_ratio"])
        row.setdefault("kv_ratio_requested", []).append(run.get("kv_ratio_requested"))
        row[f"{setting}: score (95% CI)"] = fmt_interval(
            run["score"], run["score_lo"], run["score_hi"], 3
        )
        row[f"{setting}: n"] = run["score_n"]
        reference = run["verdict"] == "reference"
        found = versus_full.get((SCORE, run["label"]), ("",))[0]
        row[f"{setting}: vs full"] = "reference" if reference else found
        if NLL in _metrics(group, inputs):
            found_nll = versus_full.get((NLL, run["label"]))
            _nll_cells(row, setting, reference, found_nll, len(inputs[run["path"]].nll))
    return pairs


def _nll_cells(
    row: dict[str, Any],
    setting: str,
    reference: bool,
    found: tuple[str, Any] | None,
    samples: int,
) -> None:
    """The NLL group of one row: the paired NLL increase vs the full cache, its n and verdict."""
    if reference:
        row[f"{setting}: NLL increase (95% CI)"] = "0 (reference)"
        row[f"{setting}: NLL n"] = samples
        row[f"{setting}: NLL vs full"] = "reference"
        return
    verdict, d = found or ("", stats.NONE)
    row[f"{setting}: NLL increase (95% CI)"] = fmt_interval(d.estimate, d.lo, d.hi, 3)
    row[f"{setting}: NLL n"] = d.n
    row[f"{setting}: NLL vs full"] = verdict


def leaderboard(table: pd.DataFrame, inputs: dict[str, FidelityInputs]) -> Leaderboard:
    """The leaderboard of ``table`` (the report's runs) from ``inputs`` (per-sample scores)."""
    table = table[table["path"].isin(list(inputs))]
    alone = table[table["reference"].isna()]
    warnings = [
        f"leaderboard: left out {r['label']} ({r['model']}, {r['task']}, {r['run_id']}): no "
        "full-cache run of its setting to compare with"
        for _, r in alone.iterrows()
    ]
    table = table[table["reference"].notna()]
    table = table.assign(setting=_settings(table) if len(table) else [])
    rows, pairs = [], []
    for model, runs in table.groupby("model", sort=True):
        cells: dict[str, dict[str, Any]] = {}
        beats: dict[str, set[str]] = {}
        for setting, group in runs.groupby("setting", sort=True):
            pairs += _setting(model, setting, group, inputs, cells, beats)
            warnings += _nll_missing(model, setting, group, inputs)
        for label, row in cells.items():
            row["kv_ratio"] = sum(row["kv_ratio"]) / len(row["kv_ratio"])
            _mark_reachable(row)
            lost_to = {w for w, losers in beats.items() if label in losers}
            row["rank"] = 1 + sum(1 for w in lost_to if w not in beats.get(label, set()))
            rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        front = ["model", "rank", "run", "method", "kv_ratio", "kv_ratio_reachable"]
        frame = frame[front + [c for c in frame.columns if c not in front]]
        frame = frame.sort_values(["model", "rank", "kv_ratio"], ascending=[True, True, False])
    return Leaderboard(frame.reset_index(drop=True), pd.DataFrame(pairs), warnings)


def write_leaderboard(board: Leaderboard, out_dir: Path) -> dict[str, Path]:
    """``leaderboard.csv`` (the rows) and ``leaderboard.md`` (the rows, the rule, the paired
    verdicts between runs); nothing when no run has a reference."""
    if board.rows.empty:
        return {}
    paths = {
        "leaderboard": out_dir / "leaderboard.csv",
        "leaderboard_md": out_dir / "leaderboard.md",
    }
    board.rows.to_csv(paths["leaderboard"], index=False)
    pairs = board.pairs
    if len(pairs):
        few = pairs["n"] < stats.MIN_PAIRED  # no test below MIN_PAIRED pairs: no p-value shown
        pairs = pairs.assign(
            p=[("–" if f else f"{p:.3g}") for p, f in zip(pairs["p"], few, strict=True)]
        )
    parts = ["# kvbench leaderboard", RULE]
    for model, rows in board.rows.groupby("model", sort=True):
        shown = [c for c in rows.columns if c != "model" and rows[c].notna().any()]
        parts += [f"## {model}", markdown(rows, shown)]
        mine = pairs[pairs["model"] == model].drop(columns="model") if len(pairs) else pairs
        if len(mine):
            parts += [f"### {model}: paired verdicts", markdown(mine)]
    if board.warnings:
        parts += ["## Left out", "\n".join(f"- {w}" for w in board.warnings)]
    paths["leaderboard_md"].write_text("\n\n".join(parts) + "\n")
    return paths
