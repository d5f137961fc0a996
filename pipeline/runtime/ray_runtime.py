"""The Ray a job runs on: joined or started with the job's console kept to its own lines, and a fault inside a
Ray worker turned back into the one line the job reports.

`ray` is imported inside `ensure_ray`: a job refuses a bad input or config before it needs Ray, and
`import ray.data` takes seconds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from pipeline.core.errors import PipelineError
from pipeline.core.faults import explain
from pipeline.runtime.local_ray import init_ray, quiet_ray_console

logger = logging.getLogger("rerank")

T = TypeVar("T")


def ensure_ray(address: str | None = None) -> None:
    """Join the Ray at `address` (else RAY_ADDRESS's), or start a fresh local one, unless this process is
    already attached to a Ray; Ray Data's progress bars and console stack traces are turned off (-v: back on)."""
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS is set by `ray job submit` and on cluster nodes; otherwise start a fresh local Ray rather
        # than attach to whatever cluster this machine ran last.
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        # The job's console is its own lines: what Ray prints for itself stays in its session folder (-v: both).
        started = quiet_ray_console(verbose=logger.isEnabledFor(logging.DEBUG))
        init_ray(
            address,
            ignore_reinit_error=True,
            log_to_driver=False,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        started()
    logger.debug("Ray at %s: %s", ray.get_runtime_context().gcs_address, ray.cluster_resources())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    quiet_ray_data_console()


def stage_task(cls: type, kwargs: dict) -> Callable:
    """A stateless stage's task function, `batch -> cls(**kwargs)(batch)`, named as the class: Ray Data names
    the operator after it (`MapBatches(WriteScored)`), and the stall watchdog names the stage by that.

    Why a task and not an actor pool: an actor pool starts a worker process per dataset, while tasks run in
    Ray's pooled workers; a stage whose constructor is cheap (no model, no tokenizer) loses nothing."""

    def task(batch):
        return cls(**kwargs)(batch)

    task.__name__ = task.__qualname__ = cls.__name__
    return task


def quiet_ray_data_console() -> None:
    """Ray Data prints each worker failure's full stack trace on the console; the job reports the fault in
    one line instead (`faults.explain`). Its log file in the Ray session folder keeps everything, and -v
    brings the console lines back."""
    if logger.isEnabledFor(logging.DEBUG):
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.CRITICAL)


def worker_errors(batches: Iterable[T], check: Callable[[], None] | None = None) -> Iterator[T]:
    """`batches` (a Ray Dataset's), with a fault inside a Ray worker re-raised as one line (`faults.explain`),
    not a Ray traceback. `check` runs before each batch is handed on and stops the iteration by raising (the
    rerank job's: its output's lease was lost to another run)."""
    try:
        for batch in batches:
            if check is not None:
                check()
            yield batch
    except PipelineError:
        raise
    except Exception as e:
        known = explain(e)
        if known is None:
            raise
        raise known from None
