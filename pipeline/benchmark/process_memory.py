"""Memory of a whole process tree (a job's driver plus every process it started), sampled from /proc.

A Ray job's work runs in processes Ray starts (gcs, raylet, workers, actors), so the driver's own VmHWM
misses most of it. Two sums over the tree, per sample:
- `rss_mb`: resident set sizes added up. Pages shared between processes (Ray's object store in /dev/shm,
  mapped by the raylet and by every worker that reads from it; shared libraries) count once per process,
  so this overstates.
- `pss_mb`: proportional set sizes (`/proc/PID/smaps_rollup`, Linux >= 4.14): a shared page counts
  1/n in each of the n processes mapping it, so the sum is the memory the tree really holds. None where
  the kernel does not offer it.
A sampled peak can miss a spike shorter than the interval.
"""

from __future__ import annotations

import os
import threading
import time

from pipeline.processes import tree_pids


def _read_int_field(text: str, key: str) -> int | None:
    start = text.find(key)
    if start < 0:
        return None
    return int(text[start + len(key):].split(None, 1)[0])


def _resident_kb(pid: int, page_kb: float) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * page_kb
    except (OSError, IndexError, ValueError):
        return None  # ended while we looked (or the pid now belongs to a process we may not read)


def _pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return _read_int_field(f.read(), "\nPss:")
    except OSError:
        return None


def process_name(pid: int) -> str | None:
    """What a process calls itself: its command line (Ray's workers and actors retitle theirs, e.g.
    `ray::MapWorker(MapBatches(ScoreStage))`), at most 100 characters."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100] or None
    except OSError:
        return None


def tree_memory_mb(root: int, with_pss: bool = True, per_process: dict | None = None) -> dict:
    """{"rss_mb", "pss_mb", "processes"} of `root`'s tree, now. `pss_mb` is None when not asked for or when
    a live process of the tree had no readable smaps_rollup (a partial sum would look like a real one).
    `per_process`, if given, receives {pid: PSS in MB} for every process whose PSS was read."""
    page_kb = os.sysconf("SC_PAGE_SIZE") / 1024
    rss_kb, pss_kb, count = 0.0, 0 if with_pss else None, 0
    for pid in tree_pids(root):
        resident = _resident_kb(pid, page_kb)
        if resident is None:
            continue
        rss_kb += resident
        count += 1
        if pss_kb is not None:
            pss = _pss_kb(pid)
            pss_kb = None if pss is None else pss_kb + pss
            if pss is not None and per_process is not None:
                per_process[pid] = pss / 1024
    return {"rss_mb": rss_kb / 1024, "pss_mb": None if pss_kb is None else pss_kb / 1024, "processes": count}


class ProcessTreeMemory:
    """Samples `tree_memory_mb(root)` every `interval` seconds on a thread while the block runs.

    `peak_rss_mb` / `peak_pss_mb`: the largest sums seen; `timeline`: [(seconds since start, rss_mb,
    pss_mb, processes)], every sample, for plotting memory against progress. `root` defaults to this process.
    `processes`: {pid: {"name", "first_s", "first_mb", "last_s", "last_mb", "peak_mb"}}, each process's own PSS
    when first and last seen and at its peak (with PSS only), to tell which process a sum's growth is in.
    """

    def __init__(self, root: int | None = None, interval: float = 0.25, with_pss: bool = True):
        self.root = os.getpid() if root is None else root
        self.interval, self.with_pss = interval, with_pss
        self.peak_rss_mb, self.peak_pss_mb = 0.0, None
        self.timeline: list[tuple[float, float, float | None, int]] = []
        self.processes: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def sample(self) -> dict:
        pss_of: dict[int, float] = {}
        now = tree_memory_mb(self.root, self.with_pss, pss_of if self.with_pss else None)
        seconds = round(time.monotonic() - self._start, 2)
        for pid, mb in pss_of.items():
            seen = self.processes.get(pid)
            if seen is None:  # a new process (a pid reused by another later is another name, kept apart)
                seen = self.processes[pid] = {"name": process_name(pid), "first_s": seconds, "first_mb": round(mb, 1),
                                              "peak_mb": 0.0}
            seen.update(last_s=seconds, last_mb=round(mb, 1), peak_mb=max(seen["peak_mb"], round(mb, 1)))
        self.peak_rss_mb = max(self.peak_rss_mb, now["rss_mb"])
        if now["pss_mb"] is not None:
            self.peak_pss_mb = max(self.peak_pss_mb or 0.0, now["pss_mb"])
        self.timeline.append((seconds, round(now["rss_mb"], 1),
                              None if now["pss_mb"] is None else round(now["pss_mb"], 1), now["processes"]))
        return now

    def growth(self, top: int = 8) -> list[dict]:
        """The `top` processes whose own PSS grew most from when first seen to when last seen, largest first."""
        grown = [{"pid": pid, **p, "growth_mb": round(p["last_mb"] - p["first_mb"], 1)}
                 for pid, p in self.processes.items()]
        return sorted(grown, key=lambda p: -p["growth_mb"])[:top]

    def elapsed(self) -> float:
        """Seconds since sampling started, on the timeline's clock."""
        return time.monotonic() - self._start

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "ProcessTreeMemory":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
