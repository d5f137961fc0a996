"""What the score cache costs when nothing hits, and what it saves when most pairs repeat.

    python -m jobs.benchmark_cache [--model dummy:jina-reranker-v2-base] [--pairs 4300] [--changed 0.1]
                                   [--output results/cache-cpu.json] [--work-dir DIR] [--set key=value ...]

Runs `python -m jobs.rerank` as a user does (its own process, its own local Ray), timed end to end, on DL19's
first --pairs pairs (day 1) and on the same pairs with --changed of the documents rewritten (day 2):

    no cache, day 1        the baseline
    cold cache, day 1      0% hits: the cache's cost (lookup, staging, publishing) over the baseline
    warm cache, day 1      100% hits
    no cache, day 2        day 2's baseline
    warm cache, day 2      (1 - changed) hits: the nightly case

Reports pairs/s end to end (input pairs over wall seconds, Ray's start included) and the ratios, as JSON and
a markdown table beside it. The default model has the jina-reranker-v2-base shape with random weights, so
scoring costs what the real model's does on this CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.benchmark.machine import load_average, machine_info
from pipeline.benchmark.report import write_report
from pipeline.core.cli import JobArgumentParser, run_main, setup_logging
from pipeline.core.errors import InputError, PipelineError
from pipeline.datasets.tables import default_data_dir

log = logging.getLogger("jobs.benchmark_cache")
ROOT = Path(__file__).resolve().parents[1]
RUNS = [
    ("no cache, day 1", "day1", False),
    ("cold cache, day 1", "day1", True),
    ("warm cache, day 1", "day1", True),
    ("no cache, day 2", "day2", False),
    ("warm cache, day 2", "day2", True),
]


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog="python -m jobs.benchmark_cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="dummy:jina-reranker-v2-base",
        help="checkpoint (default: the jina-reranker-v2-base shape, random weights)",
    )
    parser.add_argument(
        "--pairs", type=int, default=4300, help="DL19 pairs per run (default 4300: all of them)"
    )
    parser.add_argument(
        "--changed",
        type=float,
        default=0.1,
        help="share of day 2's documents rewritten (default 0.1)",
    )
    parser.add_argument(
        "--output", default="results/cache-cpu.json", help="JSON report (the .md goes beside it)"
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="inputs, outputs and the cache (default: a temporary folder)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder (default: SHARED_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds one run may take (default 3600)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the rerank job, e.g. scorer.max_tokens_per_batch=8192 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def make_inputs(data_dir: Path, pairs: int, changed: float, work: Path) -> dict[str, str]:
    """Day 1: DL19's first `pairs` pairs. Day 2: the same, every round(1/changed)-th document rewritten."""
    path = data_dir / "trec-dl" / "retrieve_results_dl19.json"
    if not path.exists():
        raise InputError(f"{path} not found; pass --data-dir, the shared data folder")
    with open(path) as f:
        topics = json.load(f)
    rows = [
        {
            "query_id": str(h["qid"]),
            "query": t["query"],
            "doc_id": str(h["docid"]),
            "document": h["content"],
        }
        for t in topics
        for h in t["hits"]
    ][:pairs]
    if len(rows) < pairs:
        raise InputError(f"--pairs {pairs}: DL19 has {len(rows)} pairs")
    if not 0 < changed < 1:
        raise InputError(f"--changed {changed}: give a share between 0 and 1, e.g. 0.1")
    step = max(1, round(1 / changed))
    day2 = [
        dict(r, document=r["document"] + " (updated)") if i % step == 0 else r
        for i, r in enumerate(rows)
    ]
    out = {}
    for name, table in (("day1", rows), ("day2", day2)):
        out[name] = str(work / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(table), out[name], row_group_size=1000)
    return out


def run_job(
    model: str,
    input_path: str,
    output: Path,
    cache: Path | None,
    overrides: list[str],
    timeout: float,
) -> dict:
    args = [
        sys.executable,
        "-m",
        "jobs.rerank",
        "--input",
        input_path,
        "--output",
        str(output),
        "--model",
        model,
    ]
    for o in overrides + ([f"cache.uri={cache}"] if cache else []):
        args += ["--set", o]
    start = time.monotonic()
    result = subprocess.run(
        args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.monotonic() - start
    if result.returncode != 0:
        raise PipelineError(
            f"the rerank job failed on {input_path}: {result.stderr.strip().splitlines()[-1:]}"
        )
    return run_report(json.loads((output / "summary.json").read_text()), wall)


def run_report(summary: dict, wall: float) -> dict:
    """One run's row: the job's own accounting from its summary, and its wall time end to end."""
    return {
        "wall_s": round(wall, 2),
        "input_rows": summary["input_rows"],
        "scored_rows": summary["scored_rows"],
        "rejected_rows": summary["rejected_rows"],
        "pairs_scored": summary["pairs_scored"],
        "cache_hits": summary.get("cache_hits"),
        "model_pairs_per_s": summary.get("model_pairs_per_s"),
        "scorer_seconds_saved": summary.get("scorer_seconds_saved"),
        "pairs_per_s_end_to_end": round(summary["input_rows"] / wall, 2),
        "load_average_after": load_average(),
    }


def run_benchmark(
    model: str,
    pairs: int,
    changed: float,
    data_dir: Path,
    work: Path,
    overrides: list[str],
    timeout: float,
    runner=None,
) -> dict:
    """`runner`: run_job's stand-in, same signature (the tests run the job in their own process and Ray)."""
    inputs = make_inputs(data_dir, pairs, changed, work)
    cache = work / "cache"
    runs = {}
    for k, (name, day, cached) in enumerate(RUNS):
        log.info("%s ...", name)
        runs[name] = (runner or run_job)(
            model, inputs[day], work / f"out-{k}", cache if cached else None, overrides, timeout
        )
        log.info(
            "%s: %.1f s, %s pairs scored", name, runs[name]["wall_s"], runs[name]["pairs_scored"]
        )

    storage = cache_storage(cache)

    def speed(a: str, b: str) -> float:
        """How many times faster run a is than run b, end to end."""
        return round(runs[b]["wall_s"] / runs[a]["wall_s"], 3)

    return {
        "model": model,
        "pairs": pairs,
        "changed": changed,
        "overrides": overrides,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "cache_storage": storage,
        "cold_cache_cost": round(
            1 - speed("cold cache, day 1", "no cache, day 1"), 3
        ),  # share of pairs/s lost
        "warm_speedup_day1": speed("warm cache, day 1", "no cache, day 1"),
        "warm_speedup_day2": speed("warm cache, day 2", "no cache, day 2"),
        "targets": {"cold_cache_cost_at_most": 0.05, "warm_speedup_day2_at_least": 5.0},
    }


def cache_storage(cache: Path) -> dict:
    """The cache's size after the runs, before and after `jobs.cache compact`: bytes per million entries."""
    from pipeline.rerank.cache import bucket_stats, compact_bucket, list_caches

    out = {}
    for stage in ("after the runs", "compacted"):
        entries = files = size = 0
        for spec in list_caches(str(cache), {}):
            fs, root = spec.fs()
            for b in range(spec.buckets):
                if stage == "compacted":
                    compact_bucket(fs, root, b)
                s = bucket_stats(fs, root, b)
                entries, files, size = (
                    entries + s["entries"],
                    files + s["part_files"] + s["hits_files"],
                    size + s["bytes"],
                )
        out[stage] = {
            "entries": entries,
            "files": files,
            "bytes": size,
            "bytes_per_million_entries": round(size / entries * 1e6) if entries else None,
        }
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Score cache, {report['model']}, {report['pairs']} DL19 pairs, day 2 with {report['changed']:.0%} of "
        f"the documents rewritten; {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {report['date']}.",
        "",
        "| run | wall s | pairs/s end to end | pairs scored | cache hits | load after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['pairs_per_s_end_to_end']:.1f} | {r['pairs_scored']} | "
            f"{r['cache_hits'] if r['cache_hits'] is not None else '-'} | {r['load_average_after']:.1f} |"
        )
    lines += [
        "",
        f"Cold cache cost (pairs/s lost at 0% hits): {report['cold_cache_cost']:.1%} (target <= 5%). "
        f"Warm day 1 (100% hits): {report['warm_speedup_day1']:.2f}x faster. Warm day 2 "
        f"({1 - report['changed']:.0%} hits): {report['warm_speedup_day2']:.2f}x faster (target >= 5x).",
        "Storage: "
        + "; ".join(
            f"{stage}: {v['entries']:,} entries in {v['files']} files, "
            f"{v['bytes_per_million_entries'] or 0:,} bytes per million entries"
            for stage, v in report["cache_storage"].items()
        )
        + ".",
        "A load above the core count means other work shared the CPUs during the run.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        report = run_benchmark(
            args.model, args.pairs, args.changed, data_dir, Path(work), args.overrides, args.timeout
        )
    table = write_report(
        args.output,
        report,
        markdown(report),
        "python -m jobs.benchmark_cache " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(markdown(report))
    print(f"report: {args.output}, {table}")
    return 0


if __name__ == "__main__":
    run_main(main)
