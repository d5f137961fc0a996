"""The end of a run: rejected rows moved out of staging, the rows accounted for (input = scored + rejected),
summary.json written last (its presence means the output is complete), the staging removed. Also what every
output file says about what produced it, and how busy the scorers were.
"""

from __future__ import annotations

import json
import logging
import time
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema as S
from pipeline.core.config import redact
from pipeline.core.errors import PipelineError
from pipeline.core.storage import atomic_write, join, read_own_files, write_json
from pipeline.rerank.cache_phases import cache_summary
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job_files import ScorerRecord
from pipeline.rerank.plan import RunPlan, settings_hash, utc_now
from pipeline.rerank.stages.validate import InputLayout

logger = logging.getLogger("rerank")


def rejected_schema(layout: InputLayout, metadata: dict | None = None) -> pa.Schema:
    """The schema of a rejected/ file: the input pair's columns and `reason`, with `metadata` on it."""
    return layout.pair_schema.append(pa.field(S.REASON, pa.string())).with_metadata(metadata)


def _job_version() -> str:
    try:
        return version("rerank-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def output_metadata(config: RerankConfig, model: dict, scorers: list[dict]) -> dict[str, str]:
    """Parquet key-value metadata on every file under ranked/ and rejected/: a file copied out of an output
    still says what produced it (and that a smoke run's scores are random). No timestamps: a rerun of the same
    job writes the same bytes."""
    return {
        "rerank.model": config.model,
        "rerank.revision": str(model["revision"]),
        "rerank.dtype": ",".join(sorted({s["dtype"] for s in scorers})) or str(config.dtype),
        "rerank.random_weights": json.dumps(
            any(s.get("random_weights") for s in scorers) or config.model.startswith("dummy:")
        ),
        "rerank.config_hash": settings_hash(config),
        "rerank.job_version": _job_version(),
        "rerank.score": "raw logit (float32); sigmoid gives jina's compute_score",
    }


def scorer_records(plan: RunPlan) -> list[dict]:
    """What each scorer actor recorded about the model it ran (dtype, kernel, device), this run or earlier."""
    return [
        r.model_dump()
        for r in read_own_files(
            plan.out_fs,
            plan.out_fs.glob(join(plan.work, "scorers", "*.json")),
            ScorerRecord,
            "scorer record",
            "delete it: it only describes one scorer for summary.json",
            plan.protocol,
        )
    ]


def move_rejected(plan: RunPlan, manifests: list[dict], scorers: list[dict]) -> dict[str, int]:
    """Rejected rows from staging to rejected/ (an empty table if none); returns rejected rows by reason."""
    fs, rejected_dir = plan.out_fs, join(plan.out_root, "rejected")
    fs.makedirs(rejected_dir, exist_ok=True)
    schema = rejected_schema(plan.layout, output_metadata(plan.config, plan.model, scorers))
    reasons: dict[str, int] = {}
    for m in manifests:
        for k, f in enumerate(x for x in m["files"] if x["kind"] == "rejected"):
            with fs.open(f["path"], "rb") as fh:
                table = pq.read_table(fh)
            for reason in table.column(S.REASON).to_pylist():
                reasons[reason] = reasons.get(reason, 0) + 1
            table = table.select(schema.names).replace_schema_metadata(schema.metadata)
            atomic_write(
                fs,
                join(rejected_dir, f"shard-{m['shard']:05d}-{k:03d}.parquet"),
                lambda fh, t=table: pq.write_table(t, fh),
            )
    if not fs.glob(join(rejected_dir, "*.parquet")):
        # Nothing rejected: an empty table with the schema, so that readers of rejected/*.parquet find a file.
        atomic_write(
            fs,
            join(rejected_dir, "part-empty.parquet"),
            lambda fh: pq.write_table(schema.empty_table(), fh),
        )
    return reasons


def _number(value) -> float | None:
    return (
        value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        else None
    )


def busy(record: dict, window: tuple[float, float] | None = None) -> dict:
    """A scorer record's busy seconds, wall seconds and their ratio (None where the record has no numbers).
    A scorer of this run (ready within `window`, the scoring phase's start and end, Unix time) is counted up
    to the phase's end: the record is written only inside calls, so a scorer that waited for tokens after its
    last call would otherwise look busier than it was."""
    busy, wall, ready = (
        _number(record.get("busy_s")),
        _number(record.get("wall_s")),
        _number(record.get("ready_unix")),
    )
    if window is not None and ready is not None and window[0] <= ready <= window[1]:
        wall = round(window[1] - ready, 3)
    return {
        "busy_s": busy,
        "wall_s": wall,
        "busy_fraction": round(min(1.0, busy / wall), 3) if busy is not None and wall else None,
    }


def mean_busy(scorers: list[dict], window: tuple[float, float] | None = None) -> float | None:
    fractions = [f for f in (busy(s, window)["busy_fraction"] for s in scorers) if f is not None]
    return round(sum(fractions) / len(fractions), 3) if fractions else None


def commit(plan: RunPlan, manifests, bucket_reports, lease, this_run: dict, start_time, t0) -> dict:
    """Rejected rows out of staging, counts reconciled, summary.json last, staging removed."""
    config, fs = plan.config, plan.out_fs
    new_pairs, new_tokens = this_run["pairs"] + this_run["rejected"], this_run["tokens"]
    score_seconds = this_run["score_seconds"]
    scorers = scorer_records(plan)
    reasons = move_rejected(plan, manifests, scorers)
    duplicates = sum(r["duplicates"] for r in bucket_reports.values())
    if duplicates:
        reasons["duplicate (query_id, doc_id)"] = duplicates
    scored_rows = sum(r["scored"] for r in bucket_reports.values())
    rejected_rows = sum(reasons.values())
    if scored_rows + rejected_rows != plan.total_pairs:
        raise PipelineError(
            f"row accounting failed: {plan.total_pairs} input pairs but {scored_rows} scored + "
            f"{rejected_rows} rejected; the output in {plan.output_uri} is left incomplete"
        )
    engine = scorers[0] if scorers else {}
    elapsed = time.monotonic() - t0
    summary = {
        "input_rows": plan.total_pairs,
        "scored_rows": scored_rows,
        "rejected_rows": rejected_rows,
        "ranked_rows_written": sum(r["written"] for r in bucket_reports.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "input_uri": plan.input_uri,
        "input_fingerprint": plan.fingerprint,
        "input_format": "grouped" if plan.layout.grouped else "long",
        "input_files": len(plan.files),
        "shards": len(plan.shards),
        "shards_resumed": len(plan.committed),
        "ranking_buckets": plan.num_buckets,
        "pairs_this_run": new_pairs,
        "tokens": sum(m["tokens"] for m in manifests),
        "pairs_per_s": round(new_pairs / score_seconds, 2)
        if score_seconds > 0 and new_pairs
        else None,
        "tokens_per_s": round(new_tokens / score_seconds, 1)
        if score_seconds > 0 and new_tokens
        else None,
        "seconds": round(elapsed, 2),
        # Dense layers always run on packed tokens; attention is padding-free with the varlen kernels and with
        # SDPA on CPU (runs of equal length). Only SDPA on a GPU pads inside length groups, not counted: null.
        "padding_efficiency": None
        if any(
            s["attention_backend"] == "sdpa_length_grouped" and s["device"] != "cpu"
            for s in scorers
        )
        else 1.0,
        "model": config.model,
        "revision": plan.model["revision"],
        "layout": plan.model["layout"]
        or (sorted({s["layout"] for s in scorers})[0] if scorers else None),
        "dtype": sorted({s["dtype"] for s in scorers}) if scorers else None,
        "attention_backend": sorted({s["attention_backend"] for s in scorers}) if scorers else None,
        "device": sorted({s["device"] for s in scorers}) if scorers else None,
        # where each scorer actor ran (this run or an earlier one of this output): its device and Ray node
        # and how busy it was: seconds scoring over seconds since it was ready (null in records that predate it)
        "scorers": sorted(
            (
                {
                    "device": s["device"],
                    "node_id": s.get("node_id"),
                    **busy(s, this_run.get("score_window_unix")),
                }
                for s in scorers
            ),
            key=lambda s: (s["node_id"] or "", s["device"]),
        ),
        # the pool's mean busy fraction: near 1, the scorers set the pace; well below, they waited for tokens
        "scorer_busy_fraction": mean_busy(scorers, this_run.get("score_window_unix")),
        "random_weights": bool(engine.get("random_weights", config.model.startswith("dummy:"))),
        "max_length": plan.model["max_length"],
        # A decoder reranker's prompt as it ran: the template's every field and the instruction, the default one
        # included when tokenizer.instruction was left null (null for a cross-encoder).
        "prompt": plan.model.get("prompt"),
        "long_documents": config.tokenizer.long_documents,
        "top_k": config.output.top_k,
        **cache_summary(plan, manifests, this_run, scorers),
        "config_hash": settings_hash(config),
        "settings": config.result_settings(),
        "config": redact(config.model_dump(mode="json")),
        "start_time": start_time,
        "end_time": utc_now(),
    }
    if summary["random_weights"]:
        logger.warning(
            "RANDOM WEIGHTS: %s is a dummy model; these scores mean nothing", config.model
        )
    lease.check()  # never publish a summary over another run's files
    write_json(fs, join(plan.out_root, "summary.json"), summary)
    fs.rm(plan.work, recursive=True)
    logger.info(
        "done: %s scored, %s rejected in %.1fs -> %s",
        f"{scored_rows:,}",
        f"{rejected_rows:,}",
        elapsed,
        plan.output_uri,
    )
    return summary
