"""The rerank pipeline on Ray Data, read top to bottom like its data-flow diagram: each phase is a short table
of stages (class, constructor arguments, rows per call, how many actors, where they run), built by `build`.

Fault tolerance is Ray Data's own: its actor pools restart a dead actor and retry its tasks
(max_restarts=-1, max_task_retries=-1 by default), and a task whose worker died runs again (max_retries=-1);
exactly-once output is ours (see job.py).

    [score cache: shards -> read + keys -> write keys; cache buckets -> join with the cache -> write found]
    shards -> read + validate [+ what the lookup found] -> tokenize (CPU actors) -> score (GPU or CPU actors;
    a pair the cache answered keeps its score) -> write staging
    [score cache: cache buckets -> publish new entries, fill repeated pairs]
    buckets -> rank -> write ranked/

Stages are plain classes (pipeline/rerank/stages/). Which class runs each step, and which variant of the
pipeline (with the score cache or not, int8 or not), is the plan's (`plan.RunPlan`): this module only says
where each stage runs and how many. `ray` is imported where a dataset is built: the driver refuses a bad input
before it waits for `import ray.data`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.core.errors import ConfigError
from pipeline.rerank.config import RerankConfig
from pipeline.runtime.ray_runtime import stage_task

if TYPE_CHECKING:
    import ray.data

    from pipeline.rerank.plan import RunPlan

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


@dataclass(frozen=True)
class Stage:
    """One row of a phase's table: `cls(**kwargs)` on `actors` actors, each called with `batch_size` rows and
    holding `resources` (Ray's num_cpus / num_gpus / label_selector: where it runs).

    A `stateless` stage (the storage-bound ones: read, write, rank, the cache's lookup and publish) runs as at
    most `actors` Ray tasks at a time instead, `cls(**kwargs)` built for each call: its constructor only keeps
    its arguments, and a task runs in one of Ray's pooled worker processes, already started, where an actor
    pool starts a process per actor for every dataset. A job with the score cache builds five datasets; as
    actors their start-ups were most of a small job's time (0.6-1.7 s per pool against 0.1 s as tasks on a
    warm Ray; 2-core AMD EPYC, 2026-12-07). Tasks are retried when their worker dies, as actors are restarted.
    The tokenizer and the scorer stay actors: they load a tokenizer or a model once and keep it."""

    cls: type
    kwargs: dict
    batch_size: int
    actors: int
    resources: dict = field(default_factory=dict)
    max_tasks_in_flight_per_actor: int | None = None
    stateless: bool = False


def build(items: list[dict], stages: Sequence[Stage], config: RerankConfig) -> ray.data.Dataset:
    """A dataset of one input row per item in `items` (a shard, a bucket), through `stages` in order."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    with _streaming(config):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
    for stage in stages:
        if stage.stateless:
            ds = ds.map_batches(
                stage_task(stage.cls, stage.kwargs),
                batch_size=stage.batch_size,
                batch_format="pyarrow",
                compute=TaskPoolStrategy(size=stage.actors),
                **stage.resources,
            )
            continue
        pool = (
            {}
            if stage.max_tasks_in_flight_per_actor is None
            else {"max_tasks_in_flight_per_actor": stage.max_tasks_in_flight_per_actor}
        )
        ds = ds.map_batches(
            stage.cls,
            fn_constructor_kwargs=stage.kwargs,
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=stage.actors, **pool),
            **stage.resources,
        )
    return ds


@contextlib.contextmanager
def _streaming(config: RerankConfig):
    """Datasets created inside keep BLOCK_BYTES blocks and an object-store limit of `io.in_flight_mb`
    (Ray copies the current DataContext into a new dataset); the caller's own DataContext is left as it was."""
    import ray
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
    import ray

    s = config.scorer
    gpus = ray.cluster_resources().get("GPU", 0) if s.device in ("auto", "cuda") else 0
    if gpus:
        size = s.num_actors or max(1, int(gpus // s.num_gpus_per_actor))
        return size, {"num_gpus": s.num_gpus_per_actor, "num_cpus": s.num_cpus}
    return s.num_actors or 1, {"num_cpus": s.num_cpus}


def _io(plan: RunPlan) -> dict:
    """Where the read, write, lookup and rank stages run: `io.num_actors` tasks at a time of `io.num_cpus`."""
    io = plan.config.io
    return dict(actors=io.num_actors, resources={"num_cpus": io.num_cpus}, stateless=True)


def _per_item(plan: RunPlan, cls: type, **kwargs) -> Stage:
    """`cls(**kwargs)` as io tasks, called with one item (a shard, a bucket) at a time."""
    return Stage(cls, kwargs, batch_size=1, **_io(plan))


def scoring_dataset(plan: RunPlan, batches: HandOffs, on_scored=None) -> ray.data.Dataset:
    """The scoring phase over the plan's pending shards: one report row per staging file written (see
    stages/write.py). `batches`: rows per call of each stage (`hand_offs`). Scorers report each batch to
    `on_scored(pairs, rejected)` (a `progress.Progress.reporter()`), if given."""
    config, work_uri, classes = plan.config, plan.work_uri, plan.stages
    size, resources = scorer_pool(config)
    return build(
        [s.to_item() for s in plan.pending],
        [
            _per_item(
                plan,
                plan.reader,
                layout=plan.layout,
                storage_options=config.storage_options,
                uri=plan.input_uri,
                **plan.reader_cache_args,
            ),
            Stage(
                classes.tokenize,
                dict(
                    model=config.model,
                    revision=config.revision,
                    config=config.tokenizer,
                    keep_texts=config.output.carry_texts,
                ),
                batch_size=batches.tokenizer,
                actors=config.tokenizer.num_actors,
                resources=dict(
                    num_cpus=config.tokenizer.num_cpus,
                    label_selector=config.tokenizer.label_selector,
                ),
            ),
            Stage(
                classes.score,
                dict(
                    model=config.model,
                    revision=config.revision,
                    dtype=plan.scorer_dtype,
                    config=config.scorer,
                    scorers_uri=f"{work_uri}/scorers",
                    storage_options=config.storage_options,
                    allow_pickle=config.allow_pickle,
                    int8=plan.int8,
                    template=config.tokenizer.template,
                    on_scored=on_scored,
                ),
                batch_size=batches.scorer,
                actors=size,
                resources=resources,
                max_tasks_in_flight_per_actor=config.scorer.max_tasks_in_flight_per_actor,
            ),
            Stage(
                classes.write,
                dict(
                    work_uri=work_uri,
                    storage_options=config.storage_options,
                    num_buckets=plan.num_buckets,
                    bucket_by_shard=plan.rank_per_shard,
                    keep_texts=config.output.carry_texts,
                    cache_buckets=plan.cache_buckets,
                ),
                batch_size=batches.writer,
                **_io(plan),
            ),
        ],
        config,
    )


def ranking_dataset(
    plan: RunPlan,
    buckets: list[dict],
    rejected_schema,
    file_metadata: dict | None = None,
    fill_files: list[str] | None = None,
) -> ray.data.Dataset:
    """The ranking phase over `buckets` ([{bucket, files}]): one report row per bucket ranked. A duplicate
    pair's input row is re-read from its shard (any of the plan's, committed in this run or an earlier one).
    `file_metadata` goes on every file; `fill_files` are the scores the cache's publish gave waiting pairs."""
    config = plan.config
    rank = _per_item(
        plan,
        plan.stages.rank,
        output_uri=plan.output_uri,
        storage_options=config.storage_options,
        top_k=config.output.top_k,
        rejected_schema=rejected_schema,
        shards=[s.to_item() for s in plan.shards],
        layout=plan.layout,
        input_uri=plan.input_uri,
        file_metadata=file_metadata,
        fill_files=fill_files,
    )
    return build(buckets, [rank], config)


def lookup_datasets(plan: RunPlan):
    """The score cache's lookup, in two datasets: `keys()` yields one report per key file written (per pending
    shard and cache bucket); `join(buckets)`, given [{bucket, files}], one report per cache bucket joined."""
    config, lookup_uri = plan.config, f"{plan.work_uri}/lookup"
    keys_of_shard = _per_item(
        plan,
        plan.stages.keys,
        layout=plan.layout,
        storage_options=config.storage_options,
        uri=plan.input_uri,
        spec=plan.cache,
        lookup_uri=lookup_uri,
    )
    join_bucket = _per_item(
        plan,
        plan.stages.join,
        spec=plan.cache,
        lookup_uri=lookup_uri,
        storage_options=config.storage_options,
    )

    def keys() -> ray.data.Dataset:
        return build([s.to_item() for s in plan.pending], [keys_of_shard], config)

    def join(buckets: list[dict]) -> ray.data.Dataset:
        return build(buckets, [join_bucket], config)

    return keys, join


def publish_dataset(plan: RunPlan, buckets: list[dict]) -> ray.data.Dataset:
    """Given [{bucket, new_files, waiting_files}] per cache bucket: publishes new entries, writes fill files."""
    publish = _per_item(
        plan,
        plan.stages.publish,
        spec=plan.cache,
        work_uri=plan.work_uri,
        storage_options=plan.config.storage_options,
    )
    return build(buckets, [publish], plan.config)
