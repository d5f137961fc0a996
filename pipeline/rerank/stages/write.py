"""Write scored rows into ranking buckets, and rejected rows aside, as staging files; report what was written.

Scored rows lose their texts (already null; kept with `output.carry_texts`) and go to
    <work>/scored/shard-SSSSS/bBBBB-<digest>.parquet
where the bucket is hash(query_id) for long input (so a query's rows meet in one bucket: a shuffle through
storage of (query_id, doc_id, score, carried columns), never of texts unless `output.carry_texts`) or the
shard itself for grouped input whose query ids are unique (a query never leaves its shard: no shuffle at
all). Rejected rows go to
    <work>/scored/shard-SSSSS/rejected-<digest>.parquet
The digest is a hash of the rows' keys, so a retried task rewrites the same file instead of adding one.
Each call returns one report row per file; the driver commits a shard (its manifest) once the reports
account for every one of its rows and, in windows mode, every window of them (a row's windows may travel
in different batches).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema as S
from pipeline.core.storage import join, url_to_fs, with_filename
from pipeline.rerank.stages.read import ROW, SHARD

REPORT_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("kind", pa.string()),
        ("path", pa.string()),
        ("bucket", pa.int32()),
        ("pairs", pa.int64()),
        ("rows", pa.int64()),
        ("tokens", pa.int64()),
        ("windows_expected", pa.int64()),
        ("hits", pa.int64()),
        ("same_texts", pa.int64()),
    ]
)
# With the score cache: "cache" files hold the scores of pairs this run scored (cache-KKKKK-*, by cache
# bucket), "waiting" files the pairs that wait for a twin of the same texts (waiting-KKKKK-*). Both are staged
# beside the shard's scored files and listed in its manifest, so they exist only for committed shards. A
# call reports them before its scored files: the report that completes a shard comes after every one of them.


def bucket_of(query_ids: pa.Array, num_buckets: int) -> np.ndarray:
    """A stable bucket per query id (the same in every process and on every machine)."""
    unique = pc.unique(query_ids)
    buckets = np.array(
        [
            int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little")
            % num_buckets
            for v in unique.to_pylist()
        ],
        dtype=np.int32,
    )
    return buckets[pc.index_in(query_ids, unique).to_numpy(zero_copy_only=False)]


class WriteScored:
    def __init__(
        self,
        work_uri: str,
        storage_options: dict,
        num_buckets: int,
        bucket_by_shard: bool,
        keep_texts: bool = False,
        cache_buckets: int | None = None,
    ):
        """keep_texts: scored rows keep their query and document (`output.carry_texts`); cache_buckets: the
        score cache's number of buckets (None: no cache)."""
        self.fs, self.root = url_to_fs(work_uri, storage_options)
        self.cache_buckets = cache_buckets
        self.keep_texts = keep_texts
        self.num_buckets = num_buckets
        self.bucket_by_shard = bucket_by_shard

    def _write(self, table: pa.Table, shard: int, name: str, rows: pa.Table | None = None) -> str:
        """`rows`: the scored rows `table` was made from, if it holds no `_row` (its name's digest)."""
        source = table if rows is None else rows
        keys = source.column(ROW).to_numpy()
        window = (
            source.column(S.WINDOW).to_numpy() if S.WINDOW in source.column_names else np.zeros(0)
        )
        digest = hashlib.blake2b(
            np.sort(keys).tobytes() + np.sort(window).tobytes(), digest_size=8
        ).hexdigest()
        path = join(self.root, "scored", f"shard-{shard:05d}", f"{name}-{digest}.parquet")
        self.fs.makedirs(join(self.root, "scored", f"shard-{shard:05d}"), exist_ok=True)
        try:
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f)
        except OSError as e:
            # A full disk raises on a write or on close with no file name; this worker's error reaches the
            # driver as text, so the one line a user reads must name the file here.
            from pipeline.core.faults import explain

            known = explain(with_filename(e, path))
            if known is not None:
                raise known from None
            raise
        return path

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = []
        shards = batch.column(SHARD).to_numpy()
        for shard in np.unique(shards):
            part = batch.filter(pa.array(shards == shard))
            mask = pc.is_valid(part.column(S.REASON))
            rejected = part.filter(mask).drop_columns(
                [
                    c
                    for c in (
                        S.INPUT_IDS,
                        S.TOKEN_TYPE_IDS,
                        S.NUM_TOKENS,
                        S.WINDOW,
                        S.NUM_WINDOWS,
                        S.SCORE,
                        S.CACHE_KEY,
                        S.CACHED,
                    )
                    if c in part.column_names
                ]
            )
            if rejected.num_rows:
                path = self._write(
                    rejected.append_column(
                        S.WINDOW, pa.array(np.zeros(rejected.num_rows, np.int32))
                    ),
                    int(shard),
                    "rejected",
                )
                reports.append(
                    (
                        int(shard),
                        "rejected",
                        path,
                        -1,
                        rejected.num_rows,
                        rejected.num_rows,
                        0,
                        0,
                        0,
                        0,
                    )
                )
            scored = part.filter(pc.invert(mask)).drop_columns(
                [S.REASON] if self.keep_texts else [S.QUERY, S.DOCUMENT, S.REASON]
            )
            if not scored.num_rows:
                continue
            buckets = (
                np.full(scored.num_rows, shard, dtype=np.int32)
                if self.bucket_by_shard
                else bucket_of(scored.column(S.QUERY_ID).combine_chunks(), self.num_buckets)
            )
            states = None
            if self.cache_buckets is not None:
                reports += self._stage_cache(scored, buckets, int(shard))
                states = scored.column(S.CACHED).to_numpy()
                scored = scored.drop_columns([S.CACHE_KEY, S.CACHED])
            for bucket in np.unique(buckets):
                rows = scored.filter(pa.array(buckets == bucket))
                path = self._write(rows, int(shard), f"b{int(bucket):05d}")
                # Cached pairs are one row each (window 0): counting rows counts pairs.
                hits, waiting = (
                    (0, 0)
                    if states is None
                    else (int(np.sum(states[buckets == bucket] == state)) for state in (1, 2))
                )
                first = pc.equal(rows.column(S.WINDOW), 0)
                pairs = int(pc.sum(first).as_py() or 0)
                tokens = int(pc.sum(rows.column(S.NUM_TOKENS)).as_py() or 0)
                expected = int(pc.sum(rows.column(S.NUM_WINDOWS).filter(first)).as_py() or 0)
                reports.append(
                    (
                        int(shard),
                        "scored",
                        path,
                        int(bucket),
                        pairs,
                        rows.num_rows,
                        tokens,
                        expected,
                        hits,
                        waiting,
                    )
                )
        return pa.table(
            list(zip(*reports)) if reports else [[] for _ in REPORT_SCHEMA], schema=REPORT_SCHEMA
        )

    def _stage_cache(self, scored: pa.Table, buckets: np.ndarray, shard: int) -> list[tuple]:
        """Stage the scores this run computed (new cache entries) and the pairs waiting for a twin, by cache bucket."""
        from pipeline.rerank import cache as C
        from pipeline.rerank.stages.lookup import NEW_SCHEMA, WAITING_SCHEMA

        reports = []
        states = scored.column(S.CACHED).to_numpy()
        cache_bucket = C.bucket_of_keys(scored.column(S.CACHE_KEY), self.cache_buckets)
        for kind, state in (("cache", 0), ("waiting", 2)):
            for k in np.unique(cache_bucket[states == state]):
                select = pa.array((states == state) & (cache_bucket == k))
                rows = scored.filter(select)
                if kind == "cache":
                    table = pa.table(
                        [
                            rows.column(S.CACHE_KEY),
                            rows.column(S.WINDOW),
                            rows.column(S.NUM_WINDOWS),
                            rows.column(S.SCORE),
                        ],
                        schema=NEW_SCHEMA,
                    )
                else:
                    table = pa.table(
                        [
                            rows.column(S.CACHE_KEY),
                            rows.column(ROW),
                            pa.array(buckets[select.to_numpy(zero_copy_only=False)], pa.int32()),
                        ],
                        schema=WAITING_SCHEMA,
                    )
                path = self._write(table, shard, f"{kind}-{int(k):05d}", rows=rows)
                reports.append((shard, kind, path, int(k), 0, rows.num_rows, 0, 0, 0, 0))
        return reports
