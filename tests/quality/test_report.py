"""report.html and metrics.json: what a night shows depends on what it measured (first night, history, judge)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest

from pipeline.quality.compare import compare_nights
from pipeline.quality.metrics import means
from pipeline.quality.report import (
    CAVEAT,
    NightReport,
    bootstrap_interval,
    random_weights_warning,
    render_html,
    write_report,
)

NUM_QUERIES = 40


def _per_query(seed: int, measures: list[str], shift: float = 0.0) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns = {"query_id": [f"q{i:02d}" for i in range(NUM_QUERIES)]}
    for measure in measures:
        columns[measure] = np.clip(rng.beta(2, 2, NUM_QUERIES) + shift, 0.0, 1.0)
    return pa.table(columns)


JUDGED = ["nDCG@10", "RR@10"]
RERANKED = ["reranked/nDCG@10", "reranked/RR@10"]
LABEL_FREE = ["judge/nDCG@10", "judge/Overlap@10", "judge/RBO(p=0.9)@100", "judge/Held10@50"]


def _night(
    measures: list[str], previous: pa.Table | None = None, shift: float = 0.0, **extra
) -> NightReport:
    """A night over `measures`; with `previous`, compared with it like nightly.py does."""
    per_query = _per_query(1, measures, shift)
    values = means(per_query)
    comparisons = (
        compare_nights(per_query, previous, default_max_drop=0.01) if previous is not None else []
    )
    return NightReport(
        night="2024-05-02",
        run="run.parquet",
        per_query=per_query,
        overall={m: values[m] for m in measures if "/" not in m},
        reranked={m: values[m] for m in measures if m.startswith("reranked/")},
        label_free={m: values[m] for m in measures if m.startswith("judge/")},
        previous_night="2024-05-01" if previous is not None else None,
        comparisons=comparisons,
        alerts=[c.alert_line() for c in comparisons if c.alert],
        previous_per_query=previous,
        extra={
            "num_queries": NUM_QUERIES,
            "num_evaluated_queries": NUM_QUERIES,
            "qrels": "qrels.txt",
            "history": None,
            "pairs_without_reranker_score": None,
            "complete_queries": False,
            "relevance_level": 2,
            "config": {"night": "2024-05-02"},
            **extra,
        },
        trend_measures=measures[:2],
        segment_measure=measures[0],
    )


class _Tables(HTMLParser):
    """Every table of a page as rows of (text, colspan) cells."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", int(dict(attrs).get("colspan", 1))]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append((self._cell[0].strip(), self._cell[1]))
            self._cell = None


def _tables(page: str) -> list[list[list[tuple[str, int]]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]*"', "", page)))


def test_first_night_shows_measures_with_intervals_and_their_distribution():
    page = render_html(_night(JUDGED))
    text = _text(page)
    measures = _tables(page)[0]
    assert [cell for cell, _ in measures[0]] == ["measure", "mean", "95% interval", "queries"]
    low, high = bootstrap_interval(_per_query(1, JUDGED)["nDCG@10"].to_numpy())
    mean = means(_per_query(1, JUDGED))["nDCG@10"]
    assert [cell for cell, _ in measures[1]] == [
        "nDCG@10",
        f"{mean:.4f}",
        f"{low:.4f}–{high:.4f}",
        "40",
    ]
    assert 'alt="Per-query distribution of the judged measures"' in page and page.count("<img") == 1
    # Nothing about a previous night, a reranker or label-free measures that the page does not have.
    assert not re.search(r"\bnone\b", text, re.I) and "previous" not in text.lower()
    assert "reranked/" not in text and "judge/" not in text and CAVEAT[:40] not in text
    assert "Not compared with other nights: pass --history" in text
    assert (
        "Not measured tonight: label-free measures with the reranker as judge (pass --model" in text
    )


def test_every_column_of_every_table_has_text():
    """The user's empty 7th column: each column of each table has a header and a value in every row."""
    previous = _per_query(2, JUDGED + RERANKED + LABEL_FREE)
    for night in (
        _night(JUDGED),
        _night(JUDGED + RERANKED + LABEL_FREE, previous),
        _night(LABEL_FREE + ["judge/new@5"], _per_query(2, LABEL_FREE)),
    ):
        for table in _tables(render_html(night)):
            widths = {sum(span for _, span in row) for row in table}
            assert len(widths) == 1, table  # no row is shorter or longer than the header
            assert all(text for row in table for text, _ in row), table


def test_text_describes_only_the_families_in_the_tables():
    judged_and_reranked = _text(render_html(_night(JUDGED + RERANKED)))
    assert "After reranking" in judged_and_reranked and "reranked/nDCG@10" in judged_and_reranked
    assert "judge/" not in judged_and_reranked and CAVEAT[:40] not in judged_and_reranked
    label_free = render_html(_night(LABEL_FREE))
    text = _text(label_free)
    assert CAVEAT[:40] in text and "reranked/" not in text and "Judged measures of" not in text
    # Each label-free measure of the table is defined, and only those.
    assert re.findall(r"<dt>(.*?)</dt>", label_free) == [m.replace("<", "&lt;") for m in LABEL_FREE]
    assert "Not measured tonight: judged measures (pass --qrels" in text


def test_a_later_night_compares_with_the_previous_one():
    previous = _per_query(1, JUDGED)
    night = _night(JUDGED, previous=previous, shift=-0.2)  # every query 0.2 worse (or at 0)
    page = render_html(night)
    text = _text(page)
    header, first = _tables(page)[0][:2]
    assert [cell for cell, _ in header] == [
        "measure",
        "mean",
        "95% interval",
        "queries",
        "previous",
        "change",
        "p",
        "paired",
        "verdict",
    ]
    comparison = night.comparisons[0]
    assert [cell for cell, _ in first][4:] == [
        f"{comparison.previous:.4f}",
        f"{comparison.delta:+.4f}",
        f"{comparison.p_value:.4f}",
        "40",
        "ALERT",
    ]
    assert comparison.p_value < 0.001
    assert comparison.delta < -0.15 and "ALERT nDCG@10 regressed" in text
    assert "Compared with night 2024-05-01, over the 40 queries measured on both nights." in text
    assert 'alt="Per-query change since last night (nDCG@10)"' in page
    # A measure the previous night did not have says so across the comparison columns.
    added = render_html(_night(JUDGED + ["P@10"], previous=previous))
    assert ("not measured on 2024-05-01", 5) in _tables(added)[0][3]


def test_run_facts_have_labels_and_leave_out_facts_without_a_value():
    facts = {text for text, _ in sum(_tables(render_html(_night(JUDGED)))[-1], [])}
    assert {
        "Queries in the run",
        "Judgements (qrels)",
        "label ≥ 2",
        "skipped, like trec_eval without -c",
    } <= facts
    assert not any("_" in fact and fact != "skipped, like trec_eval without -c" for fact in facts)
    assert (
        "History" not in facts
        and "Pairs without a reranker score" not in facts
        and "–" not in facts
    )


def test_bootstrap_interval_is_reproducible_and_matches_the_normal_approximation():
    values = np.random.default_rng(7).beta(2, 5, 400)
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values)  # fixed seed: a rerun prints the same interval
    assert low < values.mean() < high
    # With 400 queries the mean is close to normal: mean ± 1.96 standard errors, to a few percent.
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert bootstrap_interval(np.full(30, 0.5)) == (0.5, 0.5)
    assert bootstrap_interval(np.array([0.3])) is None


def test_write_report_files(tmp_path):
    night = _night(JUDGED)
    paths = write_report(night, str(tmp_path / "out"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["overall"] == night.overall and metrics["night"] == "2024-05-02"
    assert metrics["comparison"] == {
        "previous_night": None,
        "measures": [],
        "test": metrics["comparison"]["test"],
    }
    assert "randomization" in metrics["comparison"]["test"]
    intervals = metrics["confidence_intervals"]
    assert intervals["confidence"] == 0.95 and "bootstrap" in intervals["method"]
    assert intervals["measures"]["nDCG@10"] == list(night.intervals["nDCG@10"])
    assert sorted(p.rsplit("/", 1)[-1] for p in paths.values()) == [
        "metrics.json",
        "per_query.parquet",
        "report.html",
    ]


def test_a_random_weights_reranker_is_named_and_said_loudly(tmp_path):
    warning = random_weights_warning("dummy:tiny")
    random = _night(
        JUDGED + RERANKED + LABEL_FREE,
        reranker_model="dummy:tiny",
        reranker_random_weights=True,
        warning=warning,
    )
    page = render_html(random)
    assert "Reranked by <code>dummy:tiny</code>" in page
    # At the top, and beside both families of measures a random reranker spoils.
    assert page.count(f'<p class="caveat random"><strong>{warning}</strong></p>') == 3
    metrics = random.metrics_json()
    assert (metrics["reranker_model"], metrics["reranker_random_weights"]) == ("dummy:tiny", True)
    assert metrics["warning"].startswith(
        "RANDOM WEIGHTS: the reranker dummy:tiny has random weights"
    )
    trained = render_html(
        _night(
            JUDGED + RERANKED,
            reranker_model="org/trained",
            reranker_random_weights=False,
            warning=None,
        )
    )
    assert "Reranked by <code>org/trained</code>" in trained and "RANDOM WEIGHTS" not in trained
