"""Run a job's module as its command line does and record the driver's own peak memory when it exits.

    python -m pipeline.benchmark.driver_peak REPORT.json -m jobs.hard_negatives --input ... --output ...

The module runs in this process as `python -m MODULE ARGS` would run it (`runpy`, `__main__`), so this
process is the job's driver. When it exits, however it exits (`sys.exit` with any status, an exception), the
kernel's count of its peak resident set (`VmHWM` in /proc/self/status: every page it ever held at once, not a
sample) and its resident set at the end (`VmRSS`) are written to REPORT.json as
{"module", "exit", "peak_rss_mb", "end_rss_mb"}. Ray's workers, actors, gcs and raylet are other processes:
their memory is not in these figures (the whole tree is sampled by `process_memory.py`).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys


def own_memory_mb() -> dict:
    """{"peak_rss_mb", "end_rss_mb"} of this process, from /proc/self/status (kB there, MiB here)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": fields["VmHWM"], "end_rss_mb": fields["VmRSS"]}


def _write(path: str, module: str, status: dict) -> None:
    report = {"module": module, "exit": status.get("code"), **own_memory_mb()}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "-m":
        raise SystemExit(
            "usage: python -m pipeline.benchmark.driver_peak REPORT.json -m MODULE [ARGS...]"
        )
    path, module, args = argv[0], argv[2], argv[3:]
    status: dict = {"code": None}
    atexit.register(
        _write, path, module, status
    )  # runs after the job's own exit handlers (Ray's shutdown)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status["code"] = 0
    except SystemExit as exit_:
        code = exit_.code
        status["code"] = code if isinstance(code, int) else (0 if code is None else 1)
        raise
    except BaseException:
        status["code"] = 1
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
