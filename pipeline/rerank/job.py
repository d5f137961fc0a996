"""The rerank job's driver: check everything, plan shards, run the pipeline, commit, summarise.

    preflight.py      the model, the cluster, the output folder: refused before any work
    plan.py           RunPlan: the input's fingerprint, shards, ranking buckets, what an earlier run committed
    cache_phases.py   the score cache: opened, looked up before scoring, published after it
    commits.py        a shard's manifest, written once its rows are all accounted for
    watchdog.py       a scoring phase that stops moving ends in one line
    summary.py        rejected rows, row accounting, summary.json last

Output layout under `--output`:
    ranked/part-BBBBB.parquet       query_id, doc_id, score (float32 raw logit), rank, carried columns
    rejected/*.parquet              input columns + reason
    summary.json                    written last: its presence means the output is complete
    _work/                          staging, manifests and markers of an unfinished run (removed at the end)

Resume: why our own manifests rather than Ray Data's checkpointing. Ray Data can skip already-written
rows by id, but the ranking step needs to know that *every* row of a query has been scored before it
ranks, and the rejected rows need the same exactly-once guarantee. So the unit of work is a shard
(whole Parquet row groups, planned from metadata) and a shard is committed by a manifest written only
after the write stage has reported files covering all of its rows (datatrove's completion markers). A
rerun skips committed shards, deletes the staging files of uncommitted ones (written before a crash,
never listed anywhere), and ranks only buckets that have no done-marker. Files are named by a hash of
their rows, and ranking drops repeated (row, window) keys, so a task Ray retried after it had written
still counts each pair once.
"""

from __future__ import annotations

import logging
import time

from pipeline.core.errors import OutputError
from pipeline.core.storage import (
    check_storage_options,
    join,
    protocol_prefix,
    read_own_files,
    url_to_fs,
    write_json,
)
from pipeline.rerank import cache_phases, compose
from pipeline.rerank.cache import read_runs
from pipeline.rerank.capacity import model_config_of, resolve_tokenizer_actors
from pipeline.rerank.commits import ShardCommits, read_manifests
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job_files import BucketMarker
from pipeline.rerank.lease import OutputLease
from pipeline.rerank.plan import (
    RunPlan,
    StageClasses,
    finished_run,
    input_fingerprint,
    input_row_bytes,
    plan_run,
    utc_now,
)
from pipeline.rerank.preflight import check_cache, check_cluster, check_model, prepare_output
from pipeline.rerank.progress import Progress
from pipeline.rerank.stages.read import list_input_files, read_schemas
from pipeline.rerank.stages.validate import InputLayout
from pipeline.rerank.summary import commit, output_metadata, rejected_schema, scorer_records
from pipeline.rerank.watchdog import watched
from pipeline.runtime.ray_runtime import ensure_ray, worker_errors

logger = logging.getLogger("rerank")


def run_rerank(
    config: RerankConfig, input_uri: str, output_uri: str, *, stages: StageClasses | None = None
) -> dict:
    """Rerank `input_uri` into `output_uri`; returns the summary (also written to summary.json). `stages`: the
    class of each step, for a test that injects a fault at one (default: the job's own)."""
    start_time, t0 = utc_now(), time.monotonic()
    check_storage_options([input_uri, output_uri, config.cache.uri], config.storage_options)
    out_fs, out_root = url_to_fs(output_uri, config.storage_options)
    protocol = protocol_prefix(output_uri)
    output_uri = protocol + out_root
    in_fs, files = list_input_files(input_uri, config.storage_options)
    fingerprint = input_fingerprint(in_fs, files)
    previous = finished_run(config, out_fs, out_root, output_uri, input_uri, fingerprint)
    if previous is not None:
        return previous

    # Everything that can be wrong with the input or the model is found here, before anything is written.
    layout = InputLayout.from_schemas(read_schemas(in_fs, files), config.input, files=files)
    model = check_model(config)
    row_bytes = input_row_bytes(in_fs, files, layout)
    # a pair too big for io.in_flight_mb: refused now
    compose.hand_offs(config, row_bytes, model["max_length"])
    if config.cache.uri:
        check_cache(config)
    prepare_output(out_fs, out_root, output_uri, config.io.create_bucket)
    with OutputLease(
        out_fs,
        out_root,
        output_uri,
        heartbeat_s=config.io.lease_heartbeat_s,
        timeout_s=config.io.lease_timeout_s,
    ) as lease:
        if out_fs.exists(join(out_root, "summary.json")):
            raise OutputError(
                f"{output_uri} was completed by another run just now; rerun to see its result"
            )
        plan = plan_run(
            config,
            input_uri,
            output_uri,
            out_fs,
            out_root,
            in_fs,
            files,
            fingerprint,
            layout,
            model,
        )
        plan.input_row_bytes = row_bytes
        plan.stages = stages or StageClasses()
        ensure_ray(config.ray_address)
        plan.config = _tokenizer_actors(config, plan)
        check_cluster(plan.config, plan.protocol)
        if config.cache.uri:
            cache_phases.open_cache_folder(plan)
            # auto-sized tokenizers: the cache may hold this model's measured rate on a GPU
            if not isinstance(config.tokenizer.num_actors, int):
                runs = read_runs(plan.cache)
                if any(r.get("device") == "cuda" for r in runs):
                    plan.config = _tokenizer_actors(config, plan, runs)
                    check_cluster(plan.config, plan.protocol)
            cache_phases.lookup(plan, lease)
        t_score, started_unix = time.monotonic(), time.time()
        this_run = _score(plan, lease)
        this_run["score_seconds"] = time.monotonic() - t_score
        this_run["score_window_unix"] = (started_unix, time.time())
        manifests = [
            m.model_dump()
            for m in read_manifests(
                plan.out_fs,
                [plan.manifest(s.shard) for s in plan.shards],
                len(plan.shards),
                plan.protocol,
            )
        ]
        fill_files = cache_phases.publish(plan, manifests, lease, this_run) if plan.cache else []
        bucket_reports = _rank(plan, manifests, lease, fill_files)
        return commit(plan, manifests, bucket_reports, lease, this_run, start_time, t0)


def _tokenizer_actors(
    config: RerankConfig, plan: RunPlan, cache_runs: list[dict] = ()
) -> RerankConfig:
    """`config` with tokenizer.num_actors auto sized from the cluster (capacity.py); a number is kept."""
    import ray

    if isinstance(config.tokenizer.num_actors, int):
        return config
    return resolve_tokenizer_actors(
        config, ray.nodes(), model_config_of(plan.model["directory"]), cache_runs
    )


def _score(plan: RunPlan, lease: OutputLease) -> dict:
    """Phase 1: score the pending shards, writing each shard's manifest once its rows are all accounted for.
    Returns this run's counts: pairs (scored or cached), rejected rows, tokens, cache hits, pairs that
    repeated another pair's texts."""
    pending = plan.pending
    totals = {"pairs": 0, "rejected": 0, "tokens": 0, "hits": 0, "same_texts": 0}
    if not pending:
        return totals
    batches = compose.hand_offs(plan.config, plan.input_row_bytes, plan.model["max_length"])
    if batches.cut(plan.config):
        logger.info(
            "pairs of about %s KB on their way to the scorer: batches cut to fit io.in_flight_mb=%d (%s)",
            f"{batches.row_bytes['scorer'] / 2**10:,.1f}",
            plan.config.io.in_flight_mb,
            ", ".join(batches.cut(plan.config)),
        )
    progress = Progress(
        plan.total_pairs,
        plan.total_pairs - sum(s.num_pairs for s in pending),
        plan.config.progress_interval_s,
    )
    commits = ShardCommits(pending)
    try:
        ds = compose.scoring_dataset(plan, batches, on_scored=progress.reporter())
        for report in worker_errors(watched(ds, progress, plan.config, batches), lease.check):
            progress.moved()
            for row in report.to_pylist():
                manifest = commits.add(row)
                if manifest is not None:
                    write_json(plan.out_fs, plan.manifest(manifest["shard"]), manifest)
                    for k in totals:
                        totals[k] += manifest[k]
        commits.check_complete()
    except BaseException:
        progress.close()
        raise
    progress.finish(totals["pairs"], totals["rejected"])
    return totals


def _rank(
    plan: RunPlan, manifests: list[dict], lease: OutputLease, fill_files: list[str]
) -> dict[int, dict]:
    """Phase 2: rank every bucket that has no done-marker yet. Returns every bucket's report."""
    bucket_files: dict[int, list[str]] = {}
    for m in manifests:
        for f in m["files"]:
            if f["kind"] == "scored":
                bucket_files.setdefault(f["bucket"], []).append(f["path"])
    ranked_dir = join(plan.work, "ranked")
    plan.out_fs.makedirs(ranked_dir, exist_ok=True)
    # One listing, not one existence check per bucket (a round trip each on object storage).
    markers = sorted(plan.out_fs.glob(join(ranked_dir, "bucket-*.json")))
    bucket_reports = {
        r.bucket: r.model_dump()
        for r in read_own_files(
            plan.out_fs,
            markers,
            BucketMarker,
            "ranked bucket's marker",
            "delete it: its bucket is ranked again on the next run",
            plan.protocol,
        )
        if r.bucket in bucket_files
    }
    todo = [
        {"bucket": b, "files": files_}
        for b, files_ in sorted(bucket_files.items())
        if b not in bucket_reports
    ]
    if todo:
        metadata = output_metadata(plan.config, plan.model, scorer_records(plan))
        ds = compose.ranking_dataset(
            plan,
            todo,
            rejected_schema(plan.layout, metadata),
            file_metadata=metadata,
            fill_files=fill_files,
        )
        for report in worker_errors(
            ds.iter_batches(batch_size=None, batch_format="pyarrow"), lease.check
        ):
            for row in report.to_pylist():
                write_json(plan.out_fs, join(ranked_dir, f"bucket-{row['bucket']:05d}.json"), row)
                bucket_reports[row["bucket"]] = row
    return bucket_reports
