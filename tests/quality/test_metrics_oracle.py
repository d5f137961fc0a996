"""Our measures against trec_eval's own expected outputs, and against published first-stage figures.

trec_eval's test suite (../shared/data/trec-eval/, usnistgov/trec_eval@f4253652 test/) holds the outputs of
these command lines (Makefile target quicktest):
    out.test      trec_eval qrels.test results.test
    out.test.a    trec_eval -m all_trec qrels.test results.test
    out.test.aq   trec_eval -m all_trec -q qrels.test results.test              (per query)
    out.test.aqc  trec_eval -m all_trec -q -c qrels.test results.trunc          (-c: missing queries count as 0)
    out.test.aql  trec_eval -m all_trec -q -l2 qrels.rel_level results.test     (graded qrels, relevant = label >= 2)
Every value of every measure we implement is compared, per query and for "all", to trec_eval's 4 decimals.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels, read_run
from pipeline.quality.metrics import evaluate, means, parse_measure

# trec_eval name -> (our name, how trec_eval's value maps to ours)
_TREC_NAMES = [
    (re.compile(r"^ndcg_cut_(\d+)$"), "nDCG@{}"),
    (re.compile(r"^ndcg$"), "nDCG"),
    (re.compile(r"^P_(\d+)$"), "P@{}"),
    (re.compile(r"^recall_(\d+)$"), "R@{}"),
    (re.compile(r"^map$"), "AP"),
    (re.compile(r"^map_cut_(\d+)$"), "AP@{}"),
    (re.compile(r"^recip_rank$"), "RR"),
    (re.compile(r"^success_(\d+)$"), "Success@{}"),
    (re.compile(r"^Rprec$"), "Rprec"),
    (
        re.compile(r"^unj_(\d+)$"),
        "Judged@{}",
    ),  # Judged@k = 1 - unj_k when at least k documents are retrieved
]


def _ours(trec_name: str) -> str | None:
    for pattern, template in _TREC_NAMES:
        match = pattern.match(trec_name)
        if match:
            return template.format(*match.groups())
    return None


def _expected(path) -> dict[str, dict[str, float]]:
    """trec_eval output `measure \\t qid \\t value` -> {our measure: {qid or "all": value}}."""
    values: dict[str, dict[str, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        name, qid, value = line.split()
        ours = _ours(name)
        if ours is not None:
            values[ours][qid] = 1.0 - float(value) if name.startswith("unj_") else float(value)
    return values


CASES = [
    # (expected output, qrels, run, relevance level, complete queries)
    ("out.test", "qrels.test", "results.test", 1, False),
    ("out.test.a", "qrels.test", "results.test", 1, False),
    ("out.test.aq", "qrels.test", "results.test", 1, False),
    ("out.test.aqc", "qrels.test", "results.trunc", 1, True),
    ("out.test.aql", "qrels.rel_level", "results.test", 2, False),
]


@pytest.mark.parametrize("expected_file, qrels_file, run_file, level, complete", CASES)
def test_equals_trec_eval_expected_output(
    shared_data, expected_file, qrels_file, run_file, level, complete
):
    folder = shared_data / "trec-eval"
    expected = _expected(folder / expected_file)
    if complete:
        # trec_eval -c reports unj = 0 ("nothing unjudged") for a query the run lacks; ours scores every
        # measure of a missing query 0, Judged included, so Judged is not comparable there.
        expected = {m: v for m, v in expected.items() if not m.startswith("Judged")}
    assert (
        len(expected) >= 8
    )  # the mapping found the measures: a renamed file cannot pass vacuously
    per_query = evaluate(
        read_run(str(folder / run_file)),
        read_qrels(str(folder / qrels_file)),
        sorted(expected),
        relevance_level=level,
        complete_queries=complete,
    )
    row = {q: i for i, q in enumerate(per_query["query_id"].to_pylist())}
    overall = means(per_query)
    compared = 0
    for measure, by_query in expected.items():
        for qid, value in by_query.items():
            ours = overall[measure] if qid == "all" else per_query[measure][row[qid]].as_py()
            # trec_eval prints 4 decimals: agreement means |ours - printed| <= half a unit of the last place.
            assert abs(ours - value) <= 5e-5 + 1e-12, (
                f"{measure} query {qid}: ours {ours:.6f}, trec_eval {value}"
            )
            compared += 1
    assert compared == sum(len(v) for v in expected.values())


def test_graded_file_really_exercises_the_relevance_level(shared_data):
    # Guard that the -l2 case is not trivially equal to -l1: the binary measures must move, nDCG must not.
    folder = shared_data / "trec-eval"
    run, qrels = read_run(str(folder / "results.test")), read_qrels(str(folder / "qrels.rel_level"))
    one = means(evaluate(run, qrels, ["AP", "P@10", "nDCG@10"], relevance_level=1))
    two = means(evaluate(run, qrels, ["AP", "P@10", "nDCG@10"], relevance_level=2))
    assert one["AP"] != two["AP"] and one["P@10"] != two["P@10"]
    assert one["nDCG@10"] == two["nDCG@10"]  # trec_eval: gains are the labels, whatever -l says


# Published nDCG@10 of the first-stage runs (Pyserini's reproductions, the figures rank_llm starts from).
PUBLISHED_NDCG10 = {
    ("BM25", "dl19"): 0.5058,
    ("BM25", "dl20"): 0.4796,
    ("BM25_RM3", "dl19"): 0.5216,
    ("BM25_RM3", "dl20"): 0.4896,
    ("D_BERT_KD_TASB", "dl19"): 0.7210,
    ("D_BERT_KD_TASB", "dl20"): 0.6854,
    ("OPEN_AI_ADA2", "dl19"): 0.7035,
    ("OPEN_AI_ADA2", "dl20"): 0.6759,
    ("SPLADE_P_P_ENSEMBLE_DISTIL", "dl19"): 0.7308,
    ("SPLADE_P_P_ENSEMBLE_DISTIL", "dl20"): 0.7197,
}


@pytest.mark.parametrize("retriever, year", sorted(PUBLISHED_NDCG10))
def test_first_stage_runs_give_published_ndcg10(shared_data, retriever, year):
    dl = shared_data / "trec-dl"
    run = read_run(str(dl / "runs" / f"{retriever}_{year}.txt"))
    qrels = read_qrels(str(dl / f"qrels.{year}-passage.txt"))
    per_query = evaluate(run, qrels, ["nDCG@10"], relevance_level=2)
    assert per_query.num_rows == {"dl19": 43, "dl20": 54}[year]  # judged queries only, as trec_eval
    assert round(means(per_query)["nDCG@10"], 4) == PUBLISHED_NDCG10[(retriever, year)]


def test_ties_are_broken_by_doc_id_descending():
    # Three documents tie; only "a" is relevant. trec_eval ranks c, b, a, so RR = 1/3 (ascending would give 1).
    run = pa.table(
        {"query_id": ["q"] * 4, "doc_id": ["b", "a", "c", "d"], "score": [1.0, 1.0, 1.0, 0.5]}
    )
    qrels = pa.table({"query_id": ["q"], "doc_id": ["a"], "label": pa.array([1], pa.int32())})
    assert evaluate(run, qrels, ["RR"])["RR"].to_pylist() == [pytest.approx(1 / 3)]


def test_run_rank_field_is_ignored_in_favour_of_scores():
    run = pa.table(
        {"query_id": ["q", "q"], "doc_id": ["rel", "other"], "score": [0.1, 0.9], "rank": [1, 2]}
    )
    qrels = pa.table({"query_id": ["q"], "doc_id": ["rel"], "label": pa.array([1], pa.int32())})
    assert evaluate(run, qrels, ["RR"])["RR"].to_pylist() == [0.5]


def test_queries_missing_from_run_or_qrels():
    run = pa.table({"query_id": ["q1", "q3"], "doc_id": ["d", "d"], "score": [1.0, 1.0]})
    qrels = pa.table(
        {"query_id": ["q1", "q2"], "doc_id": ["d", "d"], "label": pa.array([1, 1], pa.int32())}
    )
    default = evaluate(run, qrels, ["P@1"])
    assert default["query_id"].to_pylist() == ["q1"] and default["P@1"].to_pylist() == [1.0]
    complete = evaluate(run, qrels, ["P@1"], complete_queries=True)
    assert complete["query_id"].to_pylist() == ["q1", "q2"] and means(complete)["P@1"] == 0.5


def test_query_without_relevant_documents_scores_zero_not_nan():
    run = pa.table({"query_id": ["q"], "doc_id": ["d"], "score": [1.0]})
    qrels = pa.table({"query_id": ["q"], "doc_id": ["d"], "label": pa.array([0], pa.int32())})
    values = evaluate(
        run, qrels, ["nDCG@10", "AP", "R@10", "Rprec", "RR", "Judged@10"]
    ).to_pylist()[0]
    assert values == {
        "query_id": "q",
        "nDCG@10": 0.0,
        "AP": 0.0,
        "R@10": 0.0,
        "Rprec": 0.0,
        "RR": 0.0,
        "Judged@10": 1.0,
    }


def test_no_shared_query_is_a_clear_error():
    run = pa.table({"query_id": ["1"], "doc_id": ["d"], "score": [1.0]})
    qrels = pa.table({"query_id": ["q1"], "doc_id": ["d"], "label": pa.array([1], pa.int32())})
    with pytest.raises(InputError, match="same query ids"):
        evaluate(run, qrels, ["AP"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("MRR@10", "unknown measure"),
        ("P", "needs a cut-off"),
        ("Rprec@5", "takes no cut-off"),
        ("nDCG@0", "at least 1"),
    ],
)
def test_measure_names_are_checked(text, message):
    with pytest.raises(InputError, match=message):
        parse_measure(text)


def test_vectorized_measures_equal_a_per_query_loop_on_dl20(shared_data):
    # An independent, readable per-query implementation of the same definitions on a real run with ties.
    dl = shared_data / "trec-dl"
    run = read_run(str(dl / "runs" / "SPLADE_P_P_ENSEMBLE_DISTIL_dl20.txt"))
    qrels = read_qrels(str(dl / "qrels.dl20-passage.txt"))
    measures = ["nDCG@10", "AP@100", "RR@10", "R@20", "P@5", "Success@3", "Rprec", "Judged@10"]
    ours = evaluate(run, qrels, measures, relevance_level=2).to_pylist()
    judged = defaultdict(dict)
    for q, d, label in zip(*(qrels[c].to_pylist() for c in ("query_id", "doc_id", "label"))):
        judged[q][d] = label
    ranked = defaultdict(list)
    for q, d, s in zip(*(run[c].to_pylist() for c in ("query_id", "doc_id", "score"))):
        ranked[q].append((s, d))
    for row in ours:
        q = row["query_id"]
        docs = [d for s, d in sorted(ranked[q], reverse=True)]  # score desc, then doc_id desc
        labels = [judged[q].get(d) for d in docs]
        rel = [lab is not None and lab >= 2 for lab in labels]
        num_rel = sum(lab >= 2 for lab in judged[q].values())
        gains = [lab if lab and lab > 0 else 0 for lab in labels]
        ideal = sorted((g for g in judged[q].values() if g > 0), reverse=True)
        dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains[:10]))
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal[:10]))
        first = next((i + 1 for i, r in enumerate(rel) if r), None)
        ap = sum(sum(rel[: i + 1]) / (i + 1) for i in range(min(100, len(rel))) if rel[i]) / num_rel
        expected = {
            "nDCG@10": dcg / idcg,
            "AP@100": ap,
            "RR@10": 1 / first if first and first <= 10 else 0.0,
            "R@20": sum(rel[:20]) / num_rel,
            "P@5": sum(rel[:5]) / 5,
            "Success@3": float(any(rel[:3])),
            "Rprec": sum(rel[:num_rel]) / num_rel,
            "Judged@10": sum(lab is not None and lab >= 0 for lab in labels[:10])
            / min(10, len(labels)),
        }
        for measure, value in expected.items():
            assert row[measure] == pytest.approx(value, abs=1e-12), (q, measure)
