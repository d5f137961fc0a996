"""The GPU checks of issue 4, in one command (< 10 minutes, no downloads, no Ray, no flash-attn):

    python scripts/gpu_check.py [--output results/gpu-check-<device>.json] [--data-dir ../shared/data]
    python scripts/gpu_check.py --device cpu --small --output /tmp/gpu-check-dry.json   # dry run on a CPU

1. parity on the device: our engine in bf16 against transformers in fp32 on the same weights (bound: three
   times transformers' own bf16 error, as in tests/model/test_parity.py), and engine fp32 against
   transformers fp32;
2. batch invariance: every pair scored alone equals the same pair scored inside a packed batch, bit for
   bit (the engine asks PyTorch's varlen attention for num_splits=1 where that torch has the option);
3. throughput on `dl19` and `long` for sentence-transformers (defaults, fp32; fp16 with its batch size
   tuned), transformers padded batches in input order (fp16), and our engine (auto dtype: bf16), with
   MFU against the peak GEMM FLOP/s of each dtype measured here, and peak device memory;
4. the scorer stage of the Ray job called directly (a plain class; skipped, and said so, when its
   imports are missing on this image).

Writes a JSON report (figures with the device's name) and prints a markdown table. Needs the shared data
(`--data-dir`, default ../shared/data) for the workloads and the tokenizer corpus; the checkpoint is
built here with random weights (jina-reranker-v2-base's shape, ~1 min) unless `--checkpoint` names one.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.benchmark.checkpoints import benchmark_checkpoint  # noqa: E402
from pipeline.benchmark.contenders import load_contender, tune_batch_size  # noqa: E402
from pipeline.benchmark.machine import machine_info  # noqa: E402
from pipeline.benchmark.flops import Shape, gemm_shapes, model_flops, peak_gemm_flops  # noqa: E402
from pipeline.benchmark.workloads import pair_token_counts, workload_pairs  # noqa: E402
from pipeline.model import CrossEncoder  # noqa: E402

FULL = {"pairs": {"dl19": 4300, "long": 930}, "full_precision_fraction": 0.25, "parity_pairs": 64,
        "invariance_pairs": 24, "tune_pairs": 512, "tune_batch_sizes": [32, 64, 128, 256]}
SMALL = {"pairs": {"dl19": 48, "long": 8}, "full_precision_fraction": 0.5, "parity_pairs": 12,
         "invariance_pairs": 6, "tune_pairs": 16, "tune_batch_sizes": [8, 16]}
# (name, contender, dtype on CUDA, dtype on CPU): the GPU's "best honest setting" for the libraries is fp16.
CONTENDERS = [
    ("st-default", "st-default", None, None),
    ("st-fp16", "st-best", "float16", "bfloat16"),
    ("hf-padded-fp16", "hf-padded", "float16", "bfloat16"),
    ("engine", "engine", None, None),
    # float8 Linear layers (torch._scaled_mm); on CPU a reference run, so the dry run proves the path works.
    ("engine-fp8", "engine", "float8", "float8"),
]


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment(device: str) -> dict:
    from pipeline.model.modeling import _torch_varlen_attn, _varlen_options

    varlen = _torch_varlen_attn()
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else machine_info()["cpu"],
            "torch_varlen_attn": varlen is not None,
            "varlen_num_splits": varlen is not None and bool(_varlen_options(varlen)),
            "cuda": torch.version.cuda}
    for lib in ("transformers", "sentence_transformers", "tokenizers", "pyarrow"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    return info


def transformers_logits(directory: str, pairs, dtype: torch.dtype, device: str, max_length: int) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype).to(device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(pairs), 16):
            chunk = pairs[i:i + 16]
            features = tokenizer([q for q, _ in chunk], [d for _, d in chunk], padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt").to(device)
            out.append(model(**features).logits[:, 0].float().cpu().numpy())
    del model
    free(device)
    return np.concatenate(out)


def check_parity(directory: str, pairs, device: str) -> dict:
    """Engine bf16 vs transformers fp32 (bound 3x transformers' own bf16 error); engine fp32 vs fp32."""
    max_length = 512
    fp32 = transformers_logits(directory, pairs, torch.float32, device, max_length)
    ref_bf16 = transformers_logits(directory, pairs, torch.bfloat16, device, max_length)
    result = {"pairs": len(pairs), "reference_bf16_error": float(np.abs(ref_bf16 - fp32).max())}
    for dtype in ("bfloat16", "float32"):
        engine = CrossEncoder.from_pretrained(directory, device=device, dtype=dtype)
        got = np.asarray(engine.compute_score(pairs, max_length=max_length, return_logits=True))
        result[f"engine_{dtype}_error"] = float(np.abs(got - fp32).max())
        result[f"engine_{dtype}_backend"] = engine.model.attention_backend
        del engine
        free(device)
    # On CUDA fp32 matmuls may differ in summation order from transformers' (different kernels): 1e-3.
    result["bf16_ok"] = result["engine_bfloat16_error"] <= 3 * max(result["reference_bf16_error"], 1e-6)
    result["fp32_ok"] = result["engine_float32_error"] <= 1e-3
    result["logit_std"] = float(fp32.std())
    return result


def check_invariance(directory: str, pairs, device: str) -> dict:
    """Each pair alone vs inside one packed batch with all the others, same dtype (auto), bit for bit."""
    engine = CrossEncoder.from_pretrained(directory, device=device)
    together = np.asarray(engine.compute_score(pairs, return_logits=True), dtype=np.float32)
    alone = np.asarray([engine.compute_score([p], return_logits=True) for p in pairs], dtype=np.float32)
    result = {"pairs": len(pairs), "dtype": str(engine.dtype).replace("torch.", ""),
              "backend": engine.model.attention_backend, "bitwise_equal": bool(np.array_equal(alone, together)),
              "equal_pairs": int((alone == together).sum()), "max_abs_diff": float(np.abs(alone - together).max())}
    del engine
    free(device)
    return result


def check_fp8(directory: str, pairs, device: str) -> dict:
    """The engine's float8 scores against its bf16 ones (float32 on CPU) on the same pairs: fidelity of fp8."""
    from scipy.stats import spearmanr

    base = "bfloat16" if device.startswith("cuda") else "float32"
    logits = {}
    for dtype in (base, "float8"):
        encoder = CrossEncoder.from_pretrained(directory, device=device, dtype=dtype)
        logits[dtype] = np.asarray(encoder.compute_score(pairs, return_logits=True, max_length=1024), np.float64)
        del encoder
        free(device)
    diff = np.abs(logits["float8"] - logits[base])
    return {"baseline": base, "pairs": len(pairs), "max_abs_dlogit": float(diff.max()),
            "mean_abs_dlogit": float(diff.mean()), "baseline_logit_std": float(logits[base].std()),
            "spearman": float(spearmanr(logits["float8"], logits[base]).correlation)}


def measure_contender(label: str, name: str, dtype: str | None, directory: str, workloads: dict, device: str,
                      shape: Shape, peaks: dict, settings: dict) -> list[dict]:
    contender = load_contender(name, directory, max_length=1024, device=device, dtype=dtype)
    rows = []
    for workload, pairs in workloads.items():
        if contender.dtype in ("float32", None) and name != "engine":
            pairs = pairs[:max(1, round(len(pairs) * settings["full_precision_fraction"]))]
        contender.score(pairs[:8], batch_size=32)  # warm-up: kernel selection, allocator
        batch_size = 32
        tuning = None
        if name == "st-best":
            batch_size, tuning = tune_batch_size(contender, pairs[:settings["tune_pairs"]], settings["tune_batch_sizes"])
        free(device)
        sync(device)
        scored = contender.score(pairs, batch_size=batch_size)
        sync(device)
        seqlens = pair_token_counts(directory, pairs, 1024)
        flops = model_flops(shape, seqlens)
        peak = peaks.get(scored.dtype, {}).get("flops_per_s", float("nan"))
        rows.append({
            "contender": label, "workload": workload, "dtype": scored.dtype, "n_pairs": len(pairs),
            "seconds": scored.seconds, "pairs_per_s": len(pairs) / scored.seconds,
            "real_tokens_per_s": scored.real_tokens / scored.seconds,
            "padding_efficiency": scored.real_tokens / scored.processed_tokens,
            "mfu": flops / scored.seconds / peak,
            "peak_device_memory_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None,
            "batch_size": batch_size if name != "engine" else None, "tuning": tuning, "settings": scored.settings,
        })
        log(f"{label:16s} {workload:6s} {rows[-1]['pairs_per_s']:9.1f} pairs/s  MFU {100 * rows[-1]['mfu']:5.1f}%")
    del contender
    free(device)
    return rows


def check_scorer_stage(directory: str, pairs, device: str) -> dict:
    """pipeline.stages.score.ScoreStage on a token batch, against compute_score. Needs its imports (pydantic...)."""
    try:
        import pyarrow as pa

        from pipeline import schema as S
        from pipeline.rerank_config import ScorerConfig
        from pipeline.stages.score import ScoreStage
        from pipeline.stages.tokenize import list_column
        from pipeline.model.tokenization import PairTokenizer
    except ImportError as e:
        return {"ran": False, "reason": f"import failed on this image: {e}"}
    tokenizer = PairTokenizer.from_dir(directory, return_token_types=False)
    ids, _ = tokenizer.encode_pairs([q for q, _ in pairs], [d for _, d in pairs], 1024)
    batch = pa.table({S.REASON: pa.array([None] * len(ids), pa.string()),
                      S.INPUT_IDS: list_column([np.asarray(x, dtype=np.int32) for x in ids], pa.int32())})
    with tempfile.TemporaryDirectory() as tmp:
        stage = ScoreStage(directory, None, "auto", ScorerConfig(device="cuda" if device.startswith("cuda") else "cpu"),
                           tmp, {})
        stage(batch.slice(0, min(8, len(ids))))  # warm-up
        sync(device)
        start = time.perf_counter()
        out = stage(batch)
        sync(device)
        seconds = time.perf_counter() - start
    scores = out.column(S.SCORE).to_numpy()
    expected = np.asarray(stage.encoder.score_tokens(ids), dtype=np.float32)
    result = {"ran": True, "pairs": len(ids), "pairs_per_s": len(ids) / seconds,
              "equal_to_score_tokens": bool(np.array_equal(scores, expected)),
              "describe": stage.encoder.describe()}
    del stage
    free(device)
    return result


def markdown(report: dict) -> str:
    lines = [f"GPU check on {report['environment']['device_name']} (torch {report['environment']['torch']})", "",
             "| workload | contender | dtype | pairs | pairs/s | tokens/s | padding eff. | MFU | peak mem (MB) | engine x |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        mem = "n/a" if r["peak_device_memory_mb"] is None else f"{r['peak_device_memory_mb']:.0f}"
        lines.append(f"| {r['workload']} | {r['contender']} | {r['dtype']} | {r['n_pairs']} | {r['pairs_per_s']:.1f} "
                     f"| {r['real_tokens_per_s']:.0f} | {r['padding_efficiency']:.2f} | {100 * r['mfu']:.1f}% | {mem} "
                     f"| {r.get('engine_speedup', float('nan')):.2f} |")
    p, inv = report["parity"], report["invariance"]
    lines += ["", f"parity: engine bf16 error {p['engine_bfloat16_error']:.4g} vs transformers bf16 {p['reference_bf16_error']:.4g} "
                  f"({'ok' if p['bf16_ok'] else 'FAIL'}); engine fp32 error {p['engine_float32_error']:.3g} ({'ok' if p['fp32_ok'] else 'FAIL'})",
              f"batch invariance ({inv['backend']}, {inv['dtype']}): bitwise equal {inv['bitwise_equal']} "
              f"({inv['equal_pairs']}/{inv['pairs']}), max diff {inv['max_abs_diff']:.3g}",
              f"scorer stage: {json.dumps({k: v for k, v in report['scorer_stage'].items() if k != 'describe'})}"]
    peaks = ", ".join(f"{k} {v['flops_per_s'] / 1e12:.1f} TFLOP/s" for k, v in report["peak_gemm"].items())
    lines.append(f"peak GEMM: {peaks}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--small", action="store_true", help="tiny pair counts (a dry run that proves the script runs)")
    parser.add_argument("--model", default="jina-reranker-v2-base", help="dummy architecture (pipeline/model/dummy.py)")
    parser.add_argument("--checkpoint", default=None, help="an existing checkpoint directory (transformers layout)")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (default ../shared/data or $SHARED_DATA)")
    parser.add_argument("--output", default=None, help="JSON report (default results/gpu-check-<device>.json)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; for a dry run pass --device cpu --small", file=sys.stderr)
        return 2
    settings = SMALL if args.small else FULL
    started = time.time()
    report: dict = {"environment": environment(args.device), "settings": settings, "runs": [], "errors": []}
    log(f"environment: {json.dumps(report['environment'])}")
    directory = args.checkpoint or benchmark_checkpoint(args.model, args.data_dir)
    with open(os.path.join(directory, "config.json")) as f:
        shape = Shape.from_config(json.load(f))
    report["checkpoint"] = {"directory": directory, "shape": shape.__dict__}
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if args.device.startswith("cuda"):  # CPUs have no fp16 GEMM units worth measuring (and it takes minutes)
        dtypes["float16"] = torch.float16
    seconds = 0.3 if args.small else 1.0
    report["peak_gemm"] = {name: peak_gemm_flops(dtype, gemm_shapes(shape, 8192), seconds, args.device)
                           for name, dtype in dtypes.items()}
    log("peak GEMM: " + ", ".join(f"{k} {v['flops_per_s'] / 1e12:.2f} TFLOP/s" for k, v in report["peak_gemm"].items()))
    workloads = {w: workload_pairs(w, n, directory, args.data_dir) for w, n in settings["pairs"].items()}
    for key, fn in (("parity", lambda: check_parity(directory, workloads["dl19"][:settings["parity_pairs"]], args.device)),
                    ("invariance", lambda: check_invariance(
                        directory, workloads["dl19"][:settings["invariance_pairs"] - 1] + workloads["long"][:1], args.device))):
        report[key] = fn()
        log(f"{key}: {json.dumps(report[key])}")
    for label, name, cuda_dtype, cpu_dtype in CONTENDERS:
        dtype = cuda_dtype if args.device.startswith("cuda") else cpu_dtype
        try:
            report["runs"] += measure_contender(label, name, dtype, directory, workloads, args.device, shape,
                                                report["peak_gemm"], settings)
        except Exception as e:  # one contender failing must not hide the others' figures; it is recorded
            report["errors"].append({"contender": label, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-2000:]})
            log(f"{label} failed: {e}")
            free(args.device)
    engine = {r["workload"]: r["pairs_per_s"] for r in report["runs"] if r["contender"] == "engine"}
    for r in report["runs"]:
        r["engine_speedup"] = engine.get(r["workload"], math.nan) / r["pairs_per_s"]
    try:
        report["fp8_fidelity"] = check_fp8(directory, workloads["dl19"][:settings["parity_pairs"]], args.device)
        log(f"fp8 fidelity: {json.dumps(report['fp8_fidelity'])}")
    except Exception as e:  # a GPU without float8 tensor cores: recorded, the rest of the report stands
        report["errors"].append({"check": "fp8_fidelity", "error": f"{type(e).__name__}: {e}"})
        log(f"fp8 fidelity failed: {e}")
    report["scorer_stage"] = check_scorer_stage(directory, workloads["dl19"], args.device)
    report["seconds"] = time.time() - started
    device_slug = report["environment"]["device_name"].replace(" ", "-").lower() or args.device
    output = args.output or os.path.join("results", f"gpu-check-{device_slug}.json")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(markdown(report))
    log(f"report: {output} ({report['seconds']:.0f} s)")
    ok = report["parity"]["bf16_ok"] and report["parity"]["fp32_ok"] and not report["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
