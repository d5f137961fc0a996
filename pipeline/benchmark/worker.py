"""One contender, one model, in a fresh process: `python -m pipeline.benchmark.worker SPEC.json OUT.json`.

A process of its own per contender keeps the measurements apart: each starts with an empty heap, its
thread pools to itself, and its memory high-water mark its own. Peak memory is the kernel's VmHWM (peak
resident set size) of this process, reset (`/proc/self/clear_refs` = 5) after the model is loaded and the
workload is read, so it covers the scoring of one workload: the loaded weights plus everything scoring
allocates. The time of a pass covers strings in -> logits out.

SPEC (JSON): {"contender", "directory", "device", "max_length", "workloads": [{"name", "n_pairs", "batch_size"?}],
              "data_dir", "batch_size", "tune_batch_sizes", "tune_pairs", "warmup_pairs",
              "max_tokens_per_batch", "dtype", "scores_dir", "calibration_pairs"}
OUT (JSON):  {"contender", "dtype", "load_seconds", "rss_after_load_mb", "results": [per workload]}

A workload's "batch_size" (a later round of the benchmark) replaces the contender's batch-size tuning.

An optional backend (ONNX Runtime, OpenVINO) that is missing or raises while loading or scoring gives
results {"workload", "n_pairs", "skipped": "<reason>"} instead of failing the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import sys
import time

import numpy as np
import torch

from pipeline.benchmark.contenders import CONTENDERS, load_contender, tune_batch_size
from pipeline.benchmark.process_memory import ProcessTreeMemory
from pipeline.benchmark.workloads import workload_pairs


def rss_high_water_mb() -> float:
    """Peak resident set size of this process since start or the last `reset_rss_high_water` (MiB)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def reset_rss_high_water() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS. False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def calibration_pairs(spec: dict) -> list[tuple[str, str]]:
    """`calibration_pairs` pairs of each workload, the ones right after the timed ones (disjoint from them
    while the workload has that many rows; past its end `take_pairs` tiles it)."""
    pairs = []
    for workload in spec["workloads"]:
        n, extra = workload["n_pairs"], spec.get("calibration_pairs", 32)
        pairs += workload_pairs(
            workload["name"], n + extra, spec["directory"], spec.get("data_dir")
        )[n:]
    return pairs


def _reason(error: BaseException) -> str:
    """One line for the report: the exception's type and the start of its message (terminal colours removed)."""
    message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())
    return f"{type(error).__name__}: {message}"[:300]


def run(spec: dict) -> dict:
    name = spec["contender"]
    contender_spec = CONTENDERS[name]
    start = time.perf_counter()
    try:
        contender = load_contender(
            name,
            spec["directory"],
            max_length=spec["max_length"],
            device=spec["device"],
            dtype=spec.get("dtype"),
            max_tokens_per_batch=spec.get("max_tokens_per_batch"),
            ray_job_overrides=spec.get("ray_job_overrides", ()),
            calibration_pairs=calibration_pairs(spec) if contender_spec.calibrated else (),
        )
    except Exception as error:
        if not contender_spec.optional:
            raise
        reason = _reason(error)
        return {
            "contender": name,
            "dtype": contender_spec.dtype,
            "load_seconds": time.perf_counter() - start,
            "rss_after_load_mb": rss_now_mb(),
            "results": [
                {"workload": w["name"], "n_pairs": w["n_pairs"], "skipped": reason}
                for w in spec["workloads"]
            ],
        }
    load_seconds = time.perf_counter() - start
    out = {
        "contender": name,
        "dtype": contender.dtype,
        "load_seconds": load_seconds,
        "rss_after_load_mb": rss_now_mb(),
        "results": [],
    }
    for workload in spec["workloads"]:
        try:
            out["results"].append(_score_workload(spec, contender, workload))
        except Exception as error:
            if not contender_spec.optional:
                raise
            out["results"].append(
                {
                    "workload": workload["name"],
                    "n_pairs": workload["n_pairs"],
                    "skipped": _reason(error),
                }
            )
    return out


def _score_workload(spec: dict, contender, workload: dict) -> dict:
    """Warm-up, batch-size tuning (where the contender has it), then the timed pass on one workload."""
    name = spec["contender"]
    contender_spec = CONTENDERS[name]
    pairs = workload_pairs(
        workload["name"], workload["n_pairs"], spec["directory"], spec.get("data_dir")
    )
    whole_job = contender_spec.library == "ray-job"
    if (
        not whole_job
    ):  # the job's cold start (Ray, actors, model loading) is part of what it is timed on
        # Warm-up (not timed): first-call costs (kernel selection, JIT, allocator growth) are not throughput.
        # At most a quarter of the pairs: 8 long pairs in float32 on the bge shape took as long as its timed pass.
        warmup = pairs[: max(1, min(spec.get("warmup_pairs", 8), len(pairs) // 4))]
        contender.score(warmup, batch_size=spec.get("batch_size") or 32)
    result: dict = {"workload": workload["name"], "n_pairs": len(pairs)}
    batch_size = workload.get("batch_size") or spec.get("batch_size")
    if contender_spec.tuned_batch_size and not workload.get(
        "batch_size"
    ):  # a later round keeps the first's
        # At most a quarter of the pairs per size: tuning must not cost more than the measurement.
        sample = pairs[: max(1, min(spec["tune_pairs"], len(pairs) // 4))]
        batch_size, speeds = tune_batch_size(contender, sample, spec["tune_batch_sizes"])
        result["tuning"] = {"pairs": len(sample), "pairs_per_s_by_batch_size": speeds}
    reset = reset_rss_high_water()
    cpu_before = _cpu_seconds()
    # The sampler scans /proc four times a second: only where VmHWM cannot see the work. RSS only: PSS
    # costs ~70 ms of CPU per sample on a Ray job (smaps_rollup walks page tables), which would slow the
    # job it measures; the memory benchmark (jobs.benchmark_memory) samples PSS.
    with ProcessTreeMemory(with_pss=False) if whole_job else contextlib.nullcontext() as tree:
        scored = contender.score(pairs, batch_size=batch_size)
    cpu_seconds = _cpu_seconds() - cpu_before
    if (
        scored.processed_tokens <= 0
        or len(scored.logits) != len(pairs)
        or np.isnan(scored.logits).any()
    ):
        raise RuntimeError(
            f"{name} on {workload['name']}: {len(scored.logits)} scores for {len(pairs)} pairs, "
            f"{scored.processed_tokens} tokens counted; the token counter or the contender is broken"
        )
    if whole_job:
        peak, note = (
            tree.peak_rss_mb,
            (
                "sum of RSS over the driver and every Ray process (shared pages "
                "counted per process), sampled every 0.25 s"
            ),
        )
    else:
        peak, note = (
            (rss_high_water_mb(), "VmHWM while scoring (weights included)")
            if reset
            else (None, "not measured: /proc/self/clear_refs not writable")
        )
    result.update(
        {
            "seconds": scored.seconds,
            "real_tokens": scored.real_tokens,
            "processed_tokens": scored.processed_tokens,
            "dtype": scored.dtype,
            "settings": scored.settings,
            "peak_rss_mb": peak,
            "peak_rss_note": note,
            # CPU seconds this process got per wall second per torch thread: ~1 when the machine was its own,
            # lower when other processes took cores (the figures are then pessimistic). Not for the Ray job,
            # whose work runs in other processes.
            "cpu_share": None
            if whole_job
            else cpu_seconds / (scored.seconds * torch.get_num_threads()),
        }
    )
    if spec.get("scores_dir"):
        path = os.path.join(spec["scores_dir"], f"{name}-{workload['name']}.npy")
        np.save(path, scored.logits)
        result["scores_file"] = path
    return result


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
