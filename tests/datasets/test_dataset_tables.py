"""The shared table helpers (sizing, sampling, qrels scope) and the numpy BM25 first stage."""

from __future__ import annotations

import math

import pyarrow.compute as pc
import pytest

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels
from pipeline.datasets import sample_queries, take_pairs, trec_dl
from pipeline.datasets.bm25 import BM25, analyze


@pytest.fixture(scope="module")
def dl19(shared_data):
    return trec_dl(2019, shared_data)


def test_take_pairs_cuts_and_tiles_with_unique_keys(dl19):
    pairs, _ = dl19
    assert take_pairs(pairs, 10).equals(pairs.slice(0, 10))
    tiled = take_pairs(pairs, 10_000)
    assert tiled.num_rows == 10_000 and tiled.schema == pairs.schema
    keys = pc.binary_join_element_wise(tiled[schema.QUERY_ID], tiled[schema.DOC_ID], "\t")
    assert len(pc.unique(keys)) == 10_000
    assert tiled[schema.QUERY_ID][4300].as_py() == pairs[schema.QUERY_ID][0].as_py() + "#1"
    assert tiled[schema.DOCUMENT][8600 + 5].as_py() == pairs[schema.DOCUMENT][5].as_py()
    with pytest.raises(InputError, match="at least 1"):
        take_pairs(pairs, 0)


def test_sample_queries_keeps_whole_queries_and_their_qrels(dl19):
    pairs, qrels = dl19
    sampled, sampled_qrels = sample_queries(pairs, qrels, 5, seed=7)
    assert len(pc.unique(sampled[schema.QUERY_ID])) == 5 and sampled.num_rows == 500
    assert set(sampled_qrels[schema.QUERY_ID].to_pylist()) == set(
        sampled[schema.QUERY_ID].to_pylist()
    )
    again, _ = sample_queries(pairs, qrels, 5, seed=7)
    other, _ = sample_queries(pairs, qrels, 5, seed=8)
    assert sampled.equals(again) and not sampled.equals(other)
    assert sample_queries(pairs, qrels, None)[0] is pairs


def test_dl19_qrels_are_the_whole_official_file(shared_data, dl19):
    _, qrels = dl19
    assert (
        qrels.num_rows == 9260
    )  # every judgement, not only the candidates': nDCG's ideal ranking needs them
    assert read_qrels(str(shared_data / "trec-dl" / "qrels.dl19-passage.txt")).equals(qrels)


def test_bm25_matches_lucene_formula_by_hand():
    docs = ["the cat sat on the mat", "a dog and a cat", "dogs chase cats all day long in the park"]
    index = BM25(docs, k1=0.9, b=0.4)
    assert analyze(docs[0]) == ["cat", "sat", "mat"]  # "the", "on" are Lucene stop words
    # "cat": df = 2 of N = 3; lengths after analysis 3, 2, 7 -> avgdl 4.
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    expected = [idf * 1 * 1.9 / (1 + 0.9 * (0.6 + 0.4 * dl / 4)) for dl in (3, 2)]
    scores = index.scores("Cat!")
    assert scores[0] == pytest.approx(expected[0], rel=1e-12) and scores[1] == pytest.approx(
        expected[1], rel=1e-12
    )
    assert scores[2] == 0.0  # "cats" is not "cat": no stemming
    hits, hit_scores = index.search("cat", k=10)
    assert hits.tolist() == [1, 0] and hit_scores.tolist() == sorted(
        hit_scores.tolist(), reverse=True
    )


def test_bm25_breaks_ties_by_document_order():
    index = BM25(["alpha beta", "gamma", "alpha beta", "alpha beta"])
    hits, _ = index.search("alpha", k=2)
    assert hits.tolist() == [0, 2]
    assert index.search("unknown words", k=5)[0].size == 0
