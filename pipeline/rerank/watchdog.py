"""The scoring phase's stall watchdog: when nothing was scored or written for io.stall_timeout_s, Ray Data's
execution is shut down and the job ends with one line saying which stage waits on which and the setting to
change (a rerun resumes the committed shards), instead of waiting forever.
"""

from __future__ import annotations

import logging
import queue
import threading

from pipeline.core.errors import InfrastructureError
from pipeline.core.faults import RESUME
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.progress import Progress

logger = logging.getLogger("rerank")


# Ray Data's names of our stages (`MapBatches(<class>)`), as a user knows them.
_STAGE_NAMES = {
    "ReadShard": "reader",
    "ReadShardCached": "reader",
    "TokenizeStage": "tokenizer",
    "ScoreStage": "scorer",
    "WriteScored": "writer",
}
_BATCH_SETTINGS = {
    "reader": "input.rows_per_shard",
    "tokenizer": "tokenizer.batch_size",
    "scorer": "scorer.batch_size",
    "writer": "io.rows_per_write",
}


def watched(ds, progress: Progress, config: RerankConfig, batches):
    """`ds`'s report batches, consumed on a thread of their own so that the driver notices when nothing was
    scored or written for io.stall_timeout_s: then Ray Data's execution is shut down and the job ends with an
    InfrastructureError saying which stage waits on which (a rerun resumes the committed shards)."""
    # Ray Data's StreamingExecutor is the one handle that stops a running execution from another thread; the
    # dataset creates it (`_create_executor`) and only hands it out after the first output, which a stalled
    # pipeline never makes, so it is kept here as it is created. A Ray Data without that method still gets the
    # stall's error line; the job's process then ends, and its execution with it.
    executors = []
    make = getattr(ds, "_create_executor", None)

    def keep_executor():
        executor = make()
        executors.append(executor)
        return executor

    if make is not None:
        ds._create_executor = keep_executor
    reports: queue.Queue = queue.Queue()
    stop = threading.Event()

    def consume() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                reports.put(("batch", batch))
                if stop.is_set():
                    return
            reports.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            reports.put(("error", e))

    thread = threading.Thread(target=consume, name="scoring-reports", daemon=True)
    thread.start()
    timeout = config.io.stall_timeout_s
    try:
        while True:
            try:
                kind, item = reports.get(timeout=min(1.0, timeout))
            except queue.Empty:
                if progress.idle_s() < timeout:
                    continue
                raise InfrastructureError(
                    _stall_message(
                        executors[0] if executors else None, progress.idle_s(), config, batches
                    )
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        if (
            thread.is_alive()
        ):  # stopped early (a stall, a worker's fault, a lost lease): no stage may go on
            for executor in executors:
                try:
                    executor.shutdown(force=True)
                except Exception:  # noqa: BLE001 - the reason the run stops must reach the user, not this
                    logger.debug("Ray Data's execution did not shut down cleanly", exc_info=True)
            thread.join(timeout=30)


def _stall_message(executor, idle: float, config: RerankConfig, batches) -> str:
    """One line: which stage waits on which, and the setting to change. Reads Ray Data's live topology (what
    each stage runs and holds), best effort: a generic line if it cannot."""
    head = f"nothing was scored or written for {idle:.0f} s (io.stall_timeout_s={config.io.stall_timeout_s:g}) while work remains"
    tail = f"; {RESUME}"
    try:
        stages = []
        for op, state in executor._topology.items():
            cls = op.name.rsplit("(", 1)[-1].rstrip(")")
            if op.name.startswith("MapBatches("):
                actors = op.get_actor_info() if hasattr(op, "get_actor_info") else None
                stages.append(
                    (
                        _STAGE_NAMES.get(cls, cls),
                        op.num_active_tasks(),
                        state.total_enqueued_input_blocks_bytes(),
                        (actors.pending + actors.restarting) if actors else 0,
                    )
                )
    except Exception:  # noqa: BLE001 - a diagnosis must not hide the stall itself
        logger.debug("no diagnosis of the stall from Ray Data's topology", exc_info=True)
        stages = []
    # The most downstream stage with a task in flight: a stage after it holding rows waits for a batch the budget
    # keeps from filling (the reader's task streams a whole shard, so it stays in flight while held back);
    # with none, that stage itself has been busy all along.
    running = max((i for i, s in enumerate(stages) if s[1]), default=-1)
    queued = [i for i, s in enumerate(stages) if i > running and s[2]]
    if queued:
        i = max(queued, key=lambda i: stages[i][2])  # the batch that cannot fill
        name, held = stages[i][0], stages[i][2]
        upstream = stages[i - 1][0] if i else "input"
        rows = getattr(batches, name, None)
        return (
            f"{head}: the {name} waits for a full batch"
            + (f" of {rows:,} rows" if rows else "")
            + f" ({held / 2**20:,.1f} MB gathered) from the {upstream}, which io.in_flight_mb="
            f"{config.io.in_flight_mb} holds back; raise io.in_flight_mb or lower "
            f"{_BATCH_SETTINGS.get(name, 'the batch sizes')}" + tail
        )
    if running >= 0:
        name = stages[running][0]
        waiting = [s[0] for s in stages[running + 1 :]]
        return (
            f"{head}: the {name} has been running a batch all that time"
            + (
                f" and the {', '.join(waiting)} wait{'s' if len(waiting) == 1 else ''} on it"
                if waiting
                else ""
            )
            + f"; if it is only slow, raise io.stall_timeout_s or lower {_BATCH_SETTINGS.get(name, 'its batch')}"
            + tail
        )
    starting = [s for s in stages if s[3]]
    if starting:
        name, pending = starting[0][0], starting[0][3]
        return (
            f"{head}: {pending} {name} actor{'s' if pending > 1 else ''} could not start all that time (a slow "
            "start, or a cluster short of the CPUs/GPUs they ask for); see the Ray logs, and raise "
            f"io.stall_timeout_s if they only start slowly" + tail
        )
    return (
        f"{head}: no stage is running or holding rows; raise io.in_flight_mb or lower tokenizer.batch_size, "
        f"scorer.batch_size and io.rows_per_write" + tail
    )
