"""How many tokenizer actors keep the scorers fed, and how long a night's input takes: rates and cluster sizes.

Every rate carries its source, so a plan says which of its numbers were measured and which were computed:

    tokenizer pairs/s per core  measured by `python -m jobs.benchmark_tokenize` (results/tokenize-cpu.json),
                                as a line through its workloads' seconds per pair (a fixed cost per pair plus
                                a cost per token), else a built-in conservative estimate
    scorer pairs/s per GPU      measured: the score cache's runs (`model_pairs_per_s` / scorer actors), or a
                                GPU check's report (scripts/gpu_check.py, gpu-check.json); else computed from
                                the model's FLOPs per pair (pipeline/model/flops.py) at an assumed MFU

Node lists are what `ray.nodes()` returns: dicts with `Alive`, `Resources` ({"CPU": n, "GPU": n}) and `Labels`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.rerank.config import RerankConfig

logger = logging.getLogger("rerank")

TOKENIZE_RESULTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "results",
    "tokenize-cpu.json",
)
# An H100 SXM's dense bf16 peak (the figure results/tokenize-cpu.json was sized with).
GPU_BF16_TFLOPS = 989.0
# The MFU a GPU scorer is assumed to reach while no GPU throughput is measured: tokenizers are sized to keep
# up with it, so an optimistic figure errs toward a tokenizer too many, never a scorer waiting.
ASSUMED_MFU = 0.5
# Seconds per pair on one core when no tokenize benchmark is at hand: a fixed cost and one per token, about
# twice the AMD EPYC's measured figures (results/tokenize-cpu.md: 132 us + 1.9 us per token), for slower cores.
FALLBACK_TOKENIZE = (264e-6, 3.8e-6)
# Pairs of this many tokens ask the most of the tokenizers per GPU (a GPU scores short pairs fastest):
# the length a pool sized without a sample of the input is sized for (DL19's passages, ~96 tokens a pair).
SHORT_PAIR_TOKENS = 96


@dataclass(frozen=True)
class Rate:
    """pairs/s and where the figure comes from: `measured (source)` or `estimate (how)`."""

    pairs_per_s: float
    source: str

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")


@dataclass(frozen=True)
class TokenizeCost:
    """Seconds one core spends tokenizing a pair of n tokens: per_pair + per_token * n."""

    per_pair: float
    per_token: float
    source: str

    def rate(self, tokens: float) -> Rate:
        return Rate(1.0 / (self.per_pair + self.per_token * tokens), self.source)


def tokenize_cost(path: str | None = TOKENIZE_RESULTS) -> TokenizeCost:
    """A core's tokenizing cost from the tokenize benchmark's results file (two workloads or more: the least
    squares line through their seconds per pair; one: all of it per token), else the built-in estimate."""
    try:
        with open(path or "") as f:
            report = json.load(f)
        rows = [
            (w["mean_tokens_per_pair"], 1.0 / w["pairs_per_s_per_core"])
            for w in report["workloads"]
        ]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        rows = []
    if not rows:
        return TokenizeCost(
            *FALLBACK_TOKENIZE, "estimate (built-in: 264 us + 3.8 us per token a pair per core)"
        )
    where = f"measured ({os.path.basename(path)}, {report.get('cpu', '?')}, {report.get('measured', '?')})"
    if len(rows) == 1:
        return TokenizeCost(0.0, rows[0][1] / rows[0][0], where)
    n = len(rows)
    mx, my = sum(x for x, _ in rows) / n, sum(y for _, y in rows) / n
    slope = sum((x - mx) * (y - my) for x, y in rows) / max(
        1e-12, sum((x - mx) ** 2 for x, _ in rows)
    )
    return TokenizeCost(max(0.0, my - slope * mx), max(0.0, slope), where)


def flops_per_pair(model_config: dict, tokens: Sequence[int] | None = None) -> float:
    """Model FLOPs to score one pair, averaged over `tokens` (token counts of sampled pairs; None: pairs of
    SHORT_PAIR_TOKENS). `model_config`: the checkpoint's config.json."""
    from pipeline.model.flops import Shape, model_flops

    lengths = list(tokens) if tokens else [SHORT_PAIR_TOKENS]
    return model_flops(Shape.from_config(model_config), lengths) / len(lengths)


def scorer_rate(
    model_config: dict,
    tokens: Sequence[int] | None = None,
    *,
    cache_runs: Iterable[dict] = (),
    gpu_check: str | None = None,
    dtype: str = "bfloat16",
    mfu: float = ASSUMED_MFU,
    gpu_tflops: float = GPU_BF16_TFLOPS,
    sequences_per_pair: float = 1.0,
) -> Rate:
    """One GPU scorer's pairs/s: measured if the score cache's runs (on GPU) or a GPU check's report say it,
    else computed from the model's FLOPs at `mfu` of `gpu_tflops`. `tokens`: token counts of sequences; a pair
    is `sequences_per_pair` of them (windows mode), which the cache's rates (pairs of the same settings) include."""
    runs = [
        r
        for r in cache_runs
        if r.get("model_pairs_per_s")
        and r.get("pairs_scored", 0) >= 1000
        and r.get("device") == "cuda"
        and r.get("scorer_actors")
    ]
    if runs:
        best = max(runs, key=lambda r: r["pairs_scored"])
        return Rate(
            best["model_pairs_per_s"] / best["scorer_actors"],
            f"measured (score cache run of {best['pairs_scored']:,} pairs, {best.get('end_time', '?')})",
        )
    if gpu_check:
        rate = _gpu_check_rate(gpu_check, dtype, tokens)
        if rate is not None:
            return Rate(rate.pairs_per_s / sequences_per_pair, rate.source)
    pairs_per_s = (
        gpu_tflops * 1e12 * mfu / flops_per_pair(model_config, tokens) / sequences_per_pair
    )
    return Rate(
        pairs_per_s, f"estimate (model FLOPs at {100 * mfu:g}% MFU of {gpu_tflops:g} bf16 TFLOP/s)"
    )


def _gpu_check_rate(path: str, dtype: str, tokens: Sequence[int] | None) -> Rate | None:
    """The GPU check's scorer rate on token ids (`scorer_throughput.rows`) for `dtype`, from its workload whose
    mean length is nearest the sample's (or the shortest), scaled by tokens to the sample's mean length."""
    try:
        with open(path) as f:
            report = json.load(f)
        rows = [
            r
            for r in report["scorer_throughput"]["rows"]
            if r.get("dtype") == dtype and r.get("tokens_per_s")
        ]
        name = (report.get("environment") or {}).get("device_name") or "GPU"
        on_gpu = str(report.get("device", "")).startswith("cuda")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not rows or not on_gpu:  # a check run on CPU says nothing of a GPU's rate
        return None
    mean = sum(tokens) / len(tokens) if tokens else SHORT_PAIR_TOKENS
    row = min(rows, key=lambda r: abs(r["mean_tokens"] - mean))
    return Rate(
        row["tokens_per_s"] / mean,
        f"measured ({os.path.basename(path)}, {name}, {dtype} on "
        f"{row['workload']} pairs, at their tokens/s)",
    )


def _cpus(node: dict) -> float:
    return float((node.get("Resources") or {}).get("CPU", 0))


def _gpus(node: dict) -> float:
    return float((node.get("Resources") or {}).get("GPU", 0))


@dataclass(frozen=True)
class TokenizerSizing:
    actors: int
    wanted: int  # what the scorers would need, before the CPU cap
    cpu_cap: int  # tokenizer actors the matching nodes' CPUs hold beside the other pools
    gpus: float
    scorer: Rate
    tokenizer: Rate
    tokens_per_pair: float

    def line(self, config: RerankConfig) -> str:
        t = config.tokenizer
        capped = f", capped by CPUs from {self.wanted}" if self.actors < self.wanted else ""
        return (
            f"tokenizer.num_actors auto: {self.actors}{capped} (for {self.gpus:g} GPU scorers at "
            f"{self.scorer.pairs_per_s:,.0f} pairs/s each, {self.scorer.source}; a tokenizer of "
            f"{t.num_cpus:g} CPU tokenizes {self.tokenizer.pairs_per_s * min(1.0, t.num_cpus):,.0f} pairs/s of "
            f"{self.tokens_per_pair:.0f} tokens, {self.tokenizer.source}; {self.cpu_cap} fit the CPUs of nodes "
            f"matching tokenizer.label_selector {t.label_selector or '(any)'})"
        )


def size_tokenizers(
    config: RerankConfig,
    nodes: list[dict],
    scorer: Rate,
    cost: TokenizeCost,
    tokens_per_pair: float = SHORT_PAIR_TOKENS,
    gpus: float | None = None,
) -> TokenizerSizing:
    """Tokenizer actors that keep `gpus` scorers (default: the GPUs of the alive nodes) fed at `scorer`'s rate,
    at least 1, at most what the CPUs of the nodes matching tokenizer.label_selector hold once the scorers
    placed there and the read and write pools have theirs. Without GPUs (CPU scorers) one actor: a CPU scorer
    is ~100x slower than its tokenizer."""
    from pipeline.rerank.preflight import label_selector_matches

    t, s, io = config.tokenizer, config.scorer, config.io
    alive = [n for n in nodes if n.get("Alive", True)]
    if gpus is None:
        gpus = sum(_gpus(n) for n in alive) if s.device in ("auto", "cuda") else 0.0
    tokenizer = cost.rate(tokens_per_pair)
    per_actor = tokenizer.pairs_per_s * min(1.0, t.num_cpus)
    wanted = max(1, math.ceil(gpus * scorer.pairs_per_s / per_actor)) if gpus else 1
    eligible = [n for n in alive if label_selector_matches(n.get("Labels") or {}, t.label_selector)]
    scorers_there = (
        sum(_gpus(n) for n in eligible) / s.num_gpus_per_actor * s.num_cpus if gpus else 0.0
    )
    free = sum(_cpus(n) for n in eligible) - scorers_there - 2 * io.num_actors * io.num_cpus
    cap = max(1, int(free / t.num_cpus + 1e-9))
    return TokenizerSizing(min(wanted, cap), wanted, cap, gpus, scorer, tokenizer, tokens_per_pair)


def local_nodes() -> list[dict]:
    """This machine as `ray.nodes()` would list it, without starting Ray: its usable cores and CUDA GPUs."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    return [
        {
            "Alive": True,
            "NodeManagerAddress": "127.0.0.1",
            "Labels": {},
            "Resources": {"CPU": float(len(os.sched_getaffinity(0))), "GPU": float(gpus)},
        }
    ]


def wall_hours(
    pairs: int, gpus: int, scorer: Rate, tokenizers: int, tokenizer_pairs_per_s: float
) -> float:
    """Hours to score `pairs` on `gpus` scorers fed by `tokenizers` actors of `tokenizer_pairs_per_s` each: the
    slower of the two stages sets the pace (reading, writing and ranking are not counted)."""
    pace = min(gpus * scorer.pairs_per_s, tokenizers * tokenizer_pairs_per_s)
    return pairs / pace / 3600.0


def resolve_tokenizer_actors(
    config: RerankConfig, nodes: list[dict], model_config: dict, cache_runs: Iterable[dict] = ()
) -> RerankConfig:
    """`config` with tokenizer.num_actors decided (an explicit number is kept); the decision is logged in one line."""
    if isinstance(config.tokenizer.num_actors, int):
        return config
    scorer = scorer_rate(model_config, cache_runs=cache_runs, gpu_check=config.scorer.gpu_check)
    sizing = size_tokenizers(config, nodes, scorer, tokenize_cost())
    logger.info("%s", sizing.line(config))
    return config.model_copy(
        update={"tokenizer": config.tokenizer.model_copy(update={"num_actors": sizing.actors})}
    )


def model_config_of(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)
