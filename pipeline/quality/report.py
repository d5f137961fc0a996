"""The night's report: metrics.json, per_query.parquet and a self-contained report.html.

report.html opens offline: its CSS is inline and its plots are PNGs embedded as base64 data URIs. Plots are
drawn with matplotlib's object API (`Figure`, rendered by the Agg canvas), so no GUI backend is touched:
- the trend of the headline measures over the nights in the history (tonight included);
- tonight vs last night per segment (or overall when there are no segments);
- the histogram of the reranker's (judge's) scores;
- retriever-vs-reranker agreement: a 2-D histogram of each pair's first-stage rank against its reranker rank.
A plot without data (no history, no judge) is replaced by a sentence saying what would produce it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from pipeline.quality.compare import Comparison
from pipeline.quality.history import NIGHT
from pipeline.storage import join, url_to_fs, write_json

METRICS_JSON = "metrics.json"
PER_QUERY_PARQUET = "per_query.parquet"
REPORT_HTML = "report.html"

CAVEAT = (
    "The label-free measures use the cross-encoder as the judge. When that judge is also the production "
    "reranker, it flatters itself: agreement with it says how far the retriever is from the reranker, not how "
    "good either is for users, and \"what reranking would add\" is measured by the reranker's own opinion. "
    "Read them as a drift alarm; trust the measures with human judgements (qrels) for quality."
)


@dataclass
class NightReport:
    """Everything one night produced, in the shapes the report needs."""

    night: str
    run: str
    overall: dict[str, float]                   # labelled measures of the first-stage run
    per_query: pa.Table                         # (query_id, <measure> ..., <segment column> ...)
    reranked: dict[str, float] = field(default_factory=dict)    # labelled measures of the reranker's order
    label_free: dict[str, float] = field(default_factory=dict)  # judge/... means
    score_summary: dict[str, float] | None = None
    segments: dict[str, dict] = field(default_factory=dict)          # segments.segment_means of tonight
    previous_segments: dict[str, dict] = field(default_factory=dict)  # ... of the previous night
    previous_night: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    history: pa.Table | None = None             # history table including tonight's row
    judge_pairs: pa.Table | None = None         # (first_stage_rank, reranker_rank, score) for the plots
    extra: dict = field(default_factory=dict)   # run facts for metrics.json (qrels, rows, rejected, config ...)
    trend_measures: list[str] = field(default_factory=list)
    segment_measure: str | None = None

    def all_means(self) -> dict[str, float]:
        return {**self.overall, **self.reranked, **self.label_free}

    def metrics_json(self) -> dict:
        return {
            "night": self.night,
            "run": self.run,
            "overall": self.overall,
            "reranked": self.reranked,
            "label_free": {"measures": self.label_free, "score_summary": self.score_summary},
            "segments": self.segments,
            "comparison": {
                "previous_night": self.previous_night,
                "test": "two-sided paired randomization (sign-flip) test over queries of the mean difference",
                "measures": [c.to_dict() for c in self.comparisons],
            },
            "alerts": self.alerts,
            **self.extra,
        }


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_trend(history: pa.Table, measures: list[str]) -> str | None:
    """Line per measure over nights. history: (night, <measure> ...). None when nothing to draw."""
    measures = [m for m in measures if m in history.column_names]
    if history.num_rows == 0 or not measures:
        return None
    nights = history[NIGHT].to_pylist()
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    x = np.arange(len(nights))
    for measure in measures:
        values = np.array([np.nan if v is None else v for v in history[measure].to_pylist()], dtype=float)
        ax.plot(x, values, marker="o", label=measure)
    ax.set_xticks(x, nights, rotation=45 if len(nights) > 6 else 0, ha="right" if len(nights) > 6 else "center")
    ax.set_ylabel("mean over queries")
    ax.set_title("Measures over nights")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _png(fig)


def plot_segments(tonight: dict, previous: dict, measure: str, night: str, previous_night: str | None) -> str | None:
    """Grouped bars per segment value, one panel per segment column. Inputs: segment_means output."""
    columns = [c for c in tonight if tonight[c]]
    if not columns:
        return None
    fig = Figure(figsize=(8, 3.2 * len(columns)))
    axes = np.atleast_1d(fig.subplots(len(columns), 1, squeeze=False)[:, 0])
    for ax, column in zip(axes, columns):
        values = sorted(tonight[column])
        x = np.arange(len(values))
        now = [tonight[column][v].get(measure, np.nan) for v in values]
        before = [previous.get(column, {}).get(v, {}).get(measure, np.nan) for v in values]
        width = 0.4
        ax.bar(x - width / 2, before, width, label=f"previous ({previous_night or 'none'})", color="#9aa5b1")
        ax.bar(x + width / 2, now, width, label=f"tonight ({night})", color="#2f6fb0")
        ax.set_xticks(x, values)
        ax.set_ylabel(measure)
        ax.set_title(f"{measure} by {column}")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_score_histogram(scores: np.ndarray) -> str | None:
    scores = scores[np.isfinite(scores)]
    if len(scores) == 0:
        return None
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    ax.hist(scores, bins=min(60, max(10, int(math.sqrt(len(scores))))), color="#2f6fb0")
    ax.set_xlabel("reranker score")
    ax.set_ylabel("pairs")
    ax.set_title(f"Reranker scores ({len(scores):,} pairs)")
    return _png(fig)


def plot_agreement(first_stage_rank: np.ndarray, reranker_rank: np.ndarray) -> str | None:
    """2-D histogram of (first-stage rank, reranker rank); mass on the diagonal = agreement."""
    if len(first_stage_rank) == 0:
        return None
    depth = int(max(first_stage_rank.max(), reranker_rank.max()))
    bins = min(depth, 50)
    fig = Figure(figsize=(5.5, 4.6))
    ax = fig.subplots()
    counts, _, _, image = ax.hist2d(first_stage_rank, reranker_rank, bins=bins, range=[[0.5, depth + 0.5]] * 2,
                                    cmap="Blues", cmin=1)
    fig.colorbar(image, ax=ax, label="pairs")
    ax.plot([1, depth], [1, depth], color="#c0392b", linewidth=0.8, label="same rank")
    ax.set_xlabel("first-stage rank")
    ax.set_ylabel("reranker rank")
    ax.set_title("Retriever vs reranker ranks")
    ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def _figure(title: str, png: str | None, missing: str) -> str:
    body = (f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">' if png
            else f'<p class="missing">{html.escape(missing)}</p>')
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{body}</figure>"


def _measure_table(report: NightReport) -> str:
    by_measure = {c.measure: c for c in report.comparisons}
    rows = []
    for measure, value in report.all_means().items():
        c = by_measure.get(measure)
        css = ' class="alert"' if c and c.alert else ""
        rows.append(
            f"<tr{css}><td>{html.escape(measure)}</td><td>{_fmt(value)}</td>"
            f"<td>{_fmt(c.previous if c else None)}</td><td>{_fmt(c.delta if c else None)}</td>"
            f"<td>{_fmt(c.p_value if c else None)}</td><td>{c.num_paired if c else '–'}</td>"
            f"<td>{'ALERT' if c and c.alert else ''}</td></tr>"
        )
    return ("<table><tr><th>measure</th><th>tonight</th><th>previous (paired queries)</th><th>delta</th>"
            "<th>p</th><th>paired queries</th><th></th></tr>" + "".join(rows) + "</table>")


def _segment_table(report: NightReport) -> str:
    """One table per segment column: a row per measure, a column per segment value."""
    parts = []
    for column, values in report.segments.items():
        names = list(values)
        measures = [m for m in next(iter(values.values()), {}) if m != "num_queries"]
        head = "".join(f"<th>{html.escape(v)}</th>" for v in names)
        count = "".join(f"<td>{values[v]['num_queries']}</td>" for v in names)
        rows = "".join(
            f"<tr><td>{html.escape(m)}</td>" + "".join(f"<td>{_fmt(values[v].get(m))}</td>" for v in names) + "</tr>"
            for m in measures
        )
        parts.append(f"<h3>By {html.escape(column)}</h3><div class=\"wide\"><table><tr><th>measure</th>{head}</tr>"
                     f"<tr><td>queries</td>{count}</tr>{rows}</table></div>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.alert td{background:#fde2e1}
.alerts li{color:#a31515;font-weight:600}.caveat{background:#fff6dd;border-left:4px solid #e0a800;padding:0.6em 1em}
figure{margin:1em 0}.wide{overflow-x:auto}figcaption{font-weight:600;margin-bottom:0.3em}img{max-width:100%}.missing{color:#777}
"""


def render_html(report: NightReport) -> str:
    trend = plot_trend(report.history, report.trend_measures) if report.history is not None else None
    segment_measure = report.segment_measure
    if report.segments and segment_measure:
        segments_png = plot_segments(report.segments, report.previous_segments, segment_measure,
                                     report.night, report.previous_night)
    else:
        overall = {"all queries": {"all": report.all_means()}}
        previous = {"all queries": {"all": {c.measure: c.previous for c in report.comparisons}}}
        segments_png = plot_segments(overall, previous, segment_measure, report.night,
                                     report.previous_night) if segment_measure else None
    scores = agreement = None
    if report.judge_pairs is not None and report.judge_pairs.num_rows:
        pairs = report.judge_pairs
        scores = plot_score_histogram(pairs["score"].to_numpy().astype(float))
        agreement = plot_agreement(pairs["first_stage_rank"].to_numpy(), pairs["reranker_rank"].to_numpy())
    no_judge = ("No reranker scores tonight: pass --model to rerank the run, or set input.judge_score_column "
                "to the run's reranker score column.")
    alerts = ("<ul class=\"alerts\">" + "".join(f"<li>{html.escape(a)}</li>" for a in report.alerts) + "</ul>"
              if report.alerts else "<p>No alerts.</p>")
    facts = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>"
                    for k, v in report.extra.items() if not isinstance(v, (dict, list)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Index quality {html.escape(report.night)}</title>
<style>{_CSS}</style></head><body>
<h1>Index quality, night {html.escape(report.night)}</h1>
<p>Run: <code>{html.escape(report.run)}</code>. Previous night: {html.escape(report.previous_night or "none")}.</p>
<h2>Alerts</h2>{alerts}
<h2>Measures</h2>{_measure_table(report)}
<p>Deltas and p-values pair each query with itself on the previous night (two-sided paired randomization test).
<code>reranked/</code>: the same judged measures on the reranker's order ("what reranking would add");
<code>judge/</code>: label-free measures with the reranker as judge.</p>
{_figure("Measures over nights", trend, "No history yet: pass --history to keep one.")}
{_figure("Tonight vs last night" + (f" by segment ({segment_measure})" if report.segments else ""),
         segments_png, "No measures to compare.")}
{_segment_table(report)}
<h2>Reranker as judge</h2>
<p class="caveat">{html.escape(CAVEAT)}</p>
{_figure("Histogram of reranker scores", scores, no_judge)}
{_figure("Retriever vs reranker agreement", agreement, no_judge)}
<h2>Run facts</h2><table>{facts}</table>
</body></html>
"""


def write_report(report: NightReport, output: str, storage_options: dict | None = None) -> dict[str, str]:
    """Write metrics.json, per_query.parquet and report.html under `output`; returns their paths."""
    fs, root = url_to_fs(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    paths = {name: join(root, name) for name in (METRICS_JSON, PER_QUERY_PARQUET, REPORT_HTML)}
    pq.write_table(report.per_query, paths[PER_QUERY_PARQUET], filesystem=fs)
    with fs.open(paths[REPORT_HTML], "w", encoding="utf-8") as f:
        f.write(render_html(report))
    write_json(fs, paths[METRICS_JSON], report.metrics_json())  # last: its presence marks a finished report
    return paths
