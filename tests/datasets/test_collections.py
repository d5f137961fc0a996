"""Converters on the real collections: counts from the sources' own documentation, ids as strings, qrels that
join the pairs, gold answers present among the candidates, same output on every call."""

from __future__ import annotations

import collections
import json
import re

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.trec import QRELS_SCHEMA
from pipeline.datasets import bfcl, cosqa, noveleval, spider, trec_dl, vaswani, xquad_r
from pipeline.datasets.spider import create_table_statements
from pipeline.datasets.xquad_r import LANGUAGES


def _queries(table: pa.Table) -> int:
    return len(pc.unique(table[schema.QUERY_ID]))


def _check_tables(pairs: pa.Table, qrels: pa.Table) -> None:
    """What every converter promises: string ids, unique (query_id, doc_id), qrels of the pairs' queries."""
    for name in (schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT):
        assert pairs.schema.field(name).type == pa.string(), name
        assert pairs[name].null_count == 0, name
    assert qrels.schema == QRELS_SCHEMA
    keys = pairs.group_by([schema.QUERY_ID, schema.DOC_ID]).aggregate([([], "count_all")])
    assert keys.num_rows == pairs.num_rows, "a (query_id, doc_id) pair occurs twice"
    assert set(qrels[schema.QUERY_ID].to_pylist()) <= set(pairs[schema.QUERY_ID].to_pylist())


def _relevant(qrels: pa.Table, threshold: int = 1) -> dict[str, set[str]]:
    relevant = collections.defaultdict(set)
    for qid, did, label in zip(*(qrels[c].to_pylist() for c in QRELS_SCHEMA.names)):
        if label >= threshold:
            relevant[qid].add(did)
    return relevant


def _candidates(pairs: pa.Table) -> dict[str, set[str]]:
    candidates = collections.defaultdict(set)
    for qid, did in zip(pairs[schema.QUERY_ID].to_pylist(), pairs[schema.DOC_ID].to_pylist()):
        candidates[qid].add(did)
    return candidates


def _judged_candidates(pairs: pa.Table, qrels: pa.Table) -> int:
    return pairs.join(qrels, [schema.QUERY_ID, schema.DOC_ID], join_type="inner").num_rows


@pytest.mark.parametrize("year, num_pairs, num_queries", [(2019, 4300, 43), (2020, 5400, 54)])
def test_trec_dl_has_bm25_top_100_per_query(shared_data, year, num_pairs, num_queries):
    pairs, qrels = trec_dl(year, shared_data)
    _check_tables(pairs, qrels)
    assert (pairs.num_rows, _queries(pairs), _queries(qrels)) == (
        num_pairs,
        num_queries,
        num_queries,
    )
    assert pairs.schema.field(schema.FIRST_STAGE_RANK).type == pa.int32()
    ranks = pairs[schema.FIRST_STAGE_RANK].to_numpy().reshape(num_queries, 100)
    assert (ranks == list(range(1, 101))).all()
    scores = pairs[schema.FIRST_STAGE_SCORE].to_numpy().reshape(num_queries, 100)
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "BM25 scores must not increase down a ranking"
    assert set(qrels[schema.LABEL].to_pylist()) == {0, 1, 2, 3}


def test_trec_dl_2019_judged_candidates_match_the_readme(shared_data):
    pairs, qrels = trec_dl(2019, shared_data)
    assert (
        _judged_candidates(pairs, qrels) == 2257
    )  # "Of the 4,300 DL19 candidates 2,257 are judged"
    first = pairs.slice(0, 1).to_pylist()[0]
    assert (first[schema.QUERY_ID], first[schema.QUERY], first[schema.DOC_ID]) == (
        "264014",
        "how long is life cycle of flea",
        "5611210",
    )


def test_trec_dl_rejects_an_unknown_year(shared_data):
    with pytest.raises(InputError, match="2019, 2020"):
        trec_dl(2021, shared_data)


def test_a_wrong_data_dir_says_what_to_pass(tmp_path):
    with pytest.raises(InputError, match="lacks retrieve_results_dl19.json.*--data-dir"):
        trec_dl(2019, tmp_path)


def test_noveleval_every_candidate_is_judged(shared_data):
    pairs, qrels = noveleval(shared_data)
    _check_tables(pairs, qrels)
    assert (pairs.num_rows, _queries(pairs)) == (420, 21)
    assert _judged_candidates(pairs, qrels) == 420
    assert all(
        did.startswith(qid + "-")
        for qid, did in zip(pairs[schema.QUERY_ID].to_pylist(), pairs[schema.DOC_ID].to_pylist())
    )


def test_vaswani_bm25_candidates(shared_data):
    pairs, qrels = vaswani(shared_data)
    _check_tables(pairs, qrels)
    assert (pairs.num_rows, _queries(pairs), qrels.num_rows) == (9300, 93, 2083)
    assert set(pairs[schema.DOC_ID].to_pylist()) <= {str(n) for n in range(1, 11430)}
    # A first stage worth reranking: BM25 finds a fair share of the relevant abstracts in its top 100.
    relevant, candidates = _relevant(qrels), _candidates(pairs)
    recall = sum(len(relevant[q] & candidates[q]) / len(relevant[q]) for q in relevant) / len(
        relevant
    )
    assert recall > 0.4
    assert pairs[schema.QUERY][0].as_py() == pairs[schema.QUERY][0].as_py().lower()


def test_xquad_r_gold_sentence_holds_the_answer(shared_data):
    pairs, qrels = xquad_r(shared_data, languages=["en", "de"])
    _check_tables(pairs, qrels)
    assert _queries(pairs) == 2 * 1190 and qrels.num_rows == 2 * 1190
    documents = dict(zip(pairs[schema.DOC_ID].to_pylist(), pairs[schema.DOCUMENT].to_pylist()))
    with open(shared_data / "xquad-r" / "en.json", encoding="utf-8") as f:
        answers = {
            qa["id"]: qa["answers"][0]["text"]
            for article in json.load(f)["data"]
            for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]
        }
    english = [
        (q, d)
        for q, d in zip(qrels[schema.QUERY_ID].to_pylist(), qrels[schema.DOC_ID].to_pylist())
        if q.endswith("/en")
    ]
    assert len(english) == 1190
    for qid, did in english:
        answer, sentence = answers[qid.removesuffix("/en")], documents[did]
        # An answer can run past its sentence's end where the release's splitter cut inside it ("E.I. du Pont").
        assert answer in sentence or any(
            answer.startswith(sentence[i:]) for i in range(len(sentence) - 2)
        ), qid
    assert _judged_candidates(pairs, qrels) == qrels.num_rows  # every gold sentence is a candidate
    assert set(pairs["language"].to_pylist()) == {"en", "de"}


def test_xquad_r_pools(shared_data):
    pairs, qrels = xquad_r(shared_data, languages=["th"], pool_size=60, seed=3)
    assert pairs.num_rows == 1190 * 60  # no article has 60 sentences, so every pool is filled
    assert _judged_candidates(pairs, qrels) == 1190
    again, _ = xquad_r(shared_data, languages=["th"], pool_size=60, seed=3)
    other_seed, _ = xquad_r(shared_data, languages=["th"], pool_size=60, seed=4)
    assert pairs.equals(again) and not pairs.equals(other_seed)

    cross, cross_qrels = xquad_r(
        shared_data, languages=["en"], candidate_languages=["en", "zh", "hi"]
    )
    assert set(cross["doc_language"].to_pylist()) == {"en", "zh", "hi"}
    assert cross_qrels.num_rows == 3 * 1190  # the answer sentence in each candidate language
    assert _judged_candidates(cross, cross_qrels) == 3 * 1190


def test_xquad_r_rejects_unknown_languages(shared_data):
    with pytest.raises(InputError, match="subset of"):
        xquad_r(shared_data, languages=["en", "fr"])
    assert len(LANGUAGES) == 8


def test_bfcl_gold_function_is_among_candidates(shared_data):
    pairs, qrels = bfcl(shared_data)
    _check_tables(pairs, qrels)
    assert _queries(pairs) == 200 + 1053
    assert qrels.num_rows == pairs.num_rows  # every candidate judged
    counts = collections.Counter(pairs[schema.QUERY_ID].to_pylist())
    assert 2 <= min(counts.values()) and max(counts.values()) == 37
    relevant = _relevant(qrels)
    assert len(relevant) == 1253 and all(len(v) == 1 for v in relevant.values())
    gold = pairs.join(
        qrels.filter(pc.equal(qrels[schema.LABEL], 1)),
        [schema.QUERY_ID, schema.DOC_ID],
        join_type="inner",
    )
    assert gold.num_rows == 1253
    for document, name in zip(gold[schema.DOCUMENT].to_pylist(), gold[schema.DOC_ID].to_pylist()):
        assert json.loads(document)["name"] == name
    first = pairs.filter(pc.equal(pairs[schema.QUERY_ID], "live_multiple_0-0-0"))
    assert first[schema.QUERY][0].as_py().startswith("update my latte")
    assert relevant["live_multiple_0-0-0"] == {"ChaDri.change_drink"}


def test_spider_gold_tables_appear_in_the_gold_sql(shared_data):
    pairs, qrels = spider(shared_data)
    _check_tables(pairs, qrels)
    assert _queries(pairs) == 1034 and qrels.num_rows == pairs.num_rows
    with open(shared_data / "spider" / "dev.json", encoding="utf-8") as f:
        sql = {f"dev-{i}": q["query"].lower() for i, q in enumerate(json.load(f))}
    relevant = _relevant(qrels)
    assert len(relevant) == 1034  # every question names at least one table
    for qid, tables in relevant.items():
        for doc_id in tables:
            table = doc_id.split(".", 1)[1].lower()
            assert re.search(rf"\b{re.escape(table)}\b", sql[qid]), (qid, table)
    # The INTERSECT subquery in FROM: both tables come from the nested parse.
    nested = next(
        q
        for q, text in sql.items()
        if text.startswith("select count(*) from (select t1.name from country")
    )
    assert relevant[nested] == {"world_1.country", "world_1.countrylanguage"}


def test_spider_renders_create_table(shared_data):
    with open(shared_data / "spider" / "tables.json", encoding="utf-8") as f:
        db = next(d for d in json.load(f) if d["db_id"] == "concert_singer")
    statements = create_table_statements(db)
    assert len(statements) == 4
    assert statements[3] == (
        "CREATE TABLE singer_in_concert (concert_ID NUMERIC, Singer_ID TEXT, PRIMARY KEY "
        "(concert_ID), FOREIGN KEY (Singer_ID) REFERENCES singer(Singer_ID), FOREIGN KEY "
        "(concert_ID) REFERENCES concert(concert_ID));"
    )


def test_cosqa_all_functions_and_pools(shared_data):
    pairs, qrels = cosqa(shared_data)
    _check_tables(pairs, qrels)
    assert (_queries(pairs), len(pc.unique(pairs[schema.DOC_ID]))) == (313, 552)
    assert pairs.num_rows == 313 * 552
    assert pc.sum(qrels[schema.LABEL]).as_py() == 313
    pooled, pooled_qrels = cosqa(shared_data, pool_size=20, seed=1)
    assert pooled.num_rows == 313 * 20
    assert (
        _judged_candidates(pooled, pooled_qrels) == 313
    )  # the relevant function is always in the pool
    assert pooled.equals(cosqa(shared_data, pool_size=20, seed=1)[0])
    everything, all_qrels = cosqa(shared_data, pool_size=5, answerable_only=False)
    assert (_queries(everything), all_qrels.num_rows) == (604, 604)
    with pytest.raises(InputError, match="pool_size"):
        cosqa(shared_data, pool_size=553)


@pytest.mark.parametrize("convert", [noveleval, vaswani, bfcl, spider, lambda d: trec_dl(2020, d)])
def test_converters_are_deterministic(shared_data, convert):
    first, second = convert(shared_data), convert(shared_data)
    assert first[0].equals(second[0]) and first[1].equals(second[1])
