"""The score cache: raw logits of (query, document) pairs already scored, kept on storage and keyed by texts.

A nightly run over mostly the same pairs pays only for the pairs that changed. Layout under `cache.uri`:

    <fingerprint>/_cache.json                    what the fingerprint covers, and the number of buckets
    <fingerprint>/bucket-KKKKK/part-<digest>.parquet   key fixed_size_binary(16), score float32, last_used timestamp
    <fingerprint>/bucket-KKKKK/hits-<digest>.parquet   key, last_used: keys a run found (merged by compaction)
    <fingerprint>/runs/<time>-<id>.json          one line per run: hits, misses, pairs/s (for estimates, stats)

- The **fingerprint** covers everything that changes a score: the checkpoint's bytes (weights, config,
  tokenizer files), the dtype the scorers run in, the device family (CPU and CUDA kernels round differently),
  the effective max_length and the truncation or windows settings. Another fingerprint is another folder:
  it never hits.
- The **key** of a pair is blake2b-128 of (fingerprint, query text, document text): texts, not ids (ids are
  reused with new text). Its first 8 bytes pick the bucket, so a bucket is a fixed slice of the key space and
  a run joins its keys with one bucket at a time (one actor each): no process ever holds every key.
- The **value** is the pair's float32 logit; in windows mode, its best window (the windows settings are in
  the fingerprint).
- **Immutable files**: a run adds new part files and never rewrites one. A part's name is a hash of its keys
  and scores, so a rerun that publishes the same entries finds the file there and skips it; two jobs adding
  to one cache at once add different files. Readers list a bucket and read what they listed; a file that a
  compaction removed in between makes them list again (compaction writes its merged file before removing
  the ones it merged, so a second listing always holds every entry). A key may stand in several files
  (two jobs scored it at once): readers keep the smallest score, so every reader sees the same value.
- New entries are staged with their shard in the run's `_work/` and published after every shard has been
  committed: a run that crashes leaves nothing in the cache that it did not finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, PipelineError
from pipeline.storage import atomic_write, create_exclusive, join, map_paths, read_json, read_jsons, url_to_fs


FORMAT = 1
KEY, SCORE, LAST_USED = "key", "score", "last_used"
KEY_TYPE = pa.binary(16)
TIME_TYPE = pa.timestamp("s", tz="UTC")
PART_SCHEMA = pa.schema([(KEY, KEY_TYPE), (SCORE, pa.float32()), (LAST_USED, TIME_TYPE)])
HITS_SCHEMA = pa.schema([(KEY, KEY_TYPE), (LAST_USED, TIME_TYPE)])
# Checkpoint files whose bytes change a score (weights, config, tokenizer); README, images etc. do not.
_SCORE_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken")


@dataclass(frozen=True)
class CacheSpec:
    """One fingerprint's folder of a cache: small and picklable, it travels to the actors."""

    uri: str                 # <cache.uri>/<fingerprint>, with its protocol
    fingerprint: str         # 32 hex digits
    buckets: int
    storage_options: dict

    def fs(self):
        return url_to_fs(self.uri, self.storage_options)

    @staticmethod
    def bucket_dir(root: str, bucket: int) -> str:
        return join(root, f"bucket-{bucket:05d}")


# -- fingerprint and keys ---------------------------------------------------------------------------------

def checkpoint_digest(directory: str) -> dict[str, str]:
    """blake2b-128 of every file of a checkpoint folder that changes a score, by name. Reads the weights
    once (about a second per GB); a hub model's snapshot folder is read the same way as a local one."""
    digests = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or not name.endswith(_SCORE_FILES) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            digests[name] = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    return digests


def fingerprint(checkpoint: dict[str, str], settings: dict) -> str:
    """The cache folder's name: a hash of the checkpoint's file digests and the settings that change a score."""
    payload = json.dumps({"format": FORMAT, "checkpoint": checkpoint, "settings": settings}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def pair_keys(fingerprint_hex: str, queries: list, documents: list) -> pa.FixedSizeBinaryArray:
    """(n,) 16-byte keys of the pairs' exact texts under one fingerprint; null where a text is null."""
    salt = bytes.fromhex(fingerprint_hex)
    out = []
    for q, d in zip(queries, documents):
        if q is None or d is None:
            out.append(None)
            continue
        qb = q.encode("utf-8", "surrogatepass")
        h = hashlib.blake2b(salt, digest_size=16)
        h.update(len(qb).to_bytes(8, "little"))  # the length keeps ("ab", "c") apart from ("a", "bc")
        h.update(qb)
        h.update(d.encode("utf-8", "surrogatepass"))
        out.append(h.digest())
    return pa.array(out, KEY_TYPE)


def bucket_of_keys(keys: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """(n,) int32 bucket of each (non-null) key: its first 8 bytes, little-endian, modulo `buckets`."""
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if len(arr) == 0:
        return np.zeros(0, np.int32)
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=(arr.offset + len(arr)) * 16)[arr.offset * 16:]
    head = raw.reshape(-1, 16)[:, :8].copy().view("<u8").ravel()
    return (head % np.uint64(buckets)).astype(np.int32)


def digest_of(*arrays: pa.Array | np.ndarray) -> str:
    """A short content hash, for file names that make a rewrite of the same rows a no-op."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        if isinstance(a, (pa.Array, pa.ChunkedArray)):
            a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
            for buf in a.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
        else:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# -- opening a cache ---------------------------------------------------------------------------------------

def _unusable(uri: str, e: OSError) -> PipelineError:
    from pipeline.faults import explain

    known = explain(e)
    if known is not None:
        return known
    return ConfigError(f"cannot use cache.uri {uri} ({e.strerror or type(e).__name__}); choose a folder this job "
                       "can write, or leave cache.uri unset")


def check_location(uri: str, storage_options: dict) -> None:
    """The cache's folder exists (created if absent) and is a folder: checked before any work starts."""
    fs, root = url_to_fs(uri, storage_options)
    try:
        if fs.isfile(root):
            raise ConfigError(f"cache.uri {uri} is a file; pass a folder (created if absent)")
        fs.makedirs(root, exist_ok=True)
    except OSError as e:
        raise _unusable(uri, e) from None


def open_cache(uri: str, storage_options: dict, fingerprint_hex: str, covers: dict, buckets: int) -> CacheSpec:
    """The fingerprint's folder of the cache at `uri`, created with `buckets` buckets if new (an existing
    folder keeps the number it was created with). One line if the cache cannot be reached or created."""
    check_location(uri, storage_options)
    fs, root = url_to_fs(uri, storage_options)
    protocol = uri.split("://")[0] + "://" if "://" in uri else ""
    folder = join(root, fingerprint_hex)
    meta_path = join(folder, "_cache.json")
    try:
        fs.makedirs(folder, exist_ok=True)
        meta = {"format": FORMAT, "fingerprint": fingerprint_hex, "buckets": buckets, "covers": covers,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if not create_exclusive(fs, meta_path, json.dumps(meta, indent=2, sort_keys=True).encode()):
            meta = read_json(fs, meta_path)
    except OSError as e:
        raise _unusable(uri, e) from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{protocol + folder} was written by another version of the cache (format "
                          f"{meta.get('format')}, this job reads {FORMAT}); use another cache.uri")
    return CacheSpec(protocol + folder, fingerprint_hex, int(meta["buckets"]), storage_options)


def list_caches(uri: str, storage_options: dict) -> list[CacheSpec]:
    """Every fingerprint folder under a cache URI."""
    fs, root = url_to_fs(uri, storage_options)
    protocol = uri.split("://")[0] + "://" if "://" in uri else ""
    specs = []
    for meta_path in sorted(fs.glob(join(root, "*", "_cache.json"))):
        meta = read_json(fs, meta_path)
        specs.append(CacheSpec(protocol + posixpath.dirname(meta_path), meta["fingerprint"], int(meta["buckets"]),
                               storage_options))
    return specs


def aggregate(table: pa.Table, keys: list[str], aggregations: dict[str, tuple[str, str]]) -> pa.Table:
    """group_by(keys) with named outputs: {output name: (column, function)} (Arrow's own names and column
    order differ between versions)."""
    grouped = table.group_by(keys).aggregate([(column, fn) for column, fn in aggregations.values()])
    return pa.table([grouped.column(k) for k in keys] + [grouped.column(f"{c}_{fn}") for c, fn in aggregations.values()],
                    names=keys + list(aggregations))


# -- reading and writing buckets ---------------------------------------------------------------------------

def _read_files(fs, paths: list[str], schema: pa.Schema) -> pa.Table:
    def read(path):
        with fs.open(path, "rb") as f:
            return pq.read_table(f, schema=schema)
    tables = map_paths(read, paths, max_workers=16)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def list_bucket(fs, root: str, bucket: int, kind: str = "part") -> list[str]:
    return sorted(fs.glob(join(CacheSpec.bucket_dir(root, bucket), f"{kind}-*.parquet")))


def read_bucket(fs, root: str, bucket: int, with_paths: bool = False):
    """A bucket's entries, one per key (the smallest score where several files hold a key), with their
    latest last_used. Listing again when a file vanished under a concurrent compaction."""
    for attempt in range(5):
        paths = list_bucket(fs, root, bucket)
        try:
            table = _read_files(fs, paths, PART_SCHEMA)
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    table = unique_entries(table)
    return (table, paths) if with_paths else table


def unique_entries(table: pa.Table) -> pa.Table:
    """One row per key: the smallest score and the latest last_used among the key's rows (sorted by key)."""
    if table.num_rows == 0:
        return table.select([KEY, SCORE, LAST_USED]).cast(PART_SCHEMA)
    grouped = aggregate(table, [KEY], {SCORE: (SCORE, "min"), LAST_USED: (LAST_USED, "max")})
    return grouped.select([KEY, SCORE, LAST_USED]).cast(PART_SCHEMA).sort_by(KEY)


def publish(fs, root: str, bucket: int, entries: pa.Table, now: datetime | None = None) -> str | None:
    """Add (key, score) entries to a bucket as one new immutable file; None if that exact file is there."""
    if entries.num_rows == 0:
        return None
    entries = entries.sort_by(KEY)
    name = f"part-{digest_of(entries.column(KEY), entries.column(SCORE))}.parquet"
    path = join(CacheSpec.bucket_dir(root, bucket), name)
    if fs.exists(path):
        return None
    stamp = pa.array(np.full(entries.num_rows, int((now or datetime.now(timezone.utc)).timestamp()), np.int64),
                     pa.int64()).cast(TIME_TYPE)
    table = pa.table([entries.column(KEY), entries.column(SCORE).cast(pa.float32()), stamp], schema=PART_SCHEMA)
    _write_new(fs, path, table)
    return path


def record_hits(fs, root: str, bucket: int, keys: pa.Array, now: datetime | None = None) -> None:
    """Remember when keys were last found (prune --older-than drops entries nobody has used since)."""
    keys = pc.unique(keys)
    if len(keys) == 0:
        return
    t = int((now or datetime.now(timezone.utc)).timestamp())
    keys = keys.take(pc.sort_indices(keys))
    path = join(CacheSpec.bucket_dir(root, bucket), f"hits-{digest_of(keys, np.int64(t))}.parquet")
    stamp = pa.array(np.full(len(keys), t, np.int64)).cast(TIME_TYPE)
    _write_new(fs, path, pa.table([keys, stamp], schema=HITS_SCHEMA))


def _write_new(fs, path: str, table: pa.Table) -> None:
    """Write a file that readers may list at any moment: under a temporary name they do not match (`.tmp-`
    prefix, unique per writer so two writers of the same name never share one), then moved into place."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    atomic_write(fs, tmp, lambda f: pq.write_table(table, f))
    fs.mv(tmp, path)


# -- maintenance --------------------------------------------------------------------------------------------

def compact_bucket(fs, root: str, bucket: int, older_than_s: float | None = None,
                   now: datetime | None = None) -> dict:
    """Merge a bucket's part and hits files into one part file (one row per key, last_used the latest of
    written and found), dropping entries unused for `older_than_s` if given, then remove the merged files."""
    parts = list_bucket(fs, root, bucket)
    hits = list_bucket(fs, root, bucket, "hits")
    before = {"files": len(parts) + len(hits)}
    if not parts and not hits:
        return before | {"entries": 0, "dropped": 0}
    entries = _read_files(fs, parts, PART_SCHEMA)
    seen = _read_files(fs, hits, HITS_SCHEMA)
    before["rows"] = entries.num_rows
    merged = unique_entries(entries)
    if seen.num_rows:
        last = aggregate(seen, [KEY], {LAST_USED: (LAST_USED, "max")})
        joined = merged.join(last, KEY, right_suffix="_hit", join_type="left outer")
        latest = pc.max_element_wise(joined.column(LAST_USED).cast(pa.int64()),
                                     joined.column(LAST_USED + "_hit").cast(pa.int64()), skip_nulls=True)
        merged = pa.table([joined.column(KEY), joined.column(SCORE), latest.cast(TIME_TYPE)],
                          schema=PART_SCHEMA).sort_by(KEY)
    dropped = 0
    if older_than_s is not None:
        cutoff = int((now or datetime.now(timezone.utc)).timestamp() - older_than_s)
        keep = pc.greater_equal(merged.column(LAST_USED).cast(pa.int64()), cutoff)
        dropped = merged.num_rows - int(pc.sum(keep).as_py() or 0)
        merged = merged.filter(keep)
    if merged.num_rows:
        name = f"part-{digest_of(merged.column(KEY), merged.column(SCORE), merged.column(LAST_USED))}.parquet"
        path = join(CacheSpec.bucket_dir(root, bucket), name)
        if not fs.exists(path):
            _write_new(fs, path, merged)
    else:
        path = None
    for old in parts + hits:  # the merged file is in place first: a reader listing now sees every entry
        if old != path:
            try:
                fs.rm(old)
            except FileNotFoundError:  # another compaction removed it
                pass
    return before | {"entries": merged.num_rows, "dropped": dropped}


def bucket_stats(fs, root: str, bucket: int) -> dict:
    parts, hits = list_bucket(fs, root, bucket), list_bucket(fs, root, bucket, "hits")
    sizes = map_paths(lambda p: int(fs.info(p).get("size") or 0), parts + hits)
    entries = unique_entries(_read_files(fs, parts, PART_SCHEMA))
    return {"part_files": len(parts), "hits_files": len(hits), "bytes": sum(sizes), "entries": entries.num_rows,
            "oldest_last_used": _iso(pc.min(entries.column(LAST_USED))) if entries.num_rows else None,
            "newest_last_used": _iso(pc.max(entries.column(LAST_USED))) if entries.num_rows else None}


def _iso(scalar) -> str:
    return scalar.as_py().isoformat(timespec="seconds")


def record_run(spec: CacheSpec, record: dict) -> None:
    fs, root = spec.fs()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    fs.makedirs(join(root, "runs"), exist_ok=True)
    atomic_write(fs, join(root, "runs", f"{stamp}-{uuid.uuid4().hex[:8]}.json"),
                 lambda f: json.dump(record, f, sort_keys=True), mode="w")


def read_runs(spec: CacheSpec) -> list[dict]:
    fs, root = spec.fs()
    return read_jsons(fs, sorted(fs.glob(join(root, "runs", "*.json"))))
