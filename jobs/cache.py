"""python -m jobs.cache {stats,compact,prune,verify,repair} --cache URI [--older-than 30d] [--set k=v ...]

Keeps a score cache (the rerank job's `cache.uri`) healthy. stats: entries, files and bytes per model folder,
and the files that do not read. compact: merges each bucket's files into one (runs add a file per bucket each).
prune: compact, dropping entries no run has found or written for --older-than. verify: reads every file fully
and names each one that does not read (exit 2). repair: rewrites a missing or wrong _cache.json from the
entries of its bucket folders. Files that do not read are moved to <folder>/_quarantine/ by compact and prune
(and by the rerank job), never merged or removed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Sequence

from pipeline.core.cli import JobArgumentParser, run_main, setup_logging
from pipeline.core.config import StrictModel, load_config
from pipeline.core.errors import ConfigError, OutputError
from pipeline.core.storage import join, map_paths, protocol_prefix, url_to_fs
from pipeline.rerank.cache import (
    bucket_stats,
    compact_bucket,
    fingerprint_folders,
    list_caches,
    quarantined_files,
    read_runs,
    repair_meta,
    verify_bucket,
)
from pipeline.rerank.lease import LEASE_FILE, OutputLease

logger = logging.getLogger("jobs.cache")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CacheJobConfig(StrictModel):
    storage_options: dict = {}  # fsspec options of the cache's storage (s3fs: key, secret, endpoint_url...)


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise ConfigError(
            f"--older-than {text!r}: write a number and a unit, e.g. 30d, 12h, 90m (s, m, h, d, w)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = JobArgumentParser(
        prog="python -m jobs.cache", description=" ".join(__doc__.split("\n\n")[1].split())
    )
    parser.add_argument("command", choices=["stats", "compact", "prune", "verify", "repair"])
    parser.add_argument(
        "--cache", required=True, help="the cache's URI (the rerank job's cache.uri)"
    )
    parser.add_argument(
        "--older-than", help="prune: drop entries unused for this long (30d, 12h, 90m)"
    )
    parser.add_argument("--config", help="YAML with storage_options")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set storage_options.endpoint_url=http://...",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "prune" and not args.older_than:
        raise ConfigError("prune needs --older-than (e.g. --older-than 30d)")
    if args.older_than and args.command != "prune":
        raise ConfigError("--older-than belongs to prune; compact keeps every entry")
    older_than = parse_age(args.older_than) if args.older_than else None
    config = load_config(CacheJobConfig, args.config, args.overrides)
    if args.command == "repair":
        return _repair(args.cache, config.storage_options)
    caches = list_caches(args.cache, config.storage_options)
    if not caches:
        raise ConfigError(
            f"no score cache under {args.cache} (no <fingerprint>/_cache.json); pass the folder a "
            "rerank job used as cache.uri"
        )
    if args.command == "verify":
        return _verify(args.cache, caches)
    report = []
    for spec in caches:
        fs, root = spec.fs()
        shown = _shown(spec.uri)
        buckets = list(range(spec.buckets))
        if args.command == "stats":
            per_bucket = map_paths(lambda b: bucket_stats(fs, root, b), buckets, max_workers=8)
            runs = read_runs(spec)
            unreadable = [
                dict(u, path=shown(u["path"])) for b in per_bucket for u in b["unreadable"]
            ]
            for u in unreadable:
                logger.warning(
                    "%s does not read (%s); `compact` moves it to _quarantine/",
                    u["path"],
                    u["reason"],
                )
            report.append(
                {
                    "fingerprint": spec.fingerprint,
                    "uri": spec.uri,
                    "buckets": spec.buckets,
                    "entries": sum(b["entries"] for b in per_bucket),
                    "files": sum(b["part_files"] + b["hits_files"] for b in per_bucket),
                    "bytes": sum(b["bytes"] for b in per_bucket),
                    "bytes_per_million_entries": _per_million(per_bucket),
                    "unreadable_files": unreadable,
                    "quarantined_files": len(quarantined_files(fs, root)),
                    "runs": len(runs),
                    "last_run": runs[-1] if runs else None,
                }
            )
            continue
        # One maintenance run per folder at a time: a second one waits its turn or stops (the lease).
        with _MaintenanceLease(fs, root, spec.uri):
            per_bucket = map_paths(
                lambda b: compact_bucket(fs, root, b, older_than_s=older_than),
                buckets,
                max_workers=8,
            )
        unreadable = [
            {
                "path": shown(u["path"]),
                "reason": u["reason"],
                "moved_to": shown(u["moved_to"]) if u["moved_to"] else None,
            }
            for b in per_bucket
            for u in b["unreadable"]
        ]
        for u in unreadable:
            logger.warning(
                "%s does not read (%s): skipped, moved to %s (its pairs are scored again)",
                u["path"],
                u["reason"],
                u["moved_to"] or "_quarantine/ by another run",
            )
        report.append(
            {
                "fingerprint": spec.fingerprint,
                "files_before": sum(b["files"] for b in per_bucket),
                "entries": sum(b["entries"] for b in per_bucket),
                "dropped": sum(b["dropped"] for b in per_bucket),
                "unreadable_files": unreadable,
            }
        )
    print(json.dumps(report, indent=2))
    return 0


def _shown(uri: str):
    """A storage path as a user names it: with the cache URI's protocol."""
    protocol = protocol_prefix(uri)
    return lambda path: protocol + path


class _MaintenanceLease(OutputLease):
    """The folder's lease, refused in the words of this command (the output lease speaks of --output)."""

    def __enter__(self):
        try:
            return super().__enter__()
        except OutputError:
            try:
                holder = json.loads(self.fs.cat_file(self.path))
                who = f"{holder['user']}@{holder['host']}, pid {holder['pid']}, started {holder['started']}"
            except (OSError, ValueError, KeyError, TypeError):  # released meanwhile, or unreadable
                who = "holder unknown"
            raise OutputError(
                f"{self.uri} is being compacted or pruned by another run ({who}); wait for it to finish and run "
                f"this command again (a killed run's lease, {join(self.uri, LEASE_FILE)}, is taken over after "
                f"{self.timeout_s:.0f} s without a heartbeat, at once on its own machine)"
            ) from None


def _verify(cache_uri: str, caches) -> int:
    """Read every file of every bucket; one line per file that does not read and exit 2, or a count."""
    files, bad = 0, []
    for spec in caches:
        fs, root = spec.fs()
        shown = _shown(spec.uri)
        for read, unreadable in map_paths(
            lambda b: verify_bucket(fs, root, b), list(range(spec.buckets)), max_workers=8
        ):
            files += read
            bad += [(shown(u.path), u.reason) for u in unreadable]
    if bad:
        for path, reason in bad:
            print(f"unreadable: {path}: {reason}", file=sys.stderr)
        raise ConfigError(
            f"{len(bad)} of {files} score cache files under {cache_uri} do not read (listed above); "
            f"`python -m jobs.cache compact --cache {cache_uri}` moves them to _quarantine/ (their "
            "pairs are scored again), as the next rerank job that reads them does"
        )
    print(f"{files} files in {len(caches)} cache folder(s) under {cache_uri} read fully: all good")
    return 0


def _repair(cache_uri: str, storage_options: dict) -> int:
    fs, root = url_to_fs(cache_uri, storage_options)
    protocol = protocol_prefix(cache_uri)
    folders = fingerprint_folders(fs, root)
    if not folders:
        raise ConfigError(
            f"no score cache under {cache_uri} (no <fingerprint>/ folder with _cache.json or "
            "bucket folders); pass the folder a rerank job used as cache.uri"
        )
    report = []
    for folder in folders:
        repaired = repair_meta(fs, folder, cache_uri, protocol)
        if repaired:
            logger.warning(
                "%s: rewrote _cache.json with %d buckets, read back from %d keys",
                repaired["uri"],
                repaired["buckets"],
                repaired["keys"],
            )
        report.append(repaired or {"uri": protocol + folder, "problem": None})
    print(json.dumps(report, indent=2))
    return 0


def _per_million(per_bucket: list[dict]) -> int | None:
    entries = sum(b["entries"] for b in per_bucket)
    return round(sum(b["bytes"] for b in per_bucket) / entries * 1e6) if entries else None


if __name__ == "__main__":
    run_main(main)
