"""Do the rerank and hard-negative jobs stream with bounded memory? Their peaks at growing input sizes.

    python -m jobs.benchmark_memory [--job rerank|hard-negatives] [--pairs 100000,1000000] [--model dummy:tiny]
                                    [--output results/memory-cpu.json] [--work-dir DIR] [--set key=value ...]

Each size runs the job (`python -m jobs.rerank`, or `python -m jobs.hard_negatives` with `--job
hard-negatives`) once on DL19's pairs repeated to that size, a fresh local Ray each time; the driver, Ray's
processes and every actor are sampled from /proc once a second (PSS summed: shared pages such as the object
store counted once), and the driver's own peak resident set (the kernel's VmHWM) is recorded when it exits.
Reports the peaks per size and the largest size's peaks over the smallest's (rerank: <= 1.1x; hard negatives:
tree and driver <= 1.2x, driver under 1 GB), as JSON and a markdown table beside it. `--set` goes to the job
(e.g. --set scorer.max_tokens_per_batch=8192; for hard negatives --set rerank.scorer.max_tokens_per_batch=8192).
Every run must account for every input row.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence

from pipeline.benchmark.report import write_report
from pipeline.benchmark.streaming_memory import JOBS, markdown, run_streaming_memory
from pipeline.core.cli import JobArgumentParser, run_main, setup_logging
from pipeline.core.errors import InputError

log = logging.getLogger("jobs.benchmark_memory")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--pairs takes comma-separated pair counts, e.g. 100000,1000000; got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--pairs needs positive pair counts; got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog="python -m jobs.benchmark_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--job", choices=sorted(JOBS), default="rerank", help="the job measured (default: rerank)"
    )
    parser.add_argument(
        "--pairs", type=_sizes, default=[100_000, 1_000_000], help="input sizes, comma-separated"
    )
    parser.add_argument(
        "--model",
        default="dummy:tiny",
        help="checkpoint the rerank job loads (default: dummy:tiny)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON report (local path or s3://...; default: "
        "results/memory-cpu.json, results/memory-hard-negatives-cpu.json with --job hard-negatives)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="where inputs and outputs go (default: a temporary folder)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder (default: SHARED_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between memory samples"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds one size may run (default 3600)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the job, e.g. scorer.num_actors=2 (rerank) or "
        "rerank.scorer.num_actors=2 (hard negatives) (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.interval <= 0:
        raise InputError("--interval must be a positive number of seconds")
    if args.timeout <= 0:
        raise InputError("--timeout must be a positive number of seconds")
    output = args.output or (
        "results/memory-cpu.json" if args.job == "rerank" else f"results/memory-{args.job}-cpu.json"
    )
    with tempfile.TemporaryDirectory(prefix="benchmark-memory-") as tmp:
        report = run_streaming_memory(
            args.pairs,
            args.model,
            args.work_dir or tmp,
            args.overrides,
            data_dir=args.data_dir,
            interval_s=args.interval,
            timeout_s=args.timeout,
            keep_outputs=args.work_dir is not None,
            job=args.job,
        )
    report["command"] = "python -m jobs.benchmark_memory " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = markdown(report)
    write_report(output, report, table, report["command"])
    print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
