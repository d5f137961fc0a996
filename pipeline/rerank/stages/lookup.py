"""The score cache's stages (cache.uri set): find cached pairs before tokenizing, publish new scores after.

Before scoring, for the shards left to score:
    KeysOfShard   (per shard)   -> <work>/lookup/shard-SSSSS/keys-KKKKK.parquet     key, _row of its valid pairs
    JoinBucket    (per bucket)  -> <work>/lookup/shard-SSSSS/found-KKKKK.parquet    _row, _cached, _cached_score
JoinBucket joins one cache bucket's entries with every key of the run that falls in it: a key the cache
holds is a hit (`_cached` 1, its score attached); of the pairs the cache does not hold, the first of each
key (lowest `_row`) is scored and any later pair with the same texts waits for its score (`_cached` 2), so a
pair repeated in the input is scored once. The read stage attaches these to its rows (`lookup_found`);
tokenizer and scorer pass cached rows through untouched.

After scoring (every shard committed), per bucket:
    PublishBucket -> new entries into the cache (cache.publish), and
                     <work>/cache/fill-KKKKK.parquet: _row, score, bucket (the waiting pairs' scores)
New entries come from the writer's staging (`cache-KKKKK-*.parquet` beside a shard's scored files, listed in
its manifest): a shard's entries exist only once it committed. The ranker fills waiting pairs from the fill
files before it ranks.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema as S
from pipeline.core.errors import PipelineError
from pipeline.core.storage import atomic_write, join, map_paths, protocol_prefix, url_to_fs
from pipeline.rerank import cache as C
from pipeline.rerank.stages.read import ReadShard, Shard
from pipeline.rerank.stages.validate import InputLayout

SCORE_IT, HIT, SAME_TEXTS = 0, 1, 2  # values of `_cached`
KEYS_SCHEMA = pa.schema([(C.KEY, C.KEY_TYPE), (S.ROW, pa.int64())])
FOUND_SCHEMA = pa.schema(
    [(S.ROW, pa.int64()), (S.CACHED, pa.int8()), (S.CACHED_SCORE, pa.float32())]
)
# Staged by the writer, per shard and cache bucket (stages/write.py).
NEW_SCHEMA = pa.schema(
    [
        (C.KEY, C.KEY_TYPE),
        (S.WINDOW, pa.int32()),
        (S.NUM_WINDOWS, pa.int32()),
        (S.SCORE, pa.float32()),
    ]
)
WAITING_SCHEMA = pa.schema([(C.KEY, C.KEY_TYPE), (S.ROW, pa.int64()), ("bucket", pa.int32())])
FILL_SCHEMA = pa.schema([(S.ROW, pa.int64()), (S.SCORE, pa.float32()), ("bucket", pa.int32())])


def with_keys(table: pa.Table, fingerprint: str) -> pa.Table:
    """`table` + `_cache_key`: the key of each valid pair's texts (null for rejected rows)."""
    valid = pc.is_null(table.column(S.REASON))
    queries = pc.if_else(
        valid, table.column(S.QUERY), pa.nulls(table.num_rows, pa.string())
    ).to_pylist()
    keys = C.pair_keys(fingerprint, queries, table.column(S.DOCUMENT).to_pylist())
    return table.append_column(S.CACHE_KEY, keys)


def _read(fs, path: str, schema: pa.Schema, **kwargs) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, schema=schema, **kwargs)


QUARANTINED = "cache-quarantined"  # <work>/cache-quarantined/bucket-KKKKK-<file>.json: {path, reason, moved_to}


def record_quarantined(
    fs, work_root: str, spec: C.CacheSpec, bucket: int, quarantined: list[dict]
) -> None:
    """Note in the run's staging each cache file this run found unreadable and moved aside (the driver names
    them in a warning and counts them in summary.json); paths with the cache's protocol."""
    protocol = protocol_prefix(spec.uri)
    for q in quarantined:
        record = {
            "path": protocol + q["path"],
            "reason": q["reason"],
            "moved_to": protocol + q["moved_to"] if q["moved_to"] else None,
        }
        path = join(
            work_root, QUARANTINED, f"bucket-{bucket:05d}-{posixpath.basename(q['path'])}.json"
        )
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        atomic_write(fs, path, lambda f: f.write(json.dumps(record, sort_keys=True).encode()))


def lookup_found(fs, lookup_root: str, table: pa.Table) -> pa.Table:
    """Attach `_cached` and `_cached_score` to one shard's rows (as ReadShard gives them, with keys) from the
    shard's found files; rows none of them name are to score."""
    shard = int(table.column(S.SHARD)[0].as_py()) if table.num_rows else 0
    paths = sorted(fs.glob(join(lookup_root, f"shard-{shard:05d}", "found-*.parquet")))
    found = map_paths(lambda p: _read(fs, p, FOUND_SCHEMA), paths, max_workers=16)
    cached = np.zeros(table.num_rows, np.int8)
    score = np.zeros(table.num_rows, np.float32)
    is_hit = np.zeros(table.num_rows, bool)
    if found:
        found = pa.concat_tables(found)
        position = (found.column(S.ROW).to_numpy() & 0xFFFFFFFF).astype(np.int64)
        states = found.column(S.CACHED).to_numpy()
        cached[position] = states
        hit = states == HIT
        score[position[hit]] = found.column(S.CACHED_SCORE).to_numpy(zero_copy_only=False)[hit]
        is_hit[position[hit]] = True
    table = table.append_column(S.CACHED, pa.array(cached))
    return table.append_column(S.CACHED_SCORE, pa.array(score, mask=~is_hit))


class KeysOfShard:
    """Reads a shard and writes its valid pairs' keys, split by cache bucket; reports one row per file."""

    def __init__(
        self,
        layout: InputLayout,
        storage_options: dict,
        uri: str,
        spec: C.CacheSpec,
        lookup_uri: str,
    ):
        self.reader = ReadShard(layout, storage_options, uri)
        self.spec = spec
        self.fs, self.root = url_to_fs(lookup_uri, storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = []
        for item in batch.to_pylist():
            shard = Shard.from_item(item)
            table = with_keys(self.reader.read(shard), self.spec.fingerprint)
            table = table.filter(pc.is_valid(table.column(S.CACHE_KEY)))
            keys = pa.table([table.column(S.CACHE_KEY), table.column(S.ROW)], schema=KEYS_SCHEMA)
            buckets = C.bucket_of_keys(keys.column(C.KEY), self.spec.buckets)
            folder = join(self.root, f"shard-{shard.shard:05d}")
            self.fs.makedirs(folder, exist_ok=True)
            for bucket in np.unique(buckets):
                part = keys.filter(pa.array(buckets == bucket))
                path = join(folder, f"keys-{int(bucket):05d}.parquet")
                with self.fs.open(path, "wb") as f:
                    pq.write_table(part, f)
                reports.append(
                    {
                        "shard": shard.shard,
                        "bucket": int(bucket),
                        "path": path,
                        "rows": part.num_rows,
                    }
                )
        return pa.Table.from_pylist(
            reports,
            schema=pa.schema(
                [
                    ("shard", pa.int32()),
                    ("bucket", pa.int32()),
                    ("path", pa.string()),
                    ("rows", pa.int64()),
                ]
            ),
        )


class JoinBucket:
    """Joins one cache bucket with the run's keys that fall in it; writes found files per shard."""

    def __init__(self, spec: C.CacheSpec, lookup_uri: str, storage_options: dict):
        self.spec = spec
        self.cache_fs, self.cache_root = spec.fs()
        self.fs, self.root = url_to_fs(lookup_uri, storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = []
        for item in batch.to_pylist():
            bucket = int(item["bucket"])
            keys = pa.concat_tables(
                map_paths(lambda p: _read(self.fs, p, KEYS_SCHEMA), item["files"], max_workers=16)
            )
            quarantined: list[dict] = []
            entries = C.read_bucket(self.cache_fs, self.cache_root, bucket, quarantined=quarantined)
            entries = entries.select([C.KEY, C.SCORE])
            # The lookup folder is <work>/lookup: the record goes beside it, kept when a resumed run looks up again.
            record_quarantined(
                self.fs, posixpath.dirname(self.root), self.spec, bucket, quarantined
            )
            joined = keys.join(entries, C.KEY, join_type="left outer").sort_by(
                [(S.ROW, "ascending")]
            )
            hit = pc.is_valid(joined.column(C.SCORE))
            hits = joined.filter(hit)
            misses = joined.filter(pc.invert(hit))
            first = C.aggregate(misses, [C.KEY], {"_first": (S.ROW, "min")})
            misses = misses.join(first, C.KEY)
            waiting = misses.filter(pc.not_equal(misses.column(S.ROW), misses.column("_first")))
            found = pa.concat_tables(
                [
                    pa.table(
                        [
                            hits.column(S.ROW),
                            pa.array(np.full(hits.num_rows, HIT, np.int8)),
                            hits.column(C.SCORE).cast(pa.float32()),
                        ],
                        schema=FOUND_SCHEMA,
                    ),
                    pa.table(
                        [
                            waiting.column(S.ROW),
                            pa.array(np.full(waiting.num_rows, SAME_TEXTS, np.int8)),
                            pa.nulls(waiting.num_rows, pa.float32()),
                        ],
                        schema=FOUND_SCHEMA,
                    ),
                ]
            ).sort_by([(S.ROW, "ascending")])
            shard_of = found.column(S.ROW).to_numpy() >> 32
            for shard in np.unique(shard_of):
                path = join(self.root, f"shard-{int(shard):05d}", f"found-{bucket:05d}.parquet")
                with self.fs.open(path, "wb") as f:
                    pq.write_table(found.filter(pa.array(shard_of == shard)), f)
            C.record_hits(
                self.cache_fs, self.cache_root, bucket, hits.column(C.KEY).combine_chunks()
            )
            reports.append(
                {
                    "bucket": bucket,
                    "hits": hits.num_rows,
                    "same_texts": waiting.num_rows,
                    "to_score": misses.num_rows - waiting.num_rows,
                    "cache_entries": entries.num_rows,
                    "quarantined": len(quarantined),
                }
            )
        return pa.Table.from_pylist(
            reports,
            schema=pa.schema(
                [
                    ("bucket", pa.int32()),
                    ("hits", pa.int64()),
                    ("same_texts", pa.int64()),
                    ("to_score", pa.int64()),
                    ("cache_entries", pa.int64()),
                    ("quarantined", pa.int64()),
                ]
            ),
        )


def best_per_key(new: pa.Table) -> pa.Table:
    """Staged new entries (key, window, num_windows, score; a retried write may repeat rows, a pair scored in
    two shards repeats its key) -> one (key, score) per key: the best window. Raises if a key lacks a window."""
    new = new.sort_by([(C.KEY, "ascending"), (S.WINDOW, "ascending")])
    unique = C.aggregate(
        new, [C.KEY, S.WINDOW], {S.SCORE: (S.SCORE, "min"), S.NUM_WINDOWS: (S.NUM_WINDOWS, "max")}
    )
    per_key = C.aggregate(
        unique,
        [C.KEY],
        {
            S.SCORE: (S.SCORE, "max"),
            "windows": (S.WINDOW, "count"),
            S.NUM_WINDOWS: (S.NUM_WINDOWS, "max"),
        },
    )
    if not pc.all(pc.equal(per_key.column("windows"), per_key.column(S.NUM_WINDOWS))).as_py():
        raise PipelineError(
            "a committed pair is missing some of its windows' scores in the cache staging; "
            "delete the output's _work folder and rerun"
        )
    return pa.table(
        [per_key.column(C.KEY), per_key.column(S.SCORE).cast(pa.float32())], names=[C.KEY, C.SCORE]
    ).sort_by(C.KEY)


class PublishBucket:
    """Publishes one bucket's new entries and resolves the run's pairs that waited for a pair of the same texts."""

    def __init__(self, spec: C.CacheSpec, work_uri: str, storage_options: dict):
        self.spec = spec
        self.cache_fs, self.cache_root = spec.fs()
        self.fs, self.root = url_to_fs(work_uri, storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = []
        for item in batch.to_pylist():
            bucket = int(item["bucket"])
            new = map_paths(
                lambda p: _read(self.fs, p, NEW_SCHEMA), item["new_files"], max_workers=16
            )
            entries = (
                best_per_key(pa.concat_tables(new))
                if new
                else pa.table(
                    [pa.array([], C.KEY_TYPE), pa.array([], pa.float32())], names=[C.KEY, C.SCORE]
                )
            )
            published = C.publish(self.cache_fs, self.cache_root, bucket, entries)
            filled = 0
            if item["waiting_files"]:
                waiting = pa.concat_tables(
                    map_paths(lambda p: _read(self.fs, p, WAITING_SCHEMA), item["waiting_files"])
                )
                # A pair's twin was scored in this run, or (a resumed run) found in the cache by an earlier one.
                quarantined: list[dict] = []
                cached = C.read_bucket(
                    self.cache_fs, self.cache_root, bucket, quarantined=quarantined
                )
                record_quarantined(self.fs, self.root, self.spec, bucket, quarantined)
                known = pa.concat_tables([entries, cached.select([C.KEY, C.SCORE])])
                known = C.aggregate(known, [C.KEY], {C.SCORE: (C.SCORE, "min")})
                joined = waiting.join(known, C.KEY, join_type="left outer")
                if joined.column(C.SCORE).null_count:
                    raise PipelineError(
                        f"{joined.column(C.SCORE).null_count} pair(s) waited for a score that no "
                        "committed shard holds; delete the output's _work folder and rerun"
                    )
                fill = pa.table(
                    [
                        joined.column(S.ROW),
                        joined.column(C.SCORE).cast(pa.float32()),
                        joined.column("bucket"),
                    ],
                    schema=FILL_SCHEMA,
                ).sort_by([("bucket", "ascending"), (S.ROW, "ascending")])
                self.fs.makedirs(join(self.root, "cache"), exist_ok=True)
                with self.fs.open(
                    join(self.root, "cache", f"fill-{bucket:05d}.parquet"), "wb"
                ) as f:
                    pq.write_table(fill, f, row_group_size=65536)
                filled = fill.num_rows
            reports.append(
                {
                    "bucket": bucket,
                    "entries_added": entries.num_rows if published else 0,
                    "filled": filled,
                }
            )
        return pa.Table.from_pylist(
            reports,
            schema=pa.schema(
                [("bucket", pa.int32()), ("entries_added", pa.int64()), ("filled", pa.int64())]
            ),
        )


def read_fills(fs, paths: list[str], bucket: int) -> pa.Table:
    """The filled scores of one ranking bucket's waiting pairs (_row, score), from every fill file."""
    tables = map_paths(
        lambda p: _read(fs, p, FILL_SCHEMA, filters=[("bucket", "=", bucket)]),
        paths,
        max_workers=16,
    )
    return (
        pa.concat_tables(tables).select([S.ROW, S.SCORE])
        if tables
        else FILL_SCHEMA.empty_table().select([S.ROW, S.SCORE])
    )


class ReadShardCached(ReadShard):
    """ReadShard whose rows carry their key and what the lookup found (`_cached`, `_cached_score`)."""

    def __init__(
        self,
        layout: InputLayout,
        storage_options: dict,
        uri: str,
        spec: C.CacheSpec,
        lookup_uri: str,
    ):
        super().__init__(layout, storage_options, uri)
        self.spec = spec
        self.lookup_fs, self.lookup_root = url_to_fs(lookup_uri, storage_options)

    def read(self, shard: Shard) -> pa.Table:
        return lookup_found(
            self.lookup_fs, self.lookup_root, with_keys(super().read(shard), self.spec.fingerprint)
        )
