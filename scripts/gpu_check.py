"""The GPU check, in one command that fits a 10-minute device slot and never loses what it measured.

    python3 scripts/gpu_check.py --prepare .gpu-data           # once, where the shared data is: copy ~18 MB
    timeout -k 20 570 python3 scripts/gpu_check.py --data-dir .gpu-data --out "$OUT"     # on the GPU machine
    python3 scripts/gpu_check.py --device cpu --small --out /tmp/gpu-check               # a dry run on a CPU

Steps, in order (each one's result, or its error type, message and traceback tail, lands in the report):

  environment        torch, CUDA, the device, which attention backends this torch has
  checkpoint         random weights in jina-reranker-v2-base's shape, its tokenizer trained on the data (~1 min)
  peak_gemm          the best GEMM FLOP/s of each dtype here (bf16, fp16, fp32; fp8 where the device has it):
                     the denominators of every MFU figure
  workloads          DL19 pairs and long-document pairs (300-1,000 tokens) as text
  parity             engine bf16 against transformers fp32 (bound: 3x transformers' own bf16 error), engine
                     fp32 against transformers fp32
  invariance         every pair scored alone against inside one packed batch: ranks, bit equality, max diff
  scorer_throughput  the engine on token ids only (no tokenization): synthetic ids with DL19's and the long
                     workload's length distributions, 100k+ pairs, bf16 and fp8 (compute capability >= 8.9);
                     pairs/s, tokens/s and MFU against the peak GEMM of the same dtype
  contenders         end to end on the same text pairs: sentence-transformers (defaults; fp16 with a tuned
                     batch size), transformers padded fp16, the engine (auto, fp8); pairs/s ratios to the engine
  fp8_fidelity       the engine's fp8 logits against its bf16 ones (max/mean |dlogit|, Spearman)
  scorer_stage       the Ray job's scorer stage called directly on a token batch, against score_tokens

The report (`gpu-check.json` in `--out`) is rewritten atomically after every step, so a crash or the
`timeout` around the command keeps every figure measured so far; SIGTERM writes it and exits 143. A step
that fails is recorded and the next one runs. `--budget-s` bounds the whole run; each step gets a share
of it, cuts its timing loops short when its share is spent (recorded `cut_short`), and is stopped
(`timed_out`) a little after; a step the budget no longer reaches is `skipped`. `gpu-check.md` holds the
table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_PREPARED = ROOT / ".gpu-data"
REPORT_NAME = "gpu-check.json"
TABLE_NAME = "gpu-check.md"
FAIL_STEP_ENV = "GPU_CHECK_FAIL_STEP"
# What the checkpoint's tokenizer corpus and the workloads read (paths under the data folder).
DATA_FILES = [
    "README.md",
    "trec-dl/retrieve_results_dl19.json",
    "trec-dl/qrels.dl19-passage.txt",
    "vaswani/doc-text.trec",
    "vaswani/query-text.trec",
    "vaswani/qrels",
] + [f"xquad-r/{lang}.json" for lang in ("ar", "de", "en", "es", "hi", "ru", "th", "zh")]

FULL = {
    "pairs": {"dl19": 4300, "long": 930},
    "full_precision_fraction": 0.25,
    "parity_pairs": 64,
    "invariance_pairs": 24,
    "tune_pairs": 512,
    "tune_batch_sizes": [32, 64, 128, 256],
    # ~9.6M tokens of DL19 lengths and ~12M of long ones: seconds of GPU work per dtype, not milliseconds
    "token_pairs": {"dl19": 100_000, "long": 20_000},
    "token_chunks": 10,
    "gemm_tokens": 8192,
    "gemm_seconds": 0.25,
}
SMALL = {
    "pairs": {"dl19": 48, "long": 8},
    "full_precision_fraction": 0.5,
    "parity_pairs": 12,
    "invariance_pairs": 6,
    "tune_pairs": 16,
    "tune_batch_sizes": [8, 16],
    "token_pairs": {"dl19": 64, "long": 8},
    "token_chunks": 2,
    "gemm_tokens": 512,
    "gemm_seconds": 0.05,
}
# (name, contender, dtype on CUDA, dtype on CPU): the GPU's "best honest setting" for the libraries is fp16.
CONTENDERS = [
    ("st-default", "st-default", None, None),
    ("st-fp16", "st-best", "float16", "bfloat16"),
    ("hf-padded-fp16", "hf-padded", "float16", "bfloat16"),
    ("engine", "engine", None, None),
    # float8 Linear layers (torch._scaled_mm); on CPU a reference run, so the dry run proves the path works.
    ("engine-fp8", "engine", "float8", "float8"),
]
# Each step's share of --budget-s (they sum to 1). The checkpoint is built on the host's CPUs (~1 min).
SHARES = {
    "environment": 0.02,
    "checkpoint": 0.22,
    "peak_gemm": 0.05,
    "workloads": 0.08,
    "parity": 0.07,
    "invariance": 0.05,
    "scorer_throughput": 0.18,
    "contenders": 0.23,
    "fp8_fidelity": 0.04,
    "scorer_stage": 0.06,
}
NEEDS = {
    "peak_gemm": ["checkpoint"],
    "workloads": ["checkpoint"],
    "parity": ["workloads"],
    "invariance": ["workloads"],
    "scorer_throughput": ["workloads", "peak_gemm"],
    "contenders": ["workloads", "peak_gemm"],
    "fp8_fidelity": ["workloads"],
    "scorer_stage": ["workloads"],
}
STEPS = list(SHARES)
NO_FP8 = "not run: this device has no float8 tensor cores (compute capability 8.9 or 9.0+)"
GRACE_S = (
    15.0  # a step past its share gets this long to finish its current piece before it is stopped
)
MIN_STEP_S = 2.0  # below this much budget left, a step is skipped rather than started
MIN_SHARE_S = 30.0  # no step's share is less (imports alone take ~20 s on a loaded 2-core machine)


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): the report is written, then the process exits."""


class StepSkipped(Exception):
    """Raised by a step that does not apply here (e.g. fp8 on a GPU without float8 tensor cores): `skipped`."""


class StepTimeout(BaseException):
    """A step ran past its share of the budget (plus GRACE_S). BaseException: library `except Exception`
    blocks must not swallow it."""


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


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader (or a kill mid-write) sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare(source: Path, target: Path) -> int:
    """Copy DATA_FILES from the shared data folder `source` into `target` (same layout); returns bytes copied."""
    missing = [name for name in DATA_FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source} lacks {', '.join(missing)}; pass the shared data folder as --data-dir"
        )
    copied = 0
    for name in DATA_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
        copied += (source / name).stat().st_size
    return copied


# -- the checks ---------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    from pipeline.benchmark.machine import machine_info
    from pipeline.model.modeling import torch_varlen_attn, varlen_options

    varlen = torch_varlen_attn()
    cuda = device.startswith("cuda")
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if cuda else machine_info()["cpu"],
        "compute_capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "torch_varlen_attn": varlen is not None,
        "varlen_num_splits": varlen is not None and bool(varlen_options(varlen)),
        "cuda": torch.version.cuda,
    }
    for lib in ("transformers", "sentence_transformers", "tokenizers", "pyarrow", "flash_attn"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:  # absent, or built for another torch: either way not what this run uses
            info[lib] = None
    return info


def transformers_logits(
    directory: str, pairs, dtype: torch.dtype, device: str, max_length: int
) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = (
        AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype).to(device).eval()
    )
    out = []
    with torch.inference_mode():
        for i in range(0, len(pairs), 16):
            chunk = pairs[i : i + 16]
            features = tokenizer(
                [q for q, _ in chunk],
                [d for _, d in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            out.append(model(**features).logits[:, 0].float().cpu().numpy())
    del model
    free(device)
    return np.concatenate(out)


def check_parity(directory: str, pairs, device: str, engine_device: str) -> dict:
    """Engine bf16 vs transformers fp32 (bound 3x transformers' own bf16 error); engine fp32 vs fp32."""
    from pipeline.model import CrossEncoder

    max_length = 512
    fp32 = transformers_logits(directory, pairs, torch.float32, device, max_length)
    ref_bf16 = transformers_logits(directory, pairs, torch.bfloat16, device, max_length)
    result = {"pairs": len(pairs), "reference_bf16_error": float(np.abs(ref_bf16 - fp32).max())}
    for dtype in ("bfloat16", "float32"):
        engine = CrossEncoder.from_pretrained(directory, device=engine_device, dtype=dtype)
        got = np.asarray(engine.compute_score(pairs, max_length=max_length, return_logits=True))
        result[f"engine_{dtype}_error"] = float(np.abs(got - fp32).max())
        result[f"engine_{dtype}_backend"] = engine.model.attention_backend
        del engine
        free(device)
    # On CUDA fp32 matmuls may differ in summation order from transformers' (different kernels): 1e-3.
    result["bf16_ok"] = result["engine_bfloat16_error"] <= 3 * max(
        result["reference_bf16_error"], 1e-6
    )
    result["fp32_ok"] = result["engine_float32_error"] <= 1e-3
    result["logit_std"] = float(fp32.std())
    return result


def check_invariance(directory: str, pairs, device: str, engine_device: str) -> dict:
    """Each pair alone vs inside one packed batch with all the others, same dtype (auto): ranks and bits."""
    from pipeline.model import CrossEncoder

    engine = CrossEncoder.from_pretrained(directory, device=engine_device)
    together = np.asarray(engine.compute_score(pairs, return_logits=True), dtype=np.float32)
    alone = np.asarray(
        [engine.compute_score([p], return_logits=True) for p in pairs], dtype=np.float32
    )
    result = {
        "pairs": len(pairs),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "backend": engine.model.attention_backend,
        "ranks_identical": bool(
            np.array_equal(np.argsort(-alone, kind="stable"), np.argsort(-together, kind="stable"))
        ),
        "bitwise_equal": bool(np.array_equal(alone, together)),
        "equal_pairs": int((alone == together).sum()),
        "max_abs_diff": float(np.abs(alone - together).max()),
    }
    del engine
    free(device)
    return result


def peak_fp8_gemm(shapes, seconds_per_shape: float, device: str) -> dict:
    """Best FLOP/s of `torch._scaled_mm` in e4m3 with row-wise scales and bf16 output: the call, operand
    layout and scales of the engine's fp8 Linear layers (pipeline/model/fp8.py), on each (m, k, n)."""
    from pipeline.model.fp8 import quantize_rows

    results = {}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for m, k, n in shapes:
        q_x, x_scale = quantize_rows(torch.randn(m, k, generator=generator).to(device))
        q_w, w_scale = quantize_rows(torch.randn(n, k, generator=generator).to(device))
        w_scale = w_scale.reshape(1, -1).contiguous()
        best, spent = float("inf"), 0.0
        while spent < seconds_per_shape:
            sync(device)
            start = time.perf_counter()
            torch._scaled_mm(
                q_x, q_w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16
            )
            sync(device)
            elapsed = time.perf_counter() - start
            best, spent = min(best, elapsed), spent + elapsed
        results[f"_scaled_mm {m}x{k}x{n}"] = 2.0 * m * k * n / best
    return {"flops_per_s": max(results.values()), "by_kernel_and_shape": results, "dtype": "float8"}


def synthetic_ids(
    lengths: np.ndarray, vocab_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One int64 array per length: <s> (0), random ids from the vocabulary's body, </s> (2). The ids' values do
    not change the arithmetic; the lengths are what the timing is about."""
    out = []
    for n in lengths:
        ids = rng.integers(5, vocab_size, int(n), dtype=np.int64)
        ids[0], ids[-1] = 0, 2
        out.append(ids)
    return out


def scorer_throughput(
    directory: str,
    lengths: dict,
    vocab_size: int,
    device: str,
    engine_device: str,
    shape,
    peaks: dict,
    settings: dict,
    deadline: float,
) -> dict:
    """The engine's score_tokens on synthetic token ids (no tokenizer in the timed loop), per dtype and
    workload: lengths drawn (seeded) from each workload's real pair lengths. Timed in chunks; a chunk that
    would start past `deadline` is not run (`cut_short`), and the figures cover the chunks that ran."""
    from pipeline.model import CrossEncoder
    from pipeline.model.flops import model_flops
    from pipeline.model.fp8 import fp8_kernel_works

    cuda = device.startswith("cuda")
    dtypes = ["bfloat16"] + (["float8"] if fp8_kernel_works(torch.device(engine_device)) else [])
    result = {
        "dtypes": dtypes,
        "rows": [],
        "cut_short": False,
        "fp8": "measured" if "float8" in dtypes else NO_FP8,
    }
    rng = np.random.default_rng(0)
    inputs = {}
    for workload, n_pairs in settings["token_pairs"].items():
        drawn = rng.choice(lengths[workload], size=n_pairs, replace=True)
        inputs[workload] = synthetic_ids(drawn, vocab_size, rng)
    for dtype in dtypes:
        engine = CrossEncoder.from_pretrained(directory, device=engine_device, dtype=dtype)
        for workload, ids in inputs.items():
            chunks = np.array_split(np.arange(len(ids)), settings["token_chunks"])
            warm = [ids[i] for i in chunks[0][: max(1, len(chunks[0]) // 4)]]
            engine.score_tokens(
                warm
            )  # kernel selection, allocator, fp8 weights already quantized at load
            free(device)
            seconds, scored_lengths = 0.0, []
            for chunk in chunks:
                if time.monotonic() > deadline:
                    result["cut_short"] = True
                    break
                batch = [ids[i] for i in chunk]
                sync(device)
                start = time.perf_counter()
                engine.score_tokens(batch)
                sync(device)
                seconds += time.perf_counter() - start
                scored_lengths += [len(x) for x in batch]
            if not scored_lengths:
                continue
            tokens = int(np.sum(scored_lengths))
            peak = peaks.get(dtype, {}).get("flops_per_s", float("nan"))
            row = {
                "dtype": dtype,
                "workload": workload,
                "n_pairs": len(scored_lengths),
                "tokens": tokens,
                "mean_tokens": tokens / len(scored_lengths),
                "seconds": seconds,
                "pairs_per_s": len(scored_lengths) / seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": model_flops(shape, scored_lengths) / seconds / peak,
                "peak_device_memory_mb": torch.cuda.max_memory_allocated() / 2**20
                if cuda
                else None,
                "attention_backend": engine.model.attention_backend,
                "linear_kernel": engine.model.linear_kernel,
            }
            result["rows"].append(row)
            log(
                f"tokens only {dtype:9s} {workload:5s} {row['pairs_per_s']:10.1f} pairs/s  MFU {100 * row['mfu']:5.1f}%"
                f"  ({row['n_pairs']} pairs, {seconds:.1f} s)"
            )
        del engine
        free(device)
    rate = {(r["dtype"], r["workload"]): r["pairs_per_s"] for r in result["rows"]}
    result["fp8_speedup"] = {
        w: rate[("float8", w)] / rate[("bfloat16", w)]
        for w in inputs
        if ("float8", w) in rate and ("bfloat16", w) in rate
    }
    return result


def measure_contender(
    label: str,
    name: str,
    dtype: str | None,
    directory: str,
    workloads: dict,
    device: str,
    engine_device: str,
    shape,
    peaks: dict,
    settings: dict,
) -> list[dict]:
    from pipeline.benchmark.contenders import load_contender, tune_batch_size
    from pipeline.benchmark.workloads import pair_token_counts
    from pipeline.model.flops import model_flops

    contender = load_contender(
        name,
        directory,
        max_length=1024,
        device=engine_device if name == "engine" else device,
        dtype=dtype,
    )
    rows = []
    for workload, pairs in workloads.items():
        if contender.dtype in ("float32", None) and name != "engine":
            pairs = pairs[: max(1, round(len(pairs) * settings["full_precision_fraction"]))]
        contender.score(pairs[:8], batch_size=32)  # warm-up: kernel selection, allocator
        batch_size = 32
        tuning = None
        if name == "st-best":
            batch_size, tuning = tune_batch_size(
                contender, pairs[: settings["tune_pairs"]], settings["tune_batch_sizes"]
            )
        free(device)
        sync(device)
        scored = contender.score(pairs, batch_size=batch_size)
        sync(device)
        seqlens = pair_token_counts(directory, pairs, 1024)
        flops = model_flops(shape, seqlens)
        peak = peaks.get(scored.dtype, {}).get("flops_per_s", float("nan"))
        rows.append(
            {
                "contender": label,
                "workload": workload,
                "dtype": scored.dtype,
                "n_pairs": len(pairs),
                "seconds": scored.seconds,
                "pairs_per_s": len(pairs) / scored.seconds,
                "real_tokens_per_s": scored.real_tokens / scored.seconds,
                "padding_efficiency": scored.real_tokens / scored.processed_tokens,
                "mfu": flops / scored.seconds / peak,
                "peak_device_memory_mb": torch.cuda.max_memory_allocated() / 2**20
                if device.startswith("cuda")
                else None,
                "batch_size": batch_size if name != "engine" else None,
                "tuning": tuning,
                "settings": scored.settings,
            }
        )
        log(
            f"{label:16s} {workload:6s} {rows[-1]['pairs_per_s']:9.1f} pairs/s  MFU {100 * rows[-1]['mfu']:5.1f}%"
        )
    del contender
    free(device)
    return rows


def check_fp8(directory: str, pairs, device: str, engine_device: str) -> dict:
    """The engine's float8 scores against its bf16 ones (float32 on CPU) on the same pairs: fidelity of fp8."""
    from scipy.stats import spearmanr

    from pipeline.model import CrossEncoder

    base = "bfloat16" if engine_device.startswith("cuda") else "float32"
    logits = {}
    for dtype in (base, "float8"):
        encoder = CrossEncoder.from_pretrained(directory, device=engine_device, dtype=dtype)
        logits[dtype] = np.asarray(
            encoder.compute_score(pairs, return_logits=True, max_length=1024), np.float64
        )
        del encoder
        free(device)
    diff = np.abs(logits["float8"] - logits[base])
    return {
        "baseline": base,
        "pairs": len(pairs),
        "max_abs_dlogit": float(diff.max()),
        "mean_abs_dlogit": float(diff.mean()),
        "baseline_logit_std": float(logits[base].std()),
        "spearman": float(spearmanr(logits["float8"], logits[base]).correlation),
    }


def check_scorer_stage(directory: str, pairs, device: str, engine_device: str) -> dict:
    """pipeline.rerank.stages.score.ScoreStage on a token batch, against compute_score. Needs its imports (pydantic...)."""
    try:
        import pyarrow as pa

        from pipeline.core import schema as S
        from pipeline.model.tokenization import PairTokenizer
        from pipeline.rerank.config import ScorerConfig
        from pipeline.rerank.stages.score import ScoreStage
        from pipeline.rerank.stages.tokenize import list_column
    except ImportError as e:
        return {"ran": False, "reason": f"import failed on this image: {e}"}
    tokenizer = PairTokenizer.from_dir(directory, return_token_types=False)
    ids, _ = tokenizer.encode_pairs([q for q, _ in pairs], [d for _, d in pairs], 1024)
    batch = pa.table(
        {
            S.REASON: pa.array([None] * len(ids), pa.string()),
            S.INPUT_IDS: list_column([np.asarray(x, dtype=np.int32) for x in ids], pa.int32()),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        stage = ScoreStage(
            directory,
            None,
            "auto",
            ScorerConfig(device="cuda" if engine_device.startswith("cuda") else "cpu"),
            tmp,
            {},
        )
        stage(batch.slice(0, min(8, len(ids))))  # warm-up
        sync(device)
        start = time.perf_counter()
        out = stage(batch)
        sync(device)
        seconds = time.perf_counter() - start
    scores = out.column(S.SCORE).to_numpy()
    expected = np.asarray(stage.encoder.score_tokens(ids), dtype=np.float32)
    result = {
        "ran": True,
        "pairs": len(ids),
        "pairs_per_s": len(ids) / seconds,
        "equal_to_score_tokens": bool(np.array_equal(scores, expected)),
        "describe": stage.encoder.describe(),
    }
    del stage
    free(device)
    return result


# -- the run: steps, budget, report -------------------------------------------------------------------------


class Check:
    """One run: the report, the state steps hand to each other, and the step runner."""

    def __init__(self, args, settings: dict, hard_timeouts: bool):
        self.args, self.settings, self.hard_timeouts = args, settings, hard_timeouts
        self.device = args.device
        # where the engine runs: "cuda" under --standins (the engine's CUDA paths on this CPU), else the device
        self.engine_device = "cuda" if args.standins else args.device
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.path = Path(args.output) if args.output else Path(args.out) / REPORT_NAME
        self.fail_steps = {s for s in (args.fail_step or "").split(",") if s}
        self.report: dict = {
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": sys.argv[1:],
            "device": self.device,
            "standins": args.standins,
            "budget_s": args.budget_s,
            "small": args.small,
            "settings": settings,
            "data_dir": str(args.data_dir),
            "complete": False,
            "steps": {name: {"status": "pending"} for name in STEPS},
            "runs": [],
            "errors": [],
        }
        self.state: dict = {}
        self.current: str | None = None

    def write(self) -> None:
        self.report["seconds"] = time.monotonic() - self.started
        write_atomic(self.path, json.dumps(self.report, indent=2, default=str))

    def run_step(self, name: str, fn) -> None:
        entry = self.report["steps"][name]
        left = self.deadline - time.monotonic()
        share = min(max(SHARES[name] * self.args.budget_s, MIN_SHARE_S), left)
        entry["budget_s"] = round(share, 1)
        failed = [
            need
            for need in NEEDS.get(name, [])
            if self.report["steps"][need]["status"] not in ("ok", "cut_short")
        ]
        if failed:
            entry.update(
                status="skipped", reason=f"needs {', '.join(failed)}, which did not complete"
            )
        elif left < MIN_STEP_S:
            entry.update(
                status="skipped", reason=f"the budget of {self.args.budget_s:.0f} s was spent"
            )
        if entry["status"] == "skipped":
            log(f"{name}: skipped ({entry['reason']})")
            self.write()
            return
        step_deadline = time.monotonic() + share
        entry["status"] = "running"
        self.current = name
        self.write()
        start = time.monotonic()
        if self.hard_timeouts:
            signal.setitimer(signal.ITIMER_REAL, max(0.1, min(share + GRACE_S, left)))
        try:
            try:
                if name in self.fail_steps:
                    raise RuntimeError(
                        f"{name} made to fail on purpose (--fail-step / ${FAIL_STEP_ENV}, a test hook)"
                    )
                result = fn(step_deadline)
                entry["status"] = (
                    "cut_short" if isinstance(result, dict) and result.get("cut_short") else "ok"
                )
                if result is not None:
                    self.report[name] = result
                log(f"{name}: {entry['status']} ({time.monotonic() - start:.1f} s)")
            except StepSkipped as e:
                entry.update(status="skipped", reason=str(e))
                log(f"{name}: skipped ({e})")
            except Interrupted:
                entry.update(status="interrupted", error=error_record(None, "SIGTERM"))
                raise
            except StepTimeout:
                entry.update(
                    status="timed_out",
                    error=error_record(None, f"past its budget of {share:.0f} s + {GRACE_S:.0f} s"),
                )
                self.report["errors"].append({"step": name, **entry["error"]})
                log(f"{name}: timed out after {time.monotonic() - start:.0f} s")
            except Exception as e:  # recorded; the next step runs
                entry.update(status="failed", error=error_record(e))
                self.report["errors"].append({"step": name, **entry["error"]})
                log(f"{name}: failed: {type(e).__name__}: {e}")
        except (
            StepTimeout
        ):  # the timer fired while a handler above was recording how the step ended
            if entry["status"] == "running":
                entry.update(
                    status="timed_out",
                    error=error_record(None, f"past its budget of {share:.0f} s"),
                )
        finally:
            if self.hard_timeouts:
                signal.setitimer(signal.ITIMER_REAL, 0)
            entry["seconds"] = round(time.monotonic() - start, 2)
            self.current = None
            try:
                free(self.device)
            except Exception:  # a device in a bad state must not hide the step's own record
                pass
            self.write()

    # The steps. Each takes its deadline (time.monotonic()) and returns what the report keeps under its name.

    def step_environment(self, deadline):
        return environment(self.device)

    def step_checkpoint(self, deadline):
        from pipeline.benchmark.checkpoints import benchmark_checkpoint
        from pipeline.model.flops import Shape

        directory = self.args.checkpoint or benchmark_checkpoint(
            self.args.model, self.args.data_dir
        )
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        self.state.update(
            directory=directory, shape=Shape.from_config(config), vocab_size=config["vocab_size"]
        )
        return {
            "directory": directory,
            "shape": self.state["shape"].__dict__,
            "vocab_size": config["vocab_size"],
        }

    def step_peak_gemm(self, deadline):
        from pipeline.model.flops import gemm_shapes, peak_gemm_flops
        from pipeline.model.fp8 import fp8_kernel_works

        shapes = gemm_shapes(self.state["shape"], self.settings["gemm_tokens"])
        dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
        if self.device.startswith(
            "cuda"
        ):  # CPUs have no fp16 GEMM units worth measuring (and it takes minutes)
            dtypes["float16"] = torch.float16
        seconds = self.settings["gemm_seconds"]
        peaks = {
            name: peak_gemm_flops(dtype, shapes, seconds, self.device)
            for name, dtype in dtypes.items()
        }
        self.state["fp8"] = fp8_kernel_works(torch.device(self.engine_device))
        if self.state["fp8"]:
            # CPU torch runs _scaled_mm as a slow reference: the model's shapes only, not the square one
            fp8_shapes = shapes if self.device.startswith("cuda") else shapes[:-1]
            peaks["float8"] = peak_fp8_gemm(fp8_shapes, seconds, self.device)
        self.state["peaks"] = peaks
        log(
            "peak GEMM: "
            + ", ".join(f"{k} {v['flops_per_s'] / 1e12:.2f} TFLOP/s" for k, v in peaks.items())
        )
        return peaks

    def step_workloads(self, deadline):
        from pipeline.benchmark.workloads import pair_token_counts, workload_pairs

        directory = self.state["directory"]
        workloads = {
            w: workload_pairs(w, n, directory, self.args.data_dir)
            for w, n in self.settings["pairs"].items()
        }
        lengths = {w: pair_token_counts(directory, pairs, 1024) for w, pairs in workloads.items()}
        self.state.update(workloads=workloads, lengths=lengths)
        return {
            w: {
                "pairs": len(workloads[w]),
                "mean_tokens": float(n.mean()),
                "p90_tokens": float(np.percentile(n, 90)),
                "max_tokens": int(n.max()),
            }
            for w, n in lengths.items()
        }

    def step_parity(self, deadline):
        return check_parity(
            self.state["directory"],
            self.state["workloads"]["dl19"][: self.settings["parity_pairs"]],
            self.device,
            self.engine_device,
        )

    def step_invariance(self, deadline):
        w = self.state["workloads"]
        return check_invariance(
            self.state["directory"],
            w["dl19"][: self.settings["invariance_pairs"] - 1] + w["long"][:1],
            self.device,
            self.engine_device,
        )

    def step_scorer_throughput(self, deadline):
        return scorer_throughput(
            self.state["directory"],
            self.state["lengths"],
            self.state["vocab_size"],
            self.device,
            self.engine_device,
            self.state["shape"],
            self.state["peaks"],
            self.settings,
            deadline,
        )

    def step_contenders(self, deadline):
        result = {"ran": [], "not_run": [], "cut_short": False}
        for label, name, cuda_dtype, cpu_dtype in CONTENDERS:
            if time.monotonic() > deadline:
                result["not_run"].append(label)
                result["cut_short"] = True
                continue
            dtype = cuda_dtype if self.device.startswith("cuda") else cpu_dtype
            if dtype == "float8" and not self.state["fp8"]:
                result["not_run"].append(label)
                result["fp8"] = NO_FP8
                continue
            try:
                rows = measure_contender(
                    label,
                    name,
                    dtype,
                    self.state["directory"],
                    self.state["workloads"],
                    self.device,
                    self.engine_device,
                    self.state["shape"],
                    self.state["peaks"],
                    self.settings,
                )
                self.report["runs"] += rows
                result["ran"].append(label)
            except (
                Exception
            ) as e:  # one contender failing must not hide the others' figures; it is recorded
                self.report["errors"].append(
                    {"step": "contenders", "contender": label, **error_record(e)}
                )
                log(f"{label} failed: {type(e).__name__}: {e}")
                free(self.device)
            self.write()  # each contender's rows are kept even if a later one hangs
        engine = {
            r["workload"]: r["pairs_per_s"]
            for r in self.report["runs"]
            if r["contender"] == "engine"
        }
        for r in self.report["runs"]:
            r["engine_speedup"] = engine.get(r["workload"], math.nan) / r["pairs_per_s"]
        st = {
            r["workload"]: r["pairs_per_s"]
            for r in self.report["runs"]
            if r["contender"] == "st-fp16"
        }
        tokens_only = {
            r["workload"]: r["pairs_per_s"]
            for r in self.report.get("scorer_throughput", {}).get("rows", [])
            if r["dtype"] == "bfloat16"
        }
        # the target's ratio: engine over sentence-transformers' best fp16/bf16 setting, both from text
        result["engine_over_st_best"] = {w: engine[w] / st[w] for w in st if w in engine}
        # and the scorer alone (token ids, bf16) over the same: the ceiling once tokenization runs elsewhere
        result["tokens_only_bf16_over_st_best"] = {
            w: tokens_only[w] / st[w] for w in st if w in tokens_only
        }
        return result

    def step_fp8_fidelity(self, deadline):
        from pipeline.model.fp8 import fp8_kernel_works

        if not self.state.get("fp8", fp8_kernel_works(torch.device(self.engine_device))):
            raise StepSkipped(NO_FP8)
        return check_fp8(
            self.state["directory"],
            self.state["workloads"]["dl19"][: self.settings["parity_pairs"]],
            self.device,
            self.engine_device,
        )

    def step_scorer_stage(self, deadline):
        return check_scorer_stage(
            self.state["directory"],
            self.state["workloads"]["dl19"],
            self.device,
            self.engine_device,
        )

    def run(self) -> int:
        for name in STEPS:
            try:
                self.run_step(name, getattr(self, f"step_{name}"))
            except StepTimeout:  # the alarm fired as the step ended, after its record was made
                pass
        self.report["complete"] = True
        self.write()
        try:
            table = markdown(self.report)
        except (
            Exception
        ) as e:  # the JSON is complete; a table that cannot be drawn must not hide it
            table = f"no table: {type(e).__name__}: {e}"
        write_atomic(self.path.with_name(TABLE_NAME), table + "\n")
        print(table)
        log(f"report: {self.path} ({self.report['seconds']:.0f} s)")
        parity = self.report.get("parity", {})
        ok = parity.get("bf16_ok") and parity.get("fp32_ok") and not self.report["errors"]
        return 0 if ok else 1


def error_record(e: BaseException | None, message: str | None = None) -> dict:
    return {
        "type": type(e).__name__ if e is not None else message,
        "message": str(e) if e is not None else message,
        "traceback": traceback.format_exc()[-2000:],
    }


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [
        f"GPU check on {env.get('device_name', report['device'])} (torch {env.get('torch', torch.__version__)}), "
        f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget",
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
    ]
    lines += [
        f"| {name} | {s['status']} | {s.get('seconds', '')} |"
        for name, s in report["steps"].items()
    ]
    rows = report.get("scorer_throughput", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "Engine on token ids (no tokenization):",
            "",
            "| workload | dtype | pairs | mean tokens | pairs/s | tokens/s | MFU | peak mem (MB) |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            mem = (
                "n/a" if r["peak_device_memory_mb"] is None else f"{r['peak_device_memory_mb']:.0f}"
            )
            lines.append(
                f"| {r['workload']} | {r['dtype']} | {r['n_pairs']} | {r['mean_tokens']:.0f} | "
                f"{r['pairs_per_s']:.1f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {mem} |"
            )
    if report["runs"]:
        lines += [
            "",
            "End to end on text pairs (tokenization included):",
            "",
            "| workload | contender | dtype | pairs | pairs/s | tokens/s | padding eff. | MFU | peak mem (MB) | engine x |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["runs"]:
            mem = (
                "n/a" if r["peak_device_memory_mb"] is None else f"{r['peak_device_memory_mb']:.0f}"
            )
            lines.append(
                f"| {r['workload']} | {r['contender']} | {r['dtype']} | {r['n_pairs']} | {r['pairs_per_s']:.1f} "
                f"| {r['real_tokens_per_s']:.0f} | {r['padding_efficiency']:.2f} | {100 * r['mfu']:.1f}% | {mem} "
                f"| {r.get('engine_speedup', float('nan')):.2f} |"
            )
    lines.append("")
    if "parity" in report:
        p = report["parity"]
        lines.append(
            f"parity: engine bf16 error {p['engine_bfloat16_error']:.4g} vs transformers bf16 "
            f"{p['reference_bf16_error']:.4g} ({'ok' if p['bf16_ok'] else 'FAIL'}); engine fp32 error "
            f"{p['engine_float32_error']:.3g} ({'ok' if p['fp32_ok'] else 'FAIL'})"
        )
    if "invariance" in report:
        inv = report["invariance"]
        lines.append(
            f"batch invariance ({inv['backend']}, {inv['dtype']}): ranks identical {inv['ranks_identical']}, "
            f"bitwise equal {inv['bitwise_equal']} ({inv['equal_pairs']}/{inv['pairs']}), "
            f"max diff {inv['max_abs_diff']:.3g}"
        )
    for key in ("fp8_fidelity", "scorer_stage"):
        if key in report:
            lines.append(
                f"{key}: {json.dumps({k: v for k, v in report[key].items() if k != 'describe'})}"
            )
    if "contenders" in report:
        lines.append(
            f"pairs/s over sentence-transformers' best: {json.dumps(report['contenders']['engine_over_st_best'])} "
            f"(end to end), {json.dumps(report['contenders']['tokens_only_bf16_over_st_best'])} (engine on token ids)"
        )
    if "scorer_throughput" in report:
        lines.append(
            f"fp8 over bf16 (token ids): {json.dumps(report['scorer_throughput'].get('fp8_speedup', {}))}"
        )
    if "peak_gemm" in report:
        lines.append(
            "peak GEMM: "
            + ", ".join(
                f"{k} {v['flops_per_s'] / 1e12:.2f} TFLOP/s" for k, v in report["peak_gemm"].items()
            )
        )
    for e in report["errors"]:
        lines.append(
            f"error in {e['step']}{' (' + e['contender'] + ')' if 'contender' in e else ''}: "
            f"{e['type']}: {e['message']}"
        )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny pair counts (a dry run that proves the script runs)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the data folder: one made by --prepare (default {DEFAULT_PREPARED.name}/ in the checkout "
        "when it exists) or the shared data folder (../shared/data or $SHARED_DATA)",
    )
    parser.add_argument(
        "--prepare",
        type=Path,
        metavar="DIR",
        default=None,
        help="copy the data the check needs (~18 MB) from --data-dir into DIR and exit; "
        f"{DEFAULT_PREPARED.name}/ in the checkout is git-ignored and travels with the working tree",
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "results" / "tmp" / "gpu-check"),
        help=f"folder for {REPORT_NAME} (rewritten after every step) and {TABLE_NAME} "
        "(default $OUT, else results/tmp/gpu-check)",
    )
    parser.add_argument(
        "--output", default=None, help=f"the JSON report's own path (instead of OUT/{REPORT_NAME})"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="seconds for the whole run (default 480: a 10-minute device slot with start-up and margin)",
    )
    parser.add_argument(
        "--model",
        default="jina-reranker-v2-base",
        help="dummy architecture (pipeline/model/dummy.py)",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="an existing checkpoint directory (transformers layout)"
    )
    parser.add_argument(
        "--standins",
        action="store_true",
        help="test only, with --device cpu: the engine takes its CUDA code paths on this CPU through "
        "the pure-torch kernel stand-ins of tests/model/cuda_standins.py (which enforce the "
        "CUDA kernels' contracts); its figures measure nothing about a GPU",
    )
    parser.add_argument(
        "--fail-step",
        default=os.environ.get(FAIL_STEP_ENV),
        metavar="STEP[,STEP]",
        help=f"test hook: raise inside these steps to show a failure is recorded and later steps "
        f"still run (also ${FAIL_STEP_ENV}); one of {', '.join(STEPS)}",
    )
    return parser.parse_args(argv)


def install_signal_handlers() -> dict:
    """SIGTERM raises Interrupted (the report is written, exit 143), SIGALRM StepTimeout. Returns the handlers
    they replace."""

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one report; a second TERM changes nothing
        raise Interrupted()

    def on_alarm(signum, frame):
        raise StepTimeout()

    return {
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_term),
        signal.SIGALRM: signal.signal(signal.SIGALRM, on_alarm),
    }


def main(argv=None, hard_timeouts: bool = False) -> int:
    """`hard_timeouts`: stop a step past its budget with SIGALRM and write the report on SIGTERM; only when
    this is the process's own main (a test runner calling main() keeps its own signal handlers)."""
    args = parse_args(argv)
    unknown = {s for s in (args.fail_step or "").split(",") if s} - set(STEPS)
    if unknown:
        print(
            f"error: --fail-step names no step: {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}",
            file=sys.stderr,
        )
        return 2
    if args.data_dir is None:
        from pipeline.datasets.tables import default_data_dir

        args.data_dir = DEFAULT_PREPARED if DEFAULT_PREPARED.is_dir() else default_data_dir()
    if args.prepare is not None:
        try:
            copied = prepare(args.data_dir, args.prepare)
        except OSError as e:
            print(f"error: cannot prepare the GPU check's data: {e}", file=sys.stderr)
            return 2
        print(
            f"copied {copied / 2**20:.1f} MB from {args.data_dir} into {args.prepare}; "
            f"run with --data-dir {args.prepare}"
        )
        return 0
    missing = [name for name in DATA_FILES[1:] if not (args.data_dir / name).is_file()]
    if missing:
        print(
            f"error: the data folder {args.data_dir} lacks {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; where the shared data is, run "
            f"`python3 scripts/gpu_check.py --prepare {DEFAULT_PREPARED.name}` and bring that folder along",
            file=sys.stderr,
        )
        return 2
    if args.standins:
        if args.device != "cpu":
            print(
                "error: --standins replaces CUDA kernels on a CPU; use it with --device cpu",
                file=sys.stderr,
            )
            return 2
        sys.path.insert(0, str(ROOT / "tests" / "model"))
        import cuda_standins

        cuda_standins.install(None)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: no CUDA device here; for a dry run pass --device cpu --small", file=sys.stderr
        )
        return 2
    check = Check(args, SMALL if args.small else FULL, hard_timeouts)
    if hard_timeouts:
        install_signal_handlers()
    try:
        return check.run()
    except Interrupted:
        check.report["interrupted"] = "SIGTERM"
        check.write()
        log(f"SIGTERM: report written to {check.path}")
        return 143


if __name__ == "__main__":
    sys.exit(main(hard_timeouts=True))
