"""How later rounds (`--rounds`) merge into the first round's rows, with the worker processes replaced by a
function that returns chosen times: the merge is arithmetic on the workers' JSON, and this pins it down where a
real worker's time would decide which branch runs. The end-to-end run with real workers is in
test_benchmark_job.py."""

from __future__ import annotations

import pytest

from pipeline.benchmark import runner
from pipeline.benchmark.config import BenchmarkConfig


def _row(contender: str, seconds: float, batch_size: int | None = None) -> dict:
    n, tokens, flops = 10, 1000, 5e9
    return {
        "model": "m",
        "contender": contender,
        "workload": "dl19",
        "n_pairs": n,
        "seconds": seconds,
        "seconds_rounds": [seconds],
        "pairs_per_s": n / seconds,
        "real_tokens_per_s": tokens / seconds,
        "model_flops": flops,
        "model_flops_per_s": flops / seconds,
        "cpu_share": 0.5,
        "peak_rss_mb": 100.0,
        "settings": {"batch_size": batch_size},
    }


@pytest.fixture
def sweep(monkeypatch):
    """Round 2 over five contenders; returns (runs, errors, the specs each worker got)."""
    runs = [
        _row("hf-fp32", 2.0, 32),
        _row("engine", 2.0),
        _row("st-best", 2.0, 8),
        _row("ov-int8", 2.0, 16),
        {
            "model": "m",
            "contender": "ort-int8",
            "workload": "dl19",
            "n_pairs": 10,
            "skipped": "no onnxruntime",
        },
    ]
    order = ["hf-fp32", "engine", "st-best", "ov-int8", "ort-int8"]
    first = {
        name: {"contender": name, "workloads": [{"name": "dl19", "n_pairs": 10}]} for name in order
    }
    second = {
        "hf-fp32": {"results": [{"workload": "dl19", "seconds": 3.0, "cpu_share": 0.9}]},  # slower
        "engine": {
            "results": [
                {"workload": "dl19", "seconds": 1.0, "cpu_share": 0.97, "peak_rss_mb": 90.0}
            ]
        },
        "st-best": {"error": "worker exited with -9"},  # a core contender
        "ov-int8": {"error": "worker exited with 1: openvino crashed"},  # optional
    }
    specs = {}

    def run_worker(spec, timeout_s):
        specs[spec["contender"]] = spec
        return second[spec["contender"]]

    monkeypatch.setattr(runner, "run_worker", run_worker)
    errors: list[dict] = []
    runner._time_again(2, BenchmarkConfig(rounds=2), "m", order, first, runs, errors)
    return {r["contender"]: r for r in runs}, errors, specs


def test_a_faster_round_replaces_the_figures_derived_from_its_time(sweep):
    rows, _, _ = sweep
    engine = rows["engine"]
    assert engine["seconds_rounds"] == [2.0, 1.0] and engine["seconds"] == 1.0
    assert engine["pairs_per_s"] == pytest.approx(10.0) and engine[
        "real_tokens_per_s"
    ] == pytest.approx(1000.0)
    assert engine["model_flops_per_s"] == pytest.approx(5e9)
    assert (
        engine["cpu_share"] == 0.97 and engine["peak_rss_mb"] == 90.0
    )  # the row describes the round it shows
    slower = rows["hf-fp32"]
    assert slower["seconds_rounds"] == [2.0, 3.0] and slower["seconds"] == 2.0
    assert slower["pairs_per_s"] == pytest.approx(5.0) and slower["cpu_share"] == 0.5


def test_later_rounds_keep_the_first_rounds_batch_size_and_skip_skipped_rows(sweep):
    _, _, specs = sweep
    assert specs["st-best"]["workloads"] == [{"name": "dl19", "n_pairs": 10, "batch_size": 8}]
    assert specs["hf-fp32"]["workloads"][0]["batch_size"] == 32
    assert "ort-int8" not in specs  # skipped in the first round: not run again


def test_a_failed_round_is_an_error_only_for_core_contenders(sweep):
    rows, errors, _ = sweep
    assert [e["contender"] for e in errors] == ["st-best"] and errors[0]["message"].startswith(
        "round 2:"
    )
    for name in (
        "st-best",
        "ov-int8",
    ):  # the first round's figures stand, and the row says a round failed
        assert rows[name]["rounds_failed"] == [2] and rows[name]["seconds_rounds"] == [2.0]
        assert rows[name]["pairs_per_s"] == pytest.approx(5.0)
