"""The streaming-memory benchmark: its sampler sees a whole process tree, and the job end to end at two
small sizes (real rerank jobs on a fresh local Ray each, a tiny checkpoint). No measured figure is compared
with a threshold (the machine and its load decide those, and a ratio of two peaks near 1.0 flips on rounding);
what is asserted is what a broken benchmark would get wrong: a size missing, rows unaccounted for, a timeline
out of order, a ratio that is not the quotient of the figures it is reported from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import benchmark_memory
from pipeline.benchmark.process_memory import ProcessTreeMemory, tree_memory_mb, tree_pids
from pipeline.benchmark.streaming_memory import _downsample, write_repeated_pairs
from pipeline.errors import InputError
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

CHILD = "import sys, time; block = bytearray(200 * 2**20); block[::4096] = b'x' * len(block[::4096]); " \
        "print('ready', flush=True); time.sleep(30)"


def _vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def test_the_tree_sampler_counts_a_child_process():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in tree_pids(os.getpid())
        # The kernel's own figure for the child just before and after (it sleeps: they are equal unless the
        # kernel reclaimed some of its file pages in between).
        vm_rss_before = _vm_rss_mb(child.pid)
        alone = tree_memory_mb(child.pid)
        vm_rss_after = _vm_rss_mb(child.pid)
        with ProcessTreeMemory(interval=0.05) as tree:
            tree.sample()
        whole = tree_memory_mb(os.getpid())
    finally:
        child.kill()
        child.wait()
    # The child wrote to every page of 200 MiB: its own pages, so both sums hold them (PSS never exceeds RSS),
    # in MiB, as the kernel's VmRSS reads; the tree rooted here (this process and the child) holds more.
    assert alone["processes"] == 1
    assert 200 <= alone["pss_mb"] <= alone["rss_mb"]
    assert min(vm_rss_before, vm_rss_after) <= alone["rss_mb"] <= max(vm_rss_before, vm_rss_after)
    assert whole["processes"] >= 2 and whole["rss_mb"] > alone["rss_mb"]
    assert tree.peak_rss_mb >= alone["rss_mb"] and tree.timeline[-1][3] >= 2


def test_downsample_keeps_the_peak_and_the_end():
    timeline = [(float(i), 100.0, 100.0 + (50 if i == 777 else 0), 3) for i in range(1000)]
    kept = _downsample(timeline, 50)
    assert len(kept) <= 51 and kept[-1] == timeline[-1]
    assert (777.0, 100.0, 150.0, 3) in kept
    # A sample without PSS (a process ended between its reads) has a larger RSS than any PSS: still the PSS peak.
    timeline[333] = (333.0, 400.0, None, 3)
    assert (777.0, 100.0, 150.0, 3) in _downsample(timeline, 50)


def test_repeated_pairs_have_unique_ids(tmp_path, shared_data):
    info = write_repeated_pairs(str(tmp_path / "in.parquet"), 9_000, str(shared_data), row_group_size=4_000)
    table = pq.read_table(tmp_path / "in.parquet")
    assert info["rows"] == table.num_rows == 9_000
    assert pq.ParquetFile(tmp_path / "in.parquet").metadata.num_row_groups == 3
    keys = pc.binary_join_element_wise(table["query_id"], table["doc_id"], "|")
    assert len(pc.unique(keys)) == 9_000
    # Repeat 1 starts where DL19 (4,300 pairs) ends, with the same texts.
    assert table["query"][4_300].as_py() == table["query"][0].as_py()
    assert table["query_id"][4_300].as_py() == table["query_id"][0].as_py().replace("~0", "~1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return build_checkpoint(str(tmp_path_factory.mktemp("tiny")), replace(ARCHITECTURES["tiny"], tokenizer_vocab=500))


@pytest.mark.slow  # two rerank jobs, each in a process of its own on a fresh local Ray
def test_the_job_reports_every_size(tiny_model, shared_data, tmp_path):
    output = tmp_path / "memory.json"
    code = benchmark_memory.main(["--pairs", "6000,2000", "--model", tiny_model, "--output", str(output),
                                  "--data-dir", str(shared_data), "--interval", "0.5",
                                  "--set", "input.rows_per_shard=1000", "--set", "io.rows_per_write=1000",
                                  "--set", "progress_interval_s=0.1"])
    assert code == 0
    report = json.loads(output.read_text())
    runs = report["runs"]
    assert [r["n_pairs"] for r in runs] == [2000, 6000]  # every size, smallest first
    for r in runs:
        # Every row accounted for, as the job's own summary counted them.
        assert r["input_rows"] == r["n_pairs"] == r["scored_rows"] + r["rejected_rows"]
        assert r["input"]["rows"] == r["n_pairs"]
        # Driver + gcs + raylet + at least the scorer and tokenizer actors were seen.
        assert r["max_processes"] >= 5
        assert 0 < r["peak_pss_mb"] <= r["peak_rss_sum_mb"]
        assert r["seconds"] > 0 and r["pairs_per_s"] == r["n_pairs"] / r["seconds"]
        # Every sample is kept, unless there were over 400 (a long run on a loaded machine): then 400 at most.
        whole_timeline = r["samples"] <= 400
        assert r["samples"] >= 1
        assert len(r["timeline"]) == r["samples"] if whole_timeline else len(r["timeline"]) <= 400
        times = [p[0] for p in r["timeline"]]
        # Sample times are rounded to 0.01 s; the run's seconds are not.
        assert times == sorted(times) and times[0] >= 0 and times[-1] <= r["seconds"] + 0.005
        # A sample's PSS is None where a process ended between its two reads (a partial sum is never reported);
        # a sample taken once the job had exited finds no process.
        assert all(p[1] >= 0 and (p[2] is None or p[2] >= 0) and p[3] >= 0 for p in r["timeline"])
        assert max(p[3] for p in r["timeline"]) <= r["max_processes"]
        assert max(p[3] for p in r["timeline"]) == r["max_processes"] or not whole_timeline
        # The timeline holds the PSS peak (and, when whole, the RSS peak), rounded to 0.1 MB.
        assert max(p[2] for p in r["timeline"] if p[2] is not None) == pytest.approx(r["peak_pss_mb"], abs=0.05)
        assert max(p[1] for p in r["timeline"]) <= r["peak_rss_sum_mb"] + 0.05
        assert max(p[1] for p in r["timeline"]) == pytest.approx(r["peak_rss_sum_mb"], abs=0.05) or not whole_timeline
    # The job's progress lines were followed: pairs only go up, to all of them; the peak so far never falls.
    progress = runs[1]["running_peak"]
    pairs = [p["pairs"] for p in progress]
    assert pairs and pairs == sorted(pairs) and pairs[-1] == 6000
    assert [p["seconds"] for p in progress] == sorted(p["seconds"] for p in progress)
    peaks = [p["peak_pss_mb"] for p in progress]
    assert all(p is None or p > 0 for p in peaks) and peaks == sorted(peaks)
    assert peaks[-1] <= runs[1]["peak_pss_mb"] + 0.05  # timeline values are rounded to 0.1
    # Both flatness ratios are the quotients of the peaks they are reported from, and "met" is their verdict.
    flat = report["flatness"]
    assert flat["metric"] == "peak_pss_mb" and (flat["smallest"], flat["largest"]) == (2000, 6000)
    across = flat["across_runs"]
    assert across["ratio"] == runs[1]["peak_pss_mb"] / runs[0]["peak_pss_mb"]
    assert across["met"] == (across["ratio"] <= flat["goal"])
    within = flat["within_largest"]
    assert within["peak_at_smallest_mb"] == next(p["peak_pss_mb"] for p in progress if p["pairs"] >= 2000)
    assert within["peak_at_end_mb"] == runs[1]["peak_pss_mb"]
    assert within["ratio"] == within["peak_at_end_mb"] / within["peak_at_smallest_mb"]
    assert within["met"] == (within["ratio"] <= flat["goal"])
    table = output.with_suffix(".md").read_text()
    assert "| 2,000 |" in table and "| 6,000 |" in table and "--pairs 6000,2000" in table
    assert f"{across['ratio']:.2f}x" in table and f"{within['ratio']:.2f}x" in table


def test_bad_sizes_are_refused_before_any_work(run_entry_point):
    result = run_entry_point(benchmark_memory.main, "--pairs", "100k")
    assert result.returncode == 2
    assert "comma-separated pair counts" in result.stderr


def test_an_outside_ray_is_refused(tmp_path):
    with pytest.raises(InputError, match="Ray of its own"):
        benchmark_memory.main(["--pairs", "10", "--output", str(tmp_path / "m.json"),
                               "--set", "ray_address=auto"])
