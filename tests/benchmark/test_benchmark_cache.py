"""The score-cache benchmark on a tiny checkpoint: every run present and accounted for, each day's hits what the
input says they must be, and every ratio the quotient of the walls it is computed from. No measured figure is
compared with a target (the machine and its load decide those). The five jobs run in this process, on the
session's Ray (a process and a Ray start each would add minutes); the command runs each as its own process."""

from __future__ import annotations

import json
import time

import pytest

from jobs import benchmark_cache
from pipeline.core.config import load_config
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank


def _in_process(model, input_path, output, cache, overrides, timeout) -> dict:
    """run_job's report, from the same job run in this process."""
    config = load_config(
        RerankConfig, None, overrides + ([f"cache.uri={cache}"] if cache else []), model=model
    )
    start = time.monotonic()
    summary = run_rerank(config, input_path, str(output))
    return benchmark_cache.run_report(summary, time.monotonic() - start)


@pytest.mark.slow
def test_the_benchmark_reports_every_run_and_its_ratios(ray_local, shared_data, tmp_path):
    from pipeline.benchmark.report import write_report

    report = benchmark_cache.run_benchmark(
        "dummy:tiny", 80, 0.25, shared_data, tmp_path, [], 600, runner=_in_process
    )
    output = tmp_path / "cache.json"
    write_report(str(output), report, benchmark_cache.markdown(report), "test")
    report = json.loads(output.read_text())
    runs = report["runs"]
    assert set(runs) == {name for name, _, _ in benchmark_cache.RUNS}
    for name, run in runs.items():
        assert run["input_rows"] == 80 == run["scored_rows"] + run["rejected_rows"], name
        assert run["pairs_per_s_end_to_end"] == pytest.approx(80 / run["wall_s"], rel=1e-2)
    assert (
        runs["no cache, day 1"]["pairs_scored"] == runs["cold cache, day 1"]["pairs_scored"] == 80
    )
    assert (
        runs["warm cache, day 1"]["pairs_scored"] == 0
        and runs["warm cache, day 1"]["cache_hits"] == 80
    )
    assert (
        runs["warm cache, day 2"]["pairs_scored"] == 20
        and runs["warm cache, day 2"]["cache_hits"] == 60
    )
    walls = {name: run["wall_s"] for name, run in runs.items()}
    assert report["warm_speedup_day2"] == round(
        walls["no cache, day 2"] / walls["warm cache, day 2"], 3
    )
    assert report["cold_cache_cost"] == round(
        1 - round(walls["no cache, day 1"] / walls["cold cache, day 1"], 3), 3
    )
    assert "Cold cache cost" in output.with_suffix(".md").read_text()
    storage = report["cache_storage"]
    # Day 1 filled 80 entries, day 2 added its 20 rewritten pairs; compaction keeps every entry in fewer files.
    assert storage["after the runs"]["entries"] == storage["compacted"]["entries"] == 100
    assert storage["compacted"]["files"] <= storage["after the runs"]["files"]


@pytest.mark.slow
def test_one_run_is_the_job_as_a_user_runs_it(shared_data, tmp_path):
    """run_job itself (a process of its own) on a tiny input: its report holds the job's own accounting."""
    inputs = benchmark_cache.make_inputs(shared_data, 12, 0.5, tmp_path)
    run = benchmark_cache.run_job(
        "dummy:tiny", inputs["day1"], tmp_path / "out", None, ["input.rows_per_shard=6"], 600
    )
    assert (
        run["input_rows"] == 12 == run["scored_rows"]
        and run["pairs_scored"] == 12
        and run["cache_hits"] is None
    )
    assert run["wall_s"] > 0


def test_bad_arguments_are_one_line(shared_data, tmp_path, run_entry_point):
    for argv, expected in [
        (["--pairs", "999999"], "DL19 has"),
        (["--changed", "1.5"], "between 0 and 1"),
        (["--data-dir", tmp_path], "not found"),
    ]:
        result = run_entry_point(
            benchmark_cache.main,
            "--output",
            tmp_path / "r.json",
            "--work-dir",
            tmp_path,
            *([] if "--data-dir" in argv else ["--data-dir", shared_data]),
            *argv,
        )
        assert result.returncode == 2 and expected in result.stderr, (argv, result.stderr)


def test_a_work_dir_that_does_not_exist_yet_is_created(shared_data, tmp_path, run_entry_point):
    work = tmp_path / "not" / "yet"
    result = run_entry_point(
        benchmark_cache.main,
        "--output",
        tmp_path / "r.json",
        "--work-dir",
        work,
        "--data-dir",
        shared_data,
        "--pairs",
        "999999",
    )
    assert result.returncode == 2 and "DL19 has" in result.stderr, (
        result.stderr
    )  # got as far as the input
    assert work.is_dir() and not list(work.iterdir())  # its temporary folder inside was removed
