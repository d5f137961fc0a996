"""The night's report: metrics.json, per_query.parquet and a self-contained report.html.

Built from one `NightReport` (`night_report.py`: the night's measures, comparisons and run facts) in three
layers, each its own module:
    statistics.py   the bootstrap interval of each mean, per-query change since the previous night
    plots.py        the figures, as base64 PNGs (matplotlib's object API, no GUI backend)
    page.py         report.html, section by section (inline CSS, the plots as data URIs: it opens offline)
`write_report` writes the three files. The names these modules define are also importable from here.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline.core.storage import join, url_to_fs, write_json
from pipeline.quality.night_report import RERANKED_PREFIX, NightReport, random_weights_warning
from pipeline.quality.page import CAVEAT, FACT_LABELS, render_html
from pipeline.quality.plots import (
    plot_agreement,
    plot_changes,
    plot_distribution,
    plot_score_histogram,
    plot_segments,
    plot_trend,
)
from pipeline.quality.statistics import (
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    bootstrap_interval,
    paired_changes,
)

__all__ = [
    "BOOTSTRAP_METHOD",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CAVEAT",
    "CONFIDENCE",
    "FACT_LABELS",
    "METRICS_JSON",
    "PER_QUERY_PARQUET",
    "REPORT_HTML",
    "RERANKED_PREFIX",
    "NightReport",
    "bootstrap_interval",
    "paired_changes",
    "plot_agreement",
    "plot_changes",
    "plot_distribution",
    "plot_score_histogram",
    "plot_segments",
    "plot_trend",
    "random_weights_warning",
    "render_html",
    "write_report",
]

METRICS_JSON = "metrics.json"
PER_QUERY_PARQUET = "per_query.parquet"
REPORT_HTML = "report.html"


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
