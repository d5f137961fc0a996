"""Tonight vs the previous night: the paired test, and alerts that fire on regressions and not on noise."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.core.trec import read_qrels, read_run
from pipeline.quality.compare import compare_nights, paired_p_value
from pipeline.quality.metrics import evaluate

MEASURES = ["nDCG@10", "AP@100", "R@100"]


@pytest.fixture(scope="module")
def bm25(shared_data):
    dl = shared_data / "trec-dl"
    return read_run(str(dl / "runs" / "BM25_dl19.txt")), read_qrels(
        str(dl / "qrels.dl19-passage.txt")
    )


def _with_scores(run: pa.Table, scores: np.ndarray) -> pa.Table:
    return run.set_column(run.schema.get_field_index("score"), "score", pa.array(scores))


def test_planted_regression_alerts(bm25):
    run, qrels = bm25
    last_night = evaluate(run, qrels, MEASURES, relevance_level=2)
    # The index lost its best matches: each query's first-stage top 3 sink to the bottom of its list.
    rank = run["rank"].to_numpy()
    sunk = _with_scores(run, np.where(rank <= 3, -1e9, run["score"].to_numpy()))
    tonight = evaluate(sunk, qrels, MEASURES, relevance_level=2)
    result = {c.measure: c for c in compare_nights(tonight, last_night, default_max_drop=0.01)}
    assert (
        result["nDCG@10"].alert
        and result["nDCG@10"].delta < -0.05
        and result["nDCG@10"].p_value < 0.01
    )
    assert result["nDCG@10"].num_paired == 43
    assert (
        not result["R@100"].alert and result["R@100"].delta == 0.0
    )  # same top 100: recall cannot move
    line = result["nDCG@10"].alert_line()
    assert line.startswith("ALERT nDCG@10 regressed") and "p=" in line and "43 queries" in line


def test_noise_stays_quiet(bm25):
    run, qrels = bm25
    last_night = evaluate(run, qrels, MEASURES, relevance_level=2)
    # Nightly jitter: scores move by a little noise, some neighbours swap, in both directions.
    rng = np.random.default_rng(3)
    score = run["score"].to_numpy()
    jittered = _with_scores(run, score + rng.normal(0.0, 0.05, len(score)))
    tonight = evaluate(jittered, qrels, MEASURES, relevance_level=2)
    changed = pc.sum(pc.not_equal(tonight["nDCG@10"], last_night["nDCG@10"])).as_py()
    assert changed >= 10  # the jitter really moved per-query values
    comparisons = compare_nights(tonight, last_night, default_max_drop=0.01)
    assert [c.measure for c in comparisons if c.alert] == []


def _per_query(values: list[float]) -> pa.Table:
    return pa.table({"query_id": [str(i) for i in range(len(values))], "nDCG@10": values})


def test_big_but_insignificant_drop_does_not_alert():
    previous = _per_query([0.5, 0.5, 0.5, 0.5])
    tonight = _per_query(
        [0.5, 0.5, 0.5, 0.1]
    )  # one query fell: mean -0.1, but 1 of 4 queries is no evidence
    (c,) = compare_nights(tonight, previous, default_max_drop=0.01)
    assert c.delta == pytest.approx(-0.1) and c.p_value > 0.05 and not c.alert


def test_significant_drop_within_threshold_does_not_alert():
    previous = _per_query([0.5] * 40)
    tonight = _per_query(
        [0.495] * 40
    )  # every query lost 0.005: significant, but within the allowed 0.01
    (c,) = compare_nights(tonight, previous, max_drop={"nDCG@10": 0.01})
    assert c.p_value < 0.01 and not c.alert
    (c,) = compare_nights(tonight, previous, max_drop={"nDCG@10": 0.001})
    assert c.alert


def test_measure_without_threshold_never_alerts():
    (c,) = compare_nights(_per_query([0.1] * 40), _per_query([0.9] * 40), default_max_drop=None)
    assert c.delta == pytest.approx(-0.8) and not c.alert and c.max_drop is None


def test_only_queries_of_both_nights_are_paired():
    previous = pa.table({"query_id": ["a", "b", "c"], "nDCG@10": [0.2, 0.4, 0.9]})
    tonight = pa.table({"query_id": ["b", "c", "d"], "nDCG@10": [0.5, 0.9, 0.0]})
    (c,) = compare_nights(tonight, previous)
    assert (
        c.num_paired == 2 and c.previous == pytest.approx(0.65) and c.tonight == pytest.approx(0.7)
    )


def test_p_value_is_the_exact_sign_flip_test_for_small_samples():
    tonight = np.array([0.61, 0.42, 0.90, 0.33, 0.75, 0.58])
    previous = np.array([0.50, 0.45, 0.70, 0.30, 0.55, 0.60])
    difference = tonight - previous
    observed = abs(difference.mean())
    flips = [
        abs((difference * np.array(signs)).mean()) for signs in itertools.product([1, -1], repeat=6)
    ]
    exact = sum(f >= observed - 1e-12 for f in flips) / len(flips)
    assert paired_p_value(tonight, previous) == pytest.approx(exact)
    assert paired_p_value(tonight, previous, seed=1) == paired_p_value(
        tonight, previous, seed=2
    )  # exact: no randomness
