"""`python -m jobs.rerank --dry-run`: the plan of a run, and how many GPUs it needs, without running it.

Reads the input's Parquet metadata and a sample of its pairs (spread over every shard), tokenizes the sample with
the model's real tokenizer, and prints the shards, the sampled token lengths, the cache hits to expect, the pool
sizes and the wall time per GPU count. Nothing is scored, nothing is written under --output (no lease, no
_work), and Ray is not started: the cluster read is this machine's, or the running cluster's when RAY_ADDRESS
(or ray_address) names one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema as S
from pipeline.core.errors import InfrastructureError, OutputError
from pipeline.rerank import capacity as C
from pipeline.rerank.config import RerankConfig

logger = logging.getLogger("rerank")

DEFAULT_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CACHE_BUCKETS_READ = (
    2  # cache buckets a dry run reads to look its sample's keys up (a bucket may be 100s of MB)
)


def sample_positions(total: int, n: int) -> np.ndarray:
    """(min(n, total),) sorted pair positions spread evenly over 0..total-1."""
    if total <= 0 or n <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, total - 1, min(n, total)).astype(np.int64))


def read_sample(config: RerankConfig, input_uri: str, layout, shards, n: int) -> pa.Table:
    """About `n` pair rows (as the job reads them, with their `reason`) spread over every shard."""
    from pipeline.rerank.stages.read import ReadShard

    reader = ReadShard(layout, config.storage_options, input_uri)
    starts = np.cumsum([0] + [s.num_pairs for s in shards])
    positions = sample_positions(int(starts[-1]), n)
    parts = []
    for k, shard in enumerate(shards):
        inside = positions[(positions >= starts[k]) & (positions < starts[k + 1])] - starts[k]
        if len(inside):
            parts += list(reader.read_rows(shard, inside))
    return pa.concat_tables(parts) if parts else layout.empty_rows()


def token_lengths(config: RerankConfig, sample: pa.Table) -> np.ndarray:
    """(sequences,) token counts of the sample's valid pairs after truncation (several per pair in windows mode)."""
    from pipeline.rerank.stages.tokenize import TokenizeStage

    valid = sample.filter(pc.is_null(sample.column(S.REASON)))
    if valid.num_rows == 0:
        return np.zeros(0, np.int64)
    out = TokenizeStage(config.model, config.revision, config.tokenizer)(valid)
    out = out.filter(pc.is_null(out.column(S.REASON)))
    return out.column(S.NUM_TOKENS).to_numpy(zero_copy_only=False).astype(np.int64)


def _cache_hits(config: RerankConfig, model: dict, sample: pa.Table) -> dict | None:
    """Hits among the sample's keys in the cache folders made for this checkpoint and settings (read from their
    `_cache.json`), looked up in the CACHE_BUCKETS_READ buckets holding most of them; None without a cache."""
    if not config.cache.uri:
        return None
    from pipeline.rerank.cache import (
        PART_SCHEMA,
        Unreadable,
        bucket_of_keys,
        checkpoint_digest,
        list_bucket,
        list_caches,
        pair_keys,
        read_file,
        read_runs,
    )

    checkpoint = checkpoint_digest(model["directory"])
    specs = [
        s
        for s in list_caches(config.cache.uri, config.storage_options)
        if _covers(s, config, model, checkpoint)
    ]
    valid = sample.filter(pc.is_null(sample.column(S.REASON)))
    if not specs or valid.num_rows == 0:
        return {
            "uri": config.cache.uri,
            "folder": None,
            "looked_up": 0,
            "hits": 0,
            "hit_fraction": 0.0,
            "runs": [],
        }
    best = None
    for spec in specs:
        keys = pair_keys(
            spec.fingerprint,
            valid.column(S.QUERY).to_pylist(),
            valid.column(S.DOCUMENT).to_pylist(),
        )
        buckets = bucket_of_keys(keys, spec.buckets)
        chosen = [
            int(b)
            for b in np.argsort(-np.bincount(buckets, minlength=spec.buckets))[:CACHE_BUCKETS_READ]
        ]
        fs, root = spec.fs()
        known: set[bytes] = set()
        for b in chosen:
            for path in list_bucket(fs, root, b):
                try:  # read only: an unreadable file counts its keys as misses (the job's lookup quarantines it)
                    known |= set(read_file(fs, path, PART_SCHEMA).column("key").to_pylist())
                except Unreadable:
                    continue
        mine = [k for k, b in zip(keys.to_pylist(), buckets) if b in chosen]
        hits = sum(k in known for k in mine)
        found = {
            "uri": config.cache.uri,
            "folder": spec.uri,
            "looked_up": len(mine),
            "hits": hits,
            "hit_fraction": hits / len(mine) if mine else 0.0,
            "runs": read_runs(spec),
        }
        if best is None or found["hit_fraction"] > best["hit_fraction"]:
            best = found
    return best


def _covers(spec, config: RerankConfig, model: dict, checkpoint: dict) -> bool:
    """Whether a cache folder was made for this checkpoint, max_length and dtype (any dtype when auto)."""
    from pipeline.rerank.cache import read_meta

    fs, root = spec.fs()
    covers = read_meta(fs, root, config.cache.uri).covers or {}
    settings = covers.get("settings") or {}
    return (
        covers.get("checkpoint") == checkpoint
        and settings.get("max_length") == model["max_length"]
        and (config.dtype == "auto" or settings.get("dtype") == config.dtype)
    )


def _nodes(config: RerankConfig) -> tuple[list[dict], str]:
    """The cluster to plan for: the running one named by ray_address / RAY_ADDRESS, else this machine."""
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        return C.local_nodes(), "this machine (no RAY_ADDRESS)"
    import ray

    try:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return [n for n in ray.nodes() if n.get("Alive")], f"Ray cluster at {address}"
    except (
        Exception
    ) as e:  # a dry run reads the cluster only to size the pools: say which one did not answer
        raise InfrastructureError(
            f"the dry run cannot read the Ray cluster at {address} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); start it, "
            "or unset RAY_ADDRESS to plan for this machine"
        ) from None


def gpus_for_deadline(pairs: int, per_gpu: float, hours: float) -> int:
    """The fewest GPU scorers that score `pairs` at `per_gpu` pairs/s each within `hours`."""
    return max(1, math.ceil(pairs / (per_gpu * hours * 3600.0) - 1e-9))


def plan_night(
    config: RerankConfig,
    input_uri: str,
    output_uri: str,
    *,
    gpu_counts: Sequence[int] | None = None,
    deadline_hours: float | None = None,
    sample_pairs: int = 2000,
    mfu: float = C.ASSUMED_MFU,
    gpu_tflops: float = C.GPU_BF16_TFLOPS,
) -> dict:
    """The dry run's plan (what `format_plan` prints). Reads the input and the model; writes nothing."""
    from pipeline.core.storage import check_storage_options
    from pipeline.rerank.plan import input_fingerprint
    from pipeline.rerank.preflight import check_model
    from pipeline.rerank.stages.read import list_input_files, plan_shards, read_schemas
    from pipeline.rerank.stages.validate import InputLayout

    check_storage_options([input_uri, output_uri, config.cache.uri], config.storage_options)
    in_fs, files = list_input_files(input_uri, config.storage_options)
    layout = InputLayout.from_schemas(read_schemas(in_fs, files), config.input, files=files)
    model = check_model(config)
    shards = plan_shards(in_fs, files, layout, config.input.rows_per_shard)
    pairs = sum(s.num_pairs for s in shards)
    sample = read_sample(config, input_uri, layout, shards, sample_pairs)
    valid_pairs = int(pc.sum(pc.is_null(sample.column(S.REASON))).as_py() or 0)
    lengths = token_lengths(config, sample)
    sequences_per_pair = len(lengths) / valid_pairs if valid_pairs else 1.0
    cache = _cache_hits(config, model, sample)
    to_score = round(
        pairs
        * (valid_pairs / sample.num_rows if sample.num_rows else 1.0)
        * (1 - (cache["hit_fraction"] if cache else 0.0))
    )

    model_config = C.model_config_of(model["directory"])
    scorer = C.scorer_rate(
        model_config,
        lengths.tolist() or None,
        cache_runs=(cache or {}).get("runs", ()),
        gpu_check=config.scorer.gpu_check,
        mfu=mfu,
        gpu_tflops=gpu_tflops,
        sequences_per_pair=sequences_per_pair,
    )  # windows: a pair is several sequences
    mean_tokens = (
        float(lengths.mean()) * sequences_per_pair if len(lengths) else C.SHORT_PAIR_TOKENS
    )
    cost = C.tokenize_cost()
    tokenizer = cost.rate(mean_tokens)
    per_actor = tokenizer.pairs_per_s * min(1.0, config.tokenizer.num_cpus)
    nodes, cluster = _nodes(config)
    sizing = C.size_tokenizers(config, nodes, scorer, cost, mean_tokens)
    explicit = config.tokenizer.num_actors if isinstance(config.tokenizer.num_actors, int) else None
    counts = sorted(set(gpu_counts or DEFAULT_GPU_COUNTS))
    fewest = (
        gpus_for_deadline(to_score, scorer.pairs_per_s, deadline_hours) if deadline_hours else None
    )
    if fewest is not None and gpu_counts is None and fewest not in counts:
        counts = sorted(set(counts) | {fewest})
    rows = []
    for g in counts:
        tokenizers = max(1, math.ceil(g * scorer.pairs_per_s / per_actor))
        hours = C.wall_hours(to_score, g, scorer, tokenizers, per_actor)
        rows.append(
            {
                "gpus": g,
                "tokenizer_actors": tokenizers,
                "tokenizer_cores": round(tokenizers * config.tokenizer.num_cpus, 1),
                "pairs_per_s": round(g * scorer.pairs_per_s),
                "hours": hours,
                "fits_deadline": None if deadline_hours is None else hours <= deadline_hours,
            }
        )
    q = np.percentile(lengths, [50, 90]) if len(lengths) else [None, None]
    return {
        "input_uri": input_uri,
        "output_uri": output_uri,
        "files": len(files),
        "input_bytes": input_fingerprint(in_fs, files)["bytes"],
        "pairs": pairs,
        "pairs_to_score": to_score,
        "shards": len(shards),
        "rows_per_shard": config.input.rows_per_shard,
        "sample": {
            "pairs": sample.num_rows,
            "valid": valid_pairs,
            "sequences": len(lengths),
            "tokens_p50": None if q[0] is None else int(q[0]),
            "tokens_p90": None if q[1] is None else int(q[1]),
            "tokens_max": int(lengths.max()) if len(lengths) else None,
            "tokens_mean": round(float(lengths.mean()), 1) if len(lengths) else None,
            "max_length": model["max_length"],
            "long_documents": config.tokenizer.long_documents,
        },
        "cache": None if cache is None else {k: v for k, v in cache.items() if k != "runs"},
        "model": config.model,
        "cluster": cluster,
        "cluster_gpus": sizing.gpus,
        "cluster_cpus": sum(C._cpus(n) for n in nodes),
        "rates": {
            "scorer_pairs_per_s_per_gpu": round(scorer.pairs_per_s, 1),
            "scorer_source": scorer.source,
            "tokenizer_pairs_per_s_per_core": round(tokenizer.pairs_per_s, 1),
            "tokenizer_source": tokenizer.source,
        },
        "pools": {
            "scorer_actors": config.scorer.num_actors
            or max(1, int(sizing.gpus // config.scorer.num_gpus_per_actor)),
            "tokenizer_actors": explicit or sizing.actors,
            "tokenizer_actors_source": "tokenizer.num_actors" if explicit else sizing.line(config),
        },
        "deadline_hours": deadline_hours,
        "fewest_gpus_for_deadline": fewest,
        "estimates": rows,
    }


def format_plan(plan: dict) -> str:
    """The plan as the readable table `--dry-run` prints."""
    s, r = plan["sample"], plan["rates"]
    lines = [
        f"dry run: nothing scored, nothing written under {plan['output_uri']}",
        f"input      {plan['input_uri']}: {plan['files']} file(s), {plan['input_bytes']:,} bytes, "
        f"{plan['pairs']:,} pairs in {plan['shards']} shard(s) of ~{plan['rows_per_shard']:,}",
        f"sample     {s['pairs']:,} pairs over every shard ({s['valid']:,} valid): tokens after truncation to "
        f"{s['max_length']} p50 {s['tokens_p50']}, p90 {s['tokens_p90']}, max {s['tokens_max']} "
        f"(mean {s['tokens_mean']}, {s['long_documents']}, {s['sequences']:,} sequences)",
    ]
    c = plan["cache"]
    if c is not None:
        lines.append(
            f"cache      {c['uri']}: "
            + (
                f"{c['hits']} of {c['looked_up']} sampled keys found "
                f"({100 * c['hit_fraction']:.0f}%, {c['folder']})"
                if c["folder"]
                else "no folder for this checkpoint and settings yet: every pair is scored"
            )
        )
    lines += [
        f"to score   {plan['pairs_to_score']:,} pairs (valid, less expected cache hits)",
        f"cluster    {plan['cluster']}: {plan['cluster_gpus']:g} GPU(s), {plan['cluster_cpus']:g} CPU(s); scorer pool "
        f"{plan['pools']['scorer_actors']}, tokenizer pool {plan['pools']['tokenizer_actors']} "
        f"({plan['pools']['tokenizer_actors_source']})",
        f"scorer     {r['scorer_pairs_per_s_per_gpu']:,.0f} pairs/s per GPU: {r['scorer_source']}",
        f"tokenizer  {r['tokenizer_pairs_per_s_per_core']:,.0f} pairs/s per core: {r['tokenizer_source']}",
        "",
        f"{'GPUs':>6} {'tokenizers':>10} {'cores':>7} {'pairs/s':>12} {'hours':>9}"
        + ("  fits" if plan["deadline_hours"] is not None else ""),
    ]
    for row in plan["estimates"]:
        fits = "" if row["fits_deadline"] is None else ("  yes" if row["fits_deadline"] else "  no")
        lines.append(
            f"{row['gpus']:>6} {row['tokenizer_actors']:>10,} {row['tokenizer_cores']:>7,.0f} "
            f"{row['pairs_per_s']:>12,} {row['hours']:>9.3g}{fits}"
        )
    lines.append(
        "hours: the scoring phase alone, at the rates above (reading, ranking and start-up not counted)"
    )
    if plan["deadline_hours"] is not None:
        lines.append(
            f"deadline   {plan['deadline_hours']:g} h: at least {plan['fewest_gpus_for_deadline']} GPU(s)"
        )
    return "\n".join(lines)


def write_plan_json(plan: dict, path: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(plan, f, indent=2)
    except OSError as e:
        raise OutputError(
            f"cannot write --dry-run-json {path} ({e.strerror or type(e).__name__}); choose a file "
            "in a folder that exists and this user may write"
        ) from None
