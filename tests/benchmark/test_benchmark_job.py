"""The benchmark job end to end on a tiny checkpoint and a few dozen real pairs: every core contender's
figures are there and consistent (engine-fp32 is the engine in another dtype, left out to save a worker), and
the CPU runtimes (ONNX Runtime, OpenVINO) score the pairs close to the fp32 reference. No measured figure (time,
pairs/s, MFU, memory, a speed-up) is compared with a threshold: the machine's load decides those. What is
asserted is what a broken benchmark would get wrong: token counts, padding, score alignment, fidelity, each
derived figure being the quotient of the figures it comes from, the JSON's layout."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import benchmark
from pipeline.benchmark.checkpoints import (
    REAL_CHECKPOINT_ENV,
    head_pairs,
    spread_classifier,
    tokenizer_corpus,
)
from pipeline.benchmark.config import CORE_CONTENDERS, CPU_RUNTIME_CONTENDERS
from pipeline.benchmark.contenders import CONTENDERS
from pipeline.benchmark.fidelity import fidelity, spearman, top_k_overlap
from pipeline.benchmark.runner import FIDELITY_REFERENCE
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

ROOT = Path(__file__).resolve().parents[2]
N_PAIRS = 16
# multilingual is left out of the end-to-end run: its pairs go through the same code as dl19's, and one
# workload fewer pays for the fidelity reference's worker.
WORKLOADS = ["dl19", "long"]
FIELDS = [
    "pairs_per_s",
    "real_tokens_per_s",
    "padding_efficiency",
    "mfu",
    "model_flops",
    "peak_rss_mb",
    "seconds",
    "n_pairs",
    "dtype",
    "real_tokens",
    "processed_tokens",
    "engine_speedup",
]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, shared_data) -> str:
    """A tiny transformers-layout checkpoint whose tokenizer saw a slice of the workloads' text (1-2 s)."""
    corpus = tokenizer_corpus(shared_data)
    arch = replace(
        ARCHITECTURES["tiny"],
        layout="xlm_roberta",
        tokenizer_vocab=3000,
        initializer_range=0.2,
        max_position_embeddings=1026,
    )
    return build_checkpoint(
        str(tmp_path_factory.mktemp("tiny")), arch, corpus[:800] + corpus[-3000::10]
    )


@pytest.fixture(scope="module")
def spread_checkpoint(tiny_checkpoint, tmp_path_factory, shared_data) -> str:
    """The tiny checkpoint with its classifier refitted as the benchmark's checkpoints are (logit std 3)."""
    import shutil

    directory = str(tmp_path_factory.mktemp("spread") / "tiny")
    shutil.copytree(tiny_checkpoint, directory)
    spread_classifier(directory, head_pairs(shared_data, n=32))
    return directory


def run_job(
    checkpoint: str, shared_data, output: Path, *argv: str, env: dict | None = None
) -> tuple[int, dict]:
    """`python -m jobs.benchmark` in this process (its workers are processes of their own) on `checkpoint`."""
    mp = pytest.MonkeyPatch()
    mp.setenv(REAL_CHECKPOINT_ENV, checkpoint)
    mp.setenv("SHARED_DATA", str(shared_data))
    for key, value in (env or {}).items():
        mp.setenv(key, value)
    try:
        code = benchmark.main(
            [
                "--output",
                str(output),
                "--set",
                "peak_seconds_per_shape=0.05",
                "--set",
                "scale_pairs_by_model_size=false",
                "--set",
                "max_tokens_per_batch=512",
                *argv,
            ]
        )
    finally:
        mp.undo()
    return code, json.loads(output.read_text())


@pytest.fixture(scope="module")
def report(tiny_checkpoint, shared_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "bench.json"
    code, report = run_job(
        tiny_checkpoint,
        shared_data,
        output,
        "--workloads",
        ",".join(WORKLOADS),
        "--contenders",
        ",".join(CORE_CONTENDERS),
        "--n-pairs",
        str(N_PAIRS),
        "--set",
        "tune_batch_sizes=[8,16]",
        "--set",
        "tune_pairs=16",
        # st-default scores a quarter of the pairs: hf-fp32 is the reference
        "--set",
        "full_precision_pairs_fraction=0.25",
    )
    assert code == 0
    assert "| engine |" in output.with_suffix(".md").read_text()  # the table beside the JSON
    return report


@pytest.fixture(scope="module")
def runtimes_report(spread_checkpoint, shared_data, tmp_path_factory):
    """The CPU runtimes on 24 DL19 pairs (one query), exports cached in a folder of the test's own."""
    folder = tmp_path_factory.mktemp("runtimes")
    code, report = run_job(
        spread_checkpoint,
        shared_data,
        folder / "bench.json",
        "--workloads",
        "dl19",
        "--n-pairs",
        "24",
        "--contenders",
        ",".join([*CPU_RUNTIME_CONTENDERS, "engine-int8"]),
        "--set",
        "tune_batch_sizes=[4,8]",
        "--set",
        "tune_pairs=8",
        "--set",
        "warmup_pairs=4",
        "--set",
        "calibration_pairs=16",
        env={"RERANK_CACHE": str(folder / "cache")},
    )
    assert code == 0, report["errors"]
    return report


@pytest.mark.slow  # `report`: every contender in a worker process of its own, the Ray job one included
def test_every_contender_has_sane_figures(report):
    assert report["errors"] == []
    runs = {(r["workload"], r["contender"]): r for r in report["runs"]}
    assert set(runs) == {(w, c) for w in WORKLOADS for c in [*CORE_CONTENDERS, FIDELITY_REFERENCE]}
    for (workload, contender), r in runs.items():
        missing = [f for f in FIELDS if f not in r]
        assert not missing, f"{workload}/{contender} lacks {missing}"
        assert r["pairs_per_s"] > 0 and r["real_tokens_per_s"] > 0 and r["seconds"] > 0
        assert r["pairs_per_s"] == pytest.approx(r["n_pairs"] / r["seconds"], rel=1e-12)
        assert r["real_tokens_per_s"] == pytest.approx(r["real_tokens"] / r["seconds"], rel=1e-12)
        assert 0 < r["padding_efficiency"] <= 1
        assert r["padding_efficiency"] == pytest.approx(
            r["real_tokens"] / r["processed_tokens"], rel=1e-12
        )
        # MFU: the model's FLOP/s over the higher peak GEMM FLOP/s of its dtype measured in the same run.
        assert r["model_flops"] > 0 and np.isfinite(r["model_flops"])
        assert r["model_flops_per_s"] == pytest.approx(r["model_flops"] / r["seconds"], rel=1e-12)
        peak = report["peak_gemm"][r["model"]][r["dtype"]]
        assert (
            peak["flops_per_s"]
            == max(peak["before"]["flops_per_s"], peak["after"]["flops_per_s"])
            > 0
        )
        assert r["mfu"] > 0 and r["mfu"] == pytest.approx(
            r["model_flops_per_s"] / peak["flops_per_s"], rel=1e-12
        )
        assert r["peak_rss_mb"] > 0
        # The fidelity reference scores every pair, whatever the fraction.
        expected_pairs = (
            N_PAIRS // 4
            if CONTENDERS[contender].full_precision and contender != FIDELITY_REFERENCE
            else N_PAIRS
        )
        assert r["n_pairs"] == expected_pairs
        engine = runs[(workload, "engine")]
        assert r["engine_speedup"] == pytest.approx(
            engine["pairs_per_s"] / r["pairs_per_s"], rel=1e-12
        )
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
        # Every row against the fp32 reference (itself included: exactly equal).
        assert r["fidelity_reference"] == FIDELITY_REFERENCE
        assert r["max_abs_logit_diff"] < 0.1 and r["spearman"] > 0.9, (
            r["workload"],
            r["contender"],
        )
        if r["contender"] == FIDELITY_REFERENCE:
            assert r["max_abs_logit_diff"] == 0.0 and r["spearman"] == pytest.approx(1.0)
        if r["contender"] in ("engine", FIDELITY_REFERENCE):  # the reference runs before the engine
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
                runs[("dl19", "engine")]["pairs_per_s"] / runs[("dl19", contender)]["pairs_per_s"],
                rel=1e-12,
            )
        assert target["met"] == (target["value"] >= target["target"])
    from pipeline.benchmark.report import markdown_table

    table = markdown_table(report)
    assert all(f"| {c} |" in table for c in CORE_CONTENDERS)


@pytest.mark.slow  # `runtimes_report`: an ONNX export, an int8 calibration, seven workers
def test_cpu_runtimes_score_the_pairs_close_to_the_fp32_reference(runtimes_report):
    """ONNX Runtime and OpenVINO score every pair, in input order, with a tuned batch size; fp32 ones agree with
    transformers fp32 to rounding, int8 ones rank nearly alike (bounds loose enough for the tiny model's
    quantization error, tight enough to catch a misaligned or broken export: a shuffle gives Spearman ~0)."""
    runs = {r["contender"]: r for r in runtimes_report["runs"]}
    assert set(runs) == {FIDELITY_REFERENCE, *CPU_RUNTIME_CONTENDERS, "engine-int8"}
    assert not [r for r in runs.values() if "skipped" in r]
    spread = runtimes_report["models"][next(iter(runtimes_report["models"]))][
        "reference_logit_std"
    ]["dl19"]
    assert (
        spread > 1.0
    )  # the refitted head spreads the logits (std 3 on the pairs it was fitted on)
    for name in CPU_RUNTIME_CONTENDERS:
        r = runs[name]
        assert r["n_pairs"] == 24 and r["padding_efficiency"] <= 1 and r["pairs_per_s"] > 0
        assert r["settings"]["batch_size"] in (4, 8) and set(
            r["tuning"]["pairs_per_s_by_batch_size"]
        ) == {"4", "8"}
        assert r["top10_queries"] == 1 and r["top10_overlap"] is not None
        if r["dtype"] == "int8":
            assert r["spearman"] > 0.8 and r["top10_overlap"] >= 0.6, (
                name,
                r["spearman"],
                r["top10_overlap"],
            )
        elif r["dtype"] == "float32":
            assert r["max_abs_logit_diff"] < 1e-3 and r["spearman"] > 0.999, (
                name,
                r["max_abs_logit_diff"],
            )
        else:  # OpenVINO's default is bf16 on CPUs with bf16 units: rounding of ~0.1 logit on this tiny model
            assert r["max_abs_logit_diff"] < 0.25 * spread and r["spearman"] > 0.98, (
                name,
                r["max_abs_logit_diff"],
            )
    assert runs["ov-int8"]["settings"]["calibration_pairs"] == 16
    assert runs["ov-default"]["dtype"] in ("float32", "bfloat16", "float16")
    assert {runs[n]["dtype"] for n in ("ort-int8", "ov-int8", "engine-int8")} == {"int8"}
    # The engine's own int8 path, on the same pairs and against the same reference.
    engine = runs["engine-int8"]
    assert engine["n_pairs"] == 24 and engine["pairs_per_s"] > 0
    assert engine["spearman"] > 0.8 and engine["top10_overlap"] >= 0.6, (
        engine["spearman"],
        engine["top10_overlap"],
    )


@pytest.mark.slow  # four workers: two contenders, two rounds
def test_rounds_keep_each_rows_fastest_sweep_and_every_sweeps_figure(
    tiny_checkpoint, shared_data, tmp_path
):
    """With --rounds 2 every contender is timed in two sweeps; a row's figures are its fastest sweep's, and the
    engine runs dtype auto, the dtype the job resolves on this machine (its MFU divides by that dtype's peak)."""
    from pipeline.model.cross_encoder import resolve_dtype

    output = tmp_path / "bench.json"
    code, report = run_job(
        tiny_checkpoint,
        shared_data,
        output,
        "--workloads",
        "dl19",
        "--n-pairs",
        "12",
        "--contenders",
        "engine",
        "--rounds",
        "2",
    )
    assert code == 0, report["errors"]
    assert report["config"]["rounds"] == 2
    runs = {r["contender"]: r for r in report["runs"]}
    assert set(runs) == {"engine", FIDELITY_REFERENCE}
    for r in runs.values():
        assert len(r["seconds_rounds"]) == 2 and r["seconds"] == min(r["seconds_rounds"])
        assert r["pairs_per_s"] == pytest.approx(r["n_pairs"] / r["seconds"], rel=1e-9)
        assert r["model_flops_per_s"] == pytest.approx(r["model_flops"] / r["seconds"], rel=1e-9)
        assert r["pairs_per_s_rounds"] == pytest.approx(
            [r["n_pairs"] / s for s in r["seconds_rounds"]], rel=1e-12
        )
        assert r["mfu"] == pytest.approx(
            r["model_flops_per_s"] / report["peak_gemm"][r["model"]][r["dtype"]]["flops_per_s"],
            rel=1e-12,
        )
    assert runs["engine"]["dtype"] == str(resolve_dtype("auto", torch.device("cpu"))).replace(
        "torch.", ""
    )
    slowest = min(runs["engine"]["pairs_per_s_rounds"])
    assert (
        f"| {runs['engine']['pairs_per_s']:.2f} ({slowest:.2f}) |"
        in output.with_suffix(".md").read_text()
    )


@pytest.mark.slow  # two workers
def test_a_missing_backend_gives_skipped_rows_with_the_reason(
    tiny_checkpoint, shared_data, tmp_path
):
    """onnxruntime hidden from the workers (a package of that name that fails to import, first on their
    PYTHONPATH): ort-int8's rows say skipped and why, the run still succeeds, the table shows it."""
    import os

    hidden = tmp_path / "hidden" / "onnxruntime"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    path = os.pathsep.join([str(hidden.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])
    output = tmp_path / "bench.json"
    code, report = run_job(
        tiny_checkpoint,
        shared_data,
        output,
        "--workloads",
        "dl19",
        "--n-pairs",
        "8",
        "--contenders",
        "ort-int8",
        env={"PYTHONPATH": path, "RERANK_CACHE": str(tmp_path)},
    )
    assert code == 0 and report["errors"] == []
    skipped = [r for r in report["runs"] if r["contender"] == "ort-int8"]
    assert (
        len(skipped) == 1
        and "onnxruntime" in skipped[0]["skipped"]
        and "hidden by the test" in skipped[0]["skipped"]
    )
    assert "pairs_per_s" not in skipped[0]
    assert [r["contender"] for r in report["runs"] if "skipped" not in r] == [FIDELITY_REFERENCE]
    assert "| ort-int8 | skipped: " in output.with_suffix(".md").read_text()


def test_optional_backend_missing_in_the_worker_is_a_skipped_result(
    tiny_checkpoint, shared_data, monkeypatch
):
    """The worker itself: openvino not importable -> one skipped result per workload, nothing raised."""
    import sys

    from pipeline.benchmark.worker import run

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    out = run(
        {
            "contender": "ov-fp32",
            "directory": tiny_checkpoint,
            "device": "cpu",
            "max_length": 64,
            "workloads": [{"name": "dl19", "n_pairs": 4}, {"name": "long", "n_pairs": 2}],
            "data_dir": str(shared_data),
            "batch_size": 4,
        }
    )
    assert [r["workload"] for r in out["results"]] == ["dl19", "long"]
    assert all(
        r["skipped"].startswith("BackendUnavailable: openvino is not installed")
        for r in out["results"]
    )


def test_a_core_contender_failing_in_the_worker_still_raises(
    tiny_checkpoint, shared_data, monkeypatch
):
    """Only the optional backends are skipped: a broken sentence-transformers is an error of the run."""
    import sys

    from pipeline.benchmark.worker import run

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError):
        run(
            {
                "contender": "st-best",
                "directory": tiny_checkpoint,
                "device": "cpu",
                "max_length": 64,
                "workloads": [{"name": "dl19", "n_pairs": 4}],
                "data_dir": str(shared_data),
                "batch_size": 4,
            }
        )


def test_spearman_of_identical_scores_is_one_and_of_reversed_minus_one():
    scores = np.array([0.3, -1.2, 2.5, 0.0, 4.1])
    assert spearman(scores, scores.copy()) == pytest.approx(1.0)
    assert spearman(scores, -scores) == pytest.approx(-1.0)
    assert spearman(scores, 10 * scores + 3) == pytest.approx(
        1.0
    )  # ranks only: a rescaled head agrees


def test_top10_overlap_counts_shared_documents_per_query():
    rng = np.random.default_rng(0)
    queries = (
        ["q1"] * 20 + ["q2"] * 30 + ["q3"] * 5
    )  # q3: 5 candidates, both top-10s are all of them
    reference = rng.normal(size=55)
    assert top_k_overlap(reference, reference.copy(), queries) == (1.0, 2)
    # Reversed within each query: the 10 best become the 10 worst, disjoint for queries of 20 or more.
    assert top_k_overlap(reference, -reference, queries) == (0.0, 2)
    # One query keeps its order, the other is reversed: the mean over the two.
    mixed = np.concatenate([reference[:20], -reference[20:50], reference[50:]])
    assert top_k_overlap(reference, mixed, queries) == (0.5, 2)
    # Swap q1's 10th and 11th best documents: 9 of 10 shared.
    order = np.argsort(-reference[:20])
    swapped = reference.copy()
    swapped[order[9]], swapped[order[10]] = reference[order[10]], reference[order[9]]
    assert top_k_overlap(reference, swapped, queries)[0] == pytest.approx((0.9 + 1.0) / 2)
    assert top_k_overlap(reference[50:], reference[50:], queries[50:]) == (None, 0)


def test_fidelity_gathers_the_three_figures():
    reference = np.arange(12, dtype=np.float32)
    scores = reference + np.where(np.arange(12) == 3, 0.5, 0.0)
    figures = fidelity(reference, scores, ["q"] * 12)
    assert figures["max_abs_logit_diff"] == pytest.approx(0.5)
    assert figures["spearman"] == pytest.approx(1.0)  # 3.5 stays between 3 and 4
    assert figures["top10_overlap"] == 1.0 and figures["top10_queries"] == 1


def test_spread_classifier_gives_logits_of_the_std_asked_for(spread_checkpoint, shared_data):
    """The refitted head: std 3, mean 0 on the pairs it was fitted on (to float32 rounding)."""
    from pipeline.benchmark.contenders import TransformersContender

    contender = TransformersContender(spread_checkpoint, 128, "float32", length_sorted=True)
    logits = contender.score(head_pairs(shared_data, n=32), batch_size=8).logits
    assert logits.std() == pytest.approx(3.0, rel=1e-3) and abs(logits.mean()) < 1e-3


def test_unknown_contender_is_a_config_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        from pipeline.core.cli import run_main

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
    code = gpu_check.main(
        [
            "--device",
            "cpu",
            "--small",
            "--checkpoint",
            tiny_checkpoint,
            "--data-dir",
            str(shared_data),
            "--output",
            str(output),
        ]
    )
    result = json.loads(output.read_text())
    assert code == 0, result["errors"]
    assert result["parity"]["bf16_ok"] and result["parity"]["fp32_ok"]
    assert {r["contender"] for r in result["runs"]} == {
        "st-default",
        "st-fp16",
        "hf-padded-fp16",
        "engine",
        "engine-fp8",
    }
    fp8 = result[
        "fp8_fidelity"
    ]  # the CPU runs float8 as a reference: the figures exist, and they are honest
    assert fp8["baseline"] == "float32" and fp8["pairs"] == 12
    assert 0 < fp8["max_abs_dlogit"] and -1 <= fp8["spearman"] <= 1
    assert {r["workload"] for r in result["runs"]} == {"dl19", "long"}
    assert result["scorer_stage"]["ran"] and result["scorer_stage"]["equal_to_score_tokens"]
    assert result["invariance"]["pairs"] == 6
