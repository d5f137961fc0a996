"""The report's plots: matplotlib figures drawn with the object API and returned as base64 PNG text.

Each `plot_*` returns the PNG as base64 (for a data URI, so report.html opens offline), or None when there is
nothing to draw. Figures are rendered by the Agg canvas (`Figure`, never pyplot), so no GUI backend is touched,
and anything random in a picture (the jitter of the dots) draws from a fixed seed: the same night draws the
same picture.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pipeline.quality.history import NIGHT
from pipeline.quality.statistics import CONFIDENCE, measured_values

BLUE, GREY, RED, GREEN = "#2f6fb0", "#9aa5b1", "#c0392b", "#2e8b57"


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_distribution(per_query: pa.Table, measures: list[str], intervals: dict) -> str | None:
    """Per-query values of each measure, one row per measure: every query as a dot, the quartiles as a box,
    the mean with its bootstrap interval. None when no measure has a value."""
    rows = [(m, v) for m in measures if len(v := measured_values(per_query, m))]
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
