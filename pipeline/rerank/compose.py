"""The rerank pipeline on Ray Data, read top to bottom like its data-flow diagram.

Fault tolerance is Ray Data's own: its actor pools restart a dead actor and retry its tasks
(max_restarts=-1, max_task_retries=-1 by default); exactly-once output is ours (see job.py).

    [score cache: shards -> read + keys -> write keys; cache buckets -> join with the cache -> write found]
    shards -> read + validate -> tokenize (CPU actors) -> score (GPU or CPU actors) -> write staging
    [score cache: cache buckets -> publish new entries, fill repeated pairs]
    buckets -> rank -> write ranked/

Stages are plain classes (pipeline/rerank/stages/); this module only says where each runs and how many.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import ray
from ray.data import ActorPoolStrategy

from pipeline.core.errors import ConfigError
from pipeline.rerank.cache import CacheSpec
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.progress import report_to
from pipeline.rerank.stages.lookup import JoinBucket, KeysOfShard, PublishBucket, ReadShardCached
from pipeline.rerank.stages.rank import RankBucket
from pipeline.rerank.stages.read import ReadShard, Shard
from pipeline.rerank.stages.score import ScoreStage
from pipeline.rerank.stages.tokenize import TokenizeStage
from pipeline.rerank.stages.validate import InputLayout
from pipeline.rerank.stages.write import WriteScored

# Ray Data merges a task's outputs into blocks of up to DataContext.target_max_block_size (128 MiB by
# default) and a downstream task gets whole blocks. Our rows are small once tokenized (a DL19 pair is
# ~0.5 KB of token ids, a scored row ~60 bytes), so at the default a 100,000-row shard travelled as one
# block: the scorer started only after the whole shard was tokenized, the writer and the driver's progress
# only after it was all scored, and every stage held a shard in memory at once. 2 MiB blocks are a few
# thousand rows: the stages overlap within a shard and what is in flight stays small whatever the input's
# size. Writes are then regrouped by rows (io.rows_per_write) so small blocks do not mean small files.
BLOCK_BYTES = 2 * 2**20


# A stage's batch gathers in its input queue until it holds `batch_size` rows, and Ray Data counts those rows
# against the stage that produced them: once they exceed what that stage may keep in the object store (its
# share of io.in_flight_mb), the producer may not run and the batch never fills; the whole pipeline then
# waits forever. Ray Data's ReservationOpResourceAllocator reserves half the limit evenly over the stages (an
# eighth each for our four, half of that for their outputs) and shares the rest, and a producer must still fit
# one task's output besides the waiting batch; so a batch between stages holds at most a sixteenth of the
# limit, in bytes, whatever its configured rows (measured: 16 KB pairs carried under 32 MB, which stalled
# with the configured rows, run in ~125-row batches).
BATCH_SHARE = 16


@dataclass(frozen=True)
class HandOffs:
    """Rows per batch handed to each stage, after the in-flight budget had its say."""

    tokenizer: int
    scorer: int
    writer: int
    batch_bytes: int  # the most bytes one batch may hold (io.in_flight_mb / BATCH_SHARE)
    row_bytes: dict  # estimated bytes of one row entering each stage: {"tokenizer": n, ...}

    def cut(self, config: RerankConfig) -> list[str]:
        """The settings whose rows did not fit, as `key configured -> used`."""
        asked = {
            "tokenizer.batch_size": (config.tokenizer.batch_size, self.tokenizer),
            "scorer.batch_size": (config.scorer.batch_size, self.scorer),
            "io.rows_per_write": (config.io.rows_per_write, self.writer),
        }
        return [f"{k} {a:,} -> {b:,}" for k, (a, b) in asked.items() if b < a]


def hand_offs(config: RerankConfig, input_row_bytes: int, max_length: int) -> HandOffs:
    """Rows per batch for each stage so that a full batch fits the in-flight budget, from the estimated bytes of
    one input pair (`input_row_bytes`: its columns as read) and the tokens a row may hold (`max_length`). A row
    that alone overflows a batch's share cannot be carried at all: ConfigError, before any work."""
    tokens = 5 * max_length  # input_ids int32 (+ token_type_ids int8 for BERT) per token, at most
    ids = 128  # query and doc ids, counters, the score
    texts = input_row_bytes if config.output.carry_texts else 0
    row_bytes = {
        "tokenizer": input_row_bytes,
        "scorer": ids + tokens + texts,
        "writer": ids + texts,
    }
    batch_bytes = config.io.in_flight_mb * 2**20 // BATCH_SHARE
    biggest = max(row_bytes, key=row_bytes.get)
    if row_bytes[biggest] > batch_bytes:
        carried = " (texts carried: output.carry_texts=true)" if config.output.carry_texts else ""
        raise ConfigError(
            f"a pair is about {row_bytes[biggest] / 2**10:,.0f} KB on its way to the {biggest}{carried}, more than "
            f"one batch may hold in io.in_flight_mb={config.io.in_flight_mb} (a batch gets 1/{BATCH_SHARE} of it, "
            f"{batch_bytes / 2**10:,.0f} KB); raise io.in_flight_mb to at least "
            f"{-(-row_bytes[biggest] * BATCH_SHARE // 2**20)}"
            + (", or lower tokenizer.max_length" if biggest == "scorer" else "")
        )
    fit = {stage: max(1, batch_bytes // max(1, b)) for stage, b in row_bytes.items()}
    return HandOffs(
        tokenizer=min(config.tokenizer.batch_size, fit["tokenizer"]),
        scorer=min(config.scorer.batch_size, fit["scorer"]),
        writer=min(config.io.rows_per_write, fit["writer"]),
        batch_bytes=batch_bytes,
        row_bytes=row_bytes,
    )


@contextlib.contextmanager
def _streaming(config: RerankConfig):
    """Datasets created inside keep BLOCK_BYTES blocks and an object-store limit of `io.in_flight_mb`
    (Ray copies the current DataContext into a new dataset); the caller's own DataContext is left as it was."""
    from ray.data import ExecutionResources

    ctx = ray.data.DataContext.get_current()
    blocks, limits = ctx.target_max_block_size, ctx.execution_options.resource_limits
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.execution_options.resource_limits = ExecutionResources(
        object_store_memory=config.io.in_flight_mb * 2**20
    )
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.execution_options.resource_limits = blocks, limits


def scorer_pool(config: RerankConfig) -> tuple[int, dict]:
    """Fixed pool size and per-actor resources: one actor per GPU (all start together), else CPU actors."""
    s = config.scorer
    gpus = ray.cluster_resources().get("GPU", 0) if s.device in ("auto", "cuda") else 0
    if gpus:
        size = s.num_actors or max(1, int(gpus // s.num_gpus_per_actor))
        return size, {"num_gpus": s.num_gpus_per_actor, "num_cpus": s.num_cpus}
    return s.num_actors or 1, {"num_cpus": s.num_cpus}


def scoring_dataset(
    shards: list[Shard],
    layout: InputLayout,
    config: RerankConfig,
    input_uri: str,
    work_uri: str,
    num_buckets: int,
    rank_per_shard: bool,
    progress_counter=None,
    cache: CacheSpec | None = None,
    dtype: str | None = None,
    batches: HandOffs | None = None,
) -> ray.data.Dataset:
    """Yields one report row per staging file written (see stages/write.py). `batches`: rows per batch of each
    stage (`hand_offs`), else the configured ones. Scorers report each batch to
    `progress_counter` (a `progress.ScoreCounter` actor), if given. With `cache`, the read stage attaches what
    the lookup found (`lookup_datasets` ran first) and the writer stages new entries. `dtype`: the scorers'
    dtype when the driver resolved `auto` (the cache's fingerprint names it)."""
    size, resources = scorer_pool(config)
    tokenizers = config.tokenizer.num_actors
    if not isinstance(
        tokenizers, int
    ):  # auto, where the caller did not size it (the job does, before its checks)
        from pipeline.model.checkpoint import resolve_model_directory
        from pipeline.rerank.capacity import model_config_of, resolve_tokenizer_actors

        directory, _ = resolve_model_directory(config.model, config.revision)
        tokenizers = resolve_tokenizer_actors(
            config, ray.nodes(), model_config_of(directory)
        ).tokenizer.num_actors
    if batches is None:
        batches = HandOffs(
            config.tokenizer.batch_size, config.scorer.batch_size, config.io.rows_per_write, 0, {}
        )
    with _streaming(config):
        ds = ray.data.from_items([s.to_item() for s in shards], override_num_blocks=len(shards))
    read, read_kwargs = (
        ReadShard,
        dict(layout=layout, storage_options=config.storage_options, uri=input_uri),
    )
    if cache is not None:
        read, read_kwargs = (
            ReadShardCached,
            read_kwargs | dict(spec=cache, lookup_uri=f"{work_uri}/lookup"),
        )
    ds = ds.map_batches(
        read,
        fn_constructor_kwargs=read_kwargs,
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.io.num_actors),
        num_cpus=config.io.num_cpus,
    )
    ds = ds.map_batches(
        TokenizeStage,
        fn_constructor_kwargs=dict(
            model=config.model,
            revision=config.revision,
            config=config.tokenizer,
            keep_texts=config.output.carry_texts,
        ),
        batch_size=batches.tokenizer,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=tokenizers),
        num_cpus=config.tokenizer.num_cpus,
        label_selector=config.tokenizer.label_selector,
    )
    ds = ds.map_batches(
        ScoreStage,
        fn_constructor_kwargs=dict(
            model=config.model,
            revision=config.revision,
            dtype=dtype or config.dtype,
            config=config.scorer,
            scorers_uri=f"{work_uri}/scorers",
            storage_options=config.storage_options,
            allow_pickle=config.allow_pickle,
            int8=config.int8 if (dtype or config.dtype) == "int8" else None,
            template=config.tokenizer.template,
            on_scored=None
            if progress_counter is None
            else functools.partial(report_to, progress_counter),
        ),
        batch_size=batches.scorer,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            size=size, max_tasks_in_flight_per_actor=config.scorer.max_tasks_in_flight_per_actor
        ),
        **resources,
    )
    return ds.map_batches(
        WriteScored,
        fn_constructor_kwargs=dict(
            work_uri=work_uri,
            storage_options=config.storage_options,
            num_buckets=num_buckets,
            bucket_by_shard=rank_per_shard,
            keep_texts=config.output.carry_texts,
            cache_buckets=None if cache is None else cache.buckets,
        ),
        batch_size=batches.writer,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.io.num_actors),
        num_cpus=config.io.num_cpus,
    )


def ranking_dataset(
    buckets: list[dict],
    config: RerankConfig,
    output_uri: str,
    rejected_schema,
    shards: list[Shard],
    layout: InputLayout,
    input_uri: str,
    file_metadata: dict | None = None,
    fill_files: list[str] | None = None,
) -> ray.data.Dataset:
    """Yields one report row per bucket ranked. `shards` is the whole plan: a duplicate pair's input row is
    re-read from its shard, committed in this run or an earlier one. `file_metadata` goes on every file."""
    with _streaming(config):
        ds = ray.data.from_items(buckets, override_num_blocks=len(buckets))
    return ds.map_batches(
        RankBucket,
        fn_constructor_kwargs=dict(
            output_uri=output_uri,
            storage_options=config.storage_options,
            top_k=config.output.top_k,
            rejected_schema=rejected_schema,
            shards=[s.to_item() for s in shards],
            layout=layout,
            input_uri=input_uri,
            file_metadata=file_metadata,
            fill_files=fill_files,
        ),
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.io.num_actors),
        num_cpus=config.io.num_cpus,
    )


def lookup_datasets(
    shards: list[Shard],
    layout: InputLayout,
    config: RerankConfig,
    input_uri: str,
    work_uri: str,
    cache: CacheSpec,
):
    """The score cache's lookup, in two datasets: `keys(shards)` yields one report per key file written (per
    shard and cache bucket); `join(buckets)`, given [{bucket, files}], one report per cache bucket joined."""
    io = dict(compute=ActorPoolStrategy(size=config.io.num_actors), num_cpus=config.io.num_cpus)

    def keys() -> ray.data.Dataset:
        with _streaming(config):
            ds = ray.data.from_items([s.to_item() for s in shards], override_num_blocks=len(shards))
        return ds.map_batches(
            KeysOfShard,
            fn_constructor_kwargs=dict(
                layout=layout,
                storage_options=config.storage_options,
                uri=input_uri,
                spec=cache,
                lookup_uri=f"{work_uri}/lookup",
            ),
            batch_size=1,
            batch_format="pyarrow",
            **io,
        )

    def join(buckets: list[dict]) -> ray.data.Dataset:
        with _streaming(config):
            ds = ray.data.from_items(buckets, override_num_blocks=len(buckets))
        return ds.map_batches(
            JoinBucket,
            fn_constructor_kwargs=dict(
                spec=cache, lookup_uri=f"{work_uri}/lookup", storage_options=config.storage_options
            ),
            batch_size=1,
            batch_format="pyarrow",
            **io,
        )

    return keys, join


def publish_dataset(
    buckets: list[dict], config: RerankConfig, work_uri: str, cache: CacheSpec
) -> ray.data.Dataset:
    """Given [{bucket, new_files, waiting_files}] per cache bucket: publishes new entries, writes fill files."""
    with _streaming(config):
        ds = ray.data.from_items(buckets, override_num_blocks=len(buckets))
    return ds.map_batches(
        PublishBucket,
        fn_constructor_kwargs=dict(
            spec=cache, work_uri=work_uri, storage_options=config.storage_options
        ),
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.io.num_actors),
        num_cpus=config.io.num_cpus,
    )
