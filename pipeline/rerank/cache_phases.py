"""The score cache's phases around the scoring phase: open the cache's folder for this model and settings, look
the pending pairs up before any tokenizing (phase 0), publish the new scores once every shard is committed
(phase 1b), and say what the cache did for summary.json. Its stages are in stages/lookup.py, its files in cache.py.
"""

from __future__ import annotations

import hashlib
import json
import logging

from pipeline.core.storage import join, read_own_files
from pipeline.rerank import compose
from pipeline.rerank.cache import (
    checkpoint_digest,
    fingerprint,
    open_cache,
    read_runs,
    record_run,
)
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job_files import QuarantineRecord
from pipeline.rerank.lease import OutputLease
from pipeline.rerank.plan import RunPlan, utc_now
from pipeline.rerank.stages.lookup import QUARANTINED
from pipeline.runtime.ray_runtime import worker_errors

logger = logging.getLogger("rerank")


def open_cache_folder(plan: RunPlan) -> None:
    """The score cache's folder for this model and settings (created if new): the fingerprint covers the
    checkpoint's bytes and every setting that changes a score. `dtype: auto` is resolved here, on a task placed
    like a scorer, and the scorers are given the result, so the fingerprint names the dtype they really run."""
    config = plan.config
    _, resources = compose.scorer_pool(config)
    device = "cuda" if resources.get("num_gpus") else "cpu"
    dtype = config.dtype if config.dtype != "auto" else _scorer_dtype(device, resources)
    tokenizer = {"max_chars_per_token", "long_documents"} | (
        {"max_query_length", "overlap"} if config.tokenizer.long_documents == "windows" else set()
    )
    settings = {
        "dtype": dtype,
        "device": device,
        "max_length": plan.model["max_length"],
        "tokenizer": config.tokenizer.model_dump(mode="json", include=tokenizer),
    }
    if dtype == "int8":
        settings["int8"] = int8_settings(config, plan.model["fp32_layers"], **_scorer_int8())
    if plan.model.get("prompt"):  # a decoder reranker's template and instruction
        settings["prompt"] = plan.model["prompt"]
    checkpoint = checkpoint_digest(plan.model["directory"])
    name = fingerprint(checkpoint, settings)
    plan.cache = open_cache(
        config.cache.uri,
        config.storage_options,
        name,
        {
            "model": config.model,
            "revision": str(plan.model["revision"]),
            "checkpoint": checkpoint,
            "settings": settings,
        },
        config.cache.buckets,
    )
    plan.dtype = dtype
    logger.info(
        "score cache %s (%d buckets) for %s, %s on %s",
        plan.cache.uri,
        plan.cache.buckets,
        config.model,
        dtype,
        device,
    )


def int8_settings(
    config: RerankConfig, fp32_layers: list[str], weight_qmax: int, calibration: str
) -> dict:
    """What changes an int8 score besides the weights, for the cache's fingerprint: the configured options, the
    float32 layers by name (patterns that pick the same layers score the same), and what `_scorer_int8` found."""
    return {
        "weight_qmax": weight_qmax,
        "smooth_alpha": config.int8.smooth_alpha,
        "fp32_layers": fp32_layers,
        "calibration": calibration,
    }


# What a task on the cluster found, per (cluster, question): a driver that runs several jobs on one Ray (the
# Python API, the hard-negatives and index-quality jobs, a test session) asks once. Each answer costs a worker
# that imports torch and, for the dtype, a GEMM probe: about a second per job otherwise.
_ASKED: dict[tuple, object] = {}


def _once_per_cluster(question: tuple, ask):
    import ray

    key = (ray.get_runtime_context().gcs_address, *question)
    if key not in _ASKED:
        _ASKED[key] = ask()
    return _ASKED[key]


def _scorer_int8() -> dict:
    """What a scorer's CPU and the engine decide about int8: the weights' range (63 on CPUs without VNNI, 127
    with it, so the two never share entries) and a digest of the pairs SmoothQuant calibrates on."""
    return dict(_once_per_cluster(("int8",), _ask_scorer_int8))


def _ask_scorer_int8() -> dict:
    import ray

    @ray.remote(num_cpus=0)
    def resolve() -> dict:
        from pipeline.model.quantization import CALIBRATION_PAIRS, Int8Options, weight_qmax

        calibration = Int8Options().calibration_pairs or CALIBRATION_PAIRS
        digest = hashlib.blake2b(json.dumps(calibration).encode(), digest_size=8).hexdigest()
        return {"weight_qmax": weight_qmax(), "calibration": digest}

    return ray.get(resolve.remote())


def _scorer_dtype(device: str, resources: dict) -> str:
    """What `dtype: auto` resolves to where a scorer runs (a GPU node, or any CPU node)."""
    gpus = resources.get("num_gpus", 0)
    return _once_per_cluster(("dtype", device, gpus), lambda: _ask_scorer_dtype(device, gpus))


def _ask_scorer_dtype(device: str, gpus: float) -> str:
    import ray

    @ray.remote(num_cpus=0, num_gpus=gpus and 0.01)
    def resolve(device: str) -> str:
        import torch

        from pipeline.model.cross_encoder import resolve_dtype

        return str(resolve_dtype("auto", torch.device(device))).replace("torch.", "")

    return ray.get(resolve.remote(device))


def lookup(plan: RunPlan, lease: OutputLease) -> None:
    """Phase 0 (score cache): find the pending shards' pairs in the cache, per cache bucket, before any
    tokenizing. Writes the found files the read stage attaches (stages/lookup.py)."""
    if not plan.pending:
        return
    lookup_dir = join(plan.work, "lookup")
    if plan.out_fs.exists(lookup_dir):  # an earlier run's lookup: the cache may hold more by now
        plan.out_fs.rm(lookup_dir, recursive=True)
    keys, join_buckets = compose.lookup_datasets(plan)
    files: dict[int, list[str]] = {}
    for report in worker_errors(
        keys().iter_batches(batch_size=None, batch_format="pyarrow"), lease.check
    ):
        for row in report.to_pylist():
            listed = files.setdefault(row["bucket"], [])
            if row["path"] not in listed:  # a retried task reports the file it rewrote again
                listed.append(row["path"])
    counts = {"hits": 0, "same_texts": 0, "to_score": 0}
    if files:
        ds = join_buckets([{"bucket": b, "files": f} for b, f in sorted(files.items())])
        for report in worker_errors(
            ds.iter_batches(batch_size=None, batch_format="pyarrow"), lease.check
        ):
            for row in report.to_pylist():
                for k in counts:
                    counts[k] += row[k]
    logger.info(
        "score cache: %s pairs found, %s repeat another pair of this run, %s to score",
        f"{counts['hits']:,}",
        f"{counts['same_texts']:,}",
        f"{counts['to_score']:,}",
    )


def publish(plan: RunPlan, manifests: list[dict], lease: OutputLease, this_run: dict) -> list[str]:
    """Phase 1b (score cache): every shard is committed; publish their new scores to the cache and give the
    pairs that waited for a twin their score. Returns the fill files the ranker reads."""
    new: dict[int, list[str]] = {}
    waiting: dict[int, list[str]] = {}
    for m in manifests:
        for f in m["files"]:
            if f["kind"] in ("cache", "waiting"):
                (new if f["kind"] == "cache" else waiting).setdefault(f["bucket"], []).append(
                    f["path"]
                )
    items = [
        {"bucket": b, "new_files": new.get(b, []), "waiting_files": waiting.get(b, [])}
        for b in sorted(set(new) | set(waiting))
    ]
    fill_files, added = [], 0
    if items:
        ds = compose.publish_dataset(plan, items)
        for report in worker_errors(
            ds.iter_batches(batch_size=None, batch_format="pyarrow"), lease.check
        ):
            for row in report.to_pylist():
                added += row["entries_added"]
                if row["filled"]:
                    fill_files.append(join(plan.work, "cache", f"fill-{row['bucket']:05d}.parquet"))
    this_run["entries_added"] = added
    logger.info("score cache: %s new entries published", f"{added:,}")
    return sorted(fill_files)


def cache_summary(
    plan: RunPlan, manifests: list[dict], this_run: dict, scorers: list[dict]
) -> dict:
    """What the score cache did: over the whole output (hits, repeats, misses) and in this run (pairs the model
    scored, scorer-seconds it saved at the model's measured rate); recorded in the cache for later estimates.
    `scorers`: the scorer actors' records (`summary.scorer_records`), for the device the rate was measured on."""
    scored_now = this_run["pairs"] - this_run["hits"] - this_run["same_texts"]
    seconds = this_run["score_seconds"]
    fields = {
        "pairs_scored": scored_now,
        "model_pairs_per_s": round(scored_now / seconds, 2) if seconds > 0 and scored_now else None,
    }
    if plan.cache is None:
        return fields | {"cache": None}
    actors = compose.scorer_pool(plan.config)[0]
    # Cache files that did not read: skipped (their pairs scored again) and moved aside by the lookup.
    quarantined = [
        r.model_dump()
        for r in read_own_files(
            plan.out_fs,
            sorted(plan.out_fs.glob(join(plan.work, QUARANTINED, "*.json"))),
            QuarantineRecord,
            "note of a quarantined cache file",
            "delete it: it only names a moved cache file for summary.json",
            plan.protocol,
        )
    ]
    for q in quarantined:
        logger.warning(
            "score cache: %s does not read (%s); skipped, its pairs scored again, moved to %s",
            q["path"],
            q["reason"],
            q["moved_to"] or "the quarantine by another run",
        )
    # The model's rate: this run's, if it scored enough pairs to measure it, else the best measured run of the
    # same cache folder (a warm run that scored nothing still gets an estimate).
    rate = fields["model_pairs_per_s"] if scored_now >= 1000 else None
    if rate is None:
        measured = [
            r
            for r in read_runs(plan.cache)
            if r.get("model_pairs_per_s") and r.get("pairs_scored", 0) >= 1000
        ]
        best = max(measured, key=lambda r: r["pairs_scored"], default=None)
        rate = best["model_pairs_per_s"] if best else None
    saved = this_run["hits"] + this_run["same_texts"]
    hits = sum(m.get("hits", 0) for m in manifests)
    same = sum(m.get("same_texts", 0) for m in manifests)
    cache = {
        "uri": plan.config.cache.uri,
        "fingerprint": plan.cache.fingerprint,
        "buckets": plan.cache.buckets,
        "entries_added": this_run.get("entries_added", 0),
        "quarantined_files": len(quarantined),
        "quarantined": [q["path"] for q in quarantined],
        "this_run": {
            "hits": this_run["hits"],
            "same_texts": this_run["same_texts"],
            "scored": scored_now,
        },
    }
    record_run(
        plan.cache,
        {
            "output_uri": plan.output_uri,
            "end_time": utc_now(),
            "hits": this_run["hits"],
            "same_texts": this_run["same_texts"],
            "pairs_scored": scored_now,
            "model_pairs_per_s": fields["model_pairs_per_s"],
            "scorer_actors": actors,
            # which device the rate was measured on: only a GPU run's sizes GPU pools
            "device": ",".join(sorted({s["device"] for s in scorers})) or None,
            "entries_added": cache["entries_added"],
        },
    )
    return fields | {
        "cache_hits": hits,
        "cache_same_texts": same,
        "cache_misses": sum(m["pairs"] for m in manifests) - hits - same,
        # Scorer-seconds (GPU-seconds on a GPU pool) this run did not spend: pairs it took from the cache or
        # from a repeated pair, at the model's rate per actor. An estimate: null when no rate was ever measured.
        "scorer_seconds_saved": round(saved * actors / rate, 1) if rate else None,
        "cache": cache,
    }
