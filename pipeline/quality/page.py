"""report.html: one self-contained page (inline CSS, plots as PNG data URIs), built section by section.

The page shows only what tonight's inputs produced, one section per family of measures:
- judged measures (qrels) of the first-stage order, `reranked/...` (the same on the reranker's order) and
  `judge/...` (label-free, the reranker as judge), each as a table of means with a 95% bootstrap interval
  and, with a previous night, the paired comparison; under each table the per-query distribution;
- the reranker's score histogram and a 2-D histogram of first-stage rank against reranker rank (judge only);
- over nights (history only): the trend of the headline measures and each query's change since last night;
- by segment (segment columns only): the headline measure per segment value, tonight and last night;
- the run's facts.
"""

from __future__ import annotations

import html
import math

from pipeline.quality.compare import Comparison
from pipeline.quality.label_free import PREFIX as JUDGE_PREFIX
from pipeline.quality.night_report import RERANKED_PREFIX, NightReport
from pipeline.quality.plots import (
    plot_agreement,
    plot_changes,
    plot_distribution,
    plot_score_histogram,
    plot_segments,
    plot_trend,
)
from pipeline.quality.statistics import (
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE,
    measured_values,
    paired_changes,
)

CAVEAT = (
    "The label-free measures use the cross-encoder as the judge. When that judge is also the production "
    "reranker, it flatters itself: agreement with it says how far the retriever is from the reranker, not how "
    "good either is for users. Read them as a drift alarm; trust the measures with human judgements (qrels) "
    "for quality."
)

# Run facts as the report names them; facts not listed here are shown with their key made readable.
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
            f"{len(measured_values(report.per_query, measure)):,}",
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
    """The whole page: its sections in reading order, each a list of HTML blocks (empty when it has nothing)."""
    # Loud, at the top and beside each table it spoils: a random reranker's "after reranking" shows as a drop.
    banner = _random_weights_banner(report)
    parts = [
        f"<h1>Index quality, night {html.escape(report.night)}</h1>",
        _lead(report),
        banner,
        *_alerts(report),
        _how_to_read(report),
        *_judged_section(report),
        *_reranked_section(report, banner),
        *_label_free_section(report, banner),
        *_not_measured(report),
        *_over_nights_section(report),
        *_segments_section(report),
        *_run_facts(report),
    ]
    body = "\n".join(parts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Index quality {html.escape(report.night)}</title>
<style>{_CSS}</style></head><body>
{body}
</body></html>
"""


def _random_weights_banner(report: NightReport) -> str:
    """The random-weights warning as a red box; empty for a trained reranker or none."""
    random_weights = (
        report.extra.get("warning") if report.extra.get("reranker_random_weights") else None
    )
    if not random_weights:
        return ""
    return f'<p class="caveat random"><strong>{html.escape(random_weights)}</strong></p>'


def _alerts(report: NightReport) -> list[str]:
    """Tonight's alert lines, or that there are none; nothing when tonight is not compared."""
    if not report.comparisons:
        return []
    alpha = report.comparisons[0].alpha
    return [
        "<h2>Alerts</h2>"
        + (
            '<ul class="alerts">'
            + "".join(f"<li>{html.escape(a)}</li>" for a in report.alerts)
            + "</ul>"
            if report.alerts
            else f'<p class="ok">No alerts: no measure dropped by more than its allowed drop with p &lt; {alpha:g}.</p>'
        )
    ]


def _how_to_read(report: NightReport) -> str:
    """The Measures heading and how to read its tables: the interval, and the comparison when there is one."""
    how = (
        f"Each value is the mean over queries; the {CONFIDENCE:.0%} interval is a percentile bootstrap of that "
        f"mean ({BOOTSTRAP_RESAMPLES:,} resamples of the queries from a fixed seed, so a rerun gives the same "
        "interval). Below each table, the per-query values behind the means."
    )
    if report.comparisons:
        how += (
            f" Previous, change and p pair each query with itself on night {report.previous_night}: both means "
            "are over the queries measured on both nights (paired), p is a two-sided paired randomization "
            f"test, a verdict is significant at p < {report.comparisons[0].alpha:g}, and an alert needs a "
            "significant drop beyond the measure's allowed drop."
        )
    return f"<h2>Measures</h2><p>{html.escape(how)}</p>"


def _judged_section(report: NightReport) -> list[str]:
    """The judged measures of the first-stage order (qrels): heading, table, per-query distribution."""
    overall = list(report.overall)
    if not overall:
        return []
    level = report.extra.get("relevance_level")
    binary = (
        f"; a label ≥ {level} counts as relevant for the binary measures"
        if level is not None
        else ""
    )
    parts = [
        f"<h3>Judged measures of the first-stage order</h3><p>Against the human judgements (qrels), "
        f"with trec_eval's conventions{html.escape(binary)}.</p>",
        _measure_table(report, overall),
    ]
    if png := plot_distribution(report.per_query, overall, report.intervals):
        parts.append(_figure("Per-query distribution of the judged measures", png))
    return parts


def _reranked_section(report: NightReport, banner: str) -> list[str]:
    """The same judged measures on the reranker's order, with the headline measure's gain in words."""
    reranked = list(report.reranked)
    if not reranked:
        return []
    means = report.all_means()
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
    parts = [
        f"<h3>After reranking</h3>{banner}<p>{html.escape(text)}</p>",
        _measure_table(report, reranked),
    ]
    if png := plot_distribution(report.per_query, reranked, report.intervals):
        parts.append(_figure("Per-query distribution after reranking", png))
    return parts


def _label_free_section(report: NightReport, banner: str) -> list[str]:
    """The reranker as judge: the caveat, what each measure means, the table and the judge's own plots."""
    label_free = list(report.label_free)
    if not label_free:
        return []
    parts = [
        f"<h3>Reranker as judge (no labels)</h3>{banner}",
        f'<p class="caveat">{html.escape(CAVEAT)}</p>',
        _judge_definitions(label_free),
        _measure_table(report, label_free),
    ]
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
    return parts


def _not_measured(report: NightReport) -> list[str]:
    """Which family of measures tonight lacks, and the option that adds it."""
    missing = []
    if not report.overall:
        missing.append("judged measures (pass --qrels with human judgements)")
    if not report.label_free:
        missing.append(
            "label-free measures with the reranker as judge (pass --model, or set "
            "input.judge_score_column to the run's reranker score column)"
        )
    if not missing:
        return []
    return [f'<p class="note">Not measured tonight: {html.escape("; ".join(missing))}.</p>']


def _over_nights_section(report: NightReport) -> list[str]:
    """The trend of the headline measures over the history, and each query's change since last night."""
    over_nights = []
    if report.history is not None and (png := plot_trend(report.history, report.trend_measures)):
        over_nights.append(_figure("Measures over nights", png))
    headline = report.segment_measure
    if report.comparisons and headline and report.previous_per_query is not None:
        changes = paired_changes(report.per_query, report.previous_per_query, headline)
        if png := plot_changes(changes, headline, report.night, report.previous_night):
            over_nights.append(_figure(f"Per-query change since last night ({headline})", png))
    if not over_nights:
        return []
    return ["<h2>Over nights</h2>" + "".join(over_nights)]


def _segments_section(report: NightReport) -> list[str]:
    """The headline measure per segment value (tonight beside last night), then every measure's table."""
    if not report.segments:
        return []
    compared = bool(report.comparisons)
    headline = report.segment_measure
    parts = ["<h2>By segment</h2>"]
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
    return parts


def _run_facts(report: NightReport) -> list[str]:
    """The run's facts that have a value, labelled for a reader."""
    facts = [f for k, v in report.extra.items() if (f := _fact(k, v))]
    if not facts:
        return []
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(text)}</td></tr>"
        for label, text in facts
    )
    return [f'<h2>Run facts</h2><table class="facts">{rows}</table>']
