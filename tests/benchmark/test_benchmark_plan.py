"""Which contender runs on which model and workload (`contender_scope`), which scorer is the fidelity
reference, and the batch-size tuning's early stop. The plan's end-to-end run uses real workers on a tiny
checkpoint standing in for both models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from jobs import benchmark
from pipeline.benchmark import runner
from pipeline.benchmark.checkpoints import stored_dtype
from pipeline.benchmark.config import (CORE_CONTENDERS, CPU_RUNTIME_CONTENDERS, DEFAULT_CONTENDERS, DEFAULT_SCOPE,
                                       BenchmarkConfig)
from pipeline.benchmark.contenders import Scored, tune_batch_size
from pipeline.benchmark.report import markdown_table
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

FIRST, SECOND = "jina-reranker-v2-base", "bge-reranker-v2-m3"


def test_the_default_run_has_every_contender_and_the_default_plan():
    config = BenchmarkConfig()
    assert config.contenders == DEFAULT_CONTENDERS
    assert set(CORE_CONTENDERS + CPU_RUNTIME_CONTENDERS + ["engine-fp32", "engine-int8"]) == set(DEFAULT_CONTENDERS)
    assert set(config.contender_scope) == set(DEFAULT_SCOPE)
    first, second = runner.model_plan(config, True), runner.model_plan(config, False)
    assert first.keys() == set(DEFAULT_CONTENDERS)
    for name in ["hf-padded", "hf-sorted", "ray-job", *CPU_RUNTIME_CONTENDERS, "engine-fp32", "engine-int8"]:
        assert first[name] == ["dl19"] and name not in second
    for name in ["st-default", "st-best", "engine"]:
        assert first[name] == ["dl19", "long", "multilingual"]
    # The bge shape: the seed's size claim and the targets' contenders, on DL19.
    assert second == {name: ["dl19"] for name in ["st-default", "st-best", "engine"]}


@pytest.mark.parametrize("explicit", [{"workloads": ["dl19"]}, {"models": [FIRST]}, {"contenders": ["engine"]}])
def test_an_explicit_selection_runs_everything_on_everything(explicit):
    config = load_config(BenchmarkConfig, None, (), **explicit)
    assert config.contender_scope == {}
    plan = runner.model_plan(config, False)
    assert all(workloads == config.workloads for workloads in plan.values()) and list(plan) == config.contenders


def test_a_scope_set_by_hand_applies_to_an_explicit_selection():
    config = load_config(BenchmarkConfig, None, ["contender_scope={engine-int8: {workloads: [long]}}"],
                         contenders=["engine", "engine-int8"])
    assert runner.model_plan(config, True) == {"engine": ["dl19", "long", "multilingual"], "engine-int8": ["long"]}


def test_a_scope_can_differ_between_the_first_model_and_the_others():
    config = load_config(BenchmarkConfig, None, ["contender_scope={engine: {workloads: [long], other_models: [dl19]},"
                                                 " st-best: {other_models: []}}"], contenders=["engine", "st-best"])
    assert runner.model_plan(config, True) == {"engine": ["long"], "st-best": ["dl19", "long", "multilingual"]}
    assert runner.model_plan(config, False) == {"engine": ["dl19"]}
    # Only other models: valid with two models, an error with one (the contender would run nowhere).
    others_only = "contender_scope={engine: {workloads: [], other_models: [dl19]}}"
    config = load_config(BenchmarkConfig, None, [others_only])
    assert "engine" not in runner.model_plan(config, True) and runner.model_plan(config, False)["engine"] == ["dl19"]
    with pytest.raises(ConfigError, match="leaves it none of this run's workloads"):
        load_config(BenchmarkConfig, None, [others_only], models=[FIRST])


@pytest.mark.parametrize("override, message", [
    ("contender_scope={engine: {workloads: [long]}}", "none of this run's workloads"),
    ("contender_scope={nope: {}}", "unknown contender in contender_scope"),
    ("contender_scope={engine: {workloads: [dl20]}}", "unknown workload in contender_scope.engine.workloads"),
    ("contender_scope={engine: {other_models: [dl20]}}", "unknown workload in contender_scope.engine.other_models"),
    ("contender_scope={engine: {first: true}}", "unknown config key `contender_scope.engine.first`"),
])
def test_a_scope_that_cannot_run_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BenchmarkConfig, None, [override], workloads=["dl19"], models=[FIRST])


def test_a_bad_scope_ends_the_job_in_one_error_line_before_any_work(tmp_path, capsys):
    from pipeline.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(benchmark.main, ["--workloads", "dl19", "--models", FIRST, "--set", "contender_scope={engine: {workloads: [long]}}",
                                  "--output", str(tmp_path / "bench.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: contender_scope.engine leaves it none of this run's workloads (['dl19'])")
    assert not (tmp_path / "bench.json").exists()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    arch = replace(ARCHITECTURES["tiny"], layout="xlm_roberta")
    root = tmp_path_factory.mktemp("stored")
    return {dtype: build_checkpoint(str(root / dtype), arch, dtype=dtype) for dtype in ("float32", "bfloat16")}


def test_stored_dtype_reads_the_safetensors_header(checkpoints, tmp_path):
    assert stored_dtype(checkpoints["float32"]) == "float32"
    assert stored_dtype(checkpoints["bfloat16"]) == "bfloat16"
    assert stored_dtype(str(tmp_path)) is None  # no safetensors file


def test_st_default_is_the_reference_only_where_it_scores_every_pair_in_float32(checkpoints):
    plan = {"st-default": ["dl19", "long"], "engine": ["dl19", "long"], "ort-int8": ["dl19"]}
    config = BenchmarkConfig(contenders=["engine"])
    assert runner.fidelity_reference(config, plan, checkpoints["float32"]) == "st-default"
    # Stored in bf16: sentence-transformers at its defaults computes in bf16, not a float32 reference.
    assert runner.fidelity_reference(config, plan, checkpoints["bfloat16"]) == "hf-fp32"
    # Scoring a fraction of the pairs, or not every workload another contender scores: not a reference.
    fraction = BenchmarkConfig(contenders=["engine"], full_precision_pairs_fraction=0.5)
    assert runner.fidelity_reference(fraction, plan, checkpoints["float32"]) == "hf-fp32"
    narrower = {**plan, "st-default": ["dl19"]}
    assert runner.fidelity_reference(config, narrower, checkpoints["float32"]) == "hf-fp32"
    assert runner.fidelity_reference(config, {"engine": ["dl19"]}, checkpoints["float32"]) == "hf-fp32"


class _Timed:
    """A contender whose pass over the pairs takes a chosen time per batch size (tune_batch_size's input)."""

    def __init__(self, seconds: dict[int, float]):
        self.seconds, self.tried = seconds, []

    def score(self, pairs, batch_size):
        self.tried.append(batch_size)
        return Scored(np.zeros(len(pairs), np.float32), self.seconds[batch_size], 1, 1, "float32")


@pytest.mark.parametrize("seconds, best, tried", [
    ({2: 1.0, 4: 2.0, 8: 0.5, 16: 0.4}, 2, [2, 4]),       # slower at 4: stop there
    ({2: 2.0, 4: 1.0, 8: 0.5, 16: 0.6}, 8, [2, 4, 8, 16]),
    ({2: 2.0, 4: 1.0, 8: 0.5, 16: 0.25}, 16, [2, 4, 8, 16]),
])
def test_batch_size_tuning_climbs_until_a_size_is_slower(seconds, best, tried):
    contender = _Timed(seconds)
    chosen, speeds = tune_batch_size(contender, [("q", "d")] * 8, [16, 4, 8, 2])  # any order given
    assert chosen == best and contender.tried == tried and list(speeds) == tried
    assert speeds[best] == pytest.approx(8 / seconds[best])


@pytest.mark.slow  # five workers on a tiny checkpoint
def test_a_scoped_two_model_run_follows_its_plan(checkpoints, shared_data, tmp_path, monkeypatch):
    """Two models (the tiny checkpoint standing in for both), a contender scoped to the first model's dl19:
    it runs there only, st-default (float32, every pair) is the reference and no hf-fp32 worker runs, every
    row's fidelity is against st-default's scores, and the table's footer gives the plan."""
    monkeypatch.setattr(runner, "benchmark_checkpoint", lambda model, data_dir, **kwargs: checkpoints["float32"])
    monkeypatch.setenv("SHARED_DATA", str(shared_data))
    monkeypatch.delenv(runner.REAL_CHECKPOINT_ENV, raising=False)
    config = load_config(BenchmarkConfig, None, [
        "contender_scope={engine-fp32: {workloads: [dl19], other_models: []}}", "n_pairs={dl19: 12, long: 6}",
        "peak_seconds_per_shape=0.05", "scale_pairs_by_model_size=false", "max_tokens_per_batch=512"],
        models=[FIRST, SECOND], workloads=["dl19", "long"], contenders=["st-default", "engine", "engine-fp32"])
    report = runner.run_benchmark(config)
    assert report["errors"] == []
    ran = sorted((r["model"], r["contender"], r["workload"]) for r in report["runs"])
    assert ran == sorted([(m, c, w) for m in (FIRST, SECOND) for c in ("st-default", "engine") for w in ("dl19", "long")]
                         + [(FIRST, "engine-fp32", "dl19")])
    for r in report["runs"]:
        assert r["fidelity_reference"] == "st-default" and r["n_pairs"] == {"dl19": 12, "long": 6}[r["workload"]]
        if r["contender"] == "st-default":
            assert r["max_abs_logit_diff"] == 0.0 and r["spearman"] == pytest.approx(1.0)
        else:  # same weights in float32 or the engine's auto dtype: rounding apart, not a different order
            assert r["max_abs_logit_diff"] < 0.1 and r["spearman"] > 0.9, (r["contender"], r["workload"])
    assert report["models"][FIRST]["plan"] == {"st-default": ["dl19", "long"], "engine": ["dl19", "long"],
                                               "engine-fp32": ["dl19"]}
    assert report["models"][SECOND]["fidelity_reference"] == "st-default"
    table = markdown_table(report)
    assert (f"Plan (contender_scope): {FIRST}: st-default (reference), engine on dl19, long; engine-fp32 on dl19. "
            f"{SECOND}: st-default (reference), engine on dl19, long.") in table
