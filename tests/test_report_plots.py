"""The report's plots, drawn by matplotlib's renderer and checked on their layout and data:
nothing clipped (every text, legend and marker inside its figure and axes), every legend
entry a drawn line, no empty panel, no line across points of different lengths or task
settings, overlapping series still visible, no interval outside the metric's range."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.lines import Line2D
from matplotlib.text import Text
from test_report import dump, make_record

from harness.report import load_report
from harness.report.plot_common import method_colors, run_labels
from harness.report.plots import PLOTS, plot_score_vs_kv_ratio
from harness.report.plots_context import plot_context
from harness.report.plots_costs import peak_words, plot_memory
from harness.report.plots_methods import plot_kv_per_layer
from harness.report.plots_nll import NLL_PLOTS
from harness.report.plots_ruler import plot_accuracy_vs_kv
from harness.report.summary import details_markdown, summary_markdown

N = 20
TOLERANCE = 1.0  # pixels


def passes(record: dict[str, Any], passed: int) -> dict[str, Any]:
    """``record`` whose first ``passed`` of its samples are right, the score their mean."""
    for i, sample in enumerate(record["samples"]):
        sample["metrics"]["exact_match"] = float(i < passed)
    record["score"]["value"] = passed / len(record["samples"])
    return record


def demo(root: Path, cpu_peak: bool = True, samples: int = N) -> Any:
    """The demo's situation: the full cache passing every sample (a star at 1.0), SnapKV 17
    of 20 (lm-eval's normal interval reached 1.011), StreamingLLM none, SnapKV and
    StreamingLLM at the same measured ratio with the same per-layer fractions, and a second
    full-cache run over fewer samples."""
    outputs = [str(i) for i in range(samples)]
    runs = [
        ("full", "full", {"ratio": 1.0}, samples, 1.0, outputs),
        ("snap", "snapkv", {"ratio": 0.2, "window": 32}, 17, 0.2, outputs[:-1] + ["x"]),
        ("stream", "streamingllm", {"ratio": 0.2, "sinks": 4}, 0, 0.2, ["x"] * samples),
    ]
    for run_id, method, params, passed, kv, outs in runs:
        record = passes(make_record(run_id, method, params, 0.0, kv, outs), passed)
        if method != "full":
            record["method"]["stats"] = {"tokens_before": [500] * 4, "tokens_kept": [100] * 4}
        if cpu_peak:
            record["measurements"]["peak_memory_kind"] = "weights_plus_kv_allocated"
        dump(root, record, run_id)
    small = passes(make_record("full6", "full", {"ratio": 1.0}, 0.0, 1.0, outputs[:6]), 6)
    small["config"]["task"]["limit"] = 6
    if cpu_peak:
        small["measurements"]["peak_memory_kind"] = "weights_plus_kv_allocated"
    dump(root, small, "full6")
    return load_report(root)


def draw(fig: Any) -> Any:
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def inside(box: Any, outer: Any) -> bool:
    return (
        box.x0 >= outer.x0 - TOLERANCE
        and box.y0 >= outer.y0 - TOLERANCE
        and box.x1 <= outer.x1 + TOLERANCE
        and box.y1 <= outer.y1 + TOLERANCE
    )


def clipped(fig: Any) -> list[str]:
    """What does not fit: an axes' decorations (title, labels, tick labels) or any other
    text or legend outside the figure, a marker outside its axes."""
    renderer = draw(fig)
    problems = []
    for ax in fig.axes:
        if ax.get_visible() and not inside(ax.get_tightbbox(renderer), fig.bbox):
            problems.append(f"axes {ax.get_title()!r} ({ax.get_xlabel()!r}) leaves the figure")
        for line in ax.lines:
            marker = line.get_marker() not in (None, "None", "", " ")
            if (
                marker
                and len(line.get_xdata())
                and not inside(line.get_window_extent(renderer), ax.bbox)
            ):
                problems.append(f"markers of {line.get_label()!r} cut by the axes' edge")
    # tick labels are in the axes' tight boxes above (those of ticks out of view are never
    # drawn); every other text (titles, notes, labels written on bars) is checked itself
    ticks = {id(t) for ax in fig.axes for t in axis_texts(ax)}
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    for text in texts:
        if id(text) not in ticks and not inside(text.get_window_extent(renderer), fig.bbox):
            problems.append(f"text {text.get_text()[:40]!r} leaves the figure")
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    for legend in legends:
        if not inside(legend.get_window_extent(renderer), fig.bbox):
            problems.append("a legend leaves the figure")
    return problems


def axis_texts(ax: Any) -> list[Text]:
    """The tick labels of both axes of ``ax``, major and minor, drawn or not."""
    out = []
    for axis in (ax.xaxis, ax.yaxis):
        for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
            out += [tick.label1, tick.label2]
    return out


def drawn(handle: Any, ax: Any) -> bool:
    """Whether a legend handle's artist shows something inside ``ax``'s view."""
    if isinstance(handle, ErrorbarContainer):
        handle = handle.lines[0]
    if isinstance(handle, BarContainer):
        return any(p.get_width() > 0 and p.get_height() > 0 for p in handle.patches)
    if isinstance(handle, Line2D):
        xs, ys = handle.get_xdata(), handle.get_ydata()
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        shown = [x0 <= x <= x1 and y0 <= y <= y1 for x, y in zip(xs, ys, strict=True)]
        marker = handle.get_marker() not in (None, "None", "", " ")
        line = handle.get_linestyle() not in ("None", "", " ")
        return (marker and any(shown)) or (line and sum(shown) >= 2)
    offsets = getattr(handle, "get_offsets", lambda: [])()
    return len(offsets) > 0


def undrawn_legend_entries(fig: Any) -> list[str]:
    """The labels of axes legends whose artists draw nothing inside their axes."""
    draw(fig)
    out = []
    for ax in fig.axes:
        if ax.get_legend() is None:
            continue
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if not drawn(handle, ax):
                out.append(label)
    return out


@pytest.fixture
def report(tmp_path: Path) -> Any:
    return demo(tmp_path / "results")


def test_every_plot_fits_its_figure_and_lists_only_drawn_lines(report: Any) -> None:
    group = report.runs
    colors = method_colors(list(group["method"].unique()))
    figures = {kind: plot(group, colors) for kind, plot in PLOTS.items()}
    labels = dict(zip(group["run_id"], run_labels(group), strict=True))
    figures["context"] = plot_context(report.requests, colors, labels, peak_words(group))
    figures["kv_per_layer"] = plot_kv_per_layer(group)
    for kind, fig in figures.items():
        assert fig is not None, kind
        assert clipped(fig) == [], kind
        assert undrawn_legend_entries(fig) == [], kind


def test_score_intervals_stay_in_range_and_the_full_cache_star_is_whole(report: Any) -> None:
    rows = report.runs.set_index("run_id")
    # the tables' interval, Wilson: inside [0, 1], never of zero width
    assert rows.at["snap", "score_hi"] <= 1.0 and rows.at["full", "score_lo"] < 1.0
    assert rows.at["stream", "score_hi"] > 0.0
    fig = plot_score_vs_kv_ratio(report.runs, method_colors(list(rows["method"].unique())))
    ax = fig.axes[0]
    assert clipped(fig) == []  # the star at 1.0 included
    for container in ax.containers:
        for collection in container.lines[2]:  # the whiskers, drawn from the same interval
            for segment in collection.get_segments():
                assert all(-1e-9 <= y <= 1.0 + 1e-9 for _, y in segment)
    # the two full-cache runs (20 and 6 samples) are separate series, never joined
    names = [c.get_label() for c in ax.containers]
    assert any("limit 6" in name for name in names) and "snapkv" in names
    for container in ax.containers:
        assert len(container.lines[0].get_xdata()) == 1


def test_the_memory_plot_shows_a_measured_peak_named_or_no_panel(tmp_path: Path) -> None:
    report = demo(tmp_path / "cpu")
    colors = method_colors(list(report.runs["method"].unique()))
    fig = plot_memory(report.runs, colors)
    assert len(fig.axes) == 2 and clipped(fig) == []
    peak = fig.axes[1]
    assert peak.get_xlabel() == "weights + KV cache allocated (MB)"
    for ax in fig.axes:  # no empty panel: every bar panel shows positive bars
        assert any(p.get_width() > 0 for p in ax.patches)
    # runs that recorded no peak: the panel is left out, not drawn empty
    none = report.runs.assign(peak_mem_mb_p50=math.nan, peak_mem_mb_p95=math.nan)
    assert len(plot_memory(none, colors).axes) == 1
    # an older CPU record (no kind): its resident-set peak, named as such
    old = demo(tmp_path / "old", cpu_peak=False)
    assert "resident-set" in plot_memory(old.runs, colors).axes[1].get_xlabel()


def test_context_lines_join_only_each_runs_per_length_medians(report: Any) -> None:
    requests = report.requests.copy()
    # RULER-like lengths: two clusters of slightly different prompt lengths per run
    lengths = [600 + (i % 3) if i < N // 2 else 1000 + (i % 5) for i in requests["doc_id"]]
    requests["prompt_tokens_original"] = lengths
    colors = method_colors(list(report.runs["method"].unique()))
    labels = dict(zip(report.runs["run_id"], run_labels(report.runs), strict=True))
    fig = plot_context(requests, colors, labels, "weights + KV cache allocated")
    assert clipped(fig) == []
    for ax in fig.axes:
        for line in ax.lines:
            if line.get_linestyle() in ("None", "", " "):
                continue  # the requests themselves, as points
            xs = list(line.get_xdata())
            assert len(xs) <= 2 and xs == sorted(set(xs))  # one point per length cluster
    assert all(ax.get_xlabel() for ax in fig.axes)


def test_runs_with_the_same_per_layer_fractions_stay_visible(report: Any) -> None:
    fig = plot_kv_per_layer(report.runs)
    draw(fig)
    lines = [line for line in fig.axes[0].lines if line.get_label().startswith(("snap", "stream"))]
    assert len(lines) == 2
    a, b = (line.get_xydata().tolist() for line in lines)
    assert a != b  # shifted apart along x
    assert lines[0].get_marker() != lines[1].get_marker()
    assert lines[0].get_linestyle() != lines[1].get_linestyle()


def ruler_record(run_id: str, method: str, kv: float, passed: list[int]) -> dict[str, Any]:
    record = make_record(run_id, method, {"ratio": kv}, 0.0, kv, [""] * len(passed))
    record["task"]["name"] = record["config"]["task"]["name"] = "ruler_niah_single_1"
    record["score"] = {"metric": "score,none", "value": sum(passed) / len(passed)}
    for sample, ok in zip(record["samples"], passed, strict=True):
        sample["doc"] = {"max_length": 1024, "depth": 0.5}
        sample["metrics"] = {"score": float(ok), "passed": float(ok)}
        sample["filter"] = "none"
    return record


def test_ruler_accuracy_dodges_methods_at_one_ratio_and_keeps_its_legend_beside(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ruler"
    dump(root, ruler_record("full", "full", 1.0, [1] * 5), "full")
    dump(root, ruler_record("snap", "snapkv", 0.2, [1, 1, 0, 0, 0]), "snap")
    dump(root, ruler_record("stream", "streamingllm", 0.2, [1, 1, 0, 0, 0]), "stream")
    runs = load_report(root).runs
    fig = plot_accuracy_vs_kv(runs)
    renderer = draw(fig)
    assert clipped(fig) == [] and undrawn_legend_entries(fig) == []
    ax = fig.axes[-1]
    xs = {c.get_label(): c.lines[0].get_xdata()[0] for c in ax.containers}
    assert xs["snapkv"] != xs["streamingllm"]  # side by side, not on top of each other
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.bbox.x1 and abs(legend.y1 - ax.bbox.y1) <= 8  # beside, at the top
    # the table and the plot give one interval: the main table's Wilson is the RULER one's
    rows = runs.set_index("run_id")
    whisker_top = ax.containers[0].lines[1][1].get_ydata()[0]
    assert rows.at["full", "score_hi"] == 1.0 and whisker_top == pytest.approx(1.0)
    assert rows.at["snap", "score_ci"] == "Wilson"


def test_a_runs_label_is_the_same_in_every_table_and_plot(report: Any, tmp_path: Path) -> None:
    runs = report.runs
    labels = dict(zip(runs["run_id"], runs["label"], strict=True))
    # two full-cache runs that differ only in their slice say which slice each is
    assert labels == {
        "full": "full [all samples]",
        "full6": "full [limit 6]",
        "snap": "snapkv r=0.2",
        "stream": "streamingllm r=0.2",
    }
    text = summary_markdown(runs)
    assert all(f"| {label} " in text for label in labels.values())
    assert all(f"| {label} " in details_markdown(runs) for label in labels.values())
    colors = method_colors(list(runs["method"].unique()))
    memory = plot_memory(runs, colors)
    draw(memory)
    ticks = [t.get_text() for t in memory.axes[0].get_yticklabels()]
    assert ticks == list(runs["label"])
    # runs that differ in a parameter besides the ratio are told apart by it; a run alone
    # keeps the label it has beside others (stable from one report to the next)
    root = tmp_path / "params"
    for run_id, window in (("w16", 16), ("w32", 32)):
        params = {"ratio": 0.2, "window": window}
        dump(root, make_record(run_id, "snapkv", params, 0.5, 0.2, ["a", "b"]), run_id)
    dump(root, make_record("f", "full", {"ratio": 1.0}, 0.5, 1.0, ["a", "b"]), "f")
    rows = load_report(root).runs.set_index("run_id")
    assert rows.at["w16", "label"] == "snapkv r=0.2 (window=16)"
    assert rows.at["f", "label"] == "full" and rows.at["f", "method_params"] == "ratio=1"


def test_nll_plots_draw_cache_and_prompt_methods_with_intervals(tmp_path: Path) -> None:
    root = tmp_path / "results"
    runs = [
        ("full", "full", {"ratio": 1.0}, 1.0, 0.0, 1.0),
        ("snap", "snapkv", {"ratio": 0.2}, 0.2, 0.1, 1.0),
        ("stream", "streamingllm", {"ratio": 0.2}, 0.2, 0.6, 1.0),
        ("ll", "llmlingua", {"rate": 0.5}, 0.5, 0.3, 0.5),
    ]
    for run_id, method, params, kv, shift, kept in runs:
        record = passes(make_record(run_id, method, params, 0.0, kv, ["o"] * N), 0)
        record["measurements"]["prompt_ratio"] = kept
        for i, sample in enumerate(record["samples"]):
            sample["requests"][0]["reference_nll"] = 2.0 + shift + 0.02 * (i % 5)
        dump(root, record, run_id)
    group = load_report(root).runs
    colors = method_colors(list(group["method"].unique()))
    assert not NLL_PLOTS["nll_vs_kv_ratio"](group.assign(nll_increase=math.nan), colors)
    for kind, plot in NLL_PLOTS.items():
        fig = plot(group, colors)
        assert fig is not None, kind
        assert clipped(fig) == [] and undrawn_legend_entries(fig) == [], kind
        assert "gsm8k" in fig.texts[0].get_text() and "NLL" in fig.texts[0].get_text().upper()
        assert f"n = {N}" in fig.axes[0].get_title()
        bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
        assert any(c.has_yerr for c in bars), kind
    prompt = NLL_PLOTS["vs_prompt_kept"](group, colors)
    names = prompt.axes[0].get_legend_handles_labels()[1]
    assert any("llmlingua" in n for n in names) and not any("snapkv" in n for n in names)
