"""Per-query measures where the data lives: the run split by hash(query_id), each part measured on its own.

    run files ----scatter (a task per file)----> <output>/_parts/bucket-BBBBB/run-FFFFF.parquet
    ranked/ parts (--model) --scatter--------->  <output>/_parts/bucket-BBBBB/judge-FFFFF.parquet
    bucket-BBBBB/* --measure_bucket (a task per bucket)--> BucketResult: per-query tables, counts, a plot sample
    BucketResults --combine (the driver)--> tables of queries x measures, sorted by query_id

Every measure is a function of one query's rows, and a query's rows all land in one bucket (with its
judgements: the qrels are filtered to the bucket's queries on the task), so the per-query tables of the
buckets, put together and sorted by query_id, are the tables `nightly.measure` computes from the whole run,
value for value, whatever the number of buckets. The driver receives queries x measures (and, for the report's
plots, at most `workers.plot_sample_pairs` pairs), never the run's rows.

A run of one bucket is measured in the calling process when Ray is not running (it holds at most
`workers.rows_per_bucket` pairs: starting Ray would cost more than it saves); otherwise the tasks run on Ray.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import InputError
from pipeline.core.schema import CANDIDATES, DOC_ID, FIRST_STAGE_RANK, QUERY_ID, SCORE
from pipeline.core.storage import join, protocol_prefix, url_to_fs
from pipeline.core.trec import is_parquet, read_run
from pipeline.quality.config import IndexQualityConfig
from pipeline.quality.label_free import RERANKER_RANK, label_free_measures, rank_both
from pipeline.quality.metrics import evaluate
from pipeline.quality.report import RERANKED_PREFIX
from pipeline.quality.run_input import (
    JUDGE_SCORE,
    RunColumns,
    _explode_grouped,
    check_columns,
    prepare_run,
)
from pipeline.quality.segments import query_segments
from pipeline.rerank.stages.write import bucket_of

PARTS = "_parts"
RUN, JUDGE = "run", "judge"
LABELLED, LABEL_FREE, RERANKED = "labelled", "label_free", "reranked"
TREC_LINE_BYTES = (
    40  # about one line of a TREC run file: sizes the buckets of a text run before it is read
)


@dataclass(frozen=True)
class RunPlan:
    """What the driver knows of a run before reading its rows: files, columns, first-stage order, size."""

    uri: str
    files: list[str]  # URIs (with the protocol) of the run's files
    parquet: bool
    order: str  # the first-stage order column, and whether it is a score (higher = better)
    is_score: bool
    estimated_rows: int
    num_buckets: int


@dataclass
class BucketResult:
    """One bucket's contribution: per-query tables (queries x measures), counts and a bounded plot sample."""

    bucket: int
    pid: int  # the process that read and measured the bucket
    pairs: int = 0  # usable pairs of the run in this bucket
    queries: int = 0
    judge_pairs_total: int = 0  # pairs with a judge score (before sampling)
    unjudged_pairs: int = 0  # run pairs without a judge score
    tables: dict[str, pa.Table] = field(
        default_factory=dict
    )  # LABELLED / LABEL_FREE / RERANKED -> per query
    segments: pa.Table | None = None  # (query_id, segment columns), one row per query
    rejected: pa.Table | None = None  # rows the run could not use (null id, null/NaN order key)
    plot_sample: pa.Table | None = None  # (first_stage_rank, reranker_rank, score)
    score_moments: dict | None = None  # count, sum, sum of squares, min, max of the judge's scores
    error: str | None = None  # an InputError's message, raised again on the driver


def _with_protocol(uri: str, path: str) -> str:
    protocol = protocol_prefix(uri)
    return protocol + path if protocol and not path.startswith(protocol) else path


def plan_run(config: IndexQualityConfig, uri: str) -> RunPlan:
    """Files, columns and size of `uri` from listings and Parquet footers only; the checks `load_run` makes
    on the columns are made here, before any row is read."""
    options = config.storage_options
    parquet = is_parquet(uri, options)  # "not found" is reported here, in one line
    fs, path = url_to_fs(uri, options)
    if parquet:
        paths = (
            sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]
        )
        if not paths:
            raise InputError(f"run {uri!r}: no Parquet file in the folder")
        names: list[str] = []
        rows = 0
        for p in paths:
            try:
                with fs.open(p, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                    schema = meta.schema.to_arrow_schema()
            except (pa.ArrowInvalid, OSError) as e:
                raise InputError(f"run {uri!r} cannot be read as Parquet: {e}") from None
            rows += meta.num_rows
            if CANDIDATES in schema.names:  # grouped: the candidates' fields become columns
                candidates = schema.field(CANDIDATES).type
                fields = list(candidates.value_type) if hasattr(candidates, "value_type") else []
                schema_names = [n for n in schema.names if n != CANDIDATES] + [
                    f.name for f in fields
                ]
                rows = (
                    rows - meta.num_rows + meta.num_rows * 100
                )  # ~100 candidates a query: sizing only
            else:
                schema_names = schema.names
            names += [n for n in schema_names if n not in names]
        columns = RunColumns(names)
    else:
        paths = [path]
        rows = max(1, fs.size(path) // TREC_LINE_BYTES)
        columns = RunColumns([QUERY_ID, DOC_ID, "rank", SCORE, "tag"])
    i = config.input
    order, is_score = check_columns(
        uri, columns, i.score_column, i.rank_column, i.judge_score_column
    )
    num_buckets = max(1, -(-rows // config.workers.rows_per_bucket))
    return RunPlan(
        uri, [_with_protocol(uri, p) for p in paths], parquet, order, is_score, rows, num_buckets
    )


# ---------------------------------------------------------------- scatter


def _bucket_dir(work_uri: str, bucket: int) -> str:
    return join(work_uri, f"bucket-{bucket:05d}")


def _run_tables(uri: str, parquet: bool, options: dict) -> Iterator[pa.Table]:
    """A run file's rows, a row group at a time (a TREC text file at once)."""
    if not parquet:
        yield read_run(uri, options)
        return
    fs, path = url_to_fs(uri, options)
    with fs.open(path, "rb") as f:
        reader = pq.ParquetFile(f)
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group)
            yield _explode_grouped(table) if CANDIDATES in table.column_names else table


def _judge_tables(uri: str, options: dict) -> Iterator[pa.Table]:
    """A ranked part's (query_id, doc_id, score), a row group at a time."""
    fs, path = url_to_fs(uri, options)
    with fs.open(path, "rb") as f:
        reader = pq.ParquetFile(f)
        for group in range(reader.num_row_groups):
            yield reader.read_row_group(group, columns=[QUERY_ID, DOC_ID, SCORE])


def scatter(
    kind: str, number: int, uri: str, parquet: bool, work_uri: str, num_buckets: int, options: dict
) -> int:
    """Split one source file by bucket of its query ids into `bucket-BBBBB/<kind>-<number>.parquet` fragments
    (one per bucket it has rows for). Returns the rows read. A row without a query id goes to bucket 0 (it is
    rejected there with its reason)."""
    fs, work = url_to_fs(work_uri, options)
    writers: dict[int, pq.ParquetWriter] = {}
    files = {}
    rows = 0
    tables = _run_tables(uri, parquet, options) if kind == RUN else _judge_tables(uri, options)
    try:
        for table in tables:
            rows += table.num_rows
            if table.num_rows == 0:
                continue
            ids = pc.fill_null(table[QUERY_ID].cast(pa.string()), "").combine_chunks()
            buckets = bucket_of(ids, num_buckets)
            for bucket in np.unique(buckets).tolist():
                part = table.filter(pa.array(buckets == bucket))
                if bucket not in writers:
                    folder = _bucket_dir(work, bucket)
                    fs.makedirs(folder, exist_ok=True)
                    files[bucket] = fs.open(join(folder, f"{kind}-{number:05d}.parquet"), "wb")
                    writers[bucket] = pq.ParquetWriter(files[bucket], part.schema)
                writers[bucket].write_table(part.cast(writers[bucket].schema))
    finally:
        for bucket, writer in writers.items():
            writer.close()
            files[bucket].close()
    return rows


def _read_fragments(fs, folder: str, kind: str) -> pa.Table | None:
    paths = sorted(fs.glob(join(folder, f"{kind}-*.parquet")))
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


# ---------------------------------------------------------------- measure


def _sampled(table: pa.Table, rate: float) -> pa.Table:
    """The pairs whose hash of (query_id, doc_id) falls below `rate`: the same pairs whatever the buckets."""
    if rate >= 1.0 or table.num_rows == 0:
        return table
    keys = zip(table[QUERY_ID].to_pylist(), table[DOC_ID].to_pylist())
    threshold = int(rate * 2**64)
    keep = [
        int.from_bytes(hashlib.blake2b(f"{q}\x1f{d}".encode(), digest_size=8).digest(), "little")
        < threshold
        for q, d in keys
    ]
    return table.filter(pa.array(keep, pa.bool_()))


def judge_table(pairs: pa.Table, scores: pa.Table | None) -> tuple[pa.Table | None, int]:
    """(query_id, doc_id, first_stage_rank, score = the judge's) and how many run pairs lack a judge score.
    scores: the reranker's (query_id, doc_id, score), or None to use the run's own judge score column."""
    if scores is not None:
        scores = scores.select([QUERY_ID, DOC_ID, SCORE]).cast(
            pa.schema([(QUERY_ID, pa.string()), (DOC_ID, pa.string()), (SCORE, pa.float64())])
        )
        table = pairs.select([QUERY_ID, DOC_ID, FIRST_STAGE_RANK]).join(
            scores, keys=[QUERY_ID, DOC_ID]
        )
    elif JUDGE_SCORE in pairs.column_names:
        table = pairs.select([QUERY_ID, DOC_ID, FIRST_STAGE_RANK, JUDGE_SCORE]).rename_columns(
            [QUERY_ID, DOC_ID, FIRST_STAGE_RANK, SCORE]
        )
    else:
        return None, 0
    table = table.filter(pc.invert(pc.is_nan(pc.fill_null(table[SCORE], float("nan")))))
    return table, pairs.num_rows - table.num_rows


def _prefixed(table: pa.Table, prefix: str) -> pa.Table:
    return table.rename_columns([c if c == QUERY_ID else prefix + c for c in table.column_names])


def measure_families(
    config: IndexQualityConfig,
    pairs: pa.Table,
    qrels: pa.Table | None,
    judge: pa.Table | None,
    require_judged: bool = True,
) -> dict[str, pa.Table]:
    """The per-query tables of every family the inputs allow, for whole queries (a run, or a bucket of it)."""
    m, lf = config.metrics, config.label_free
    tables = {}
    if qrels is not None:
        tables[LABELLED] = evaluate(
            pairs, qrels, m.measures, m.relevance_level, m.complete_queries, require_judged
        )
    if judge is not None and (judge.num_rows or require_judged):
        tables[LABEL_FREE] = label_free_measures(
            judge, lf.cutoffs, lf.rbo_p, lf.rbo_depth, lf.held, lf.score_is_logit
        )
        if (
            qrels is not None
        ):  # "what reranking would add": the same judged measures on the reranker's order
            tables[RERANKED] = _prefixed(
                evaluate(
                    judge, qrels, m.measures, m.relevance_level, m.complete_queries, require_judged
                ),
                RERANKED_PREFIX,
            )
    return tables


def measure_bucket(
    bucket: int,
    work_uri: str,
    config: IndexQualityConfig,
    plan: RunPlan,
    qrels: pa.Table | None,
    with_reranker: bool,
    sample_rate: float,
) -> BucketResult:
    """Read one bucket's fragments and measure its queries (on a Ray task, or in the caller for one bucket)."""
    result = BucketResult(bucket=bucket, pid=os.getpid())
    try:
        fs, work = url_to_fs(work_uri, config.storage_options)
        folder = _bucket_dir(work, bucket)
        run = _read_fragments(fs, folder, RUN)
        if run is None:
            return result
        loaded = prepare_run(
            run,
            plan.uri,
            plan.order,
            plan.is_score,
            config.input.judge_score_column,
            config.segment_columns,
        )
        pairs = loaded.pairs.drop_columns(
            [c for c in loaded.pairs.column_names if c in ("query", "document")]
        )  # texts: not measured
        result.rejected = loaded.rejected if loaded.rejected.num_rows else None
        result.pairs = pairs.num_rows
        if pairs.num_rows == 0:
            return result
        result.segments = query_segments(pairs, config.segment_columns)
        result.queries = result.segments.num_rows
        if qrels is not None:  # the judgements of this bucket's queries
            ids = qrels[QUERY_ID].cast(pa.string()).combine_chunks()
            qrels = (
                qrels.filter(pa.array(bucket_of(ids, plan.num_buckets) == bucket))
                if len(ids)
                else qrels
            )
        scores = _read_fragments(fs, folder, JUDGE) if with_reranker else None
        if with_reranker and scores is None:
            scores = pa.table(
                {
                    QUERY_ID: pa.array([], pa.string()),
                    DOC_ID: pa.array([], pa.string()),
                    SCORE: pa.array([], pa.float32()),
                }
            )
        judge, result.unjudged_pairs = judge_table(pairs, scores)
        result.tables = measure_families(config, pairs, qrels, judge, require_judged=False)
        if judge is not None and judge.num_rows:
            values = judge[SCORE].to_numpy(zero_copy_only=False).astype(np.float64)
            result.judge_pairs_total = judge.num_rows
            result.score_moments = {
                "count": len(values),
                "sum": float(values.sum()),
                "sum_sq": float(np.square(values).sum()),
                "min": float(values.min()),
                "max": float(values.max()),
            }
            both = rank_both(judge)
            result.plot_sample = _sampled(both, sample_rate).select(
                [FIRST_STAGE_RANK, RERANKER_RANK, SCORE]
            )
    except InputError as e:
        result.error = str(e)
    return result


# ---------------------------------------------------------------- running the tasks


def _ray_map(fn: Callable, calls: list[tuple], num_cpus: float, max_in_flight: int) -> Iterator:
    """fn(*args) for every args in `calls` on Ray tasks, at most `max_in_flight` at once; results as they end."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(fn)
    pending, waiting = list(calls), []
    while pending or waiting:
        while pending and len(waiting) < max_in_flight:
            waiting.append(remote.remote(*pending.pop(0)))
        done, waiting = ray.wait(waiting, num_returns=1)
        yield ray.get(done[0])


def run_tasks(
    fn: Callable, calls: list[tuple], use_ray: bool, config: IndexQualityConfig
) -> Iterable:
    if not use_ray:
        return (fn(*args) for args in calls)
    return _ray_map(fn, calls, config.workers.num_cpus, config.workers.max_in_flight)


def ray_is_running() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


@dataclass
class Combined:
    """The buckets put together on the driver: queries x measures, counts, the plot sample."""

    tables: dict[str, pa.Table]
    segments: pa.Table
    rejected: pa.Table | None
    pairs: int
    unjudged_pairs: int
    judge_pairs: pa.Table | None
    score_moments: dict | None
    buckets: list[dict]  # {bucket, pid, pairs, queries}: where each bucket was measured


def _concat_sorted(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables).sort_by(QUERY_ID).combine_chunks()


def combine(results: Iterable[BucketResult]) -> Combined:
    tables: dict[str, list[pa.Table]] = {}
    segments, rejected, samples, buckets = [], [], [], []
    pairs = unjudged = 0
    moments = None
    errors = []
    for r in results:
        if r.error:
            errors.append((r.bucket, r.error))
            continue
        buckets.append({"bucket": r.bucket, "pid": r.pid, "pairs": r.pairs, "queries": r.queries})
        pairs += r.pairs
        unjudged += r.unjudged_pairs
        for name, table in r.tables.items():
            tables.setdefault(name, []).append(table)
        if r.segments is not None:
            segments.append(r.segments)
        if r.rejected is not None:
            rejected.append(r.rejected)
        if r.plot_sample is not None:
            samples.append(r.plot_sample)
        if r.score_moments:
            m = r.score_moments
            moments = (
                dict(m)
                if moments is None
                else {
                    "count": moments["count"] + m["count"],
                    "sum": moments["sum"] + m["sum"],
                    "sum_sq": moments["sum_sq"] + m["sum_sq"],
                    "min": min(moments["min"], m["min"]),
                    "max": max(moments["max"], m["max"]),
                }
            )
    if errors:
        raise InputError(min(errors)[1])  # the same message whatever order the tasks ended in
    return Combined(
        tables={name: _concat_sorted(parts) for name, parts in tables.items()},
        segments=_concat_sorted(segments)
        if segments
        else pa.table({QUERY_ID: pa.array([], pa.string())}),
        rejected=pa.concat_tables(rejected, promote_options="permissive") if rejected else None,
        pairs=pairs,
        unjudged_pairs=unjudged,
        judge_pairs=pa.concat_tables(samples) if samples else None,
        score_moments=moments,
        buckets=sorted(buckets, key=lambda b: b["bucket"]),
    )


def measure_run(
    config: IndexQualityConfig,
    plan: RunPlan,
    output: str,
    qrels: pa.Table | None,
    reranker_parts: list[str] | None,
) -> Combined:
    """Scatter the run (and the reranker's scores) into buckets, measure each bucket, combine on the driver."""
    options = config.storage_options
    use_ray = plan.num_buckets > 1 or ray_is_running()
    if use_ray and not ray_is_running():
        from pipeline.rerank.api import ensure_ray

        ensure_ray(config.rerank_config())
    fs, root = url_to_fs(output, options)
    work_uri = _with_protocol(output, join(root, PARTS))
    if fs.exists(join(root, PARTS)):
        fs.rm(join(root, PARTS), recursive=True)  # an interrupted run's fragments
    try:
        calls = [
            (RUN, n, uri, plan.parquet, work_uri, plan.num_buckets, options)
            for n, uri in enumerate(plan.files)
        ]
        calls += [
            (JUDGE, n, uri, True, work_uri, plan.num_buckets, options)
            for n, uri in enumerate(reranker_parts or [])
        ]
        failures = [
            r for r in run_tasks(_scatter_or_error, calls, use_ray, config) if isinstance(r, str)
        ]
        if failures:
            raise InputError(min(failures))
        # The plot sample's rate, from the run's size known before reading (exact for Parquet, estimated for text).
        rate = min(1.0, config.workers.plot_sample_pairs / max(1, plan.estimated_rows))
        qrels_ref = qrels
        if use_ray and qrels is not None:
            import ray

            qrels_ref = ray.put(qrels)  # once into the object store, not once per task
        calls = [
            (b, work_uri, config, plan, qrels_ref, reranker_parts is not None, rate)
            for b in range(plan.num_buckets)
        ]
        return combine(run_tasks(measure_bucket, calls, use_ray, config))
    finally:
        if fs.exists(join(root, PARTS)):
            fs.rm(join(root, PARTS), recursive=True)


def _scatter_or_error(*args) -> int | str:
    """scatter(), or an InputError's message, raised again on the driver as one line (a Ray task's error
    would carry the worker's traceback)."""
    try:
        return scatter(*args)
    except InputError as e:
        return str(e)
