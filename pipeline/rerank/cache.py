"""The score cache: raw logits of (query, document) pairs already scored, kept on storage and keyed by texts.

A nightly run over mostly the same pairs pays only for the pairs that changed. Layout under `cache.uri`:

    <fingerprint>/_cache.json                    what the fingerprint covers, and the number of buckets
    <fingerprint>/bucket-KKKKK/part-<digest>.parquet   key fixed_size_binary(16), score float32, last_used timestamp
    <fingerprint>/bucket-KKKKK/hits-<digest>.parquet   key, last_used: keys a run found (merged by compaction)
    <fingerprint>/runs/<time>-<id>.json          one line per run: hits, misses, pairs/s (for estimates, stats)
    <fingerprint>/_quarantine/bucket-KKKKK/...   files that did not read, moved aside (their pairs are scored again)

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
- **A file that does not read** (garbage, truncated, a page failing its checksum) is never a reason to stop: the
  reader skips it, so its pairs are scored again, and moves it to `_quarantine/` so that nobody trips on it
  again. Only the parsing decides: a storage fault while fetching the bytes is raised as it is.
- **`_cache.json`** is validated where it is read (`CacheMeta`); the bucket count, its one value that matters,
  can be read back from the entries themselves (`infer_buckets`), which `jobs.cache repair` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.faults import explain
from pipeline.core.storage import (
    atomic_write,
    create_exclusive,
    join,
    map_paths,
    protocol_prefix,
    read_jsons,
    url_to_fs,
)

FORMAT = 1
KEY, SCORE, LAST_USED = "key", "score", "last_used"
KEY_TYPE = pa.binary(16)
TIME_TYPE = pa.timestamp("s", tz="UTC")
PART_SCHEMA = pa.schema([(KEY, KEY_TYPE), (SCORE, pa.float32()), (LAST_USED, TIME_TYPE)])
HITS_SCHEMA = pa.schema([(KEY, KEY_TYPE), (LAST_USED, TIME_TYPE)])
# Checkpoint files whose bytes change a score (weights, config, tokenizer); README, images etc. do not.
_SCORE_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken")
META = "_cache.json"
QUARANTINE = "_quarantine"
REPAIR = "python -m jobs.cache repair --cache"


@dataclass(frozen=True)
class CacheSpec:
    """One fingerprint's folder of a cache: small and picklable, it travels to the actors."""

    uri: str  # <cache.uri>/<fingerprint>, with its protocol
    fingerprint: str  # 32 hex digits
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
            digests[name] = hashlib.file_digest(
                f, lambda: hashlib.blake2b(digest_size=16)
            ).hexdigest()
    return digests


def fingerprint(checkpoint: dict[str, str], settings: dict) -> str:
    """The cache folder's name: a hash of the checkpoint's file digests and the settings that change a score."""
    payload = json.dumps(
        {"format": FORMAT, "checkpoint": checkpoint, "settings": settings}, sort_keys=True
    )
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
        h.update(
            len(qb).to_bytes(8, "little")
        )  # the length keeps ("ab", "c") apart from ("a", "bc")
        h.update(qb)
        h.update(d.encode("utf-8", "surrogatepass"))
        out.append(h.digest())
    return pa.array(out, KEY_TYPE)


def bucket_of_keys(keys: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """(n,) int32 bucket of each (non-null) key: its first 8 bytes, little-endian, modulo `buckets`."""
    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if len(arr) == 0:
        return np.zeros(0, np.int32)
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=(arr.offset + len(arr)) * 16)[
        arr.offset * 16 :
    ]
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
    known = explain(e)
    if known is not None:
        return known
    return ConfigError(
        f"cannot use cache.uri {uri} ({e.strerror or type(e).__name__}); choose a folder this job "
        "can write, or leave cache.uri unset"
    )


def check_location(uri: str, storage_options: dict) -> None:
    """The cache's folder exists (created if absent) and is a folder: checked before any work starts."""
    fs, root = url_to_fs(uri, storage_options)
    try:
        if fs.isfile(root):
            raise ConfigError(f"cache.uri {uri} is a file; pass a folder (created if absent)")
        fs.makedirs(root, exist_ok=True)
    except OSError as e:
        raise _unusable(uri, e) from None


class CacheMeta(BaseModel):
    """`<fingerprint>/_cache.json`: what a fingerprint folder covers and how its keys are split."""

    model_config = ConfigDict(extra="forbid")

    format: Annotated[int, Field(strict=True)]
    fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    buckets: Annotated[int, Field(strict=True, gt=0, le=1 << 20)]
    covers: dict | None = None  # model, revision, checkpoint digests, settings (null once repaired)
    created: str | None = None
    repaired: str | None = None  # when `jobs.cache repair` rewrote it from the folder's entries


class OtherFormat(ConfigError):
    """A `_cache.json` of another version of the cache: not ours to read, nor to repair."""


def _bad_meta(shown: str, what: str, cache_uri: str) -> ConfigError:
    return ConfigError(
        f"score cache metadata {shown} {what}; run `{REPAIR} {cache_uri}` to rewrite it from the "
        f"entries of its bucket folders, or delete {posixpath.dirname(shown)} to start that cache "
        "afresh"
    )


def read_meta(fs, folder: str, cache_uri: str, protocol: str = "") -> CacheMeta:
    """The validated `_cache.json` of a fingerprint folder; one line naming the file, what is wrong with it and
    how to recover if it is missing, unparseable or wrong. Storage faults are raised as they are."""
    path, shown = join(folder, META), protocol + join(folder, META)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise _bad_meta(shown, "is missing", cache_uri) from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad_meta(shown, f"is not JSON ({e})", cache_uri) from None
    if (
        isinstance(data, dict)
        and data.get("format") != FORMAT
        and isinstance(data.get("format"), int)
    ):
        raise OtherFormat(
            f"{shown} was written by another version of the cache (format {data['format']}, this "
            f"job reads {FORMAT}); use another cache.uri, or that version of this job"
        )
    try:
        meta = CacheMeta.model_validate(data)
    except ValidationError as e:
        what = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'the file'}: {err['msg']}"
            + (f" (found {err['input']!r})" if err["type"] not in ("missing", "model_type") else "")
            for err in e.errors()
        )
        raise _bad_meta(shown, f"is wrong ({what})", cache_uri) from None
    if meta.format != FORMAT:
        raise _bad_meta(
            shown, f"is wrong (format: {meta.format!r}, this job reads {FORMAT})", cache_uri
        )
    if meta.fingerprint != posixpath.basename(folder.rstrip("/")):
        raise _bad_meta(
            shown, f"is wrong (fingerprint {meta.fingerprint} is not its folder's name)", cache_uri
        )
    highest = max(bucket_folders(fs, folder), default=-1)
    if highest >= meta.buckets:
        raise _bad_meta(
            shown,
            f"is wrong (buckets: {meta.buckets}, but the folder holds bucket-{highest:05d})",
            cache_uri,
        )
    return meta


def bucket_folders(fs, folder: str) -> list[int]:
    """The bucket numbers of a fingerprint folder's `bucket-KKKKK` folders (buckets nobody wrote have none)."""
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(
        int(n[len("bucket-") :])
        for n in names
        if n.startswith("bucket-") and n[len("bucket-") :].isdigit()
    )


def open_cache(
    uri: str, storage_options: dict, fingerprint_hex: str, covers: dict, buckets: int
) -> CacheSpec:
    """The fingerprint's folder of the cache at `uri`, created with `buckets` buckets if new (an existing
    folder keeps the number it was created with). One line if the cache cannot be reached or created, or if an
    existing folder's `_cache.json` is missing or wrong."""
    check_location(uri, storage_options)
    fs, root = url_to_fs(uri, storage_options)
    protocol = protocol_prefix(uri)
    folder = join(root, fingerprint_hex)
    meta_path = join(folder, META)
    try:
        fs.makedirs(folder, exist_ok=True)
        if not fs.exists(meta_path) and bucket_folders(fs, folder):
            # Entries without their metadata: creating it anew could name another bucket count than the
            # entries were split by, and every lookup would miss.
            raise _bad_meta(protocol + meta_path, "is missing", uri)
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint_hex,
            "buckets": buckets,
            "covers": covers,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if create_exclusive(fs, meta_path, json.dumps(meta, indent=2, sort_keys=True).encode()):
            return CacheSpec(protocol + folder, fingerprint_hex, buckets, storage_options)
        try:
            meta = read_meta(fs, folder, uri, protocol)
        except OtherFormat:
            raise
        except (
            ConfigError
        ):  # a job creating the folder right now: a local create is visible before its bytes
            time.sleep(1.0)
            meta = read_meta(fs, folder, uri, protocol)
    except OSError as e:
        raise _unusable(uri, e) from None
    return CacheSpec(protocol + folder, fingerprint_hex, meta.buckets, storage_options)


def fingerprint_folders(fs, root: str) -> list[str]:
    """Every folder under a cache's root that holds `_cache.json` or bucket folders (a folder whose
    `_cache.json` was lost still counts: its entries are there)."""
    found = {posixpath.dirname(p) for p in fs.glob(join(root, "*", META))}
    try:
        listed = fs.ls(root, detail=True)
    except FileNotFoundError:
        listed = []
    for entry in listed:
        name = entry["name"].rstrip("/")
        if entry.get("type") == "directory" and name not in found and bucket_folders(fs, name):
            found.add(name)
    return sorted(found)


def list_caches(uri: str, storage_options: dict) -> list[CacheSpec]:
    """Every fingerprint folder under a cache URI, its `_cache.json` validated (one line if one is wrong)."""
    fs, root = url_to_fs(uri, storage_options)
    protocol = protocol_prefix(uri)
    specs = []
    for folder in fingerprint_folders(fs, root):
        meta = read_meta(fs, folder, uri, protocol)
        specs.append(CacheSpec(protocol + folder, meta.fingerprint, meta.buckets, storage_options))
    return specs


def infer_buckets(fs, folder: str) -> tuple[int | None, int]:
    """The bucket count a fingerprint folder's entries were split by, read back from them, and how many keys
    it rests on. A key's first 8 bytes modulo the count is its folder's number, so the count divides
    (head - bucket) of every key: their gcd is the count times the gcd of the quotients, which is 1 with
    overwhelming odds once there are a few dozen keys. None when the folder holds too few keys to tell."""
    gcd, keys, highest = 0, 0, -1
    for bucket in bucket_folders(fs, folder):
        paths = list_bucket(fs, folder, bucket) + list_bucket(fs, folder, bucket, "hits")
        table = _read_files(fs, paths, HITS_SCHEMA.remove(1), unreadable=[])
        for key in pc.unique(table.column(KEY)).to_pylist() if table.num_rows else []:
            gcd = math.gcd(gcd, int.from_bytes(key[:8], "little") - bucket)
            keys += 1
        highest = max(highest, bucket)
    if keys < 32 or gcd <= highest or gcd > 1 << 20:
        return None, keys
    return gcd, keys


def repair_meta(fs, folder: str, cache_uri: str, protocol: str = "") -> dict | None:
    """Rewrite a fingerprint folder's `_cache.json` from its entries if it is missing or wrong; None if it was
    valid. What it covered (model, settings) cannot be read back: `covers` becomes null."""
    try:
        read_meta(fs, folder, cache_uri, protocol)
        return None
    except OtherFormat:
        raise
    except ConfigError as e:
        problem = str(e).split(";")[0]
    name = posixpath.basename(folder.rstrip("/"))
    if not (len(name) == 32 and all(c in "0123456789abcdef" for c in name)):
        raise ConfigError(
            f"{protocol + folder} is not a score cache folder (its name is no fingerprint); "
            "move it out of the cache"
        )
    buckets, keys = infer_buckets(fs, folder)
    if buckets is None:
        raise ConfigError(
            f"{problem}, and its {keys} entries are too few to read the bucket count back; delete "
            f"{protocol + folder} (its pairs are scored again on the next run)"
        )
    meta = CacheMeta(
        format=FORMAT,
        fingerprint=name,
        buckets=buckets,
        covers=None,
        repaired=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    atomic_write(
        fs, join(folder, META), lambda f: f.write(meta.model_dump_json(indent=2)), mode="w"
    )
    return {"uri": protocol + folder, "problem": problem, "buckets": buckets, "keys": keys}


def aggregate(
    table: pa.Table, keys: list[str], aggregations: dict[str, tuple[str, str]]
) -> pa.Table:
    """group_by(keys) with named outputs: {output name: (column, function)} (Arrow's own names and column
    order differ between versions)."""
    grouped = table.group_by(keys).aggregate([(column, fn) for column, fn in aggregations.values()])
    return pa.table(
        [grouped.column(k) for k in keys]
        + [grouped.column(f"{c}_{fn}") for c, fn in aggregations.values()],
        names=keys + list(aggregations),
    )


# -- reading and writing buckets ---------------------------------------------------------------------------


class Unreadable(Exception):
    """A cache file whose bytes arrived but do not parse as one of the cache's tables."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_file(fs, path: str, schema: pa.Schema) -> pa.Table:
    """One cache file, read fully (page checksums verified where written). Raises `Unreadable` if its bytes do
    not parse as `schema`'s columns; a storage fault fetching them (FileNotFoundError included) is raised as
    it is: only a file that arrived whole and does not parse is the file's fault."""
    data = fs.cat_file(path)
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        return table.select(schema.names).cast(schema)
    except (
        pa.ArrowException,
        OSError,
        ValueError,
        TypeError,
        KeyError,
    ) as e:  # no I/O here: all parsing
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unreadable(
            path, text.replace("Could not open Parquet input source '<Buffer>': ", "")
        ) from None


def _read_files(
    fs,
    paths: list[str],
    schema: pa.Schema,
    unreadable: list | None = None,
    vanished: list | None = None,
) -> pa.Table:
    """The files' rows, concatenated. With `unreadable` (a list), files that do not parse are skipped and
    appended to it as `Unreadable`; with `vanished`, files gone since they were listed are skipped likewise."""

    def read(path):
        try:
            return read_file(fs, path, schema)
        except Unreadable as e:
            if unreadable is None:
                raise
            return e
        except FileNotFoundError:
            if vanished is None:
                raise
            return path

    tables = []
    for result in map_paths(read, paths, max_workers=16):
        if isinstance(result, Unreadable):
            unreadable.append(result)
        elif isinstance(result, str):
            vanished.append(result)
        else:
            tables.append(result)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def quarantine(fs, root: str, bad: Unreadable) -> dict:
    """Move an unreadable file of a bucket to `<root>/_quarantine/bucket-KKKKK/` so that no reader trips on it
    again. Returns {path, reason, moved_to}; moved_to is None when another reader moved it first."""
    bucket_dir = posixpath.basename(posixpath.dirname(bad.path))
    target = join(root, QUARANTINE, bucket_dir, posixpath.basename(bad.path))
    try:
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.mv(bad.path, target)
    except (
        FileNotFoundError
    ):  # another run quarantined it (or a compaction merged what it could) meanwhile
        target = None
    return {"path": bad.path, "reason": bad.reason, "moved_to": target}


def list_bucket(fs, root: str, bucket: int, kind: str = "part") -> list[str]:
    return sorted(fs.glob(join(CacheSpec.bucket_dir(root, bucket), f"{kind}-*.parquet")))


def read_bucket(
    fs, root: str, bucket: int, with_paths: bool = False, quarantined: list | None = None
):
    """A bucket's entries, one per key (the smallest score where several files hold a key), with their
    latest last_used. Listing again when a file vanished under a concurrent compaction. A file that does not
    read is skipped (its pairs count as misses) and quarantined; `quarantined` (a list) receives what
    `quarantine` returns for each."""
    for attempt in range(5):
        paths = list_bucket(fs, root, bucket)
        unreadable: list[Unreadable] = []
        try:
            table = _read_files(fs, paths, PART_SCHEMA, unreadable=unreadable)
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    for bad in unreadable:
        moved = quarantine(fs, root, bad)
        if quarantined is not None:
            quarantined.append(moved)
    paths = [p for p in paths if p not in {bad.path for bad in unreadable}]
    table = unique_entries(table)
    return (table, paths) if with_paths else table


def unique_entries(table: pa.Table) -> pa.Table:
    """One row per key: the smallest score and the latest last_used among the key's rows (sorted by key)."""
    if table.num_rows == 0:
        return table.select([KEY, SCORE, LAST_USED]).cast(PART_SCHEMA)
    grouped = aggregate(table, [KEY], {SCORE: (SCORE, "min"), LAST_USED: (LAST_USED, "max")})
    return grouped.select([KEY, SCORE, LAST_USED]).cast(PART_SCHEMA).sort_by(KEY)


def publish(
    fs, root: str, bucket: int, entries: pa.Table, now: datetime | None = None
) -> str | None:
    """Add (key, score) entries to a bucket as one new immutable file; None if that exact file is there."""
    if entries.num_rows == 0:
        return None
    entries = entries.sort_by(KEY)
    name = f"part-{digest_of(entries.column(KEY), entries.column(SCORE))}.parquet"
    path = join(CacheSpec.bucket_dir(root, bucket), name)
    if fs.exists(path):
        return None
    stamp = pa.array(
        np.full(entries.num_rows, int((now or datetime.now(timezone.utc)).timestamp()), np.int64),
        pa.int64(),
    ).cast(TIME_TYPE)
    table = pa.table(
        [entries.column(KEY), entries.column(SCORE).cast(pa.float32()), stamp], schema=PART_SCHEMA
    )
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
    # Page checksums: a file damaged after it was written fails its read instead of giving other scores.
    atomic_write(fs, tmp, lambda f: pq.write_table(table, f, write_page_checksum=True))
    fs.mv(tmp, path)


# -- maintenance --------------------------------------------------------------------------------------------


def compact_bucket(
    fs, root: str, bucket: int, older_than_s: float | None = None, now: datetime | None = None
) -> dict:
    """Merge a bucket's part and hits files into one part file (one row per key, last_used the latest of
    written and found), dropping entries unused for `older_than_s` if given, then remove the merged files.
    Files that do not read are left out of the merge and quarantined (listed under "unreadable")."""
    parts = list_bucket(fs, root, bucket)
    hits = list_bucket(fs, root, bucket, "hits")
    before = {"files": len(parts) + len(hits), "unreadable": []}
    if not parts and not hits:
        return before | {"entries": 0, "dropped": 0}
    unreadable: list[Unreadable] = []
    vanished: list[str] = []  # quarantined by a job's reader since the listing
    entries = _read_files(fs, parts, PART_SCHEMA, unreadable=unreadable, vanished=vanished)
    seen = _read_files(fs, hits, HITS_SCHEMA, unreadable=unreadable, vanished=vanished)
    before["unreadable"] = [quarantine(fs, root, bad) for bad in unreadable]
    merged_paths = [
        p for p in parts + hits if p not in {bad.path for bad in unreadable} | set(vanished)
    ]
    before["rows"] = entries.num_rows
    merged = unique_entries(entries)
    if seen.num_rows:
        last = aggregate(seen, [KEY], {LAST_USED: (LAST_USED, "max")})
        joined = merged.join(last, KEY, right_suffix="_hit", join_type="left outer")
        latest = pc.max_element_wise(
            joined.column(LAST_USED).cast(pa.int64()),
            joined.column(LAST_USED + "_hit").cast(pa.int64()),
            skip_nulls=True,
        )
        merged = pa.table(
            [joined.column(KEY), joined.column(SCORE), latest.cast(TIME_TYPE)], schema=PART_SCHEMA
        ).sort_by(KEY)
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
    for (
        old
    ) in merged_paths:  # the merged file is in place first: a reader listing now sees every entry
        if old != path:
            try:
                fs.rm(old)
            except FileNotFoundError:  # another compaction removed it
                pass
    return before | {"entries": merged.num_rows, "dropped": dropped}


def bucket_stats(fs, root: str, bucket: int) -> dict:
    """A bucket's files, bytes and entries; files that do not read are listed under "unreadable" (path,
    reason), left where they are."""
    parts, hits = list_bucket(fs, root, bucket), list_bucket(fs, root, bucket, "hits")
    sizes = map_paths(lambda p: int(fs.info(p).get("size") or 0), parts + hits)
    unreadable: list[Unreadable] = []
    entries = unique_entries(
        _read_files(fs, parts, PART_SCHEMA, unreadable=unreadable, vanished=[])
    )
    _read_files(fs, hits, HITS_SCHEMA, unreadable=unreadable, vanished=[])
    return {
        "part_files": len(parts),
        "hits_files": len(hits),
        "bytes": sum(sizes),
        "entries": entries.num_rows,
        "oldest_last_used": _iso(pc.min(entries.column(LAST_USED))) if entries.num_rows else None,
        "newest_last_used": _iso(pc.max(entries.column(LAST_USED))) if entries.num_rows else None,
        "unreadable": [{"path": bad.path, "reason": bad.reason} for bad in unreadable],
    }


def verify_bucket(fs, root: str, bucket: int) -> tuple[int, list[Unreadable]]:
    """Read every part and hits file of a bucket fully; (files read, the ones that do not read)."""
    paths = list_bucket(fs, root, bucket) + list_bucket(fs, root, bucket, "hits")
    unreadable: list[Unreadable] = []
    for path in paths:
        try:
            read_file(
                fs,
                path,
                PART_SCHEMA if posixpath.basename(path).startswith("part-") else HITS_SCHEMA,
            )
        except Unreadable as bad:
            unreadable.append(bad)
        except FileNotFoundError:  # compacted or quarantined since the listing
            pass
    return len(paths), unreadable


def quarantined_files(fs, root: str) -> list[str]:
    return sorted(fs.glob(join(root, QUARANTINE, "bucket-*", "*.parquet")))


def _iso(scalar) -> str:
    return scalar.as_py().isoformat(timespec="seconds")


def record_run(spec: CacheSpec, record: dict) -> None:
    fs, root = spec.fs()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    fs.makedirs(join(root, "runs"), exist_ok=True)
    atomic_write(
        fs,
        join(root, "runs", f"{stamp}-{uuid.uuid4().hex[:8]}.json"),
        lambda f: json.dump(record, f, sort_keys=True),
        mode="w",
    )


def read_runs(spec: CacheSpec) -> list[dict]:
    fs, root = spec.fs()
    return read_jsons(fs, sorted(fs.glob(join(root, "runs", "*.json"))))
