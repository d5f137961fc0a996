"""`dtype: auto` on CPU: decided by a GEMM probe once per machine and torch version, then remembered."""

from __future__ import annotations

import json
import logging
import time

import torch

from pipeline.model.cross_encoder import BF16_MIN_SPEEDUP, PROBE_ROUNDS, cpu_auto_dtype, gemm_rate


def _rates(float32: float, bfloat16: float, calls: list):
    def rate(dtype: torch.dtype) -> float:
        calls.append(dtype)
        return {torch.float32: float32, torch.bfloat16: bfloat16}[dtype]

    return rate


def test_a_cpu_where_bf16_is_slower_runs_float32_and_the_choice_is_remembered(tmp_path, caplog):
    path = str(tmp_path / "cpu-dtype.json")
    calls: list = []
    with caplog.at_level(logging.INFO, logger="pipeline.model.cross_encoder"):
        assert (
            cpu_auto_dtype(_rates(100.0, 40.0, calls), path) == torch.float32
        )  # emulated bf16: slower
    assert (
        calls == [torch.float32, torch.bfloat16] * PROBE_ROUNDS
    )  # interleaved: load slows both alike
    (message,) = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert (
        "float32 100 GFLOP/s" in message and "bfloat16 40 GFLOP/s" in message
    )  # both rates logged
    (entry,) = json.loads(open(path).read()).values()
    assert entry["dtype"] == "float32"
    # A later start whose probe would say otherwise keeps the remembered choice, without probing.
    again: list = []
    assert cpu_auto_dtype(_rates(100.0, 500.0, again), path) == torch.float32
    assert again == []


def test_bf16_only_when_clearly_faster(tmp_path):
    calls: list = []
    barely = cpu_auto_dtype(
        _rates(100.0, 100.0 * BF16_MIN_SPEEDUP * 0.95, calls), str(tmp_path / "a.json")
    )
    clearly = cpu_auto_dtype(
        _rates(100.0, 100.0 * BF16_MIN_SPEEDUP, calls), str(tmp_path / "b.json")
    )
    assert (barely, clearly) == (torch.float32, torch.bfloat16)
    # An unreadable file is probed again (and rewritten), not an error.
    (tmp_path / "c.json").write_text("{not json")
    assert cpu_auto_dtype(_rates(10.0, 50.0, calls), str(tmp_path / "c.json")) == torch.bfloat16
    assert json.loads((tmp_path / "c.json").read_text())


def test_the_real_probe_is_short_and_measures_both_dtypes():
    start = time.perf_counter()
    fp32, bf16 = gemm_rate(torch.float32), gemm_rate(torch.bfloat16)
    assert fp32 > 0 and bf16 > 0
    # Under a second on an idle machine; generous here, where the CPUs are shared.
    assert time.perf_counter() - start < 5
