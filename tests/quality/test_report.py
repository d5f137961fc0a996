"""report.html and metrics.json when a night has little to show: no history, no judge, no segments."""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.quality.report import NightReport, render_html, write_report


def _bare_report() -> NightReport:
    per_query = pa.table({"query_id": ["q1", "q2"], "nDCG@10": [0.25, 0.75]})
    return NightReport(night="2024-05-01", run="run.txt", overall={"nDCG@10": 0.5}, per_query=per_query,
                       extra={"num_queries": 2}, trend_measures=["nDCG@10"], segment_measure="nDCG@10")


def test_missing_plots_say_what_would_produce_them():
    page = render_html(_bare_report())
    assert "No history yet: pass --history" in page
    assert page.count("No reranker scores tonight") == 2  # score histogram and agreement
    assert page.count("<img") == 1  # only tonight-vs-last-night (overall bars) has data
    assert "<td>nDCG@10</td><td>0.5000</td>" in page


def test_write_report_files(tmp_path):
    paths = write_report(_bare_report(), str(tmp_path / "out"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["overall"] == {"nDCG@10": 0.5} and metrics["night"] == "2024-05-01"
    assert metrics["comparison"] == {"previous_night": None, "measures": [], "test": metrics["comparison"]["test"]}
    assert "randomization" in metrics["comparison"]["test"]
    assert sorted(p.rsplit("/", 1)[-1] for p in paths.values()) == ["metrics.json", "per_query.parquet", "report.html"]
