"""The benchmark job end to end on a tiny checkpoint and a few dozen real pairs: every default contender's
figures are there and consistent (engine-fp32 is the engine in another dtype, left out to save a worker). No
measured figure (time, pairs/s, MFU, memory, a speed-up) is compared with a threshold: the machine's load decides
those. What is asserted is what a broken benchmark would get wrong: token counts, padding, score alignment, each
derived figure being the quotient of the figures it comes from, the JSON's layout."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from jobs import benchmark
from pipeline.benchmark.checkpoints import REAL_CHECKPOINT_ENV, tokenizer_corpus
from pipeline.benchmark.config import DEFAULT_CONTENDERS
from pipeline.benchmark.contenders import CONTENDERS
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

ROOT = Path(__file__).resolve().parents[2]
N_PAIRS = 16
WORKLOADS = ["dl19", "long", "multilingual"]
FIELDS = ["pairs_per_s", "real_tokens_per_s", "padding_efficiency", "mfu", "model_flops", "peak_rss_mb",
          "seconds", "n_pairs", "dtype", "real_tokens", "processed_tokens", "engine_speedup"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, shared_data) -> str:
    """A tiny transformers-layout checkpoint whose tokenizer saw a slice of the workloads' text (1-2 s)."""
    corpus = tokenizer_corpus(shared_data)
    arch = replace(ARCHITECTURES["tiny"], layout="xlm_roberta", tokenizer_vocab=3000, initializer_range=0.2,
                   max_position_embeddings=1026)
    return build_checkpoint(str(tmp_path_factory.mktemp("tiny")), arch, corpus[:800] + corpus[-3000::10])


@pytest.fixture(scope="module")
def report(tiny_checkpoint, shared_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "bench.json"
    mp = pytest.MonkeyPatch()
    mp.setenv(REAL_CHECKPOINT_ENV, tiny_checkpoint)
    mp.setenv("SHARED_DATA", str(shared_data))
    try:
        code = benchmark.main([
            "--workloads", ",".join(WORKLOADS), "--n-pairs", str(N_PAIRS),
            "--output", str(output), "--set", "tune_batch_sizes=[8,16]", "--set", "tune_pairs=16",
            "--set", "peak_seconds_per_shape=0.05", "--set", "scale_pairs_by_model_size=false",
            "--set", "max_tokens_per_batch=512", "--set", "full_precision_pairs_fraction=0.25"])
    finally:
        mp.undo()
    assert code == 0
    assert "| engine |" in output.with_suffix(".md").read_text()  # the table beside the JSON
    return json.loads(output.read_text())


@pytest.mark.slow  # `report`: every contender in a worker process of its own, the Ray job one included
def test_every_contender_has_sane_figures(report):
    assert report["errors"] == []
    runs = {(r["workload"], r["contender"]): r for r in report["runs"]}
    assert set(runs) == {(w, c) for w in WORKLOADS for c in DEFAULT_CONTENDERS}
    for (workload, contender), r in runs.items():
        missing = [f for f in FIELDS if f not in r]
        assert not missing, f"{workload}/{contender} lacks {missing}"
        assert r["pairs_per_s"] > 0 and r["real_tokens_per_s"] > 0 and r["seconds"] > 0
        assert r["pairs_per_s"] == pytest.approx(r["n_pairs"] / r["seconds"], rel=1e-12)
        assert r["real_tokens_per_s"] == pytest.approx(r["real_tokens"] / r["seconds"], rel=1e-12)
        assert 0 < r["padding_efficiency"] <= 1
        assert r["padding_efficiency"] == pytest.approx(r["real_tokens"] / r["processed_tokens"], rel=1e-12)
        # MFU: the model's FLOP/s over the higher peak GEMM FLOP/s of its dtype measured in the same run.
        assert r["model_flops"] > 0 and np.isfinite(r["model_flops"])
        assert r["model_flops_per_s"] == pytest.approx(r["model_flops"] / r["seconds"], rel=1e-12)
        peak = report["peak_gemm"][r["model"]][r["dtype"]]
        assert peak["flops_per_s"] == max(peak["before"]["flops_per_s"], peak["after"]["flops_per_s"]) > 0
        assert r["mfu"] > 0 and r["mfu"] == pytest.approx(r["model_flops_per_s"] / peak["flops_per_s"], rel=1e-12)
        assert r["peak_rss_mb"] > 0
        expected_pairs = N_PAIRS // 4 if CONTENDERS[contender].full_precision else N_PAIRS
        assert r["n_pairs"] == expected_pairs
        engine = runs[(workload, "engine")]
        assert r["engine_speedup"] == pytest.approx(engine["pairs_per_s"] / r["pairs_per_s"], rel=1e-12)
    for workload in WORKLOADS:
        engine = runs[(workload, "engine")]
        assert engine["padding_efficiency"] == 1.0 and engine["engine_speedup"] == 1.0
        assert runs[(workload, "ray-job")]["padding_efficiency"] == 1.0
        # Padded batches of 32 pairs of different lengths waste tokens: the hook counts them.
        assert runs[(workload, "hf-padded")]["padding_efficiency"] < 1.0


@pytest.mark.slow  # `report`
def test_all_contenders_see_the_same_tokens_and_give_aligned_scores(report):
    """Token counts at each model's input equal our tokenizer's; scores line up with the engine's, pair by pair."""
    mean_tokens = report["models"][next(iter(report["models"]))]["mean_tokens_per_pair"]
    for r in report["runs"]:
        assert r["real_tokens"] == pytest.approx(mean_tokens[r["workload"]] * r["n_pairs"], rel=0.5)
        if r["contender"] == "engine":
            continue
        # Same weights, bf16 or fp32: scores differ by rounding only. A pair scored out of order would
        # differ by the spread of the logits (a tiny model with wide init: ~0.3) or more.
        assert r["max_abs_logit_diff_vs_engine"] < 0.1, (r["workload"], r["contender"])
    by = {}
    for r in report["runs"]:
        by.setdefault((r["workload"], r["n_pairs"]), set()).add(r["real_tokens"])
    assert all(len(tokens) == 1 for tokens in by.values()), by


@pytest.mark.slow  # `report`
def test_report_has_machine_peaks_targets_and_a_table(report, capsys):
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    peaks = next(iter(report["peak_gemm"].values()))
    assert peaks["bfloat16"]["flops_per_s"] > 0 and peaks["float32"]["flops_per_s"] > 0
    names = {t["name"] for t in report["targets"]}
    assert "engine / st-best pairs/s on dl19" in names and "engine MFU on long" in names
    # Each target's value is computed from the runs, and "met" is its verdict (never asserted to hold).
    runs = {(r["workload"], r["contender"]): r for r in report["runs"]}
    for target in report["targets"]:
        name = target["name"]
        if name.startswith("engine MFU on "):
            assert target["value"] == runs[(name.removeprefix("engine MFU on "), "engine")]["mfu"]
        elif name.startswith("engine / "):
            contender = name.removeprefix("engine / ").split()[0]
            assert target["value"] == pytest.approx(
                runs[("dl19", "engine")]["pairs_per_s"] / runs[("dl19", contender)]["pairs_per_s"], rel=1e-12)
        assert target["met"] == (target["value"] >= target["target"])
    from pipeline.benchmark.report import markdown_table

    table = markdown_table(report)
    assert all(f"| {c} |" in table for c in DEFAULT_CONTENDERS)


def test_unknown_contender_is_a_config_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        from pipeline.cli import run_main

        run_main(benchmark.main, ["--contenders", "engine,st-fastest"])
    assert exit_info.value.code == 2
    assert "st-fastest" in capsys.readouterr().err


@pytest.mark.slow  # every contender and the scorer stage, end to end
def test_gpu_check_dry_run_on_cpu(tiny_checkpoint, shared_data, tmp_path):
    """scripts/gpu_check.py runs through (parity, invariance, contenders, scorer stage) with --device cpu --small."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    output = tmp_path / "gpu.json"
    code = gpu_check.main(["--device", "cpu", "--small", "--checkpoint", tiny_checkpoint,
                           "--data-dir", str(shared_data), "--output", str(output)])
    result = json.loads(output.read_text())
    assert code == 0, result["errors"]
    assert result["parity"]["bf16_ok"] and result["parity"]["fp32_ok"]
    assert {r["contender"] for r in result["runs"]} == {"st-default", "st-fp16", "hf-padded-fp16", "engine"}
    assert {r["workload"] for r in result["runs"]} == {"dl19", "long"}
    assert result["scorer_stage"]["ran"] and result["scorer_stage"]["equal_to_score_tokens"]
    assert result["invariance"]["pairs"] == 6
