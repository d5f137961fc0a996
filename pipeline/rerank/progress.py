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

import logging
import threading
import time

logger = logging.getLogger("rerank")


class ScoreCounter:
    """Running totals, held by a Ray actor (see `start`); `add` is called fire-and-forget by the scorers."""

    def __init__(self):
        self.pairs = self.rejected = self.beats = 0

    def add(self, pairs: int, rejected: int) -> None:
        self.pairs += pairs
        self.rejected += rejected
        self.beats += 1

    def get(self) -> tuple[int, int]:
        return self.pairs, self.rejected

    def get_with_beats(self) -> tuple[int, int, int]:
        """(pairs, rejected, beats): `beats` counts every report, empty ones included, so the watchdog sees a
        scorer that is still working through one long call (see `report_to`)."""
        return self.pairs, self.rejected, self.beats


def report_to(counter, pairs: int, rejected: int) -> None:
    """What a scorer calls after each batch, and with (0, 0) while inside a long one (bound to a counter
    actor with functools.partial)."""
    counter.add.remote(pairs, rejected)


class Progress:
    """Prints the progress line from a `ScoreCounter` actor every `interval` seconds until `stop`."""

    def __init__(self, total: int, done_before: int, interval: float):
        import ray

        self.total, self.done_before, self.interval = total, done_before, interval
        self.counter = ray.remote(num_cpus=0)(ScoreCounter).remote()
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
                    self.counter.get_with_beats.remote(), timeout=self.interval
                )
            except Exception:  # noqa: BLE001 - progress must never fail the job
                continue
            if (*counts, beats) != self._polled:
                self._polled = (*counts, beats)
                self.moved()
            self._print(*counts)

    def moved(self) -> None:
        """Something was scored or written just now."""
        self._moved = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since anything was last scored or written (found within one `interval` of happening)."""
        return time.monotonic() - self._moved

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        try:
            ray.kill(self.counter)
        except Exception:  # noqa: BLE001 - Ray may already be shutting down
            pass

    def finish(self, pairs: int, rejected: int) -> None:
        """The last line, with the exact counts of this run once everything is committed."""
        self.close()
        self._print(pairs, rejected)
