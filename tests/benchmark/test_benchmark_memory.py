"""The streaming-memory benchmark: its sampler sees a whole process tree, and the job end to end at two
small sizes (real rerank jobs on a fresh local Ray each, a tiny checkpoint). No memory figure is asserted
against a goal (the machine decides those); what is asserted is what a broken benchmark would get wrong."""

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


def test_the_tree_sampler_counts_a_child_process():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in tree_pids(os.getpid())
        alone = tree_memory_mb(child.pid)
        with ProcessTreeMemory(interval=0.05) as tree:
            tree.sample()
        whole = tree_memory_mb(os.getpid())
    finally:
        child.kill()
        child.wait()
    # The child touched 200 MB: both its sums see it, PSS never exceeds RSS, and the tree rooted here
    # (this process and whatever else it runs) holds at least the child.
    assert alone["processes"] == 1
    assert 200 <= alone["pss_mb"] <= alone["rss_mb"] < 400
    assert whole["processes"] >= 2 and whole["rss_mb"] >= alone["rss_mb"] + 10
    assert tree.peak_rss_mb >= alone["rss_mb"] and tree.timeline[-1][3] >= 2


def test_downsample_keeps_the_peak_and_the_end():
    timeline = [(float(i), 100.0, 100.0 + (50 if i == 777 else 0), 3) for i in range(1000)]
    kept = _downsample(timeline, 50)
    assert len(kept) <= 51 and kept[-1] == timeline[-1]
    assert (777.0, 100.0, 150.0, 3) in kept


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


def test_the_job_reports_every_size(tiny_model, shared_data, tmp_path):
    output = tmp_path / "memory.json"
    code = benchmark_memory.main(["--pairs", "6000,2000", "--model", tiny_model, "--output", str(output),
                                  "--data-dir", str(shared_data), "--interval", "0.5",
                                  "--set", "input.rows_per_shard=1000", "--set", "io.rows_per_write=1000",
                                  "--set", "progress_interval_s=0.1"])
    assert code == 0
    report = json.loads(output.read_text())
    runs = report["runs"]
    assert [r["n_pairs"] for r in runs] == [2000, 6000]  # smallest first
    for r in runs:
        # Driver + gcs + raylet + at least the scorer and tokenizer actors were seen.
        assert r["max_processes"] >= 5
        assert 100 < r["peak_pss_mb"] <= r["peak_rss_sum_mb"]
        assert r["samples"] >= 3 and len(r["timeline"]) == r["samples"]
        times = [p[0] for p in r["timeline"]]
        assert times == sorted(times) and times[-1] <= r["seconds"]
        assert max(p[2] for p in r["timeline"] if p[2] is not None) == pytest.approx(r["peak_pss_mb"], abs=0.1)
    # The job's progress lines were followed: pairs only go up, to all of them; the peak so far never falls.
    progress = runs[1]["running_peak"]
    pairs = [p["pairs"] for p in progress]
    assert len(pairs) >= 3 and pairs == sorted(pairs) and pairs[-1] == 6000
    peaks = [p["peak_pss_mb"] for p in progress]
    assert peaks == sorted(peaks) and peaks[-1] <= runs[1]["peak_pss_mb"] + 0.05  # timeline values are rounded to 0.1
    flat = report["flatness"]
    assert flat["metric"] == "peak_pss_mb" and flat["largest"] == 6000
    within = flat["within_largest"]
    assert within["peak_at_smallest_mb"] == next(p["peak_pss_mb"] for p in progress if p["pairs"] >= 2000)
    assert within["ratio"] >= 1.0
    table = output.with_suffix(".md").read_text()
    assert "| 6,000 |" in table and "--pairs 6000,2000" in table


def test_bad_sizes_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_memory.main(["--pairs", "100k"])
    assert exit_info.value.code == 2
    assert "comma-separated pair counts" in capsys.readouterr().err


def test_an_outside_ray_is_refused(tmp_path):
    with pytest.raises(InputError, match="Ray of its own"):
        benchmark_memory.main(["--pairs", "10", "--output", str(tmp_path / "m.json"),
                               "--set", "ray_address=auto"])
