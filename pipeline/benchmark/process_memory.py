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

from pipeline.runtime.processes import tree_pids


def _read_int_field(text: str, key: str) -> int | None:
    start = text.find(key)
    if start < 0:
        return None
    return int(text[start + len(key) :].split(None, 1)[0])


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
    """What a process is, shortly: Ray's workers and actors retitle themselves (`ray::ScoreCounter`,
    `ray::MapWorker(MapBatches(ScoreStage))`), kept as they are; a Python process is `python -m module`,
    `python -c` or `python script.py`; anything else its program's name (`raylet`, `gcs_server`). None once it has ended."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    argv = [a for a in argv if a]
    if not argv:
        return None
    if argv[0].startswith("ray::"):
        return " ".join(argv)[:80]
    program = os.path.basename(argv[0])
    if program.startswith("python"):
        rest = argv[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
            rest = rest[1:]
        if rest[:1] == ["-m"] and len(rest) > 1:
            return f"python -m {rest[1]}"
        if rest[:1] == ["-c"]:
            return "python -c"
        return f"python {os.path.basename(rest[0])}" if rest else "python"
    return program


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
    return {
        "rss_mb": rss_kb / 1024,
        "pss_mb": None if pss_kb is None else pss_kb / 1024,
        "processes": count,
    }


class ProcessTreeMemory:
    """Samples `tree_memory_mb(root)` every `interval` seconds on a thread while the block runs.

    `peak_rss_mb` / `peak_pss_mb`: the largest sums seen; `timeline`: [(seconds since start, rss_mb,
    pss_mb, processes)], every sample, for plotting memory against progress. `root` defaults to this process.
    `processes`: {pid: {"name", "samples": [(seconds, PSS MB)]}}, each process's own PSS at every sample (with
    PSS only), to tell which process a sum's growth is in (`growth`).
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
        now = tree_memory_mb(self.root, self.with_pss, pss_of)  # pss_of stays empty without PSS
        seconds = round(time.monotonic() - self._start, 2)
        for pid, mb in pss_of.items():
            seen = self.processes.setdefault(pid, {"name": None, "samples": []})
            # A Ray worker retitles itself once it runs an actor (ray::MapWorker(...)), and again when it is done
            # (ray::IDLE): the actor's name is the one kept.
            if (
                seen["name"] is None
                or not seen["name"].startswith("ray::")
                or seen["name"] == "ray::IDLE"
            ):
                seen["name"] = process_name(pid) or seen["name"]
            seen["samples"].append((seconds, round(mb, 1)))
        self.peak_rss_mb = max(self.peak_rss_mb, now["rss_mb"])
        if now["pss_mb"] is not None:
            self.peak_pss_mb = max(self.peak_pss_mb or 0.0, now["pss_mb"])
        self.timeline.append(
            (
                seconds,
                round(now["rss_mb"], 1),
                None if now["pss_mb"] is None else round(now["pss_mb"], 1),
                now["processes"],
            )
        )
        return now

    def growth(self, since_s: float = 0.0, top: int = 8) -> list[dict]:
        """The `top` processes whose own PSS grew most from `since_s` (or from when they were first seen, if
        later; start-up is then part of their growth) to when they were last seen, largest growth first:
        [{"pid", "name", "from_s", "to_s", "from_mb", "to_mb", "growth_mb", "peak_mb"}]."""
        grown = []
        for pid, p in self.processes.items():
            base = next(((t, mb) for t, mb in p["samples"] if t >= since_s), None)
            if base is None:  # ended before `since_s`
                continue
            (t0, mb0), (t1, mb1) = base, p["samples"][-1]
            grown.append(
                {
                    "pid": pid,
                    "name": p["name"],
                    "from_s": t0,
                    "to_s": t1,
                    "from_mb": mb0,
                    "to_mb": mb1,
                    "growth_mb": round(mb1 - mb0, 1),
                    "peak_mb": max(mb for _, mb in p["samples"]),
                }
            )
        return sorted(grown, key=lambda g: -g["growth_mb"])[:top]

    def elapsed(self) -> float:
        """Seconds since sampling started, on the timeline's clock."""
        return time.monotonic() - self._start

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessTreeMemory:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
