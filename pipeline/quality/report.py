"""The night's report: metrics.json, per_query.parquet and a self-contained report.html.

report.html opens offline: its CSS is inline and its plots are PNGs embedded as base64 data URIs. Plots are
drawn with matplotlib's object API (`Figure`, rendered by the Agg canvas), so no GUI backend is touched.
The page shows only what tonight's inputs produced, one section per family of measures:
- judged measures (qrels) of the first-stage order, `reranked/...` (the same on the reranker's order) and
  `judge/...` (label-free, the reranker as judge), each as a table of means with a 95% bootstrap interval
  and, with a previous night, the paired comparison; under each table the per-query distribution;
- the reranker's score histogram and a 2-D histogram of first-stage rank against reranker rank (judge only);
- over nights (history only): the trend of the headline measures and each query's change since last night;
- by segment (segment columns only): the headline measure per segment value, tonight and last night.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pipeline.core.schema import QUERY_ID
from pipeline.core.storage import join, url_to_fs, write_json
from pipeline.quality.compare import Comparison
from pipeline.quality.history import NIGHT
from pipeline.quality.label_free import PREFIX as JUDGE_PREFIX

METRICS_JSON = "metrics.json"
PER_QUERY_PARQUET = "per_query.parquet"
REPORT_HTML = "report.html"

RERANKED_PREFIX = "reranked/"  # judged measures of the reranker's order (nightly.py names them)

# The interval of each mean: percentile bootstrap over queries. 2,000 resamples keep the 2.5% and 97.5%
# quantiles stable to ~0.001 on a few dozen queries (Efron & Tibshirani suggest 1,000-2,000 for intervals);
# a fixed seed makes a rerun of the same night print the same interval.
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2_000
BOOTSTRAP_SEED = 0
BOOTSTRAP_METHOD = (
    f"percentile bootstrap of the mean over queries, {BOOTSTRAP_RESAMPLES:,} resamples, "
    f"seed {BOOTSTRAP_SEED}"
)

CAVEAT = (
    "The label-free measures use the cross-encoder as the judge. When that judge is also the production "
    "reranker, it flatters itself: agreement with it says how far the retriever is from the reranker, not how "
    "good either is for users. Read them as a drift alarm; trust the measures with human judgements (qrels) "
    "for quality."
)


# Run facts as the report names them; facts not listed here are shown with their key made readable.
def random_weights_warning(model: str) -> str:
    """The caveat of a report whose reranker has random weights (a `dummy:` model, for trying the pipeline)."""
    return (
        f"RANDOM WEIGHTS: the reranker {model} has random weights, so every measure after reranking and every "
        "measure with the reranker as judge is noise; rerank with a trained model to measure anything"
    )


FACT_LABELS = {
    "reranker_model": "Reranker model",
    "reranker_random_weights": "Reranker weights random",
    "warning": "Warning",
    "qrels": "Judgements (qrels)",
    "history": "History",
    "num_queries": "Queries in the run",
    "num_evaluated_queries": "Queries measured",
    "num_pairs": "Query–document pairs",
    "rejected_rows": "Rows rejected",
    "pairs_without_reranker_score": "Pairs without a reranker score",
    "first_stage_order_column": "First-stage order from column",
    "relevance_level": "Relevant for binary measures",
    "complete_queries": "Judged queries missing from the run",
    "label_free_gains": "Label-free gains",
    "config_hash": "Config hash",
    "num_parts": "Parts measured (by hash of query_id)",
}


def bootstrap_interval(
    values: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of (n,) per-query values; None with fewer than 2 values.

    Every measure of a night draws the same resamples from the same seed, so intervals are reproducible.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = len(values)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    batch = max(1, 4_000_000 // n)  # bounds the index matrix at ~32 MB for any number of queries
    resampled = np.empty(resamples)
    for start in range(0, resamples, batch):
        stop = min(resamples, start + batch)
        resampled[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(low), float(high)


def _values(per_query: pa.Table, measure: str) -> np.ndarray:
    """(n,) float64 values of one measure, the queries it was measured on (nulls dropped)."""
    if measure not in per_query.column_names:
        return np.empty(0)
    return pc.drop_null(per_query[measure]).to_numpy().astype(np.float64)


@dataclass
class NightReport:
    """Everything one night produced, in the shapes the report needs."""

    night: str
    run: str
    overall: dict[str, float]  # labelled measures of the first-stage run
    per_query: pa.Table  # (query_id, <measure> ..., <segment column> ...)
    reranked: dict[str, float] = field(
        default_factory=dict
    )  # labelled measures of the reranker's order
    label_free: dict[str, float] = field(default_factory=dict)  # judge/... means
    score_summary: dict[str, float] | None = None
    segments: dict[str, dict] = field(default_factory=dict)  # segments.segment_means of tonight
    previous_segments: dict[str, dict] = field(default_factory=dict)  # ... of the previous night
    previous_night: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    history: pa.Table | None = None  # history table including tonight's row
    judge_pairs: pa.Table | None = None  # (first_stage_rank, reranker_rank, score) for the plots
    extra: dict = field(
        default_factory=dict
    )  # run facts for metrics.json (qrels, rows, rejected, config ...)
    parts: list = field(
        default_factory=list
    )  # where each part of the run was measured: bucket, pid, pairs, queries
    trend_measures: list[str] = field(default_factory=list)
    segment_measure: str | None = None
    previous_per_query: pa.Table | None = (
        None  # the previous night's (query_id, <measure> ...), for per-query change
    )

    def all_means(self) -> dict[str, float]:
        return {**self.overall, **self.reranked, **self.label_free}

    @cached_property
    def intervals(self) -> dict[str, tuple[float, float] | None]:
        """{measure: (low, high)} 95% bootstrap interval of tonight's mean; None below 2 queries."""
        return {m: bootstrap_interval(_values(self.per_query, m)) for m in self.all_means()}

    def metrics_json(self) -> dict:
        return {
            "night": self.night,
            "run": self.run,
            "overall": self.overall,
            "reranked": self.reranked,
            "label_free": {"measures": self.label_free, "score_summary": self.score_summary},
            "confidence_intervals": {
                "method": BOOTSTRAP_METHOD,
                "confidence": CONFIDENCE,
                "measures": {m: list(i) for m, i in self.intervals.items() if i is not None},
            },
            "segments": self.segments,
            "comparison": {
                "previous_night": self.previous_night,
                "test": "two-sided paired randomization (sign-flip) test over queries of the mean difference",
                "measures": [c.to_dict() for c in self.comparisons],
            },
            "alerts": self.alerts,
            **self.extra,
        }


# ---------------------------------------------------------------- plots

BLUE, GREY, RED, GREEN = "#2f6fb0", "#9aa5b1", "#c0392b", "#2e8b57"


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_distribution(per_query: pa.Table, measures: list[str], intervals: dict) -> str | None:
    """Per-query values of each measure, one row per measure: every query as a dot, the quartiles as a box,
    the mean with its bootstrap interval. None when no measure has a value."""
    rows = [(m, v) for m in measures if len(v := _values(per_query, m))]
    if not rows:
        return None
    fig = Figure(figsize=(8, 0.62 * len(rows) + 1.5), layout="constrained")
    ax = fig.subplots()
    jitter = np.random.default_rng(0)  # fixed, so the same night draws the same picture
    most = max(len(v) for _, v in rows)
    dot_alpha = float(
        np.clip(8.0 / math.sqrt(most), 0.08, 0.6)
    )  # thousands of queries stay readable
    for i, (measure, values) in enumerate(rows):
        y = len(rows) - 1 - i  # the first measure on top, as in the table
        ax.boxplot(
            values,
            positions=[y],
            orientation="horizontal",
            widths=0.62,
            whis=(0, 100),
            showfliers=False,
            patch_artist=True,
            boxprops={"facecolor": "#e8eef6", "edgecolor": "#5b6b7d"},
            medianprops={"color": "#1d3f66", "linewidth": 1.6},
            whiskerprops={"color": "#5b6b7d"},
            capprops={"color": "#5b6b7d"},
            zorder=1,
        )
        ax.scatter(
            values,
            y + jitter.uniform(-0.2, 0.2, len(values)),
            s=10,
            color=BLUE,
            alpha=dot_alpha,
            linewidths=0,
            zorder=2,
        )
        mean = float(values.mean())
        interval = intervals.get(measure)
        xerr = [[mean - interval[0]], [interval[1] - mean]] if interval else None
        ax.errorbar(
            mean, y, xerr=xerr, fmt="D", color=RED, markersize=6, capsize=5, elinewidth=2, zorder=3
        )
    ax.set_yticks(range(len(rows)), [m for m, _ in reversed(rows)])
    low = min(0.0, min(float(v.min()) for _, v in rows))
    high = max(1.0, max(float(v.max()) for _, v in rows))
    ax.set_xlim(low - 0.02 * (high - low), high + 0.02 * (high - low))
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("per-query value")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=BLUE, alpha=0.6, label="one query"),
        Patch(
            facecolor="#e8eef6",
            edgecolor="#5b6b7d",
            label="middle half of queries, line at the median",
        ),
        Line2D([], [], marker="D", color=RED, label=f"mean, {CONFIDENCE:.0%} bootstrap interval"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize="small", frameon=False)
    counts = sorted({len(v) for _, v in rows})
    ax.set_title(
        f"Per-query values ({counts[0]:,} queries)" if len(counts) == 1 else "Per-query values"
    )
    return _png(fig)


def plot_trend(history: pa.Table, measures: list[str]) -> str | None:
    """Line per measure over nights. history: (night, <measure> ...). None with fewer than two nights."""
    measures = [m for m in measures if m in history.column_names]
    if history.num_rows < 2 or not measures:
        return None
    nights = history[NIGHT].to_pylist()
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    x = np.arange(len(nights))
    for measure in measures:
        values = np.array(
            [np.nan if v is None else v for v in history[measure].to_pylist()], dtype=float
        )
        ax.plot(x, values, marker="o", label=measure)
    ax.set_xticks(
        x,
        nights,
        rotation=45 if len(nights) > 6 else 0,
        ha="right" if len(nights) > 6 else "center",
    )
    ax.set_ylabel("mean over queries")
    ax.set_title("Measures over nights")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _png(fig)


def paired_changes(tonight: pa.Table, previous: pa.Table, measure: str) -> np.ndarray:
    """(n,) tonight - previous of `measure` for the queries measured on both nights, sorted ascending."""
    if measure not in tonight.column_names or measure not in previous.column_names:
        return np.empty(0)
    both = tonight.select([QUERY_ID, measure]).join(
        previous.select([QUERY_ID, measure]),
        keys=QUERY_ID,
        join_type="inner",
        right_suffix=".previous",
    )
    both = both.filter(
        pc.and_(pc.is_valid(both[measure]), pc.is_valid(both[f"{measure}.previous"]))
    )
    now = both[measure].to_numpy().astype(np.float64)
    before = both[f"{measure}.previous"].to_numpy().astype(np.float64)
    return np.sort(now - before)


def plot_changes(changes: np.ndarray, measure: str, night: str, previous_night: str) -> str | None:
    """One bar per query: its change since the previous night, sorted; a mean drop shows where it comes from."""
    if len(changes) == 0:
        return None
    fig = Figure(figsize=(8, 3.4))
    ax = fig.subplots()
    colours = np.where(changes < 0, RED, np.where(changes > 0, GREEN, GREY))
    ax.bar(
        np.arange(len(changes)), changes, width=1.0 if len(changes) > 200 else 0.8, color=colours
    )
    ax.axhline(0.0, color="#444", linewidth=0.8)
    ax.axhline(
        float(changes.mean()),
        color=BLUE,
        linestyle="--",
        linewidth=1.2,
        label=f"mean change {changes.mean():+.4f}",
    )
    worse, better = int((changes < 0).sum()), int((changes > 0).sum())
    ax.set_title(
        f"{measure} per query, {previous_night} → {night}: {worse} worse, {better} better, "
        f"{len(changes) - worse - better} unchanged"
    )
    ax.set_xlabel(f"queries measured on both nights ({len(changes):,}), sorted by change")
    ax.set_ylabel(f"change in {measure}")
    ax.set_xticks([])
    span = max(float(np.abs(changes).max()), 0.05)  # unchanged nights still get a readable axis
    ax.set_ylim(-1.08 * span, 1.08 * span)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


def plot_segments(
    tonight: dict, previous: dict, measure: str, night: str, previous_night: str | None
) -> str | None:
    """Bars per segment value, one panel per segment column: tonight, beside the previous night when there is one.

    Inputs: segment_means output ({column: {value: {measure: mean, "num_queries": n}}}).
    """
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
        if previous_night and not np.all(np.isnan(np.asarray(before, dtype=float))):
            width = 0.4
            ax.bar(x - width / 2, before, width, label=previous_night, color=GREY)
            ax.bar(x + width / 2, now, width, label=f"{night} (tonight)", color=BLUE)
            ax.legend(loc="upper center", ncol=2, fontsize="small")
        else:
            ax.bar(x, now, 0.5, color=BLUE)
        top = np.nanmax(np.asarray([*now, *before], dtype=float))
        ax.set_ylim(
            0, 1.25 * top if np.isfinite(top) and top > 0 else 1.0
        )  # room for the legend above the bars
        ax.set_xticks(
            x, [f"{v}\n{tonight[column][v].get('num_queries', 0):,} queries" for v in values]
        )
        ax.set_ylabel(measure)
        ax.set_title(f"{measure} by {column}")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_score_histogram(scores: np.ndarray) -> str | None:
    scores = scores[np.isfinite(scores)]
    if len(scores) == 0:
        return None
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    ax.hist(scores, bins=min(60, max(10, int(math.sqrt(len(scores))))), color=BLUE)
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
    counts, _, _, image = ax.hist2d(
        first_stage_rank,
        reranker_rank,
        bins=bins,
        range=[[0.5, depth + 0.5]] * 2,
        cmap="Blues",
        cmin=1,
    )
    fig.colorbar(image, ax=ax, label="pairs")
    ax.plot([1, depth], [1, depth], color=RED, linewidth=0.8, label="same rank")
    ax.set_xlabel("first-stage rank")
    ax.set_ylabel("reranker rank")
    ax.set_title("Retriever vs reranker ranks")
    ax.legend(loc="upper left", fontsize="small")
    return _png(fig)


# ---------------------------------------------------------------- HTML


def _num(value: float) -> str:
    return f"{value:.4f}"


def _p(value: float) -> str:
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def _figure(title: str, png: str) -> str:
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}"></figure>'
    )


def _verdict(c: Comparison) -> str:
    if c.alert:
        return "ALERT"
    if c.p_value is None:
        return "not tested"
    if c.p_value < c.alpha and c.delta != 0:
        return "significant drop" if c.delta < 0 else "significant gain"
    return "not significant"


def _measure_table(report: NightReport, measures: list[str]) -> str:
    """Tonight's mean, interval and query count per measure; with a comparison, last night's side by side.

    Every column has a value in every row: a measure new tonight says so across the comparison columns.
    """
    compared = bool(report.comparisons)
    by_measure = {c.measure: c for c in report.comparisons}
    means = report.all_means()
    head = ["measure", "mean", f"{CONFIDENCE:.0%} interval", "queries"]
    if compared:
        head += ["previous", "change", "p", "paired", "verdict"]
    rows = []
    for measure in measures:
        interval = report.intervals.get(measure)
        cells = [
            html.escape(measure),
            _num(means[measure]),
            f"{_num(interval[0])}–{_num(interval[1])}" if interval else "too few queries",
            f"{len(_values(report.per_query, measure)):,}",
        ]
        c = by_measure.get(measure)
        css = ' class="alert"' if c and c.alert else ""
        cells = [f"<td>{cell}</td>" for cell in cells]
        if compared and c is not None and c.num_paired:
            cells += [
                f"<td>{_num(c.previous)}</td>",
                f"<td>{c.delta:+.4f}</td>",
                f"<td>{_p(c.p_value) if c.p_value is not None else 'under 2 queries'}</td>",
                f"<td>{c.num_paired:,}</td>",
                f'<td class="verdict">{_verdict(c)}</td>',
            ]
        elif compared:
            why = (
                "no query measured on both nights"
                if c is not None
                else f"not measured on {report.previous_night}"
            )
            cells.append(f'<td colspan="5" class="note">{html.escape(why)}</td>')
        rows.append(f"<tr{css}>{''.join(cells)}</tr>")
    verdict = ' class="verdict"'
    header = "".join(f"<th{verdict if h == 'verdict' else ''}>{html.escape(h)}</th>" for h in head)
    return (
        f'<div class="wide"><table class="measures"><tr>{header}</tr>{"".join(rows)}</table></div>'
    )


def _judge_definitions(measures: list[str]) -> str:
    """What each label-free measure of tonight means, from its name (label_free.py defines them)."""
    items = []
    for measure in measures:
        name = measure[len(JUDGE_PREFIX) :]
        kind, _, k = name.partition("@")
        if kind == "nDCG":
            text = (
                f"nDCG of the retriever's top {k} with the judge's probability of relevance as the gain; "
                "1 = the retriever's top already matches the judge's own order"
            )
        elif kind == "Overlap":
            text = f"share of the judge's top {k} that is also in the retriever's top {k}"
        elif kind.startswith("RBO"):
            text = (
                f"rank-biased overlap of the two orders to depth {k} ({kind[4:-1]}, top-weighted); "
                "1 = identical orders"
            )
        elif kind.startswith("Held"):
            text = f"share of the judge's top {kind[4:]} that the retriever's top {k} holds"
        else:
            continue
        items.append(f"<dt>{html.escape(measure)}</dt><dd>{html.escape(text)}</dd>")
    return f'<dl class="defs">{"".join(items)}</dl>' if items else ""


def _segment_tables(report: NightReport) -> str:
    """One table per segment column: a row per measure, a column per segment value."""
    parts = []
    for column, values in report.segments.items():
        names = list(values)
        measures = [m for m in next(iter(values.values()), {}) if m != "num_queries"]
        head = "".join(f"<th>{html.escape(v)}</th>" for v in names)
        count = "".join(f"<td>{values[v]['num_queries']:,}</td>" for v in names)

        def cell(value) -> str:
            return _num(value) if value is not None and not math.isnan(value) else "not measured"

        rows = "".join(
            f"<tr><td>{html.escape(m)}</td>"
            + "".join(f"<td>{cell(values[v].get(m))}</td>" for v in names)
            + "</tr>"
            for m in measures
        )
        parts.append(
            f'<h3>Means by {html.escape(column)}</h3><div class="wide"><table>'
            f"<tr><th>measure</th>{head}</tr><tr><td>queries</td>{count}</tr>{rows}</table></div>"
        )
    return "".join(parts)


def _fact(key: str, value) -> tuple[str, str] | None:
    """(label, text) of one run fact, None when it has no value to show."""
    if (
        value is None
        or isinstance(value, (dict, list))
        or (isinstance(value, float) and math.isnan(value))
    ):
        return None
    label = FACT_LABELS.get(key, key.replace("_", " ").capitalize())
    if key == "complete_queries":
        text = "count as 0 (trec_eval -c)" if value else "skipped, like trec_eval without -c"
    elif key == "relevance_level":
        text = f"label ≥ {value}"
    elif key == "rejected_rows" and value:
        text = f"{value:,} (see rejected.parquet)"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return label, text


def _lead(report: NightReport) -> str:
    """The sentence under the title: what tonight is compared with, or why it is not."""
    queries = report.extra.get("num_evaluated_queries", report.per_query.num_rows)
    measured = f"{queries:,} queries measured." if isinstance(queries, int) else ""
    if report.comparisons:
        paired = sorted({c.num_paired for c in report.comparisons})
        over = (
            f"over the {paired[0]:,} queries measured on both nights"
            if len(paired) == 1
            else "over the queries measured on both nights"
        )
        compared = f"Compared with night {html.escape(report.previous_night)}, {over}."
    elif report.previous_night:
        compared = (
            f"The history holds no per-query values for night {html.escape(report.previous_night)}, "
            "so tonight is not compared with it."
        )
    elif report.history is not None:
        compared = (
            "First night in the history: from the next night on, every measure is compared with the "
            "previous night and can raise an alert."
        )
    else:
        compared = "Not compared with other nights: pass --history to keep a history, compare nights and raise alerts."
    model = report.extra.get("reranker_model")
    reranked = f" Reranked by <code>{html.escape(model)}</code>." if model else ""
    return f'<p class="lead">Run <code>{html.escape(report.run)}</code>.{reranked} {measured} {compared}</p>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em;
line-height:1.45}
h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:0.5em 0 1em;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f3f5f8}
td:first-child,th:first-child,.verdict{text-align:left}
tr.alert td{background:#fde2e1}tr.alert td.verdict{color:#a31515;font-weight:700}
td.note{color:#666;text-align:center;font-style:italic}
.alerts li{color:#a31515;font-weight:600}.ok{color:#2e6b3f}
.caveat{background:#fff6dd;border-left:4px solid #e0a800;padding:0.6em 1em}
.caveat.random{background:#fde2e1;border-left-color:#a31515;color:#a31515}
.lead{font-size:1.05em}.note{color:#666}dl.defs{display:grid;grid-template-columns:max-content 1fr;gap:0.2em 1em}
dl.defs dt{font-family:monospace}dl.defs dd{margin:0}
figure{margin:1em 0}.wide{overflow-x:auto}figcaption{font-weight:600;margin-bottom:0.3em}img{max-width:100%}
table.facts td:last-child{text-align:left;white-space:normal}
"""


def render_html(report: NightReport) -> str:
    overall, reranked, label_free = (
        list(report.overall),
        list(report.reranked),
        list(report.label_free),
    )
    means = report.all_means()
    compared = bool(report.comparisons)
    parts = [f"<h1>Index quality, night {html.escape(report.night)}</h1>", _lead(report)]
    # Loud, at the top and beside each table it spoils: a random reranker's "after reranking" shows as a drop.
    random_weights = (
        report.extra.get("warning") if report.extra.get("reranker_random_weights") else None
    )
    banner = (
        f'<p class="caveat random"><strong>{html.escape(random_weights)}</strong></p>'
        if random_weights
        else ""
    )
    parts.append(banner)

    if compared:
        alpha = report.comparisons[0].alpha
        parts.append(
            "<h2>Alerts</h2>"
            + (
                '<ul class="alerts">'
                + "".join(f"<li>{html.escape(a)}</li>" for a in report.alerts)
                + "</ul>"
                if report.alerts
                else f'<p class="ok">No alerts: no measure dropped by more than its allowed drop with p &lt; {alpha:g}.</p>'
            )
        )

    how = (
        f"Each value is the mean over queries; the {CONFIDENCE:.0%} interval is a percentile bootstrap of that "
        f"mean ({BOOTSTRAP_RESAMPLES:,} resamples of the queries from a fixed seed, so a rerun gives the same "
        "interval). Below each table, the per-query values behind the means."
    )
    if compared:
        how += (
            f" Previous, change and p pair each query with itself on night {report.previous_night}: both means "
            "are over the queries measured on both nights (paired), p is a two-sided paired randomization "
            f"test, a verdict is significant at p < {report.comparisons[0].alpha:g}, and an alert needs a "
            "significant drop beyond the measure's allowed drop."
        )
    parts.append(f"<h2>Measures</h2><p>{html.escape(how)}</p>")

    if overall:
        level = report.extra.get("relevance_level")
        binary = (
            f"; a label ≥ {level} counts as relevant for the binary measures"
            if level is not None
            else ""
        )
        parts.append(
            f"<h3>Judged measures of the first-stage order</h3><p>Against the human judgements (qrels), "
            f"with trec_eval's conventions{html.escape(binary)}.</p>"
        )
        parts.append(_measure_table(report, overall))
        if png := plot_distribution(report.per_query, overall, report.intervals):
            parts.append(_figure("Per-query distribution of the judged measures", png))

    if reranked:
        text = (
            "The same judged measures on the reranker's order of the same candidates: what reranking "
            "would add."
        )
        headline = next((m for m in reranked if m[len(RERANKED_PREFIX) :] in report.overall), None)
        if headline:
            base = headline[len(RERANKED_PREFIX) :]
            text += (
                f" {base}: {_num(report.overall[base])} for the first stage, {_num(means[headline])} "
                f"after reranking ({means[headline] - report.overall[base]:+.4f})."
            )
        parts.append(f"<h3>After reranking</h3>{banner}<p>{html.escape(text)}</p>")
        parts.append(_measure_table(report, reranked))
        if png := plot_distribution(report.per_query, reranked, report.intervals):
            parts.append(_figure("Per-query distribution after reranking", png))

    if label_free:
        parts.append(f"<h3>Reranker as judge (no labels)</h3>{banner}")
        parts.append(f'<p class="caveat">{html.escape(CAVEAT)}</p>')
        parts.append(_judge_definitions(label_free))
        parts.append(_measure_table(report, label_free))
        if png := plot_distribution(report.per_query, label_free, report.intervals):
            parts.append(_figure("Per-query distribution of the label-free measures", png))
        if report.judge_pairs is not None and report.judge_pairs.num_rows:
            pairs = report.judge_pairs
            if png := plot_score_histogram(pairs["score"].to_numpy().astype(float)):
                parts.append(_figure("Histogram of reranker scores", png))
            if png := plot_agreement(
                pairs["first_stage_rank"].to_numpy(), pairs["reranker_rank"].to_numpy()
            ):
                parts.append(_figure("Retriever vs reranker agreement", png))

    missing = []
    if not overall:
        missing.append("judged measures (pass --qrels with human judgements)")
    if not label_free:
        missing.append(
            "label-free measures with the reranker as judge (pass --model, or set "
            "input.judge_score_column to the run's reranker score column)"
        )
    if missing:
        parts.append(
            f'<p class="note">Not measured tonight: {html.escape("; ".join(missing))}.</p>'
        )

    over_nights = []
    if report.history is not None and (png := plot_trend(report.history, report.trend_measures)):
        over_nights.append(_figure("Measures over nights", png))
    headline = report.segment_measure
    if compared and headline and report.previous_per_query is not None:
        changes = paired_changes(report.per_query, report.previous_per_query, headline)
        if png := plot_changes(changes, headline, report.night, report.previous_night):
            over_nights.append(_figure(f"Per-query change since last night ({headline})", png))
    if over_nights:
        parts.append("<h2>Over nights</h2>" + "".join(over_nights))

    if report.segments:
        parts.append("<h2>By segment</h2>")
        if headline and (
            png := plot_segments(
                report.segments,
                report.previous_segments,
                headline,
                report.night,
                report.previous_night if compared else None,
            )
        ):
            title = f"By segment ({headline})" + (", tonight vs last night" if compared else "")
            parts.append(_figure(title, png))
        parts.append(_segment_tables(report))

    facts = [f for k, v in report.extra.items() if (f := _fact(k, v))]
    if facts:
        rows = "".join(
            f"<tr><td>{html.escape(label)}</td><td>{html.escape(text)}</td></tr>"
            for label, text in facts
        )
        parts.append(f'<h2>Run facts</h2><table class="facts">{rows}</table>')

    body = "\n".join(parts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Index quality {html.escape(report.night)}</title>
<style>{_CSS}</style></head><body>
{body}
</body></html>
"""


def write_report(
    report: NightReport, output: str, storage_options: dict | None = None
) -> dict[str, str]:
    """Write metrics.json, per_query.parquet and report.html under `output`; returns their paths."""
    fs, root = url_to_fs(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    paths = {name: join(root, name) for name in (METRICS_JSON, PER_QUERY_PARQUET, REPORT_HTML)}
    pq.write_table(report.per_query, paths[PER_QUERY_PARQUET], filesystem=fs)
    with fs.open(paths[REPORT_HTML], "w", encoding="utf-8") as f:
        f.write(render_html(report))
    write_json(
        fs, paths[METRICS_JSON], report.metrics_json()
    )  # last: its presence marks a finished report
    return paths
