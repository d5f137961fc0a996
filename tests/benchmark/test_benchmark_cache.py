"""The score-cache benchmark end to end on a tiny checkpoint: every run present and accounted for, each day's
hits what the input says they must be, and every ratio the quotient of the walls it is computed from. No
measured figure is compared with a target (the machine and its load decide those)."""

from __future__ import annotations

import json

import pytest

from jobs import benchmark_cache


@pytest.mark.slow
def test_the_benchmark_reports_every_run_and_its_ratios(shared_data, tmp_path, run_entry_point):
    output = tmp_path / "cache.json"
    result = run_entry_point(benchmark_cache.main, "--model", "dummy:tiny", "--pairs", "80", "--changed", "0.25",
                             "--output", output, "--work-dir", tmp_path, "--data-dir", shared_data)
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    runs = report["runs"]
    assert set(runs) == {name for name, _, _ in benchmark_cache.RUNS}
    for name, run in runs.items():
        assert run["input_rows"] == 80 == run["scored_rows"] + run["rejected_rows"], name
        assert run["pairs_per_s_end_to_end"] == pytest.approx(80 / run["wall_s"], rel=1e-2)
    assert runs["no cache, day 1"]["pairs_scored"] == runs["cold cache, day 1"]["pairs_scored"] == 80
    assert runs["warm cache, day 1"]["pairs_scored"] == 0 and runs["warm cache, day 1"]["cache_hits"] == 80
    assert runs["warm cache, day 2"]["pairs_scored"] == 20 and runs["warm cache, day 2"]["cache_hits"] == 60
    walls = {name: run["wall_s"] for name, run in runs.items()}
    assert report["warm_speedup_day2"] == round(walls["no cache, day 2"] / walls["warm cache, day 2"], 3)
    assert report["cold_cache_cost"] == round(1 - round(walls["no cache, day 1"] / walls["cold cache, day 1"], 3), 3)
    assert "Cold cache cost" in output.with_suffix(".md").read_text()
    storage = report["cache_storage"]
    # Day 1 filled 80 entries, day 2 added its 20 rewritten pairs; compaction keeps every entry in fewer files.
    assert storage["after the runs"]["entries"] == storage["compacted"]["entries"] == 100
    assert storage["compacted"]["files"] <= storage["after the runs"]["files"]


def test_bad_arguments_are_one_line(shared_data, tmp_path, run_entry_point):
    for argv, expected in [(["--pairs", "999999"], "DL19 has"), (["--changed", "1.5"], "between 0 and 1"),
                           (["--data-dir", tmp_path], "not found")]:
        result = run_entry_point(benchmark_cache.main, "--output", tmp_path / "r.json", "--work-dir", tmp_path,
                                 *([] if "--data-dir" in argv else ["--data-dir", shared_data]), *argv)
        assert result.returncode == 2 and expected in result.stderr, (argv, result.stderr)
