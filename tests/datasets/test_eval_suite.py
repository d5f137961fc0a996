"""The evaluation suite (issue 6): its configs, the published first-stage figures, a run with random weights."""

from __future__ import annotations

import json

import pytest

from jobs.eval_suite import _ranking, load_suite_config, main
from pipeline.datasets import load_collection
from pipeline.errors import ConfigError
from pipeline.quality.metrics import evaluate, means

# The seed's table: collection -> its measure (issue 6).
SEED_MEASURES = {"trec_dl19": "nDCG@10", "trec_dl20": "nDCG@10", "xquad_r": "R@10", "bfcl": "R@3",
                 "spider": "R@3", "cosqa": "RR@10"}


def test_configs_describe_the_seed_table():
    config = load_suite_config()
    assert list(config.collections) == list(SEED_MEASURES)  # in the seed's order
    assert {name: entry.measures[0] for name, entry in config.collections.items()} == SEED_MEASURES


@pytest.mark.parametrize("name, published", [("trec_dl19", 0.5058), ("trec_dl20", 0.4796)])
def test_dl_configs_give_bm25_its_published_ndcg(shared_data, name, published):
    # Anserini's BM25 (default parameters) on the official qrels: the first-stage column of the table.
    entry = load_suite_config().collections[name]
    pairs, qrels = load_collection(entry.collection, shared_data, **entry.arguments)
    first_stage = means(evaluate(_ranking(pairs, pairs["first_stage_score"]), qrels, entry.measures,
                                 entry.relevance_level))
    assert round(first_stage["nDCG@10"], 4) == published


@pytest.mark.slow  # the whole suite end to end: six collections, each loaded, scored and measured
def test_suite_runs_with_random_weights(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHARED_DATA", str(shared_data))
    output = tmp_path / "results" / "suite.json"
    assert main(["--model", "dummy:tiny", "--dtype", "float32", "--max-queries", "2", "--output", str(output),
                 "--set", "collections.cosqa.arguments.pool_size=40"]) == 0
    results = json.loads(output.read_text())
    assert results["model"]["random_weights"] is True
    assert results["order"] == list(SEED_MEASURES)  # the JSON's keys are sorted; this keeps the table's rows
    for name, result in results["collections"].items():
        assert result["measure"] == SEED_MEASURES[name]
        assert 0.0 <= result["value"] <= 1.0 and result["value"] == result["measures"][result["measure"]]
        assert result["num_queries"] == 2, name
    assert results["collections"]["cosqa"]["num_pairs"] == 2 * 40
    assert results["collections"]["trec_dl19"]["num_pairs"] == 200
    assert set(results["collections"]["trec_dl19"]["first_stage_measures"]) == {"nDCG@10", "RR@10"}
    assert "first_stage_measures" not in results["collections"]["bfcl"]  # no first stage there
    languages = results["collections"]["xquad_r"]["segments"]["language"]
    assert sum(v["num_queries"] for v in languages.values()) == 2
    table = capsys.readouterr().out
    titles = ["TREC DL 2019", "TREC DL 2020", "XQuAD-R", "BFCL", "Spider", "CoSQA"]
    assert [line.split("  ")[0].strip() for line in table.splitlines()[2:8]] == titles
    assert "random weights" in table


@pytest.mark.parametrize("overrides, collections, message", [
    (["collections.bfcl.measures=[Recall@3]"], None, r"collections\.bfcl\.measures.*unknown measure 'Recall@3'"),
    (["collections.spider.arguments.tables=3"], None, r"collections\.spider.*spider has no argument tables"),
    (["collections.cosqa.max_queries=0"], None, r"collections\.cosqa\.max_queries"),
    (["collections.cosqa.colection=x"], None, r"unknown config key `collections\.cosqa\.colection`"),
    ([], ["trec_dl19", "msmarco"], r"unknown collection\(s\) \['msmarco'\]"),
])
def test_config_errors_name_the_key(overrides, collections, message):
    with pytest.raises(ConfigError, match=message):
        load_suite_config(overrides=overrides, collections=collections)
