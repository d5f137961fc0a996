"""The tokenizer-sizing benchmark: what it reports is consistent with itself and with the stage it runs.
No measured rate is compared with a threshold."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.benchmark.tokenize_rate import _batches, gpu_sizing, markdown, one_core, run
from pipeline.benchmark.workloads import workload_pairs
from pipeline.model.checkpoint import resolve_model_directory
from pipeline.model.flops import Shape, model_flops
from pipeline.rerank.config import TokenizerConfig
from pipeline.rerank.stages.tokenize import TokenizeStage


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model_directory("dummy:tiny")[0]


def test_one_core_pins_and_then_restores():
    before, rayon = os.sched_getaffinity(0), os.environ.get("RAYON_NUM_THREADS")
    with one_core() as core:
        assert os.sched_getaffinity(0) == {core} and core in before
        assert os.environ["RAYON_NUM_THREADS"] == "1"
    assert os.sched_getaffinity(0) == before and os.environ.get("RAYON_NUM_THREADS") == rayon


def test_the_report_holds_the_stage_figures_and_their_gpu_consequences(tiny, shared_data):
    config = TokenizerConfig(max_length=1024, batch_size=64)
    report = run(
        tiny, ["dl19", "long"], 120, config, gpu_tflops=100.0, repeats=1, data_dir=str(shared_data)
    )
    with open(os.path.join(tiny, "config.json")) as f:
        shape = Shape.from_config(json.load(f))
    stage = TokenizeStage(tiny, None, config)
    for row in report["workloads"]:
        assert row["pairs"] == 120 and row["seconds"] > 0
        assert row["pairs_per_s_per_core"] == pytest.approx(120 / row["seconds"], rel=1e-12)
        # The FLOPs are those of the token counts the job's own stage produces for the same pairs.
        pairs = workload_pairs(row["workload"], 120, tiny, str(shared_data))
        seqlens = np.concatenate(
            [stage(b).column("num_tokens").to_numpy() for b in _batches(pairs, 64)]
        )
        assert row["mean_tokens_per_pair"] == pytest.approx(seqlens.sum() / 120)
        assert row["model_flops_per_pair"] == pytest.approx(model_flops(shape, seqlens) / 120)
        assert 0 < row["mean_tokens_per_pair"] <= 1024
        # Cores per GPU = the GPU's pairs/s at that MFU over the pairs/s of one core.
        assert [g["mfu"] for g in row["gpu"]] == [1.0, 0.5, 0.3]
        for g in row["gpu"]:
            assert g["gpu_pairs_per_s"] == pytest.approx(
                100e12 * g["mfu"] / row["model_flops_per_pair"]
            )
            assert g["cores_per_gpu"] == pytest.approx(
                g["gpu_pairs_per_s"] / row["pairs_per_s_per_core"]
            )
    long, dl19 = report["workloads"][1], report["workloads"][0]
    assert long["mean_tokens_per_pair"] > dl19["mean_tokens_per_pair"]  # the long workload is long
    table = markdown(report)
    assert (
        table.count("\n| dl19 |") == 1 and "| long |" in table and "not measured on a GPU" in table
    )


def test_sizing_scales_with_the_gpu():
    row = {"model_flops_per_pair": 2e10, "pairs_per_s_per_core": 500.0}
    small, large = gpu_sizing(row, 100.0), gpu_sizing(row, 400.0)
    assert [b["cores_per_gpu"] / a["cores_per_gpu"] for a, b in zip(small, large)] == pytest.approx(
        [4.0] * 3
    )
    assert small[0]["gpu_pairs_per_s"] == pytest.approx(100e12 / 2e10)
