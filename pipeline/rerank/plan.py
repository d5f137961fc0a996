"""The plan of one run, decided on the driver before any work: what the input is (its fingerprint), how it is cut
into shards and ranking buckets, which shards an earlier run committed, and which variant of the pipeline runs
(with the score cache or not, int8 or not) with which stage classes.

A finished output of the same settings and input is this run's result (`finished_run`); an unfinished one of the
same identity is resumed (`plan_run`); anything else is refused before it is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.parquet as pq

from pipeline.core.errors import OutputError
from pipeline.core.storage import join, map_paths, protocol_prefix, read_own_file, write_json
from pipeline.rerank.cache import CacheSpec
from pipeline.rerank.commits import read_manifests
from pipeline.rerank.config import Int8Config, RerankConfig
from pipeline.rerank.job_files import JobIdentity, Summary, settings_differences
from pipeline.rerank.stages.lookup import JoinBucket, KeysOfShard, PublishBucket, ReadShardCached
from pipeline.rerank.stages.rank import RankBucket
from pipeline.rerank.stages.read import ReadShard, Shard, plan_shards, query_ids_unique
from pipeline.rerank.stages.score import ScoreStage
from pipeline.rerank.stages.tokenize import TokenizeStage
from pipeline.rerank.stages.validate import InputLayout
from pipeline.rerank.stages.write import WriteScored

logger = logging.getLogger("rerank")


def utc_now() -> str:
    """Now, as summary.json and the score cache's run records write it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StageClasses:
    """The class that runs each step of the pipeline (`compose.py` says where and how many). A test passes a
    subclass to inject a fault at a named step, e.g. a scorer that dies mid-batch or one that never returns."""

    read: type = ReadShard
    read_cached: type = (
        ReadShardCached  # the reader with the score cache: attaches what the lookup found
    )
    tokenize: type = TokenizeStage
    score: type = ScoreStage
    write: type = WriteScored
    keys: type = KeysOfShard
    join: type = JoinBucket
    publish: type = PublishBucket
    rank: type = RankBucket


def settings_hash(config: RerankConfig) -> str:
    """summary.json's `config_hash`: a hash of `RerankConfig.result_settings()` (what changes the output)."""
    return hashlib.sha256(
        json.dumps(config.result_settings(), sort_keys=True).encode()
    ).hexdigest()[:16]


def input_fingerprint(fs, files: list[str]) -> dict:
    """What identifies the input without reading it: every file's path, size and version (ETag on object
    storage, modification time on disks), from the listing. Any rewrite of a file changes it."""

    def version(path: str) -> list:
        info = fs.info(path)
        tag = next(
            (
                info[k]
                for k in (
                    "ETag",
                    "etag",
                    "md5Hash",
                    "generation",
                    "mtime",
                    "LastModified",
                    "updated",
                    "last_modified",
                )
                if info.get(k) is not None
            ),
            None,
        )
        return [path, int(info.get("size") or 0), str(tag)]

    listing = map_paths(version, files)
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return {"files": len(files), "bytes": sum(v[1] for v in listing), "sha256": digest}


def describe_input(uri: str | None, fingerprint: dict | None) -> str:
    if not fingerprint:
        return f"{uri or 'an unknown input'} (no input fingerprint recorded)"
    return f"{uri} ({fingerprint['files']} file(s), {fingerprint['bytes']:,} bytes, fingerprint {fingerprint['sha256']})"


def input_row_bytes(fs, files: list[str], layout: InputLayout) -> int:
    """Bytes of one input pair as read (the columns the job reads, uncompressed), from the Parquet footers of
    every file (metadata only, read in parallel): the largest row group's mean, so a few big-document files are
    not averaged away. A single outsize pair inside a row group of small ones is not seen here; the stall
    watchdog names the batch it blocks."""
    columns = set(layout.read_columns)
    doc_ids = f"{layout.candidates}.list.element.{layout.config.doc_id_column}"

    def per_pair(path: str) -> float:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        worst = 0.0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            chunks = [group.column(c) for c in range(group.num_columns)]
            size = sum(
                c.total_uncompressed_size
                for c in chunks
                if c.path_in_schema.split(".")[0] in columns
            )
            pairs = group.num_rows
            if layout.grouped:  # a row is a query: its candidates are the pairs
                pairs = next((c.num_values for c in chunks if c.path_in_schema == doc_ids), pairs)
            if pairs:
                worst = max(worst, size / pairs)
        return worst

    return int(max(map_paths(per_pair, files), default=0))


@dataclass
class RunPlan:
    """What one run works on, decided on the driver before any work: small (paths, counts, shard plan), never data."""

    config: RerankConfig
    input_uri: str
    output_uri: (
        str  # absolute, with its protocol: workers resolve it the same way wherever they run
    )
    out_fs: Any
    out_root: str
    files: list[str]
    fingerprint: dict  # input_fingerprint(files)
    layout: InputLayout
    model: dict  # preflight.check_model()
    shards: list[Shard]
    rank_per_shard: (
        bool  # grouped input whose query ids are unique: a shard is its own ranking bucket
    )
    num_buckets: int
    committed: set[int] = field(default_factory=set)  # shards whose manifest an earlier run wrote
    cache: CacheSpec | None = (
        None  # the score cache's folder for this model and settings (cache.uri set)
    )
    dtype: str | None = None  # the scorers' dtype, when the cache needed `auto` resolved up front
    input_row_bytes: int = (
        0  # bytes of one input pair as read (`input_row_bytes`): sizes the hand-offs
    )
    stages: StageClasses = field(default_factory=StageClasses)

    @property
    def protocol(self) -> str:
        return protocol_prefix(self.output_uri)

    @property
    def work(self) -> str:
        return join(self.out_root, "_work")

    @property
    def work_uri(self) -> str:
        return self.protocol + self.work

    @property
    def manifests_dir(self) -> str:
        return join(self.work, "manifests")

    def manifest(self, shard: int) -> str:
        return join(self.manifests_dir, f"shard-{shard:05d}.json")

    @property
    def total_pairs(self) -> int:
        return sum(s.num_pairs for s in self.shards)

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.shard not in self.committed]

    def identity(self) -> dict:
        """What a resumed run must share with the run that started the output."""
        return {
            "config_hash": settings_hash(self.config),
            "input_fingerprint": self.fingerprint,
            "num_buckets": self.num_buckets,
            "shards": len(self.shards),
            "rank_per_shard": self.rank_per_shard,
        }

    # -- the variant that runs: decided here, so that the composition is one table -------------------------

    @property
    def reader(self) -> type:
        """The read stage's class: with the score cache, the reader attaches what the lookup found."""
        return self.stages.read if self.cache is None else self.stages.read_cached

    @property
    def reader_cache_args(self) -> dict:
        """The score cache's arguments of the read stage (none without the cache)."""
        if self.cache is None:
            return {}
        return {"spec": self.cache, "lookup_uri": f"{self.work_uri}/lookup"}

    @property
    def cache_buckets(self) -> int | None:
        """The score cache's bucket count, for the writer that stages new entries (None: no cache)."""
        return None if self.cache is None else self.cache.buckets

    @property
    def scorer_dtype(self) -> str:
        """The dtype the scorers are given: `auto` resolved where the cache's fingerprint needed it."""
        return self.dtype or self.config.dtype

    @property
    def int8(self) -> Int8Config | None:
        """The int8 section the scorers quantize with; None unless they run int8."""
        return self.config.int8 if self.scorer_dtype == "int8" else None


def finished_run(config, out_fs, out_root, output_uri, input_uri, fingerprint) -> dict | None:
    """The summary of a finished run of the same settings and input, None if there is none; any other finished
    run is refused rather than reported as this run's result."""
    summary_path = join(out_root, "summary.json")
    if not out_fs.exists(summary_path):
        return None
    protocol = protocol_prefix(output_uri)
    summary = read_own_file(
        out_fs,
        summary_path,
        Summary,
        "summary of a finished run",
        f"delete {output_uri} to run again, or use another --output",
        protocol,
    )
    previous = summary.model_dump(mode="json")
    if summary.config_hash != settings_hash(config):
        differ = settings_differences(summary.settings or summary.config, config.result_settings())
        raise OutputError(
            f"{output_uri} already holds a finished run with other settings ("
            + (
                differ
                or f"model {summary.model!r}, settings hash {summary.config_hash} there, "
                f"{settings_hash(config)} in this run"
            )
            + "); use another --output, or delete it to "
            "run again"
        )
    if previous.get("input_fingerprint") != fingerprint:
        raise OutputError(
            f"{output_uri} already holds a finished run of another input: it ranked "
            f"{describe_input(previous.get('input_uri'), previous.get('input_fingerprint'))}, this "
            f"run's input is {describe_input(input_uri, fingerprint)}; use another --output, "
            "or delete it to run again"
        )
    if out_fs.exists(
        join(out_root, "_work")
    ):  # a crash after the summary, before the staging was removed
        out_fs.rm(join(out_root, "_work"), recursive=True)
    logger.info(
        "%s is already complete (summary.json exists, same settings and input); nothing to do",
        output_uri,
    )
    return previous


def plan_run(
    config, input_uri, output_uri, out_fs, out_root, in_fs, files, fingerprint, layout, model
) -> RunPlan:
    """The shard plan (from Parquet metadata), checked against an unfinished run's, whose committed shards
    are kept."""
    shards = plan_shards(in_fs, files, layout, config.input.rows_per_shard)
    total_pairs = sum(s.num_pairs for s in shards)
    # Grouped input ranks each shard on its own (no shuffle) only if no query id spans two rows.
    rank_per_shard = layout.grouped and query_ids_unique(in_fs, files, config.input.query_id_column)
    if layout.grouped and not rank_per_shard:
        logger.info(
            "grouped input repeats query ids across rows: ranking by hash(query_id) buckets instead"
        )
    num_buckets = (
        len(shards) if rank_per_shard else max(1, -(-total_pairs // config.output.rows_per_bucket))
    )
    plan = RunPlan(
        config,
        input_uri,
        output_uri,
        out_fs,
        out_root,
        files,
        fingerprint,
        layout,
        model,
        shards,
        rank_per_shard,
        num_buckets,
    )

    identity_path = join(plan.work, "job.json")
    identity = plan.identity() | {"settings": config.result_settings()}
    # glob, not ls: object stores have no folders, an empty prefix simply lists nothing.
    manifests = sorted(out_fs.glob(join(plan.manifests_dir, "shard-*.json")))
    if out_fs.exists(identity_path):
        work_uri = plan.protocol + plan.work
        earlier = read_own_file(
            out_fs,
            identity_path,
            JobIdentity,
            "record of an unfinished run",
            f"delete {work_uri} to start this output over (its committed shards are scored again)",
            plan.protocol,
        )
        if (
            earlier.model_dump(mode="json", exclude={"settings"}, include=set(plan.identity()))
            != plan.identity()
        ):
            if manifests:
                differ = settings_differences(earlier.settings, config.result_settings())
                what = differ or (
                    "another input"
                    if earlier.input_fingerprint.model_dump() != fingerprint
                    else "other settings or input"
                )
                raise OutputError(
                    f"{output_uri} holds an unfinished run with other settings or input ({what}; "
                    f"{len(manifests)} shard(s) committed); rerun it with its settings to finish it, "
                    "use another --output, or delete it to start over"
                )
            # A run that committed no shard (refused before any work, or stopped before its first commit) left
            # nothing worth resuming: this run starts the output over with its own settings.
            logger.info(
                "the unfinished run in %s committed no shard; starting over with this run's settings",
                output_uri,
            )
            out_fs.rm(plan.work, recursive=True)
            out_fs.makedirs(plan.work, exist_ok=True)
            write_json(out_fs, identity_path, identity)
        else:
            logger.info("resuming the unfinished run in %s", output_uri)
    else:
        out_fs.makedirs(plan.work, exist_ok=True)
        write_json(out_fs, identity_path, identity)
    out_fs.makedirs(plan.manifests_dir, exist_ok=True)
    # Every committed manifest is checked now, before any work, not after an hour of scoring the others.
    plan.committed = {
        m.shard for m in read_manifests(out_fs, manifests, len(shards), plan.protocol)
    }
    for (
        shard
    ) in plan.pending:  # staging files of a shard that never committed were written before a crash
        stale = join(plan.work, "scored", f"shard-{shard.shard:05d}")
        if out_fs.exists(stale):
            out_fs.rm(stale, recursive=True)
    logger.debug(
        "shards: %s; ranking buckets: %d (%s); input fingerprint %s",
        ", ".join(
            f"{s.shard}={posixpath.basename(s.path)}:{len(s.row_groups)} row groups/{s.num_pairs} pairs"
            for s in shards[:20]
        )
        + (f" ... (+{len(shards) - 20})" if len(shards) > 20 else ""),
        num_buckets,
        "one per shard" if rank_per_shard else "hash(query_id)",
        fingerprint["sha256"],
    )
    logger.info(
        "%s pairs in %d shard(s) (%s input); %d already done, %d to score; model %s (%s layout)",
        f"{total_pairs:,}",
        len(shards),
        "grouped" if layout.grouped else "long",
        len(plan.committed),
        len(plan.pending),
        config.model,
        model["layout"] or "read by the scorers",
    )
    return plan
