"""Progress that follows scoring: the scorer actors count what they score, the driver prints it.

Commits (shard manifests) come in whole shards and staging writes in `io.rows_per_write` rows, both far
coarser than what a person watching a run wants to see; so each scorer call reports its pairs to a tiny
counter actor, and a driver thread prints

    scored 1,200/4,300 pairs (27.9%), 153 pairs/s, 3 rejected

every `progress_interval_s` seconds. A retried batch is counted twice, so the count is capped at the total;
the exact figures are in summary.json. The same polls tell the driver's stall watchdog when anything last moved
(`idle_s`): a pair scored here, a scorer's heartbeat from inside a long batch (a CPU scorer can spend minutes on
one), or a staging file written (the driver calls `moved`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid

logger = logging.getLogger("rerank")


class ScoreCounter:
    """Running totals per run, held by a Ray actor (see `shared_counter`); `add` is called fire-and-forget by
    the scorers. One actor serves every run of a driver on a cluster (the Python API, the hard-negatives and
    index-quality jobs, a test session run many): an actor of its own per run started a worker process each."""

    def __init__(self):
        self.runs: dict[str, list[int]] = {}

    def ping(self) -> bool:
        return True

    def add(self, run: str, pairs: int, rejected: int) -> None:
        totals = self.runs.setdefault(run, [0, 0, 0])
        totals[0] += pairs
        totals[1] += rejected
        totals[2] += 1

    def get(self, run: str) -> tuple[int, int]:
        pairs, rejected, _ = self.runs.get(run, (0, 0, 0))
        return pairs, rejected

    def get_with_beats(self, run: str) -> tuple[int, int, int]:
        """(pairs, rejected, beats): `beats` counts every report, empty ones included, so the watchdog sees a
        scorer that is still working through one long call (see `report_to`)."""
        return tuple(self.runs.get(run, (0, 0, 0)))

    def drop(self, run: str) -> None:
        self.runs.pop(run, None)


_COUNTERS: dict[
    str, object
] = {}  # the counter actor of each cluster this driver joined, by GCS address


def shared_counter():
    """This driver's counter actor on the current cluster, started on first use, or again if it died."""
    import ray

    address = ray.get_runtime_context().gcs_address
    counter = _COUNTERS.get(address)
    if counter is not None:
        try:
            ray.get(counter.ping.remote(), timeout=30)
            return counter
        except Exception:  # noqa: BLE001 - dead or unreachable: a new one
            pass
    counter = _COUNTERS[address] = ray.remote(num_cpus=0)(ScoreCounter).remote()
    return counter


def report_to(counter, run: str, pairs: int, rejected: int) -> None:
    """What a scorer calls after each batch, and with (0, 0) while inside a long one (bound to a counter
    actor and a run with functools.partial)."""
    counter.add.remote(run, pairs, rejected)


class Progress:
    """Prints the progress line from a `ScoreCounter` actor every `interval` seconds until `stop`."""

    def __init__(self, total: int, done_before: int, interval: float):
        self.total, self.done_before, self.interval = total, done_before, interval
        self.counter, self.run = shared_counter(), uuid.uuid4().hex
        self.start = time.monotonic()
        self._last = (0, 0)  # nothing is printed until something is scored
        self._polled = (0, 0, 0)
        self._moved = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _print(self, pairs: int, rejected: int) -> None:
        if (pairs, rejected) == self._last:
            return
        self._last = (pairs, rejected)
        done = min(self.total, self.done_before + pairs + rejected)
        rate = (pairs + rejected) / max(time.monotonic() - self.start, 1e-9)
        logger.info(
            "scored %s/%s pairs (%.1f%%), %s pairs/s, %s rejected",
            f"{done:,}",
            f"{self.total:,}",
            100 * done / max(self.total, 1),
            f"{rate:.3g}" if rate < 100 else f"{rate:,.0f}",
            f"{rejected:,}",
        )

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.interval):
            try:
                *counts, beats = ray.get(
                    self.counter.get_with_beats.remote(self.run), timeout=self.interval
                )
            except Exception:  # noqa: BLE001 - progress must never fail the job
                continue
            if (*counts, beats) != self._polled:
                self._polled = (*counts, beats)
                self.moved()
            self._print(*counts)

    def reporter(self):
        """What the scorers call after each batch: `report_to` bound to this run's counter."""
        return functools.partial(report_to, self.counter, self.run)

    def moved(self) -> None:
        """Something was scored or written just now."""
        self._moved = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since anything was last scored or written (found within one `interval` of happening)."""
        return time.monotonic() - self._moved

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        try:
            self.counter.drop.remote(self.run)
        except Exception:  # noqa: BLE001 - Ray may already be shutting down
            pass

    def finish(self, pairs: int, rejected: int) -> None:
        """The last line, with the exact counts of this run once everything is committed."""
        self.close()
        self._print(pairs, rejected)
