"""The rerank job's driver: check everything, plan shards, run the pipeline, commit, summarise.

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

import hashlib
import json
import logging
import os
import posixpath
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import redact
from pipeline.errors import InputError, PipelineError
from pipeline.model.checkpoint import inspect_checkpoint, resolve_model_directory
from pipeline.rerank_config import RerankConfig
from pipeline.stages.read import list_input_files, plan_shards, query_ids_unique, read_schemas
from pipeline.stages.validate import InputLayout
from pipeline.storage import join, read_json, read_jsons, url_to_fs, write_json

logger = logging.getLogger("rerank")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Progress:
    """Pairs done / total and pairs per second, printed every few seconds (Ray's block bars are off)."""

    def __init__(self, total: int, done: int, interval: float):
        self.total, self.done, self.rejected, self.interval = total, done, 0, interval
        self.start = self.last = time.monotonic()
        self.new = 0

    def add(self, pairs: int, rejected: int) -> None:
        self.done += pairs + rejected
        self.new += pairs + rejected
        self.rejected += rejected
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            rate = self.new / max(now - self.start, 1e-9)
            logger.info("scored %s/%s pairs (%.1f%%), %.0f pairs/s, %s rejected", f"{self.done:,}",
                        f"{self.total:,}", 100 * self.done / max(self.total, 1), rate, f"{self.rejected:,}")


def _rejected_schema(layout: InputLayout) -> pa.Schema:
    return layout.pair_schema.append(pa.field(S.REASON, pa.string()))


def check_model(config: RerankConfig) -> dict:
    """Resolve the checkpoint and read its layout before any work starts (weights are loaded by the actors)."""
    directory, revision = resolve_model_directory(config.model, config.revision)
    layout, model_config = inspect_checkpoint(directory)
    return {"directory": directory, "revision": revision, "layout": layout.name,
            "max_length": min(config.tokenizer.max_length, model_config.max_tokens_per_sequence)}


def settings_hash(config: RerankConfig) -> str:
    """summary.json's `config_hash`: a hash of `RerankConfig.result_settings()` (what changes the output)."""
    return hashlib.sha256(json.dumps(config.result_settings(), sort_keys=True).encode()).hexdigest()[:16]


def _job_identity(config: RerankConfig, files: list[str], fs) -> dict:
    return {"config_hash": settings_hash(config),
            "input": [{"path": p, "size": fs.size(p)} for p in files]}


def _ensure_ray(config: RerankConfig) -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS is set by `ray job submit` and on cluster nodes; otherwise start a fresh local Ray rather
        # than attach to whatever cluster this machine ran last.
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _check_cluster(config: RerankConfig, protocol: str) -> None:
    """What the cluster must offer before any work: GPUs if asked for, shared storage if several nodes."""
    import ray

    if config.scorer.device == "cuda" and not ray.cluster_resources().get("GPU"):
        raise InputError("scorer.device is cuda but the Ray cluster has no GPU; use scorer.device=auto or cpu, "
                         "or wait for GPU workers to join")
    hosts = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1 and protocol in ("", "file://", "local://"):
        raise InputError(f"a cluster of {len(hosts)} machines cannot share a local --output; use object storage "
                         "(s3://, gs://) or a shared filesystem's URI")
    # The scoring phase's actor pools are fixed-size and all start together: if their CPUs exceed the
    # cluster's, Ray Data waits for resources forever. A Ray of this machine alone cannot grow; a remote
    # cluster may autoscale, so there it is a warning.
    from pipeline.compose import scorer_pool

    size, resources = scorer_pool(config)
    asks = {"tokenizer": config.tokenizer.num_actors * config.tokenizer.num_cpus,
            "scorer": size * resources["num_cpus"], "io (read + write)": 2 * config.io.num_actors * config.io.num_cpus}
    have = ray.cluster_resources().get("CPU", 0)
    if sum(asks.values()) > have + 1e-9:
        message = (f"the scoring phase asks for {sum(asks.values()):g} CPUs (" +
                   ", ".join(f"{k} {v:g}" for k, v in asks.items()) + f") but the Ray cluster has {have:g}; lower "
                   "tokenizer.num_actors / tokenizer.num_cpus, io.num_actors / io.num_cpus or scorer.num_cpus")
        if len(hosts) == 1 and not (config.ray_address or os.environ.get("RAY_ADDRESS")):
            raise InputError(message)
        logger.warning("%s (waiting for the autoscaler, if any)", message)


def _worker_errors(batches):
    """Re-raise a PipelineError raised inside a Ray worker as itself (one line), not a Ray traceback."""
    from ray.exceptions import RayTaskError

    try:
        yield from batches
    except RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), PipelineError) else None
        if cause is None:
            raise
        raise type(cause)(str(cause)) from None


def run_rerank(config: RerankConfig, input_uri: str, output_uri: str) -> dict:
    """Rerank `input_uri` into `output_uri`; returns the summary (also written to summary.json)."""
    start_time, t0 = _now(), time.monotonic()
    out_fs, out_root = url_to_fs(output_uri, config.storage_options)
    protocol = output_uri.split("://")[0] + "://" if "://" in output_uri else ""
    output_uri = protocol + out_root  # absolute: workers resolve it the same way wherever they run
    summary_path = join(out_root, "summary.json")
    work = join(out_root, "_work")
    if out_fs.exists(summary_path):
        previous = read_json(out_fs, summary_path)
        if previous.get("config_hash") != settings_hash(config):
            raise InputError(f"{output_uri} already holds a finished run with other settings (model "
                             f"{previous.get('model')!r}); use another --output, or delete it to run again")
        if out_fs.exists(work):  # a crash after the summary, before the staging was removed
            out_fs.rm(work, recursive=True)
        logger.info("%s is already complete (summary.json exists); nothing to do", output_uri)
        return previous

    # -- everything that can be wrong with the input or the model is found here, before any work --------
    in_fs, files = list_input_files(input_uri, config.storage_options)
    layout = InputLayout.from_schemas(read_schemas(in_fs, files), config.input, files=files)
    model = check_model(config)
    shards = plan_shards(in_fs, files, layout, config.input.rows_per_shard)
    total_pairs = sum(s.num_pairs for s in shards)
    grouped = layout.grouped
    # Grouped input ranks each shard on its own (no shuffle) only if no query id spans two rows.
    rank_per_shard = grouped and query_ids_unique(in_fs, files, config.input.query_id_column)
    if grouped and not rank_per_shard:
        logger.info("grouped input repeats query ids across rows: ranking by hash(query_id) buckets instead")
    num_buckets = len(shards) if rank_per_shard else max(1, -(-total_pairs // config.output.rows_per_bucket))
    work_uri = protocol + work

    identity = _job_identity(config, files, in_fs) | {"num_buckets": num_buckets, "shards": len(shards),
                                                       "rank_per_shard": rank_per_shard}
    identity_path = join(work, "job.json")
    if out_fs.exists(identity_path):
        previous = read_json(out_fs, identity_path)
        if previous != identity:
            raise InputError(f"{output_uri} holds an unfinished run with other settings or input; "
                             "use another --output, or delete it to start over")
        logger.info("resuming the unfinished run in %s", output_uri)
    else:
        out_fs.makedirs(work, exist_ok=True)
        write_json(out_fs, identity_path, identity)

    manifests_dir = join(work, "manifests")
    out_fs.makedirs(manifests_dir, exist_ok=True)
    # glob, not ls: object stores have no folders, an empty prefix simply lists nothing.
    committed = {int(posixpath.basename(p)[len("shard-"):-len(".json")])
                 for p in out_fs.glob(join(manifests_dir, "shard-*.json"))}
    pending = [s for s in shards if s.shard not in committed]
    for shard in pending:  # staging files of a shard that never committed were written before a crash
        stale = join(work, "scored", f"shard-{shard.shard:05d}")
        if out_fs.exists(stale):
            out_fs.rm(stale, recursive=True)
    logger.info("%s pairs in %d shard(s) (%s input); %d already done, %d to score; model %s (%s layout)",
                f"{total_pairs:,}", len(shards), "grouped" if grouped else "long", len(committed), len(pending),
                config.model, model["layout"])

    _ensure_ray(config)
    _check_cluster(config, protocol)
    from pipeline.compose import ranking_dataset, scoring_dataset

    # -- phase 1: score ---------------------------------------------------------------------------------
    done_before = sum(s.num_pairs for s in shards if s.shard in committed)
    progress = Progress(total_pairs, done_before, config.progress_interval_s)
    t_score = time.monotonic()
    new_pairs, new_tokens = 0, 0
    if pending:
        by_id = {s.shard: s for s in pending}
        seen: dict[int, dict] = {s.shard: {"pairs": 0, "rejected": 0, "tokens": 0, "windows": 0, "windows_expected": 0,
                                           "files": {}} for s in pending}
        ds = scoring_dataset(pending, layout, config, input_uri, work_uri, num_buckets, rank_per_shard)
        for report in _worker_errors(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            for row in report.to_pylist():
                state = seen[row["shard"]]
                if row["path"] in state["files"]:
                    continue  # a retried task rewrote the same file
                state["files"][row["path"]] = row
                if row["kind"] == "rejected":
                    state["rejected"] += row["pairs"]
                else:
                    state["pairs"] += row["pairs"]
                    state["tokens"] += row["tokens"]
                    state["windows"] += row["rows"]
                    state["windows_expected"] += row["windows_expected"]
                progress.add(row["pairs"] if row["kind"] == "scored" else 0,
                             row["pairs"] if row["kind"] == "rejected" else 0)
                shard = by_id[row["shard"]]
                complete = (state["pairs"] + state["rejected"] >= shard.num_pairs
                            and state["windows"] >= state["windows_expected"])  # a row's windows may arrive late
                if complete and "committed" not in state:
                    state["committed"] = True
                    write_json(out_fs, join(manifests_dir, f"shard-{shard.shard:05d}.json"), {
                        "shard": shard.shard, "pairs": state["pairs"], "rejected": state["rejected"],
                        "tokens": state["tokens"], "files": list(state["files"].values())})
                    new_pairs += state["pairs"] + state["rejected"]
                    new_tokens += state["tokens"]
        incomplete = [s for s, st in seen.items() if "committed" not in st]
        if incomplete:
            st = seen[incomplete[0]]
            raise PipelineError(f"shard {incomplete[0]} finished with {st['pairs'] + st['rejected']} of "
                                f"{by_id[incomplete[0]].num_pairs} rows accounted for; rerun to retry it")
    score_seconds = time.monotonic() - t_score

    # -- phase 2: rank ----------------------------------------------------------------------------------
    manifests = read_jsons(out_fs, [join(manifests_dir, f"shard-{s.shard:05d}.json") for s in shards])
    bucket_files: dict[int, list[str]] = {}
    for m in manifests:
        for f in m["files"]:
            if f["kind"] == "scored":
                bucket_files.setdefault(f["bucket"], []).append(f["path"])
    ranked_dir = join(work, "ranked")
    out_fs.makedirs(ranked_dir, exist_ok=True)
    # One listing, not one existence check per bucket (a round trip each on object storage).
    markers = sorted(out_fs.glob(join(ranked_dir, "bucket-*.json")))
    bucket_reports = {r["bucket"]: r for r in read_jsons(out_fs, markers) if r["bucket"] in bucket_files}
    todo = [{"bucket": b, "files": files_} for b, files_ in sorted(bucket_files.items()) if b not in bucket_reports]
    if todo:
        for report in _worker_errors(ranking_dataset(todo, config, output_uri, _rejected_schema(layout), shards, layout, input_uri).iter_batches(
                batch_size=None, batch_format="pyarrow")):
            for row in report.to_pylist():
                write_json(out_fs, join(ranked_dir, f"bucket-{row['bucket']:05d}.json"), row)
                bucket_reports[row["bucket"]] = row

    # -- commit: rejected rows out of staging, counts reconciled, summary last ---------------------------
    rejected_dir = join(out_root, "rejected")
    out_fs.makedirs(rejected_dir, exist_ok=True)
    reasons: dict[str, int] = {}
    for m in manifests:
        for k, f in enumerate(x for x in m["files"] if x["kind"] == "rejected"):
            with out_fs.open(f["path"], "rb") as fh:
                table = pq.read_table(fh)
            for reason in table.column(S.REASON).to_pylist():
                reasons[reason] = reasons.get(reason, 0) + 1
            table = table.select(_rejected_schema(layout).names)
            target = join(rejected_dir, f"shard-{m['shard']:05d}-{k:03d}.parquet")
            with out_fs.open(target + ".tmp", "wb") as fh:
                pq.write_table(table, fh)
            out_fs.mv(target + ".tmp", target)
    duplicates = sum(r["duplicates"] for r in bucket_reports.values())
    if duplicates:
        reasons["duplicate (query_id, doc_id)"] = duplicates
    scored_rows = sum(r["scored"] for r in bucket_reports.values())
    rejected_rows = sum(reasons.values())
    if scored_rows + rejected_rows != total_pairs:
        raise PipelineError(f"row accounting failed: {total_pairs} input pairs but {scored_rows} scored + "
                            f"{rejected_rows} rejected; the output in {output_uri} is left incomplete")
    scorers = read_jsons(out_fs, out_fs.glob(join(work, "scorers", "*.json")))
    engine = scorers[0] if scorers else {}
    total_tokens = sum(m["tokens"] for m in manifests)
    elapsed = time.monotonic() - t0
    summary = {
        "input_rows": total_pairs, "scored_rows": scored_rows, "rejected_rows": rejected_rows,
        "ranked_rows_written": sum(r["written"] for r in bucket_reports.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "input_format": "grouped" if grouped else "long", "input_files": len(files),
        "shards": len(shards), "shards_resumed": len(committed), "ranking_buckets": num_buckets,
        "pairs_this_run": new_pairs, "tokens": total_tokens,
        "pairs_per_s": round(new_pairs / score_seconds, 2) if score_seconds > 0 and new_pairs else None,
        "tokens_per_s": round(new_tokens / score_seconds, 1) if score_seconds > 0 and new_tokens else None,
        "seconds": round(elapsed, 2),
        # Dense layers always run on packed tokens; attention is padding-free with the varlen kernels and with
        # SDPA on CPU (runs of equal length). Only SDPA on a GPU pads inside length groups, not counted: null.
        "padding_efficiency": None if any(s["attention_backend"] == "sdpa_length_grouped" and s["device"] != "cpu"
                                          for s in scorers) else 1.0,
        "model": config.model, "revision": model["revision"], "layout": model["layout"],
        "dtype": sorted({s["dtype"] for s in scorers}) if scorers else None,
        "attention_backend": sorted({s["attention_backend"] for s in scorers}) if scorers else None,
        "device": sorted({s["device"] for s in scorers}) if scorers else None,
        "random_weights": bool(engine.get("random_weights", config.model.startswith("dummy:"))),
        "max_length": model["max_length"], "long_documents": config.tokenizer.long_documents,
        "top_k": config.output.top_k,
        "config_hash": settings_hash(config), "config": redact(config.model_dump(mode="json")),
        "start_time": start_time, "end_time": _now(),
    }
    if summary["random_weights"]:
        logger.warning("RANDOM WEIGHTS: %s is a dummy model; these scores mean nothing", config.model)
    write_json(out_fs, summary_path, summary)
    out_fs.rm(work, recursive=True)
    logger.info("done: %s scored, %s rejected in %.1fs -> %s", f"{scored_rows:,}", f"{rejected_rows:,}", elapsed,
                output_uri)
    return summary

