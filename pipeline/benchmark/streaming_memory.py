"""Does the rerank job stream? Its whole memory at growing input sizes (100k and 1M pairs by default).

Each size is one ordinary run of `python -m jobs.rerank` in a process of its own (a fresh local Ray),
on an input built from the DL19 pairs repeated (each repeat gets its own query and doc ids, so every
query still has its ~100 candidates and the ranking stage sees as many queries as a real log would).
While it runs, the job's whole process tree - the driver, Ray's gcs and raylet, every worker and actor -
is sampled from /proc (`process_memory.py`): proportional set size summed (shared pages such as Ray's
object store counted once), and resident set size summed (shared pages counted per process).

Streaming means the peak is set by the job's settings, not by the input's size: blocks in flight
(compose.BLOCK_BYTES), a shard being read (input.rows_per_shard), a write (io.rows_per_write) and a ranking
bucket (output.rows_per_bucket: all of a bucket's scored rows - ids and scores, no texts - are ranked in
memory at once; at the defaults one bucket holds up to 1M rows). The report gives the peak at each size
and the ratio of the largest input's peak to the smallest's (goal: <= 1.1). Every run is checked to have
accounted for every row (input rows = scored + rejected) and to have run on a Ray of its own (its
processes were seen): a fast run that dropped rows, or memory sampled on the wrong machine, is not a result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.benchmark.machine import load_average, machine_info
from pipeline.benchmark.process_memory import ProcessTreeMemory
from pipeline.datasets import dl19
from pipeline.errors import InputError

log = logging.getLogger("benchmark.memory")

# Peak of the largest input over the smallest's: above this the job is not streaming.
FLAT_RATIO_GOAL = 1.1
# Driver, gcs, raylet and the job's actors: fewer under the driver means Ray ran somewhere else.
MIN_JOB_PROCESSES = 4
# The rerank job's progress line (pipeline/rerank_job.py, Progress): "scored 1,200/4,300 pairs (27.9%), ..."
PROGRESS = re.compile(r"scored ([\d,]+)/[\d,]+ pairs")


def write_repeated_pairs(path: str, n_pairs: int, data_dir: str | None = None, row_group_size: int = 50_000) -> dict:
    """Write `n_pairs` rows (query_id, query, doc_id, document) to one Parquet file: DL19's 4,300 pairs,
    repeated with ids suffixed `~<repeat>`. Written a row group at a time, so this process stays small too."""
    base = dl19(data_dir).select([schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT])
    base = base.cast(pa.schema([(name, pa.string()) for name in base.column_names]))
    out_schema = base.schema
    written = 0
    with pq.ParquetWriter(path, out_schema) as writer:
        while written < n_pairs:
            take = min(row_group_size, n_pairs - written)
            rows = (np.arange(written, written + take) % base.num_rows).astype(np.int64)
            repeat = (np.arange(written, written + take) // base.num_rows).astype(str)
            chunk = base.take(pa.array(rows))
            suffix = pa.array(np.char.add("~", repeat))
            chunk = chunk.set_column(0, schema.QUERY_ID, pc.binary_join_element_wise(chunk[schema.QUERY_ID], suffix, ""))
            chunk = chunk.set_column(2, schema.DOC_ID, pc.binary_join_element_wise(chunk[schema.DOC_ID], suffix, ""))
            writer.write_table(chunk, row_group_size=row_group_size)
            written += take
    return {"path": path, "rows": written, "bytes": os.path.getsize(path), "distinct_pairs": base.num_rows}


def _running_peaks(timeline: list, progress: list[tuple[float, int]]) -> list[dict]:
    """[{"pairs", "seconds", "peak_pss_mb", "peak_rss_sum_mb"}]: the highest sample up to each progress report."""
    out = []
    for seconds, pairs in progress:
        seen = [p for p in timeline if p[0] <= seconds]
        pss = [p[2] for p in seen if p[2] is not None]
        out.append({"pairs": pairs, "seconds": seconds, "peak_pss_mb": max(pss) if pss else None,
                    "peak_rss_sum_mb": max((p[1] for p in seen), default=None)})
    return out


def _downsample(timeline: list, max_points: int) -> list:
    """At most `max_points` samples, always keeping the peak PSS sample and the last one."""
    if len(timeline) <= max_points:
        return timeline
    keep = set(np.linspace(0, len(timeline) - 1, max_points - 1).astype(int).tolist())
    # The highest PSS; a sample without PSS (a process ended between its reads) only where none has one.
    keep.add(max(range(len(timeline)), key=lambda i: (timeline[i][2] is not None, timeline[i][2] or timeline[i][1])))
    return [timeline[i] for i in sorted(keep)]


def run_size(n_pairs: int, model: str, work_dir: str, overrides: list[str], data_dir: str | None,
             interval_s: float, timeout_s: float) -> dict:
    """One rerank job over `n_pairs` pairs, its process tree sampled; the job's summary and the peaks."""
    os.makedirs(work_dir, exist_ok=True)
    input_info = write_repeated_pairs(os.path.join(work_dir, "input.parquet"), n_pairs, data_dir)
    output = os.path.join(work_dir, "output")
    command = [sys.executable, "-m", "jobs.rerank", "--input", input_info["path"], "--output", output,
               "--model", model]
    # A fresh local Ray, child of the job's driver, so that the sampled tree holds all of the job's work.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for item in overrides:
        command += ["--set", item]
    log_path = os.path.join(work_dir, "job.log")
    log.info("%s pairs: %s (log: %s)", f"{n_pairs:,}", " ".join(command[1:]), log_path)
    start = time.perf_counter()
    progress: list[tuple[float, int]] = []  # (seconds on the memory timeline's clock, pairs the job reported done)
    with open(log_path, "w") as job_log, open(log_path) as job_log_reader:
        process = subprocess.Popen(command, stdout=job_log, stderr=subprocess.STDOUT, env=env)
        with ProcessTreeMemory(root=process.pid, interval=interval_s, with_pss=True) as tree:
            code, pending = None, ""
            while time.perf_counter() - start < timeout_s:
                code = process.poll()
                # The job's own progress lines, as they are written (a line still being written waits).
                *lines, pending = (pending + job_log_reader.read()).split("\n")
                for line in lines:
                    match = PROGRESS.search(line)
                    if match:
                        progress.append((round(tree.elapsed(), 2), int(match.group(1).replace(",", ""))))
                if code is not None:
                    break
                time.sleep(0.5)
            if code is None:
                process.kill()
                process.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"the rerank job on {n_pairs:,} pairs " +
                           ("timed out" if code is None else f"exited with {code}") + f"; its log ends:\n{tail}")
    with open(os.path.join(output, "summary.json")) as f:
        summary = json.load(f)
    accounted = summary["scored_rows"] + summary["rejected_rows"]
    if summary["input_rows"] != n_pairs or accounted != n_pairs:
        raise RuntimeError(f"{n_pairs:,} pairs in, but the job's summary says input {summary['input_rows']:,}, "
                           f"scored {summary['scored_rows']:,} + rejected {summary['rejected_rows']:,}")
    max_processes = max((s[3] for s in tree.timeline), default=0)
    if max_processes < MIN_JOB_PROCESSES:
        raise RuntimeError(f"only {max_processes} processes seen under the job's driver: its Ray ran elsewhere, "
                           "so its memory was not measured; unset RAY_ADDRESS and ray_address")
    return {
        "n_pairs": n_pairs, "input": input_info, "command": " ".join(command[1:]),
        "seconds": seconds, "pairs_per_s": n_pairs / seconds, "job_pairs_per_s": summary.get("pairs_per_s"),
        "input_rows": summary["input_rows"], "scored_rows": summary["scored_rows"],
        "rejected_rows": summary["rejected_rows"],
        "peak_pss_mb": tree.peak_pss_mb, "peak_rss_sum_mb": tree.peak_rss_mb,
        "max_processes": max_processes, "samples": len(tree.timeline),
        # The peak so far each time the job reported progress: does memory keep growing as pairs go by?
        "running_peak": _running_peaks(tree.timeline, progress),
        "timeline": _downsample(tree.timeline, 400),
    }


def run_streaming_memory(sizes: list[int], model: str, work_dir: str, overrides: list[str] = (),
                         data_dir: str | None = None, interval_s: float = 1.0, timeout_s: float = 3600.0,
                         keep_outputs: bool = False) -> dict:
    """Runs every size (smallest first) and reports the peaks and the flatness ratio."""
    if any(item.split("=", 1)[0].strip() == "ray_address" for item in overrides):
        raise InputError("the memory benchmark starts a Ray of its own for each run; drop --set ray_address")
    runs = []
    for n in sorted(sizes):
        run_dir = os.path.join(work_dir, f"pairs-{n}")
        runs.append(run_size(n, model, run_dir, list(overrides), data_dir, interval_s, timeout_s))
        log.info("%s pairs: %.0f s, %.0f pairs/s, peak PSS %.0f MB, peak RSS sum %.0f MB", f"{n:,}",
                 runs[-1]["seconds"], runs[-1]["pairs_per_s"], runs[-1]["peak_pss_mb"] or float("nan"),
                 runs[-1]["peak_rss_sum_mb"])
        if not keep_outputs:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    metric = "peak_pss_mb" if all(r["peak_pss_mb"] is not None for r in runs) else "peak_rss_sum_mb"
    smallest, largest = runs[0], runs[-1]
    across = largest[metric] / smallest[metric] if len(runs) > 1 else None
    # Within the largest run: its peak so far once it had scored as many pairs as the smallest input, and
    # its peak at the end. Separate runs differ in more than size (a short run ends before the scorer's
    # heap has seen its largest batches); one run shows whether memory grows while pairs stream through.
    then = next((p[metric] for p in largest["running_peak"] if p["pairs"] >= smallest["n_pairs"] and p[metric]), None)
    within = largest[metric] / then if then and len(runs) > 1 else None
    return {
        "machine": machine_info(), "load_average_after": load_average(), "model": model,
        "overrides": list(overrides), "interval_s": interval_s, "runs": runs,
        "flatness": {"metric": metric, "smallest": smallest["n_pairs"], "largest": largest["n_pairs"],
                     "goal": FLAT_RATIO_GOAL,
                     "across_runs": {"ratio": across, "met": None if across is None else across <= FLAT_RATIO_GOAL},
                     "within_largest": {"peak_at_smallest_mb": then, "peak_at_end_mb": largest[metric],
                                        "ratio": within, "met": None if within is None else within <= FLAT_RATIO_GOAL}},
    }


def markdown(report: dict) -> str:
    lines = ["| pairs | seconds | pairs/s | peak PSS, whole job (MB) | peak RSS summed (MB) | processes |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        pss = "n/a" if r["peak_pss_mb"] is None else f"{r['peak_pss_mb']:.0f}"
        lines.append(f"| {r['n_pairs']:,} | {r['seconds']:.0f} | {r['pairs_per_s']:.0f} | {pss} | "
                     f"{r['peak_rss_sum_mb']:.0f} | {r['max_processes']} |")
    flat = report["flatness"]
    verdict = lambda part: f"{part['ratio']:.2f}x (goal <= {flat['goal']}x: {'met' if part['met'] else 'not met'})"
    if flat["across_runs"]["ratio"] is not None:
        lines += ["", f"Peak ({flat['metric']}) of the {flat['largest']:,}-pair run over the {flat['smallest']:,}-pair "
                      f"run's: {verdict(flat['across_runs'])}."]
    within = flat["within_largest"]
    if within["ratio"] is not None:
        lines += [f"Within the {flat['largest']:,}-pair run, its peak at the end over its peak when {flat['smallest']:,} "
                  f"pairs were scored ({within['peak_at_end_mb']:.0f} / {within['peak_at_smallest_mb']:.0f} MB): "
                  f"{verdict(within)}."]
    m = report["machine"]
    lines += ["", f"Model: {report['model']}; machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}."]
    return "\n".join(lines)
