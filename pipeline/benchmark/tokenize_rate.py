"""How many CPU cores keep one GPU fed: the tokenize stage's pairs/s on one core, and the GPU rate it must match.

The rerank job tokenizes on CPU actors and scores on GPU actors; a GPU that waits for tokens is paid for
nothing. Two figures decide how many tokenizer cores one GPU needs:
- the tokenize stage's rate per core, measured here: the job's own `TokenizeStage` (truncation or windows,
  length sort, Arrow columns out) on `batch_size`-row batches, pinned to one core with one tokenizer thread;
- the GPU's scoring rate in pairs/s. Not measured here: it is bounded by the model FLOPs of the workload's
  pairs (`flops.model_flops` over the token counts just produced) at the GPU's dense bf16 peak, times the
  model FLOPs utilisation (MFU) the engine reaches on it.
cores per GPU = GPU pairs/s / (pairs/s per core). At 100% MFU that is a ceiling no GPU exceeds; the report
gives it with the cores needed at lower MFUs beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import pyarrow as pa

from pipeline.benchmark.machine import load_average, machine_info
from pipeline.benchmark.workloads import workload_pairs
from pipeline.core import schema as S
from pipeline.model.flops import Shape, model_flops
from pipeline.rerank.config import TokenizerConfig

# NVIDIA H100 SXM, dense bf16 tensor-core peak (the data sheet's 1,979 TFLOP/s is with 2:4 sparsity).
H100_BF16_TFLOPS = 989.0
MFU_LEVELS = (1.0, 0.5, 0.3)


@contextlib.contextmanager
def one_core():
    """Pin this process to one of the cores it may use, and the tokenizer library to one thread, while inside;
    yields the core. RAYON_NUM_THREADS is read when the tokenizers library first runs in parallel in a process:
    enter this before anything tokenizes, or run it in a process of its own."""
    saved_affinity = os.sched_getaffinity(0)
    saved_env = {k: os.environ.get(k) for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    os.environ.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    core = min(saved_affinity)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, saved_affinity)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _batches(pairs: list[tuple[str, str]], batch_size: int) -> list[pa.Table]:
    """The tokenize stage's input: (query, document, reason) rows, `batch_size` at a time."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out.append(
            pa.table(
                {
                    S.QUERY: [q for q, _ in chunk],
                    S.DOCUMENT: [d for _, d in chunk],
                    S.REASON: pa.nulls(len(chunk), pa.string()),
                }
            )
        )
    return out


def measure_workload(
    directory: str,
    workload: str,
    n_pairs: int,
    config: TokenizerConfig,
    repeats: int = 3,
    data_dir: str | None = None,
) -> dict:
    """Best-of-`repeats` pairs/s and tokens/s of the tokenize stage on this core, and the token counts' FLOPs."""
    from pipeline.rerank.stages.tokenize import TokenizeStage

    stage = TokenizeStage(directory, None, config)
    pairs = workload_pairs(workload, n_pairs, directory, data_dir)
    batches = _batches(pairs, config.batch_size)
    stage(batches[0].slice(0, 8))  # first call: the tokenizer's lazy set-up, not timed
    best, seqlens = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = [stage(batch) for batch in batches]
        best = min(best, time.perf_counter() - start)
        seqlens = np.concatenate([t.column(S.NUM_TOKENS).to_numpy() for t in out])
    with open(os.path.join(directory, "config.json")) as f:
        shape = Shape.from_config(json.load(f))
    sequences = len(seqlens)  # > pairs with long_documents: windows
    return {
        "workload": workload,
        "pairs": len(pairs),
        "sequences": sequences,
        "seconds": best,
        "pairs_per_s_per_core": len(pairs) / best,
        "tokens_per_s_per_core": float(seqlens.sum()) / best,
        "mean_tokens_per_pair": float(seqlens.sum()) / len(pairs),
        "model_flops_per_pair": model_flops(shape, seqlens) / len(pairs),
        "long_documents": config.long_documents,
        "max_length": config.max_length,
        "batch_size": config.batch_size,
    }


def gpu_sizing(row: dict, gpu_tflops: float, mfu_levels=MFU_LEVELS) -> list[dict]:
    """Per MFU level: the GPU's pairs/s on this workload's pairs, and the tokenizer cores that rate needs."""
    out = []
    for mfu in mfu_levels:
        gpu_pairs_per_s = gpu_tflops * 1e12 * mfu / row["model_flops_per_pair"]
        out.append(
            {
                "mfu": mfu,
                "gpu_pairs_per_s": gpu_pairs_per_s,
                "cores_per_gpu": gpu_pairs_per_s / row["pairs_per_s_per_core"],
            }
        )
    return out


def run(
    directory: str,
    workloads: list[str],
    n_pairs: int,
    config: TokenizerConfig,
    gpu_tflops: float,
    repeats: int = 3,
    data_dir: str | None = None,
) -> dict:
    rows = []
    with one_core() as core:
        for workload in workloads:
            row = measure_workload(directory, workload, n_pairs, config, repeats, data_dir)
            row["gpu"] = gpu_sizing(row, gpu_tflops)
            rows.append(row)
    return {
        "cpu": machine_info()["cpu"],
        "core": core,
        "load_average": load_average(),
        "checkpoint": directory,
        "gpu_bf16_tflops": gpu_tflops,
        "measured": time.strftime("%Y-%m-%d"),
        "workloads": rows,
    }


def markdown(report: dict) -> str:
    levels = [g["mfu"] for g in report["workloads"][0]["gpu"]] if report["workloads"] else []
    header = ["workload", "tokens/pair", "pairs/s per core", "tokens/s per core", "GFLOP/pair"] + [
        f"cores per GPU at {m:.0%} MFU" for m in levels
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["workloads"]:
        cells = [
            row["workload"] + (" (windows)" if row["long_documents"] == "windows" else ""),
            f"{row['mean_tokens_per_pair']:.0f}",
            f"{row['pairs_per_s_per_core']:,.0f}",
            f"{row['tokens_per_s_per_core']:,.0f}",
            f"{row['model_flops_per_pair'] / 1e9:.1f}",
        ]
        cells += [
            f"{g['cores_per_gpu']:.1f} ({g['gpu_pairs_per_s']:,.0f} pairs/s)" for g in row["gpu"]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Tokenize stage on one core of {report['cpu']} (best of the repeats, load average "
        f"{report['load_average']:.1f}); GPU rates from the model "
        f"FLOPs of these pairs at {report['gpu_bf16_tflops']:g} dense bf16 TFLOP/s times the MFU, not "
        "measured on a GPU."
    )
    return "\n".join(lines)
