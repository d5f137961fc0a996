"""The side-by-side benchmark: every contender on every model and workload, one worker process each.

    report = run_benchmark(config)   # the JSON the job writes (layout below)

For each model: the shared checkpoint (`checkpoints.py`), then one worker per contender (`worker.py`),
which scores the workloads its scope gives it on that model (`BenchmarkConfig.plan`; the default run's plan is
`config.DEFAULT_SCOPE`). The first worker is the fidelity reference, a float32 scorer of every pair: every
row's scores are compared with its scores on the same pairs (`fidelity.py`: max |Δlogit|, Spearman, mean
per-query top-10 overlap; queries are the pairs' query texts). The reference is `st-default`
(sentence-transformers at its defaults, float32 on a float32 checkpoint: what users run today) when the run
has it on every pair of every workload, else `hf-fp32` (transformers in float32, length-sorted batches), an
extra worker. Peak GEMM FLOP/s (both dtypes) is measured before the first worker and after the last, so
drift over the run shows; MFU divides by the higher of the two (the conservative choice).

Report layout:
    machine: {cpu, cores, torch, threads, load_average_before/after, ...}
    peak_gemm: {model: {bfloat16: {flops_per_s, before, after}, float32: {...}}}
    runs: [{model, workload, contender, dtype, n_pairs, seconds (fastest round), seconds_rounds,
            pairs_per_s_rounds, pairs_per_s, real_tokens_per_s,
            padding_efficiency, model_flops, mfu, peak_rss_mb, engine_speedup (engine pairs/s over this row's),
            max_abs_logit_diff, spearman, top10_overlap, top10_queries, fidelity_reference (its name),
            max_abs_logit_diff_vs_engine, cpu_share, settings, tuning, ...}
          | {model, workload, contender, description, n_pairs, skipped: "<reason>"}]  (optional backends)
    targets: [{model, name, value, target, met}]
    cross_model: [{workload, engine_on, versus, ratio}]   (the engine on the first model vs the others')
    models: {model: {directory, shape, workload_pairs, mean_tokens_per_pair, fidelity_reference,
                     plan: {contender: [workload, ...]},
                     reference_logit_std: {workload: std of the reference's logits}}}
    errors: [{model, contender, message}]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline.benchmark.checkpoints import REAL_CHECKPOINT_ENV, benchmark_checkpoint, stored_dtype
from pipeline.benchmark.config import BenchmarkConfig
from pipeline.benchmark.contenders import CONTENDERS
from pipeline.benchmark.fidelity import fidelity
from pipeline.benchmark.machine import load_average, machine_info
from pipeline.benchmark.workloads import (
    pair_token_counts,
    prompt_template,
    untruncated_token_counts,
    workload_pairs,
)
from pipeline.core.errors import InputError
from pipeline.model.flops import (
    Shape,
    gemm_shapes,
    linear_flops_per_token,
    model_flops,
    peak_gemm_flops,
)

logger = logging.getLogger(__name__)

REFERENCE = "engine"  # speed-ups are over the engine's pairs/s
FIDELITY_REFERENCE = (
    "hf-fp32"  # fidelity figures are against its scores, or st-default's (fidelity_reference)
)
# jina-reranker-v2-base-multilingual's shape: n_pairs are sized for it, and scaled down for larger models.
JINA_BASE = Shape(hidden=768, layers=12, intermediate=3072)


def _shape(directory: str) -> Shape:
    with open(os.path.join(directory, "config.json")) as f:
        return Shape.from_config(json.load(f))


def pairs_for(config: BenchmarkConfig, workload: str, shape: Shape) -> int:
    n = config.n_pairs.get(workload, 256)
    if config.scale_pairs_by_model_size:
        # A decoder's grouped-query projections and gated MLP counted as they are (a 4B Qwen3-Reranker costs
        # ~43x jina-base per token in its Linear layers; the ungated 4h^2 + 2hf formula said ~32x).
        ratio = linear_flops_per_token(JINA_BASE) / linear_flops_per_token(shape)
        n = max(8, round(n * min(1.0, ratio)))
    return n


def run_worker(spec: dict, timeout_s: float) -> dict:
    """One worker process; its JSON, or an {"error": ...} naming what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline.benchmark.worker", spec_path, out_path],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"worker ran past worker_timeout_s={timeout_s:.0f}s; lower n_pairs"}
        if proc.returncode != 0 or not os.path.isfile(out_path):
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            return {"error": f"worker exited with {proc.returncode}: {tail}"}
        with open(out_path) as f:
            return json.load(f)


def measure_peaks(shape: Shape, seconds: float, device: str) -> dict[str, dict]:
    return {
        name: peak_gemm_flops(dtype, gemm_shapes(shape), seconds, device)
        for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
    }


def _figures(result: dict, shape: Shape, seqlens: np.ndarray) -> dict:
    n = result["n_pairs"]
    flops = model_flops(shape, seqlens[:n])
    seconds = result["seconds"]
    return {
        "pairs_per_s": n / seconds,
        "real_tokens_per_s": result["real_tokens"] / seconds,
        "padding_efficiency": result["real_tokens"] / result["processed_tokens"],
        "model_flops": flops,
        "model_flops_per_s": flops / seconds,
    }


RAY_JOB_TARGET_PAIRS = 20_000


def _targets(runs: list[dict], model: str) -> list[dict]:
    """The CPU targets, reported (never asserted): speedups on dl19, engine MFU on dl19 and long,
    and the Ray job's share of the engine's pairs/s on runs of 20,000+ pairs."""
    by = {(r["workload"], r["contender"]): r for r in _measured(runs) if r["model"] == model}
    targets = []
    for contender, goal in (("st-best", 2.0), ("st-default", 6.0)):
        engine, other = by.get(("dl19", REFERENCE)), by.get(("dl19", contender))
        if engine and other:
            value = engine["pairs_per_s"] / other["pairs_per_s"]
            targets.append(
                {
                    "model": model,
                    "name": f"engine / {contender} pairs/s on dl19",
                    "value": value,
                    "target": goal,
                    "met": value >= goal,
                }
            )
    for workload in ("dl19", "long"):
        engine = by.get((workload, REFERENCE))
        if engine:
            targets.append(
                {
                    "model": model,
                    "name": f"engine MFU on {workload}",
                    "value": engine["mfu"],
                    "target": 0.5,
                    "met": engine["mfu"] >= 0.5,
                    "unit": "percent",
                }
            )
    # The whole job's pipeline overhead counts at 20,000+ pairs (below that, Ray's start-up dominates).
    for (workload, contender), job in sorted(by.items()):
        engine = by.get((workload, REFERENCE))
        if contender == "ray-job" and engine and job["n_pairs"] >= RAY_JOB_TARGET_PAIRS:
            value = job["pairs_per_s"] / engine["pairs_per_s"]
            targets.append(
                {
                    "model": model,
                    "name": f"ray-job / engine pairs/s on {workload} ({job['n_pairs']:,} pairs)",
                    "value": value,
                    "target": 0.8,
                    "met": value >= 0.8,
                    "unit": "percent",
                }
            )
    return targets


def fidelity_reference(config: BenchmarkConfig, plan: dict[str, list[str]], directory: str) -> str:
    """`st-default` when it already scores, in float32, every pair of every workload the plan has (saving a
    float32 worker: ~1.5 minutes per model in the default run on 2 cores), else `hf-fp32`."""
    needed = {w for workloads in plan.values() for w in workloads}
    if (
        set(plan.get("st-default", ())) >= needed
        and config.full_precision_pairs_fraction == 1.0
        and stored_dtype(directory) == "float32"
    ):
        return "st-default"
    return FIDELITY_REFERENCE


def _worker_spec(
    config: BenchmarkConfig,
    name: str,
    directory: str,
    workloads: dict[str, int],
    scores_dir: str,
    reference: str = FIDELITY_REFERENCE,
) -> dict:
    contender = CONTENDERS[name]
    # The reference scores every pair: each row is compared with it on the row's pairs.
    fraction = (
        config.full_precision_pairs_fraction
        if contender.full_precision and name != reference
        else 1.0
    )
    return {
        "contender": name,
        "directory": directory,
        "device": config.device,
        "max_length": config.max_length,
        "workloads": [
            {"name": w, "n_pairs": max(1, round(n * fraction))} for w, n in workloads.items()
        ],
        "data_dir": config.data_dir,
        "batch_size": None if contender.library == "engine" else config.batch_size,
        "tune_batch_sizes": config.tune_batch_sizes,
        "tune_pairs": config.tune_pairs,
        "warmup_pairs": config.warmup_pairs,
        "max_tokens_per_batch": config.max_tokens_per_batch,
        "ray_job_overrides": config.ray_job_overrides,
        "scores_dir": scores_dir,
        "calibration_pairs": config.calibration_pairs,
    }


def _row(model: str, name: str, out: dict, result: dict, load_before: float) -> dict:
    keys = (
        "workload",
        "dtype",
        "n_pairs",
        "seconds",
        "real_tokens",
        "processed_tokens",
        "peak_rss_mb",
        "peak_rss_note",
        "settings",
        "cpu_share",
        "tuning",
    )
    return {
        "model": model,
        "contender": name,
        "description": CONTENDERS[name].description,
        **{k: result[k] for k in keys if k in result},
        "rss_after_load_mb": out["rss_after_load_mb"],
        "load_seconds": out["load_seconds"],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def _skipped(model: str, name: str, workload: str, n_pairs: int, reason: str) -> dict:
    return {
        "model": model,
        "contender": name,
        "description": CONTENDERS[name].description,
        "workload": workload,
        "n_pairs": n_pairs,
        "skipped": reason,
    }


def benchmark_model(
    config: BenchmarkConfig, model: str, scores_dir: str, first_model: bool = True
) -> dict:
    """Every contender of the model's plan: {"runs", "peak_gemm", "info", "errors"}."""
    plan = config.plan(first_model)  # never empty: the config's validation sees to it
    directory, shape = _checkpoint(config, model)
    peaks_before = measure_peaks(shape, config.peak_seconds_per_shape, config.device)
    workloads = _workloads(config, directory, shape)
    scores_dir = os.path.join(scores_dir, os.path.basename(directory))
    os.makedirs(scores_dir, exist_ok=True)
    sweep = _FirstRound(config, model, directory, shape, workloads, scores_dir, plan)
    sweep.run()
    runs, errors = sweep.runs, sweep.errors
    for round_number in range(2, config.rounds + 1):
        _time_again(round_number, config, model, sweep.order, sweep.specs, runs, errors)
    for row in _measured(runs):
        row["pairs_per_s_rounds"] = [row["n_pairs"] / seconds for seconds in row["seconds_rounds"]]
    peaks_after = measure_peaks(shape, config.peak_seconds_per_shape, config.device)
    peaks = _conservative_peaks(peaks_before, peaks_after)
    for row in _measured(runs):
        row["mfu"] = (
            row["model_flops_per_s"] / peaks[row["dtype"]]["flops_per_s"]
            if row["dtype"] in peaks
            else None
        )
    _add_speedups(runs)
    return {"runs": runs, "peak_gemm": peaks, "info": sweep.info(), "errors": errors}


def _checkpoint(config: BenchmarkConfig, model: str) -> tuple[str, Shape]:
    """(the model's benchmark checkpoint directory, its shape)."""
    directory = benchmark_checkpoint(model, config.data_dir, tokenizer_vocab=config.tokenizer_vocab)
    shape = _shape(directory)
    logger.info(
        "%s: %s (hidden %d, %d layers, FFN %d)",
        model,
        directory,
        shape.hidden,
        shape.layers,
        shape.intermediate,
    )
    return directory, shape


@dataclass
class _Workloads:
    """One model's workloads, the same pairs for every contender."""

    pairs: dict[str, int]  # workload -> number of pairs
    seqlens: dict[str, np.ndarray]  # workload -> (n_pairs,) tokens of each pair
    queries: dict[
        str, list[str]
    ]  # workload -> (n_pairs,) query text of each pair (fidelity's groups)


def _workloads(config: BenchmarkConfig, directory: str, shape: Shape) -> _Workloads:
    workloads = {w: pairs_for(config, w, shape) for w in config.workloads}
    pairs = {w: workload_pairs(w, n, directory, config.data_dir) for w, n in workloads.items()}
    if shape.decoder:
        for workload, chosen in pairs.items():
            check_untruncated(directory, workload, chosen, config.max_length)
    return _Workloads(
        pairs=workloads,
        seqlens={w: pair_token_counts(directory, p, config.max_length) for w, p in pairs.items()},
        queries={w: [q for q, _ in p] for w, p in pairs.items()},
    )


def check_untruncated(
    directory: str, workload: str, pairs: list[tuple[str, str]], max_length: int
) -> None:
    """A decoder's pairs must all fit `max_length` whole: the engine truncates inside the prompt (the
    document's tail goes, the template's suffix stays) and the libraries cut the pair's end, so a truncated
    pair would be a different input for each (`workloads.py`)."""
    lengths = untruncated_token_counts(directory, pairs)
    over = int((lengths > max_length).sum())
    if over:
        raise InputError(
            f"max_length={max_length} would truncate {over} of the {len(pairs)} {workload} pairs in the "
            f"decoder's prompt (the longest has {int(lengths.max())} tokens), and the contenders truncate "
            f"prompts differently; use --set max_length={int(lengths.max())} or fewer pairs"
        )


def _conservative_peaks(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """{dtype: {flops_per_s, before, after}}: MFU divides by the higher of the peaks measured before and
    after the contenders, the conservative figure."""
    return {
        dtype: {
            "flops_per_s": max(before[dtype]["flops_per_s"], after[dtype]["flops_per_s"]),
            "before": before[dtype],
            "after": after[dtype],
        }
        for dtype in before
    }


@dataclass
class _FirstRound:
    """The first sweep over one model's contenders, a worker each: the fidelity reference first, then the engine,
    so every later row is compared with both. Collects the rows, the errors, each contender's worker spec (later
    rounds run the same) and the reference's and the engine's scores per workload."""

    config: BenchmarkConfig
    model: str
    directory: str
    shape: Shape
    workloads: _Workloads
    scores_dir: str
    plan: dict[
        str, list[str]
    ]  # contender -> its workloads; the reference's set here to every one needed
    runs: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    specs: dict[str, dict] = field(default_factory=dict)
    engine_scores: dict[str, np.ndarray] = field(default_factory=dict)
    reference_scores: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.reference = fidelity_reference(self.config, self.plan, self.directory)
        # The reference scores every workload any contender scores on this model, whatever its own scope says.
        self.needed = [
            w for w in self.config.workloads if any(w in ws for ws in self.plan.values())
        ]
        self.plan[self.reference] = self.needed
        self.order = [self.reference] + sorted(
            (c for c in self.plan if c != self.reference), key=lambda c: c != REFERENCE
        )
        logger.info("%s: fidelity reference %s", self.model, self.reference)

    def run(self) -> None:
        model = self.model
        for index, name in enumerate(self.order):  # the order may grow: see _hand_over_reference
            spec = _worker_spec(
                self.config,
                name,
                self.directory,
                {w: self.workloads.pairs[w] for w in self.plan[name]},
                self.scores_dir,
                self.reference,
            )
            logger.info(
                "%s / %s: %s",
                model,
                name,
                ", ".join(f"{w['name']} x {w['n_pairs']}" for w in spec["workloads"]),
            )
            load_before = load_average()
            out = run_worker(spec, self.config.worker_timeout_s)
            self.specs[name] = spec
            if name == self.reference != FIDELITY_REFERENCE and (
                "error" in out or out.get("dtype") != "float32"
            ):
                self._hand_over_reference(index, name, out)
            if "error" in out:
                self._worker_failed(name, spec, out["error"])
                continue
            for result in out["results"]:
                self._add_result(name, out, result, load_before)

    def _hand_over_reference(self, index: int, name: str, out: dict) -> None:
        """st-default failed or did not compute in float32 (a checkpoint whose config asks for another dtype):
        transformers in float32 is the reference after all, run next."""
        logger.warning(
            "%s: %s cannot be the fidelity reference (%s); running %s for it",
            self.model,
            name,
            out.get("error") or f"it ran {out.get('dtype')}",
            FIDELITY_REFERENCE,
        )
        self.reference = FIDELITY_REFERENCE
        self.plan[self.reference] = self.needed
        if self.reference in self.order:  # also one of the run's contenders: it moves up
            self.order.remove(self.reference)
        self.order.insert(index + 1, self.reference)

    def _worker_failed(self, name: str, spec: dict, error: str) -> None:
        """A missing or broken optional backend gives rows that say so; any other contender, an error."""
        if CONTENDERS[name].optional:
            logger.warning("%s / %s skipped: %s", self.model, name, error)
            self.runs += [
                _skipped(self.model, name, w["name"], w["n_pairs"], error)
                for w in spec["workloads"]
            ]
            return
        logger.error("%s / %s failed: %s", self.model, name, error)
        self.errors.append({"model": self.model, "contender": name, "message": error})

    def _add_result(self, name: str, out: dict, result: dict, load_before: float) -> None:
        """One workload's row: its figures, and its scores compared with the engine's and the reference's."""
        model = self.model
        if "skipped" in result:
            logger.warning(
                "%s / %s / %s skipped: %s", model, name, result["workload"], result["skipped"]
            )
            self.runs.append(
                _skipped(model, name, result["workload"], result["n_pairs"], result["skipped"])
            )
            return
        workload = result["workload"]
        row = _row(model, name, out, result, load_before)
        row.update(_figures(result, self.shape, self.workloads.seqlens[workload]))
        row["seconds_rounds"] = [result["seconds"]]
        scores = np.load(result["scores_file"])
        if name == self.reference:
            self.reference_scores[workload] = scores
        if name == REFERENCE:
            self.engine_scores[workload] = scores
        elif workload in self.engine_scores:
            engine = self.engine_scores[workload][: len(scores)]
            row["max_abs_logit_diff_vs_engine"] = float(np.max(np.abs(scores - engine)))
        if workload in self.reference_scores:
            reference = self.reference_scores[workload]
            n = min(len(scores), len(reference))
            row.update(fidelity(reference[:n], scores[:n], self.workloads.queries[workload][:n]))
            row["fidelity_reference"] = self.reference
        self.runs.append(row)
        logger.info(
            "  %-12s %-10s %8.2f pairs/s  padding eff %.2f  %.0f GFLOP/s  spearman %s",
            workload,
            name,
            row["pairs_per_s"],
            row["padding_efficiency"],
            row["model_flops_per_s"] / 1e9,
            f"{row['spearman']:.4f}" if "spearman" in row else "n/a",
        )

    def info(self) -> dict:
        """The model's entry of the report's `models`."""
        seqlens = self.workloads.seqlens
        template = prompt_template(self.directory)
        return {
            "directory": self.directory,
            # A decoder's pairs are scored through this prompt, none truncated (`check_untruncated`).
            "prompt_template": None if template is None else template.name,
            "shape": asdict(self.shape),
            "workload_pairs": self.workloads.pairs,
            "fidelity_reference": self.reference,
            "plan": {name: self.plan[name] for name in self.order},
            "mean_tokens_per_pair": {w: float(s.mean()) for w, s in seqlens.items()},
            "reference_logit_std": {w: float(np.std(s)) for w, s in self.reference_scores.items()},
            "reference_logit_range": {
                w: [float(s.min()), float(s.max())] for w, s in self.reference_scores.items()
            },
        }


def _time_again(
    round_number: int,
    config: BenchmarkConfig,
    model: str,
    order: list[str],
    specs: dict[str, dict],
    runs: list[dict],
    errors: list[dict],
) -> None:
    """One more sweep over the contenders in the first round's order, timing only: each row keeps its fastest
    round (`seconds`, the figures derived from it, and that round's `cpu_share` and peak RSS) and every round's
    time (`seconds_rounds`). Rows that were skipped are not run again; tuned contenders keep the batch size the
    first round picked, so every round times the same batches (and the fidelity columns stay theirs).

    Why sweeps, not repeats in place: on a shared or throttled host (a cloud VM's neighbours, AMX's power
    limits) throughput drifts over minutes, about 3x for the same GEMM within one run (results/performance.md,
    "Figures behind choices in the benchmark's code").
    A contender timed twice in a row sees one such minute; sweeps give every contender a draw of each part of
    the run, and the best of them is the figure least touched by the neighbours, for all alike.
    """
    rows = {(r["contender"], r["workload"]): r for r in _measured(runs) if r["model"] == model}
    for name in order:
        spec = specs.get(name, {})
        measured = [w for w in spec.get("workloads", []) if (name, w["name"]) in rows]
        if not measured:  # failed or skipped in the first round
            continue
        workloads = [
            {**w, "batch_size": (rows[(name, w["name"])].get("settings") or {}).get("batch_size")}
            for w in measured
        ]
        logger.info("%s / %s: round %d", model, name, round_number)
        out = run_worker({**spec, "workloads": workloads}, config.worker_timeout_s)
        results = [] if "error" in out else [r for r in out["results"] if "seconds" in r]
        if "error" in out or len(results) < len(measured):
            reason = out.get("error") or "; ".join(
                r.get("skipped", "no result") for r in out["results"]
            )
            for w in measured:
                rows[(name, w["name"])].setdefault("rounds_failed", []).append(round_number)
            if CONTENDERS[
                name
            ].optional:  # as in the first round: an optional backend's failure is not the run's
                logger.warning("%s / %s round %d failed: %s", model, name, round_number, reason)
                continue
            logger.error("%s / %s failed in round %d: %s", model, name, round_number, reason)
            errors.append(
                {"model": model, "contender": name, "message": f"round {round_number}: {reason}"}
            )
            continue
        for result in results:
            row = rows[(name, result["workload"])]
            row["seconds_rounds"].append(result["seconds"])
            if result["seconds"] < row["seconds"]:
                scale = row["seconds"] / result["seconds"]
                row["seconds"] = result["seconds"]
                for key in ("pairs_per_s", "real_tokens_per_s", "model_flops_per_s"):
                    row[key] *= scale
                for key in ("cpu_share", "peak_rss_mb", "peak_rss_note"):
                    if key in result:
                        row[key] = result[key]


def run_benchmark(config: BenchmarkConfig) -> dict:
    """Every (model, contender) worker; the report (layout in the module docstring)."""
    started = time.time()
    report: dict = {
        "config": config.model_dump(),
        "machine": machine_info(),
        "runs": [],
        "targets": [],
        "errors": [],
        "peak_gemm": {},
        "models": {},
    }
    report["machine"]["load_average_before"] = load_average()
    real = os.environ.get(REAL_CHECKPOINT_ENV)
    models = [real] if real else config.models
    scores_dir = tempfile.mkdtemp(prefix="benchmark-scores-")
    try:
        for index, model in enumerate(models):
            result = benchmark_model(config, model, scores_dir, first_model=index == 0)
            report["runs"] += result["runs"]
            report["errors"] += result["errors"]
            report["peak_gemm"][model] = result["peak_gemm"]
            report["models"][model] = result["info"]
            report["targets"] += _targets(result["runs"], model)
    finally:
        shutil.rmtree(scores_dir, ignore_errors=True)
    # Engine-on-one-model over others-on-another is the claim for models of one kind (the jina and bge
    # shapes): between a decoder and an encoder it compares the models, not the ways of running them.
    kind = {m: info["shape"].get("decoder", False) for m, info in report["models"].items()}
    report["cross_model"] = _cross_model(
        report["runs"], [m for m in models if kind.get(m) == kind.get(models[0])]
    )
    report["machine"]["load_average_after"] = load_average()
    report["seconds"] = time.time() - started
    return report


def _cross_model(runs: list[dict], models: list[str]) -> list[dict]:
    """The release post's kind of claim ("N x more documents than bge-reranker-v2-m3"): the engine on the first
    model against every contender on each other model, per workload (pairs/s over pairs/s)."""
    if len(models) < 2:
        return []
    by = {(r["model"], r["workload"], r["contender"]): r["pairs_per_s"] for r in _measured(runs)}
    ratios = []
    for (model, workload, contender), speed in by.items():
        engine = by.get((models[0], workload, REFERENCE))
        if model in models[1:] and engine:
            ratios.append(
                {
                    "workload": workload,
                    "engine_on": models[0],
                    "versus": f"{contender} on {model}",
                    "ratio": engine / speed,
                }
            )
    return ratios


def _measured(runs: list[dict]) -> list[dict]:
    """The rows that were measured (not skipped)."""
    return [r for r in runs if "skipped" not in r]


def _add_speedups(runs: list[dict]) -> None:
    """engine_speedup: the engine's pairs/s over the row's (same model, same workload); > 1 = engine faster."""
    engine = {
        r["workload"]: r["pairs_per_s"] for r in _measured(runs) if r["contender"] == REFERENCE
    }
    for row in _measured(runs):
        if row["workload"] in engine:
            row["engine_speedup"] = engine[row["workload"]] / row["pairs_per_s"]
