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
import time
from dataclasses import replace

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs import benchmark_memory
from pipeline.benchmark.process_memory import ProcessTreeMemory, tree_memory_mb, tree_pids
from pipeline.benchmark.streaming_memory import JOBS, _downsample, write_repeated_pairs
from pipeline.core.errors import InputError
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

CHILD = (
    "import sys, time; block = bytearray(200 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
    "print('ready', flush=True); time.sleep(30)"
)


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
    # Each process's own PSS is kept apart, named by what it runs: the child is the one holding 200 MiB.
    child_seen = tree.processes[child.pid]
    assert child_seen["name"] == "python -c" and min(mb for _, mb in child_seen["samples"]) >= 200
    assert os.getpid() in tree.processes
    grown = tree.growth(top=1)
    assert len(grown) == 1 and grown[0]["growth_mb"] == max(
        round(p["samples"][-1][1] - p["samples"][0][1], 1) for p in tree.processes.values()
    )
    assert tree.growth(since_s=1e9) == []  # nothing was seen after then


def test_processes_are_named_by_what_they_run():
    from pipeline.benchmark.process_memory import process_name

    module = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    program = subprocess.Popen(["sleep", "30"])
    try:
        assert module.stdout.readline().startswith(b"Serving HTTP")  # started (its exec long done)
        assert process_name(module.pid) == "python -m http.server"
        deadline = time.time() + 10
        while (
            process_name(program.pid) != "sleep" and time.time() < deadline
        ):  # until its exec is done
            time.sleep(0.05)
        assert process_name(program.pid) == "sleep"
    finally:
        for p in (module, program):
            p.kill()
            p.wait()
    assert process_name(program.pid) is None  # ended (and reaped)


def test_downsample_keeps_the_peak_and_the_end():
    timeline = [(float(i), 100.0, 100.0 + (50 if i == 777 else 0), 3) for i in range(1000)]
    kept = _downsample(timeline, 50)
    assert len(kept) <= 51 and kept[-1] == timeline[-1]
    assert (777.0, 100.0, 150.0, 3) in kept
    # A sample without PSS (a process ended between its reads) has a larger RSS than any PSS: still the PSS peak.
    timeline[333] = (333.0, 400.0, None, 3)
    assert (777.0, 100.0, 150.0, 3) in _downsample(timeline, 50)


def test_repeated_pairs_have_unique_ids(tmp_path, shared_data):
    info = write_repeated_pairs(
        str(tmp_path / "in.parquet"), 9_000, str(shared_data), row_group_size=4_000
    )
    table = pq.read_table(tmp_path / "in.parquet")
    assert info["rows"] == table.num_rows == 9_000
    assert pq.ParquetFile(tmp_path / "in.parquet").metadata.num_row_groups == 3
    keys = pc.binary_join_element_wise(table["query_id"], table["doc_id"], "|")
    assert len(pc.unique(keys)) == 9_000
    # Repeat 1 starts where DL19 (4,300 pairs) ends, with the same texts.
    assert table["query"][4_300].as_py() == table["query"][0].as_py()
    assert table["query_id"][4_300].as_py() == table["query_id"][0].as_py().replace("~0", "~1")


def test_repeated_pairs_with_labels_carry_the_nist_judgements(tmp_path, shared_data):
    from pipeline.datasets import trec_dl

    write_repeated_pairs(
        str(tmp_path / "in.parquet"),
        9_000,
        str(shared_data),
        row_group_size=4_000,
        with_labels=True,
    )
    table = pq.read_table(tmp_path / "in.parquet")
    assert table.column_names == [
        "query_id",
        "query",
        "doc_id",
        "document",
        "rank",
        "score",
        "label",
    ]
    assert table.num_rows == 9_000
    pairs, qrels = trec_dl(2019, str(shared_data))
    judged = {(r["query_id"], r["doc_id"]): r["label"] for r in qrels.to_pylist()}
    rows = table.to_pylist()
    for i in (0, 1, 4_299, 4_300, 8_999):  # both sides of a repeat's boundary
        row, source = rows[i], pairs.slice(i % 4_300, 1).to_pylist()[0]
        key = (row["query_id"].rsplit("~", 1)[0], row["doc_id"].rsplit("~", 1)[0])
        assert key == (source["query_id"], source["doc_id"])
        assert row["label"] == judged.get(key) and row["rank"] == source["first_stage_rank"]
    # Every repeat holds DL19's judgements: 2,257 of its 4,300 candidates are judged.
    assert table.slice(0, 4_300)["label"].null_count == 4_300 - 2_257
    assert table.slice(4_300, 4_300)["label"].equals(table.slice(0, 4_300)["label"])


DRIVER_CHILD = (
    "import sys; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
    "del block; sys.exit(int(sys.argv[1]))"
)


@pytest.mark.parametrize("status", [0, 3])
def test_the_driver_peak_is_the_kernels_and_written_however_the_module_exits(tmp_path, status):
    """A module that held 300 MiB and freed it: its peak (VmHWM) still holds them, its end does not."""
    (tmp_path / "allocate_then_exit.py").write_text(DRIVER_CHILD.replace("; ", "\n"))
    report = tmp_path / "driver.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.benchmark.driver_peak",
            str(report),
            "-m",
            "allocate_then_exit",
            str(status),
        ],
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
    )
    assert result.returncode == status
    driver = json.loads(report.read_text())
    assert driver["module"] == "allocate_then_exit" and driver["exit"] == status
    assert driver["peak_rss_mb"] >= 300 > driver["end_rss_mb"] > 0


def test_the_hard_negative_job_is_run_with_its_positives_and_bounded_buckets():
    job = JOBS["hard-negatives"]
    assert job.module == "jobs.hard_negatives" and job.with_labels
    assert "rerank.output.rows_per_bucket=100000" in job.default_overrides
    assert (job.goal, job.driver_limit_mb) == (1.2, 1024.0)
    assert JOBS["rerank"].module == "jobs.rerank" and JOBS["rerank"].default_overrides == ()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return build_checkpoint(
        str(tmp_path_factory.mktemp("tiny")), replace(ARCHITECTURES["tiny"], tokenizer_vocab=500)
    )


@pytest.mark.slow  # two rerank jobs, each in a process of its own on a fresh local Ray
def test_the_job_reports_every_size(tiny_model, shared_data, tmp_path):
    output = tmp_path / "memory.json"
    code = benchmark_memory.main(
        [
            "--pairs",
            "3000,1000",
            "--model",
            tiny_model,
            "--output",
            str(output),
            "--data-dir",
            str(shared_data),
            "--interval",
            "0.5",
            "--set",
            "input.rows_per_shard=500",
            "--set",
            "io.rows_per_write=500",
            "--set",
            "progress_interval_s=0.1",
        ]
    )
    assert code == 0
    report = json.loads(output.read_text())
    runs = report["runs"]
    assert [r["n_pairs"] for r in runs] == [1000, 3000]  # every size, smallest first
    for r in runs:
        # Every row accounted for, as the job's own summary counted them.
        assert r["input_rows"] == r["n_pairs"] == r["scored_rows"] + r["rejected_rows"]
        assert r["input"]["rows"] == r["n_pairs"]
        # Driver + gcs + raylet + at least the scorer and tokenizer actors were seen.
        assert r["max_processes"] >= 5
        assert 0 < r["peak_pss_mb"] <= r["peak_rss_sum_mb"]
        assert r["seconds"] > 0 and r["pairs_per_s"] == r["n_pairs"] / r["seconds"]
        assert r["attempts"] in (1, 2, 3)  # a retry only when Ray's start-up gave up
        # Every sample is kept, unless there were over 400 (a long run on a loaded machine): then 400 at most.
        whole_timeline = r["samples"] <= 400
        assert r["samples"] >= 1
        assert len(r["timeline"]) == r["samples"] if whole_timeline else len(r["timeline"]) <= 400
        times = [p[0] for p in r["timeline"]]
        # Sample times are rounded to 0.01 s; the run's seconds are not.
        assert times == sorted(times) and times[0] >= 0 and times[-1] <= round(r["seconds"], 2)
        # A sample's PSS is None where a process ended between its two reads (a partial sum is never reported);
        # a sample taken once the job had exited finds no process.
        assert all(p[1] >= 0 and (p[2] is None or p[2] >= 0) and p[3] >= 0 for p in r["timeline"])
        assert max(p[3] for p in r["timeline"]) <= r["max_processes"]
        assert max(p[3] for p in r["timeline"]) == r["max_processes"] or not whole_timeline
        # The timeline holds the PSS peak (and, when whole, the RSS peak), rounded to 0.1 MB the way each sample
        # is (rounding is monotone, so the largest rounded sample is the rounded peak; a tolerance of 0.05 would
        # fail on an exact half such as 2295.25, which Python rounds to 2295.2).
        assert max(p[2] for p in r["timeline"] if p[2] is not None) == round(r["peak_pss_mb"], 1)
        assert max(p[1] for p in r["timeline"]) <= round(r["peak_rss_sum_mb"], 1)
        assert (
            max(p[1] for p in r["timeline"]) == round(r["peak_rss_sum_mb"], 1) or not whole_timeline
        )
        # The processes that grew most, largest growth first, each growth its own last minus first PSS.
        growth = r["growth_by_process"]
        assert 1 <= len(growth) <= 8 and [p["growth_mb"] for p in growth] == sorted(
            (p["growth_mb"] for p in growth), reverse=True
        )
        assert all(
            p["growth_mb"] == round(p["to_mb"] - p["from_mb"], 1)
            and p["from_s"] <= p["to_s"]
            and p["from_s"] >= r["growth_since_s"]
            and p["peak_mb"] >= max(p["from_mb"], p["to_mb"])
            for p in growth
        )
        # A tenth of the pairs were scored by then, as the job's own progress lines said.
        assert r["growth_since_s"] == next(
            p["seconds"] for p in r["running_peak"] if p["pairs"] >= r["n_pairs"] / 10
        )
        assert (
            any(p["name"] == "ray::MapWorker(MapBatches(ScoreStage))" for p in growth)
            or len(growth) == 8
        )
    # The job's progress lines were followed: pairs only go up, to all of them; the peak so far never falls.
    progress = runs[1]["running_peak"]
    pairs = [p["pairs"] for p in progress]
    assert pairs and pairs == sorted(pairs) and pairs[-1] == 3000
    assert [p["seconds"] for p in progress] == sorted(p["seconds"] for p in progress)
    peaks = [p["peak_pss_mb"] for p in progress]
    assert all(p is None or p > 0 for p in peaks) and peaks == sorted(peaks)
    assert peaks[-1] <= round(runs[1]["peak_pss_mb"], 1)  # timeline values are rounded to 0.1
    # Both flatness ratios are the quotients of the peaks they are reported from, and "met" is their verdict.
    flat = report["flatness"]
    assert flat["metric"] == "peak_pss_mb" and (flat["smallest"], flat["largest"]) == (1000, 3000)
    across = flat["across_runs"]
    assert across["ratio"] == runs[1]["peak_pss_mb"] / runs[0]["peak_pss_mb"]
    assert across["met"] == (across["ratio"] <= flat["goal"])
    within = flat["within_largest"]
    assert within["peak_at_smallest_mb"] == next(
        p["peak_pss_mb"] for p in progress if p["pairs"] >= 1000
    )
    assert within["peak_at_end_mb"] == runs[1]["peak_pss_mb"]
    assert within["ratio"] == within["peak_at_end_mb"] / within["peak_at_smallest_mb"]
    assert within["met"] == (within["ratio"] <= flat["goal"])
    table = output.with_suffix(".md").read_text()
    assert "| 1,000 |" in table and "| 3,000 |" in table and "--pairs 3000,1000" in table
    assert "grew most during the 3,000-pair run" in table
    assert f"{across['ratio']:.2f}x" in table and f"{within['ratio']:.2f}x" in table


@pytest.mark.slow  # two hard-negative jobs (a rerank and a selection each), each in a process of its own
def test_the_hard_negative_job_reports_every_size_and_its_driver(tiny_model, shared_data, tmp_path):
    output = tmp_path / "memory-hn.json"
    code = benchmark_memory.main(
        [
            "--job",
            "hard-negatives",
            "--pairs",
            "2500,1000",
            "--model",
            tiny_model,
            "--output",
            str(output),
            "--data-dir",
            str(shared_data),
            "--interval",
            "0.5",
            "--set",
            "rerank.input.rows_per_shard=500",
            "--set",
            "rerank.io.rows_per_write=500",
            "--set",
            "rerank.progress_interval_s=0.1",
            "--set",
            "rerank.output.rows_per_bucket=1000",
        ]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert report["job"] == "hard-negatives"
    assert (
        report["overrides"][0] == "rerank.output.rows_per_bucket=100000"
    )  # the job's own, then --set's
    assert report["overrides"][-1] == "rerank.output.rows_per_bucket=1000"
    runs = report["runs"]
    assert [r["n_pairs"] for r in runs] == [1000, 2500]
    for r in runs:
        # Every row accounted for: by the rerank's summary, and every scored row labelled in candidates/.
        assert r["input_rows"] == r["n_pairs"] == r["scored_rows"] + r["rejected_rows"]
        assert r["candidate_rows"] == r["scored_rows"] and r["kept_negatives"] > 0
        assert r["queries"] == -(-r["n_pairs"] // 100)  # DL19's 100 candidates per query, repeated
        assert r["ranked_parts"] >= 1 and r["output_parts"] == 1
        assert (
            r["command"].startswith("python -m jobs.hard_negatives ")
            and "--set rerank." in r["command"]
        )
        assert r["max_processes"] >= 5 and 0 < r["peak_pss_mb"] <= r["peak_rss_sum_mb"]
        # The driver is one process of the tree: its own peak is positive, its end never above its peak.
        assert 0 < r["driver_end_rss_mb"] <= r["driver_peak_rss_mb"]
        assert r["pairs_per_s"] == r["n_pairs"] / r["seconds"] and r["attempts"] in (1, 2, 3)
    assert (
        runs[1]["ranked_parts"] > runs[0]["ranked_parts"]
    )  # 1,000 rows per bucket: more buckets at 2,500
    progress = runs[1]["running_peak"]
    assert progress and [p["pairs"] for p in progress][-1] == 2500
    drivers = [p["driver_peak_rss_mb"] for p in progress if p["driver_peak_rss_mb"] is not None]
    assert drivers and drivers == sorted(drivers) and drivers[-1] <= runs[1]["driver_peak_rss_mb"]
    flat = report["flatness"]
    assert flat["goal"] == 1.2
    assert flat["across_runs"]["ratio"] == runs[1]["peak_pss_mb"] / runs[0]["peak_pss_mb"]
    driver = flat["driver"]
    assert (driver["smallest_mb"], driver["largest_mb"]) == (
        runs[0]["driver_peak_rss_mb"],
        runs[1]["driver_peak_rss_mb"],
    )
    assert driver["across_runs"]["ratio"] == driver["largest_mb"] / driver["smallest_mb"]
    assert driver["across_runs"]["met"] == (driver["across_runs"]["ratio"] <= flat["goal"])
    within = driver["within_largest"]
    assert within["peak_at_smallest_mb"] == next(
        p["driver_peak_rss_mb"] for p in progress if p["pairs"] >= 1000
    )
    assert within["ratio"] == within["peak_at_end_mb"] / within["peak_at_smallest_mb"]
    assert driver["limit_mb"] == 1024.0 and driver["under_limit"] == (driver["largest_mb"] < 1024.0)
    table = output.with_suffix(".md").read_text()
    assert "| 1,000 |" in table and "| 2,500 |" in table and "--job hard-negatives" in table
    assert f"{driver['across_runs']['ratio']:.2f}x" in table and "Job: hard-negatives" in table


def test_bad_sizes_are_refused_before_any_work(run_entry_point):
    result = run_entry_point(benchmark_memory.main, "--pairs", "100k")
    assert result.returncode == 2
    assert "comma-separated pair counts" in result.stderr


def test_an_outside_ray_is_refused(tmp_path):
    with pytest.raises(InputError, match="Ray of its own"):
        benchmark_memory.main(
            ["--pairs", "10", "--output", str(tmp_path / "m.json"), "--set", "ray_address=auto"]
        )
    with pytest.raises(InputError, match="drop --set rerank.ray_address"):
        benchmark_memory.main(
            [
                "--job",
                "hard-negatives",
                "--pairs",
                "10",
                "--output",
                str(tmp_path / "m.json"),
                "--set",
                "rerank.ray_address=auto",
            ]
        )
