"""python -m jobs.cache {stats,compact,prune} --cache URI [--older-than 30d] [--set storage_options.k=v ...]

Keeps a score cache (the rerank job's `cache.uri`) healthy. stats: entries, files and bytes per model folder.
compact: merges each bucket's files into one (runs add a file per bucket each). prune: compact, dropping
entries no run has found or written for --older-than.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from pipeline.cache import bucket_stats, compact_bucket, list_caches, read_runs
from pipeline.cli import JobArgumentParser, run_main, setup_logging
from pipeline.config import StrictModel, load_config
from pipeline.errors import ConfigError
from pipeline.lease import OutputLease
from pipeline.storage import map_paths

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CacheJobConfig(StrictModel):
    storage_options: dict = {}   # fsspec options of the cache's storage (s3fs: key, secret, endpoint_url...)


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise ConfigError(f"--older-than {text!r}: write a number and a unit, e.g. 30d, 12h, 90m (s, m, h, d, w)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = JobArgumentParser(prog="python -m jobs.cache", description=" ".join(__doc__.split("\n\n")[1].split()))
    parser.add_argument("command", choices=["stats", "compact", "prune"])
    parser.add_argument("--cache", required=True, help="the cache's URI (the rerank job's cache.uri)")
    parser.add_argument("--older-than", help="prune: drop entries unused for this long (30d, 12h, 90m)")
    parser.add_argument("--config", help="YAML with storage_options")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set storage_options.endpoint_url=http://...")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "prune" and not args.older_than:
        raise ConfigError("prune needs --older-than (e.g. --older-than 30d)")
    if args.older_than and args.command != "prune":
        raise ConfigError("--older-than belongs to prune; compact keeps every entry")
    older_than = parse_age(args.older_than) if args.older_than else None
    config = load_config(CacheJobConfig, args.config, args.overrides)
    caches = list_caches(args.cache, config.storage_options)
    if not caches:
        raise ConfigError(f"no score cache under {args.cache} (no <fingerprint>/_cache.json); pass the folder a "
                          "rerank job used as cache.uri")
    report = []
    for spec in caches:
        fs, root = spec.fs()
        buckets = list(range(spec.buckets))
        if args.command == "stats":
            per_bucket = map_paths(lambda b: bucket_stats(fs, root, b), buckets, max_workers=8)
            runs = read_runs(spec)
            report.append({"fingerprint": spec.fingerprint, "uri": spec.uri, "buckets": spec.buckets,
                           "entries": sum(b["entries"] for b in per_bucket),
                           "files": sum(b["part_files"] + b["hits_files"] for b in per_bucket),
                           "bytes": sum(b["bytes"] for b in per_bucket),
                           "bytes_per_million_entries": _per_million(per_bucket),
                           "runs": len(runs), "last_run": runs[-1] if runs else None})
            continue
        # One maintenance run per folder at a time: a second one waits its turn or stops (the lease).
        with OutputLease(fs, root, spec.uri):
            per_bucket = map_paths(lambda b: compact_bucket(fs, root, b, older_than_s=older_than), buckets,
                                   max_workers=8)
        report.append({"fingerprint": spec.fingerprint, "files_before": sum(b["files"] for b in per_bucket),
                       "entries": sum(b["entries"] for b in per_bucket),
                       "dropped": sum(b["dropped"] for b in per_bucket)})
    print(json.dumps(report, indent=2))
    return 0


def _per_million(per_bucket: list[dict]) -> int | None:
    entries = sum(b["entries"] for b in per_bucket)
    return round(sum(b["bytes"] for b in per_bucket) / entries * 1e6) if entries else None


if __name__ == "__main__":
    run_main(main)
