"""Do the rerank and hard-negative jobs stream? Their memory at growing input sizes (100k and 1M pairs by default).

Each size is one ordinary run of `python -m jobs.rerank` (or `python -m jobs.hard_negatives`) in a process of
its own (a fresh local Ray), on an input built from the DL19 pairs repeated (each repeat gets its own query and doc ids, so every
query still has its ~100 candidates and the ranking stage sees as many queries as a real log would).
While it runs, the job's whole process tree - the driver, Ray's gcs and raylet, every worker and actor -
is sampled from /proc (`process_memory.py`): proportional set size summed (shared pages such as Ray's
object store counted once), and resident set size summed (shared pages counted per process). The driver's own
peak resident set is the kernel's (`VmHWM`, every page it held at once, not a sample), written when it exits
(`driver_peak.py`) and read at each progress line: a driver that gathers data grows with the input however
flat the rest is.

The hard-negative job's input also carries the first stage's `rank`/`score` and DL19's NIST `label` (its
positives, so no qrels table is read on the driver). Its ranking buckets hold the texts (they are carried to
ranked/ for the training files), so `rerank.output.rows_per_bucket` bounds what one ranker or selection actor
holds; the benchmark sets it to 100,000 (`JOBS`), so both sizes work on buckets of the same size.

Streaming means the peak is set by the job's settings, not by the input's size: blocks in flight
(compose.BLOCK_BYTES), a shard being read (input.rows_per_shard), a write (io.rows_per_write) and a ranking
bucket (output.rows_per_bucket: all of a bucket's scored rows - ids and scores, no texts - are ranked in
memory at once; at the defaults one bucket holds up to 1M rows). The report gives the peak at each size
and the ratio of the largest input's peak to the smallest's (goal: <= 1.1 for the rerank job; <= 1.2 for the
hard-negative job's tree and driver, whose driver must also stay under 1 GB). Every run is checked to have
accounted for every row (input rows = scored + rejected; for hard negatives also every scored row labelled in
candidates/) and to have run on a Ray of its own (its processes were seen): a fast run that dropped rows, or
memory sampled on the wrong machine, is not a result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.benchmark.machine import load_average, machine_info
from pipeline.benchmark.process_memory import ProcessTreeMemory
from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.datasets import trec_dl

log = logging.getLogger("benchmark.memory")

# Peak of the largest input over the smallest's: above this the job is not streaming.
FLAT_RATIO_GOAL = 1.1
# The hard-negative job: its tree and its driver within 1.2x, the driver under 1 GB at the largest size.
HARD_NEGATIVES_RATIO_GOAL = 1.2
DRIVER_LIMIT_MB = 1024.0
# Driver, gcs, raylet and the job's actors: fewer under the driver means Ray ran somewhere else.
MIN_JOB_PROCESSES = 4
# Ray's own start-up failure (its raylet did not register within its fixed 30 s): the job runs again.
RAY_START_FAILED = "timed out during startup"
RAY_START_ATTEMPTS = 3
# The rerank job's progress line (pipeline/rerank/job.py, Progress): "scored 1,200/4,300 pairs (27.9%), ..."
PROGRESS = re.compile(r"scored ([\d,]+)/[\d,]+ pairs")


def write_repeated_pairs(
    path: str,
    n_pairs: int,
    data_dir: str | None = None,
    row_group_size: int = 50_000,
    with_labels: bool = False,
) -> dict:
    """Write `n_pairs` rows (query_id, query, doc_id, document) to one Parquet file: DL19's 4,300 pairs,
    repeated with ids suffixed `~<repeat>`. Written a row group at a time, so this process stays small too.
    with_labels: also the first stage's `rank` (int32) and `score` (float64) and the NIST `label` (int32, null
    where unjudged): a hard-negative job's input with its positives."""
    pairs, qrels = trec_dl(2019, data_dir)
    columns = [schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT]
    base = pairs.select(columns).cast(pa.schema([(name, pa.string()) for name in columns]))
    if with_labels:
        label = pairs.select([schema.QUERY_ID, schema.DOC_ID]).append_column(
            "_row", pa.array(range(pairs.num_rows))
        )
        label = label.join(
            qrels, keys=[schema.QUERY_ID, schema.DOC_ID], join_type="left outer"
        ).sort_by("_row")
        base = (
            base.append_column("rank", pairs[schema.FIRST_STAGE_RANK].cast(pa.int32()))
            .append_column("score", pairs[schema.FIRST_STAGE_SCORE].cast(pa.float64()))
            .append_column(schema.LABEL, label[schema.LABEL].cast(pa.int32()))
        )
    out_schema = base.schema
    written = 0
    with pq.ParquetWriter(path, out_schema) as writer:
        while written < n_pairs:
            take = min(row_group_size, n_pairs - written)
            rows = (np.arange(written, written + take) % base.num_rows).astype(np.int64)
            repeat = (np.arange(written, written + take) // base.num_rows).astype(str)
            chunk = base.take(pa.array(rows))
            suffix = pa.array(np.char.add("~", repeat))
            chunk = chunk.set_column(
                0, schema.QUERY_ID, pc.binary_join_element_wise(chunk[schema.QUERY_ID], suffix, "")
            )
            chunk = chunk.set_column(
                2, schema.DOC_ID, pc.binary_join_element_wise(chunk[schema.DOC_ID], suffix, "")
            )
            writer.write_table(chunk, row_group_size=row_group_size)
            written += take
    return {
        "path": path,
        "rows": written,
        "bytes": os.path.getsize(path),
        "distinct_pairs": base.num_rows,
    }


def _running_peaks(timeline: list, progress: list[tuple[float, int, float | None]]) -> list[dict]:
    """[{"pairs", "seconds", "peak_pss_mb", "peak_rss_sum_mb", "driver_peak_rss_mb"}]: the highest tree sample
    up to each progress report, and the driver's own peak (VmHWM) read when the report was seen."""
    out = []
    for seconds, pairs, driver in progress:
        seen = [p for p in timeline if p[0] <= seconds]
        pss = [p[2] for p in seen if p[2] is not None]
        out.append(
            {
                "pairs": pairs,
                "seconds": seconds,
                "peak_pss_mb": max(pss) if pss else None,
                "peak_rss_sum_mb": max((p[1] for p in seen), default=None),
                "driver_peak_rss_mb": driver,
            }
        )
    return out


def _downsample(timeline: list, max_points: int) -> list:
    """At most `max_points` samples, always keeping the peak PSS sample and the last one."""
    if len(timeline) <= max_points:
        return timeline
    keep = set(np.linspace(0, len(timeline) - 1, max_points - 1).astype(int).tolist())
    # The highest PSS; a sample without PSS (a process ended between its reads) only where none has one.
    keep.add(
        max(
            range(len(timeline)),
            key=lambda i: (timeline[i][2] is not None, timeline[i][2] or timeline[i][1]),
        )
    )
    return [timeline[i] for i in sorted(keep)]


@dataclass(frozen=True)
class Job:
    """How the benchmark runs one of the jobs: its module, its input, the settings it always gets."""

    name: str
    module: str
    with_labels: bool  # the input carries rank, score and label (the job's positives)
    set_prefix: str  # where the rerank job's settings live in this job's config
    default_overrides: tuple[str, ...]
    goal: float  # largest size's peak over the smallest's
    driver_limit_mb: float | None


JOBS = {
    "rerank": Job("rerank", "jobs.rerank", False, "", (), FLAT_RATIO_GOAL, None),
    # Ranking buckets carry the texts here: 100k rows per bucket at both sizes (1 bucket at 100k, ~10 at 1M).
    "hard-negatives": Job(
        "hard-negatives",
        "jobs.hard_negatives",
        True,
        "rerank.",
        ("rerank.output.rows_per_bucket=100000",),
        HARD_NEGATIVES_RATIO_GOAL,
        DRIVER_LIMIT_MB,
    ),
}


def _vm_hwm_mb(pid: int) -> float | None:
    """The process's peak resident set so far (the kernel's VmHWM), or None once it has ended."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _run_once(
    command: list[str], env: dict, log_path: str, interval_s: float, timeout_s: float
) -> tuple[int | None, ProcessTreeMemory, list, float]:
    """Run the job once, its tree sampled and its progress lines followed: (exit code or None when it ran past
    `timeout_s`, the sampler, [(seconds, pairs, driver VmHWM)], seconds)."""
    start = time.perf_counter()
    # (seconds on the memory timeline's clock, pairs the job reported done, the driver's VmHWM then)
    progress: list[tuple[float, int, float | None]] = []
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
                        progress.append(
                            (
                                round(tree.elapsed(), 2),
                                int(match.group(1).replace(",", "")),
                                _vm_hwm_mb(process.pid),
                            )
                        )
                if code is not None:
                    break
                time.sleep(0.5)
            if code is None:
                process.kill()
                process.wait()
    return code, tree, progress, time.perf_counter() - start


def _check_rows(job: Job, n_pairs: int, output: str) -> dict:
    """The job's own row accounting, checked; what the report records of it."""
    summary_path = (
        os.path.join(output, "rerank", "summary.json")
        if job.name == "hard-negatives"
        else os.path.join(output, "summary.json")
    )
    with open(summary_path) as f:
        summary = json.load(f)
    accounted = summary["scored_rows"] + summary["rejected_rows"]
    if summary["input_rows"] != n_pairs or accounted != n_pairs:
        raise RuntimeError(
            f"{n_pairs:,} pairs in, but the job's summary says input {summary['input_rows']:,}, "
            f"scored {summary['scored_rows']:,} + rejected {summary['rejected_rows']:,}"
        )
    rows = {
        "input_rows": summary["input_rows"],
        "scored_rows": summary["scored_rows"],
        "rejected_rows": summary["rejected_rows"],
        "job_pairs_per_s": summary.get("pairs_per_s"),
    }
    if job.name == "hard-negatives":
        with open(os.path.join(output, "stats.json")) as f:
            stats = json.load(f)
        candidates = pq.ParquetDataset(os.path.join(output, "candidates")).files
        candidate_rows = sum(pq.ParquetFile(path).metadata.num_rows for path in candidates)
        if not stats["rows"] == candidate_rows == summary["scored_rows"]:
            raise RuntimeError(
                f"{summary['scored_rows']:,} pairs scored, but candidates/ holds {candidate_rows:,} rows "
                f"and stats.json counts {stats['rows']:,}"
            )
        rows.update(
            {
                "candidate_rows": candidate_rows,
                "kept_negatives": stats["kept_negatives"],
                "queries": stats["queries"]["in"],
                "ranked_parts": len(os.listdir(os.path.join(output, "rerank", "ranked"))),
                "output_parts": len(candidates),
            }
        )
    return rows


def run_size(
    n_pairs: int,
    model: str,
    work_dir: str,
    overrides: list[str],
    data_dir: str | None,
    interval_s: float,
    timeout_s: float,
    job: Job = JOBS["rerank"],
) -> dict:
    """One job over `n_pairs` pairs, its process tree sampled and its driver's own peak recorded; the job's
    row accounting and the peaks."""
    os.makedirs(work_dir, exist_ok=True)
    input_info = write_repeated_pairs(
        os.path.join(work_dir, "input.parquet"), n_pairs, data_dir, with_labels=job.with_labels
    )
    output = os.path.join(work_dir, "output")
    driver_report = os.path.join(work_dir, "driver.json")
    job_command = [
        "-m",
        job.module,
        "--input",
        input_info["path"],
        "--output",
        output,
        "--model",
        model,
    ]
    for item in [*job.default_overrides, *overrides]:
        job_command += ["--set", item]
    # The driver is this wrapper's process: it runs the job's module and records its own VmHWM when it exits.
    command = [sys.executable, "-m", "pipeline.benchmark.driver_peak", driver_report, *job_command]
    # A fresh local Ray, child of the job's driver, so that the sampled tree holds all of the job's work.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_path = os.path.join(work_dir, "job.log")
    log.info("%s pairs: python %s (log: %s)", f"{n_pairs:,}", " ".join(job_command), log_path)
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        code, tree, progress, seconds = _run_once(command, env, log_path, interval_s, timeout_s)
        with open(log_path) as f:
            tail = f.read()[-2000:]
        if code == 0 or RAY_START_FAILED not in tail or attempt == RAY_START_ATTEMPTS:
            break
        # Ray's start-up gave up (it waits 30 s for its raylet, too little on a machine under a heavy load): a
        # fresh run, measured from its start; the failed one measured nothing.
        log.warning(
            "%s pairs: Ray did not start in time (attempt %d of %d); running the job again",
            f"{n_pairs:,}",
            attempt,
            RAY_START_ATTEMPTS,
        )
        shutil.rmtree(output, ignore_errors=True)
        time.sleep(30)
    if code != 0:
        raise RuntimeError(
            f"the {job.name} job on {n_pairs:,} pairs "
            + ("timed out" if code is None else f"exited with {code}")
            + f"; its log ends:\n{tail}"
        )
    rows = _check_rows(job, n_pairs, output)
    with open(driver_report) as f:
        driver = json.load(f)
    max_processes = max((s[3] for s in tree.timeline), default=0)
    since_s = next((t for t, pairs, _ in progress if pairs >= n_pairs / 10), 0.0)
    if max_processes < MIN_JOB_PROCESSES:
        raise RuntimeError(
            f"only {max_processes} processes seen under the job's driver: its Ray ran elsewhere, "
            "so its memory was not measured; unset RAY_ADDRESS and ray_address"
        )
    return {
        "n_pairs": n_pairs,
        "input": input_info,
        "command": "python " + " ".join(job_command),
        "seconds": seconds,
        "pairs_per_s": n_pairs / seconds,
        "attempts": attempt,
        **rows,
        "peak_pss_mb": tree.peak_pss_mb,
        "peak_rss_sum_mb": tree.peak_rss_mb,
        "driver_peak_rss_mb": driver["peak_rss_mb"],
        "driver_end_rss_mb": driver["end_rss_mb"],
        "max_processes": max_processes,
        "samples": len(tree.timeline),
        # The peak so far each time the job reported progress: does memory keep growing as pairs go by?
        "running_peak": _running_peaks(tree.timeline, progress),
        "timeline": _downsample(tree.timeline, 400),
        # Which processes' own PSS grew most once a tenth of the pairs were scored (start-up left out): a sum
        # that keeps climbing is some process keeping something.
        "growth_since_s": since_s,
        "growth_by_process": tree.growth(since_s),
    }


def _ratio(largest: float | None, smallest: float | None, goal: float) -> dict:
    ratio = largest / smallest if largest is not None and smallest else None
    return {"ratio": ratio, "met": None if ratio is None else ratio <= goal}


def run_streaming_memory(
    sizes: list[int],
    model: str,
    work_dir: str,
    overrides: list[str] = (),
    data_dir: str | None = None,
    interval_s: float = 1.0,
    timeout_s: float = 3600.0,
    keep_outputs: bool = False,
    job: str = "rerank",
) -> dict:
    """Runs every size (smallest first) and reports the peaks and the flatness ratios."""
    spec = JOBS[job]
    if any(item.split("=", 1)[0].strip() == spec.set_prefix + "ray_address" for item in overrides):
        raise InputError(
            f"the memory benchmark starts a Ray of its own for each run; drop --set "
            f"{spec.set_prefix}ray_address"
        )
    runs = []
    for n in sorted(sizes):
        run_dir = os.path.join(work_dir, f"{job}-{n}")
        runs.append(
            run_size(n, model, run_dir, list(overrides), data_dir, interval_s, timeout_s, spec)
        )
        log.info(
            "%s pairs: %.0f s, %.0f pairs/s, peak PSS %.0f MB, peak RSS sum %.0f MB, driver peak RSS %.0f MB",
            f"{n:,}",
            runs[-1]["seconds"],
            runs[-1]["pairs_per_s"],
            runs[-1]["peak_pss_mb"] or float("nan"),
            runs[-1]["peak_rss_sum_mb"],
            runs[-1]["driver_peak_rss_mb"],
        )
        if not keep_outputs:
            shutil.rmtree(run_dir, ignore_errors=True)
    metric = "peak_pss_mb" if all(r["peak_pss_mb"] is not None for r in runs) else "peak_rss_sum_mb"
    smallest, largest = runs[0], runs[-1]
    several = len(runs) > 1
    # Within the largest run: its peak so far once it had scored as many pairs as the smallest input, and
    # its peak at the end. Separate runs differ in more than size (a short run ends before the scorer's
    # heap has seen its largest batches); one run shows whether memory grows while pairs stream through.
    then = next(
        (
            p[metric]
            for p in largest["running_peak"]
            if p["pairs"] >= smallest["n_pairs"] and p[metric]
        ),
        None,
    )
    driver_then = next(
        (
            p["driver_peak_rss_mb"]
            for p in largest["running_peak"]
            if p["pairs"] >= smallest["n_pairs"] and p["driver_peak_rss_mb"]
        ),
        None,
    )
    driver = {
        "smallest_mb": smallest["driver_peak_rss_mb"],
        "largest_mb": largest["driver_peak_rss_mb"],
        "across_runs": _ratio(
            largest["driver_peak_rss_mb"], smallest["driver_peak_rss_mb"], spec.goal
        )
        if several
        else {"ratio": None, "met": None},
        "within_largest": {
            "peak_at_smallest_mb": driver_then,
            "peak_at_end_mb": largest["driver_peak_rss_mb"],
            **(
                _ratio(largest["driver_peak_rss_mb"], driver_then, spec.goal)
                if several
                else {"ratio": None, "met": None}
            ),
        },
        "limit_mb": spec.driver_limit_mb,
        "under_limit": None
        if spec.driver_limit_mb is None
        else largest["driver_peak_rss_mb"] < spec.driver_limit_mb,
    }
    return {
        "job": job,
        "machine": machine_info(),
        "load_average_after": load_average(),
        "model": model,
        "overrides": [*spec.default_overrides, *overrides],
        "interval_s": interval_s,
        "runs": runs,
        "flatness": {
            "metric": metric,
            "smallest": smallest["n_pairs"],
            "largest": largest["n_pairs"],
            "goal": spec.goal,
            "across_runs": _ratio(largest[metric], smallest[metric], spec.goal)
            if several
            else {"ratio": None, "met": None},
            "within_largest": {
                "peak_at_smallest_mb": then,
                "peak_at_end_mb": largest[metric],
                **(
                    _ratio(largest[metric], then, spec.goal)
                    if several
                    else {"ratio": None, "met": None}
                ),
            },
            "driver": driver,
        },
    }


def markdown(report: dict) -> str:
    lines = [
        "| pairs | seconds | pairs/s | peak PSS, whole job (MB) | peak RSS summed (MB) | driver peak RSS (MB) "
        "| processes |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        pss = "n/a" if r["peak_pss_mb"] is None else f"{r['peak_pss_mb']:.0f}"
        lines.append(
            f"| {r['n_pairs']:,} | {r['seconds']:.0f} | {r['pairs_per_s']:.0f} | {pss} | "
            f"{r['peak_rss_sum_mb']:.0f} | {r['driver_peak_rss_mb']:.0f} | {r['max_processes']} |"
        )
    flat = report["flatness"]
    verdict = lambda part: (
        f"{part['ratio']:.2f}x (goal <= {flat['goal']}x: {'met' if part['met'] else 'not met'})"
    )
    if flat["across_runs"]["ratio"] is not None:
        lines += [
            "",
            f"Peak ({flat['metric']}) of the {flat['largest']:,}-pair run over the {flat['smallest']:,}-pair "
            f"run's: {verdict(flat['across_runs'])}.",
        ]
    within = flat["within_largest"]
    if within["ratio"] is not None:
        lines += [
            f"Within the {flat['largest']:,}-pair run, its peak at the end over its peak when {flat['smallest']:,} "
            f"pairs were scored ({within['peak_at_end_mb']:.0f} / {within['peak_at_smallest_mb']:.0f} MB): "
            f"{verdict(within)}."
        ]
    driver = flat["driver"]
    if driver["across_runs"]["ratio"] is not None:
        lines += [
            f"Driver's own peak RSS (VmHWM) at {flat['largest']:,} pairs over {flat['smallest']:,} "
            f"({driver['largest_mb']:.0f} / {driver['smallest_mb']:.0f} MB): {verdict(driver['across_runs'])}."
        ]
    if driver["within_largest"]["ratio"] is not None:
        part = driver["within_largest"]
        lines += [
            f"Within the {flat['largest']:,}-pair run, the driver's peak at the end over its peak when "
            f"{flat['smallest']:,} pairs were scored ({part['peak_at_end_mb']:.0f} / "
            f"{part['peak_at_smallest_mb']:.0f} MB): {verdict(part)}."
        ]
    if driver["limit_mb"] is not None:
        lines += [
            f"Driver's peak at {flat['largest']:,} pairs under {driver['limit_mb']:.0f} MB: "
            f"{'met' if driver['under_limit'] else 'not met'} ({driver['largest_mb']:.0f} MB)."
        ]
    largest = report["runs"][-1]
    if largest.get("growth_by_process"):
        lines += [
            "",
            f"Processes whose own PSS grew most during the {largest['n_pairs']:,}-pair run, from when a tenth "
            f"of its pairs were scored ({largest['growth_since_s']:.0f} s; a process started later: from its "
            "start) to when last seen:",
            "",
            "| process | pid | from-to (s) | PSS then (MB) | PSS last (MB) | growth (MB) | peak (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in largest["growth_by_process"]:
            lines.append(
                f"| `{p['name']}` | {p['pid']} | {p['from_s']:.0f}-{p['to_s']:.0f} | {p['from_mb']:.0f} | "
                f"{p['to_mb']:.0f} | {p['growth_mb']:+.0f} | {p['peak_mb']:.0f} |"
            )
    m = report["machine"]
    lines += [
        "",
        f"Job: {report['job']}; model: {report['model']}; settings: "
        f"{', '.join(report['overrides']) or 'defaults'}; machine: {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}.",
    ]
    return "\n".join(lines)
