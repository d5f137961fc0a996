"""The evaluation suite: its configs, the published first-stage figures, a run with random weights."""

from __future__ import annotations

import json
import re

import pytest

from jobs.eval_suite import _ranking, load_suite_config, main, reference_dtype
from pipeline.core.errors import ConfigError
from pipeline.datasets import load_collection
from pipeline.quality.metrics import evaluate, means

# The release post's table: collection -> its measure.
RELEASE_MEASURES = {
    "trec_dl19": "nDCG@10",
    "trec_dl20": "nDCG@10",
    "xquad_r": "R@10",
    "bfcl": "R@3",
    "spider": "R@3",
    "cosqa": "RR@10",
}


def test_configs_describe_the_seed_table():
    config = load_suite_config()
    assert list(config.collections) == list(RELEASE_MEASURES)  # in the release post's order
    assert {
        name: entry.measures[0] for name, entry in config.collections.items()
    } == RELEASE_MEASURES


@pytest.mark.parametrize("name, published", [("trec_dl19", 0.5058), ("trec_dl20", 0.4796)])
def test_dl_configs_give_bm25_its_published_ndcg(shared_data, name, published):
    # Anserini's BM25 (default parameters) on the official qrels: the first-stage column of the table.
    entry = load_suite_config().collections[name]
    pairs, qrels = load_collection(entry.collection, shared_data, **entry.arguments)
    first_stage = means(
        evaluate(
            _ranking(pairs, pairs["first_stage_score"]),
            qrels,
            entry.measures,
            entry.relevance_level,
        )
    )
    assert round(first_stage["nDCG@10"], 4) == published


@pytest.mark.slow  # the whole suite end to end: six collections, each loaded, scored and measured
def test_suite_runs_with_random_weights(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHARED_DATA", str(shared_data))
    output = tmp_path / "results" / "suite.json"
    assert (
        main(
            [
                "--model",
                "dummy:tiny",
                "--dtype",
                "float32",
                "--max-queries",
                "2",
                "--output",
                str(output),
                "--set",
                "collections.cosqa.arguments.pool_size=40",
            ]
        )
        == 0
    )
    results = json.loads(output.read_text())
    assert results["model"]["random_weights"] is True
    assert results["order"] == list(
        RELEASE_MEASURES
    )  # the JSON's keys are sorted; this keeps the table's rows
    for name, result in results["collections"].items():
        assert result["measure"] == RELEASE_MEASURES[name]
        assert (
            0.0 <= result["value"] <= 1.0
            and result["value"] == result["measures"][result["measure"]]
        )
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


def _table_cells(table: str, column: str) -> list[str]:
    """The cells of one column of the printed table, one per collection row (columns are 2+ spaces apart)."""
    lines = table.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:] if not line.startswith("note:")]
    return [row[header.index(column)] for row in rows if len(row) == len(header)]


def _run_with_reference(
    shared_data, tmp_path, monkeypatch, dtype: str, reference: str, *settings: str
) -> dict:
    # TREC DL (100 candidates a query) and CoSQA (a pool of 40): every query has more than 10 candidates, so
    # the top-10 overlap is defined for each. int8 runs on CPU only; the reference shares the device.
    monkeypatch.setenv("SHARED_DATA", str(shared_data))
    output = tmp_path / "suite.json"
    assert (
        main(
            [
                "--model",
                "dummy:tiny",
                "--dtype",
                dtype,
                "--reference-dtype",
                reference,
                "--collections",
                "trec_dl19,cosqa",
                "--max-queries",
                "3",
                "--output",
                str(output),
                "--set",
                "scoring.device=cpu",
                "--set",
                "collections.cosqa.arguments.pool_size=40",
                *[a for s in settings for a in ("--set", s)],
            ]
        )
        == 0
    )
    return json.loads(output.read_text())


@pytest.mark.slow  # two collections scored twice, in int8 and in float32
def test_int8_is_compared_with_the_reference_dtype(shared_data, tmp_path, capsys, monkeypatch):
    # Pairs cut at 64 tokens: oneDNN's int8 Linear is slow on CPUs without VNNI, and both sides cut alike.
    results = _run_with_reference(
        shared_data, tmp_path, monkeypatch, "int8", "float32", "scoring.max_length=64"
    )
    assert results["model"]["dtype"] == "int8"
    assert results["reference_model"]["dtype"] == "float32"
    table = capsys.readouterr().out
    assert "dummy:tiny (int8)" in table.splitlines()[0]
    deltas = _table_cells(table, "Δ vs float32")
    assert len(deltas) == 2
    for row, name in enumerate(["trec_dl19", "cosqa"]):
        result = results["collections"][name]
        reference = result["reference"]
        assert reference["dtype"] == "float32"
        assert set(reference["measures"]) == set(result["measures"]) == set(reference["delta"])
        for measure, delta in reference["delta"].items():
            assert delta == result["measures"][measure] - reference["measures"][measure], (
                name,
                measure,
            )
        assert reference["value"] == reference["measures"][result["measure"]]
        assert _table_cells(table, "float32")[row] == f"{reference['value']:.4f}"
        assert deltas[row] == f"{reference['delta'][result['measure']]:+.4f}"
        paired = reference["paired"]
        assert paired["measure"] == result["measure"] and paired["num_queries"] == 3
        # Same queries on both sides: the mean of per-query differences is the difference of the means.
        assert paired["mean_delta"] == pytest.approx(
            reference["delta"][result["measure"]], abs=1e-12
        )
        assert paired["interval"][0] <= paired["mean_delta"] <= paired["interval"][1]
        assert 0.0 <= paired["p_value"] <= 1.0
        figures = reference["fidelity"]
        assert (
            figures["max_abs_logit_diff"] > 0.0
        )  # int8 and float32 logits differ: two encoders really ran
        assert -1.0 <= figures["spearman"] <= 1.0
        # int8 perturbs the logits a little: far from 1 would mean the two lists are not of the same pairs in the
        # same order (random weights measured 0.99 here).
        assert figures["spearman"] > 0.9
        assert 0.0 <= figures["top10_overlap"] <= 1.0 and figures["top10_queries"] == 3


@pytest.mark.slow  # two collections scored twice in float32
def test_the_same_dtype_as_reference_differs_by_nothing(shared_data, tmp_path, capsys, monkeypatch):
    # Same weights, same dtype, same pairs in the same order: the scores are bit-identical, so any nonzero
    # figure would mean the comparison reads the wrong scores or the wrong queries.
    results = _run_with_reference(shared_data, tmp_path, monkeypatch, "float32", "float32")
    for name, result in results["collections"].items():
        reference = result["reference"]
        assert reference["measures"] == result["measures"], name
        assert all(delta == 0.0 for delta in reference["delta"].values()), reference["delta"]
        assert reference["paired"]["mean_delta"] == 0.0 and reference["paired"]["interval"] == [
            0.0,
            0.0,
        ]
        assert reference["paired"]["p_value"] == 1.0
        assert reference["fidelity"]["max_abs_logit_diff"] == 0.0
        assert reference["fidelity"]["spearman"] == pytest.approx(1.0)
        assert reference["fidelity"]["top10_overlap"] == 1.0
    assert _table_cells(capsys.readouterr().out, "Δ vs float32") == ["+0.0000", "+0.0000"]


def test_int8_is_compared_with_auto_unless_told_otherwise():
    assert reference_dtype("int8", None) == "auto"
    assert reference_dtype("int8", "bfloat16") == "bfloat16"
    assert reference_dtype("float32", None) is None
    assert reference_dtype(None, "float32") == "float32"


@pytest.mark.parametrize(
    "overrides, collections, message",
    [
        (
            ["collections.bfcl.measures=[Recall@3]"],
            None,
            r"collections\.bfcl\.measures.*unknown measure 'Recall@3'",
        ),
        (
            ["collections.spider.arguments.tables=3"],
            None,
            r"collections\.spider.*spider has no argument tables",
        ),
        (["collections.cosqa.max_queries=0"], None, r"collections\.cosqa\.max_queries"),
        (
            ["collections.cosqa.colection=x"],
            None,
            r"unknown config key `collections\.cosqa\.colection`",
        ),
        ([], ["trec_dl19", "msmarco"], r"unknown collection\(s\) \['msmarco'\]"),
    ],
)
def test_config_errors_name_the_key(overrides, collections, message):
    with pytest.raises(ConfigError, match=message):
        load_suite_config(overrides=overrides, collections=collections)
