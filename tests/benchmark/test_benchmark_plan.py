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
from pipeline.benchmark.config import (
    CORE_CONTENDERS,
    CPU_RUNTIME_CONTENDERS,
    DEFAULT_CONTENDERS,
    DEFAULT_SCOPE,
    BenchmarkConfig,
)
from pipeline.benchmark.contenders import Scored, tune_batch_size
from pipeline.benchmark.report import markdown_table
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

FIRST, SECOND = "jina-reranker-v2-base", "bge-reranker-v2-m3"


def test_the_default_run_has_every_contender_and_the_default_plan():
    config = BenchmarkConfig()
    assert config.contenders == DEFAULT_CONTENDERS
    assert set(CORE_CONTENDERS + CPU_RUNTIME_CONTENDERS + ["engine-fp32", "engine-int8"]) == set(
        DEFAULT_CONTENDERS
    )
    assert set(config.contender_scope) == set(DEFAULT_SCOPE)
    first, second = config.plan(True), config.plan(False)
    assert first.keys() == set(DEFAULT_CONTENDERS)
    for name in [
        "hf-padded",
        "hf-sorted",
        "ray-job",
        *CPU_RUNTIME_CONTENDERS,
        "engine-fp32",
        "engine-int8",
    ]:
        assert first[name] == ["dl19"] and name not in second
    for name in ["st-default", "st-best", "engine"]:
        assert first[name] == ["dl19", "long", "multilingual"]
    # The bge shape: the release post's size claim and the targets' contenders, on DL19.
    assert second == {name: ["dl19"] for name in ["st-default", "st-best", "engine"]}


@pytest.mark.parametrize(
    "explicit", [{"workloads": ["dl19"]}, {"models": [FIRST]}, {"contenders": ["engine"]}]
)
def test_an_explicit_selection_runs_everything_on_everything(explicit):
    config = load_config(BenchmarkConfig, None, (), **explicit)
    assert config.contender_scope == {}
    plan = config.plan(False)
    assert (
        all(workloads == config.workloads for workloads in plan.values())
        and list(plan) == config.contenders
    )


def test_a_scope_set_by_hand_applies_to_an_explicit_selection():
    config = load_config(
        BenchmarkConfig,
        None,
        ["contender_scope={engine-int8: {workloads: [long]}}"],
        contenders=["engine", "engine-int8"],
    )
    assert config.plan(True) == {
        "engine": ["dl19", "long", "multilingual"],
        "engine-int8": ["long"],
    }


def test_a_scope_can_differ_between_the_first_model_and_the_others():
    config = load_config(
        BenchmarkConfig,
        None,
        [
            "contender_scope={engine: {workloads: [long], other_models: [dl19]},"
            " st-best: {other_models: []}}"
        ],
        contenders=["engine", "st-best"],
    )
    assert config.plan(True) == {"engine": ["long"], "st-best": ["dl19", "long", "multilingual"]}
    assert config.plan(False) == {"engine": ["dl19"]}
    # Only other models: valid with two models, an error with one (the contender would run nowhere).
    others_only = "contender_scope={engine: {workloads: [], other_models: [dl19]}}"
    config = load_config(BenchmarkConfig, None, [others_only])
    assert "engine" not in config.plan(True) and config.plan(False)["engine"] == ["dl19"]
    with pytest.raises(ConfigError, match="leaves it none of this run's workloads"):
        load_config(BenchmarkConfig, None, [others_only], models=[FIRST])


@pytest.mark.parametrize(
    "override, message",
    [
        ("contender_scope={engine: {workloads: [long]}}", "none of this run's workloads"),
        ("contender_scope={nope: {}}", "unknown contender in contender_scope"),
        (
            "contender_scope={engine: {workloads: [dl20]}}",
            "unknown workload in contender_scope.engine.workloads",
        ),
        (
            "contender_scope={engine: {other_models: [dl20]}}",
            "unknown workload in contender_scope.engine.other_models",
        ),
        (
            "contender_scope={engine: {first: true}}",
            "unknown config key `contender_scope.engine.first`",
        ),
    ],
)
def test_a_scope_that_cannot_run_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BenchmarkConfig, None, [override], workloads=["dl19"], models=[FIRST])


def test_a_bad_scope_ends_the_job_in_one_error_line_before_any_work(tmp_path, capsys):
    from pipeline.core.cli import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(
            benchmark.main,
            [
                "--workloads",
                "dl19",
                "--models",
                FIRST,
                "--set",
                "contender_scope={engine: {workloads: [long]}}",
                "--output",
                str(tmp_path / "bench.json"),
            ],
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: contender_scope.engine leaves it none of this run's workloads (['dl19'])"
    )
    assert not (tmp_path / "bench.json").exists()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    arch = replace(ARCHITECTURES["tiny"], layout="xlm_roberta")
    root = tmp_path_factory.mktemp("stored")
    return {
        dtype: build_checkpoint(str(root / dtype), arch, dtype=dtype)
        for dtype in ("float32", "bfloat16")
    }


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
    assert (
        runner.fidelity_reference(config, {"engine": ["dl19"]}, checkpoints["float32"]) == "hf-fp32"
    )


class _Timed:
    """A contender whose pass over the pairs takes a chosen time per batch size (tune_batch_size's input)."""

    def __init__(self, seconds: dict[int, float]):
        self.seconds, self.tried = seconds, []

    def score(self, pairs, batch_size):
        self.tried.append(batch_size)
        return Scored(np.zeros(len(pairs), np.float32), self.seconds[batch_size], 1, 1, "float32")


@pytest.mark.parametrize(
    "seconds, best, tried",
    [
        ({2: 1.0, 4: 2.0, 8: 0.5, 16: 0.4}, 2, [2, 4]),  # slower at 4: stop there
        (
            {2: 2.0, 4: 1.0, 8: 1.5, 16: 0.1},
            4,
            [2, 4, 8],
        ),  # a faster 16 is never tried: the early stop's price
        ({2: 2.0, 4: 1.0, 8: 0.5, 16: 0.6}, 8, [2, 4, 8, 16]),
        ({2: 2.0, 4: 1.0, 8: 0.5, 16: 0.25}, 16, [2, 4, 8, 16]),
    ],
)
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
    monkeypatch.setattr(
        runner, "benchmark_checkpoint", lambda model, data_dir, **kwargs: checkpoints["float32"]
    )
    monkeypatch.setenv("SHARED_DATA", str(shared_data))
    monkeypatch.delenv(runner.REAL_CHECKPOINT_ENV, raising=False)
    config = load_config(
        BenchmarkConfig,
        None,
        [
            "contender_scope={engine-fp32: {workloads: [dl19], other_models: []}}",
            "n_pairs={dl19: 12, long: 6}",
            "peak_seconds_per_shape=0.05",
            "scale_pairs_by_model_size=false",
            "max_tokens_per_batch=512",
        ],
        models=[FIRST, SECOND],
        workloads=["dl19", "long"],
        contenders=["st-default", "engine", "engine-fp32"],
    )
    report = runner.run_benchmark(config)
    assert report["errors"] == []
    ran = sorted((r["model"], r["contender"], r["workload"]) for r in report["runs"])
    assert ran == sorted(
        [
            (m, c, w)
            for m in (FIRST, SECOND)
            for c in ("st-default", "engine")
            for w in ("dl19", "long")
        ]
        + [(FIRST, "engine-fp32", "dl19")]
    )
    for r in report["runs"]:
        assert (
            r["fidelity_reference"] == "st-default"
            and r["n_pairs"] == {"dl19": 12, "long": 6}[r["workload"]]
        )
        if r["contender"] == "st-default":
            assert r["max_abs_logit_diff"] == 0.0 and r["spearman"] == pytest.approx(1.0)
        else:  # same weights in float32 or the engine's auto dtype: rounding apart, not a different order
            assert r["max_abs_logit_diff"] < 0.1 and r["spearman"] > 0.9, (
                r["contender"],
                r["workload"],
            )
    assert report["models"][FIRST]["plan"] == {
        "st-default": ["dl19", "long"],
        "engine": ["dl19", "long"],
        "engine-fp32": ["dl19"],
    }
    assert report["models"][SECOND]["fidelity_reference"] == "st-default"
    table = markdown_table(report)
    assert (
        f"Plan (contender_scope): {FIRST}: st-default (reference), engine on dl19, long; engine-fp32 on dl19. "
        f"{SECOND}: st-default (reference), engine on dl19, long."
    ) in table


class _Workers:
    """run_worker's stand-in: records the specs, writes each workload's scores (the pair index plus a per-contender
    offset, so the fidelity figures are known) and returns what a worker returns; `fail`/`dtypes` choose errors
    and the dtype a contender reports."""

    def __init__(self, tmp_path, fail=(), dtypes=None):
        self.tmp_path, self.fail, self.dtypes, self.specs = tmp_path, set(fail), dtypes or {}, []

    def __call__(self, spec, timeout_s):
        self.specs.append(spec)
        name = spec["contender"]
        if name in self.fail:
            return {"error": f"worker exited with 1: {name} broke"}
        results = []
        for w in spec["workloads"]:
            path = self.tmp_path / f"{name}-{w['name']}-{len(self.specs)}.npy"
            np.save(
                path, np.arange(w["n_pairs"], dtype=np.float32) + (0.5 if name == "engine" else 0.0)
            )
            results.append(
                {
                    "workload": w["name"],
                    "n_pairs": w["n_pairs"],
                    "seconds": 1.0,
                    "real_tokens": 10,
                    "processed_tokens": 10,
                    "dtype": self.dtypes.get(name, "float32"),
                    "scores_file": str(path),
                }
            )
        return {
            "dtype": self.dtypes.get(name, "float32"),
            "load_seconds": 0.1,
            "rss_after_load_mb": 1.0,
            "results": results,
        }


@pytest.fixture
def stubbed(checkpoints, shared_data, monkeypatch):
    monkeypatch.setattr(
        runner, "benchmark_checkpoint", lambda model, data_dir, **kwargs: checkpoints["float32"]
    )
    monkeypatch.setattr(
        runner,
        "measure_peaks",
        lambda shape, seconds, device: {
            dtype: {"flops_per_s": 1e12} for dtype in ("bfloat16", "float32")
        },
    )
    monkeypatch.setenv("SHARED_DATA", str(shared_data))
    monkeypatch.delenv(runner.REAL_CHECKPOINT_ENV, raising=False)

    def run(tmp_path, overrides, fail=(), dtypes=None, **explicit):
        workers = _Workers(tmp_path, fail, dtypes)
        monkeypatch.setattr(runner, "run_worker", workers)
        config = load_config(
            BenchmarkConfig,
            None,
            ["n_pairs={dl19: 12, long: 6}", *overrides],
            models=[FIRST],
            workloads=["dl19", "long"],
            **explicit,
        )
        return runner.benchmark_model(config, FIRST, str(tmp_path)), workers

    return run


def test_the_reference_scores_every_workload_whatever_its_own_scope(stubbed, tmp_path):
    result, workers = stubbed(
        tmp_path,
        ["contender_scope={hf-fp32: {workloads: [dl19]}}"],
        contenders=["hf-fp32", "engine"],
    )
    assert result["info"]["fidelity_reference"] == "hf-fp32"
    assert [w["name"] for w in workers.specs[0]["workloads"]] == ["dl19", "long"]
    engine = [r for r in result["runs"] if r["contender"] == "engine"]
    assert {r["workload"] for r in engine} == {"dl19", "long"}
    assert all(
        r["max_abs_logit_diff"] == pytest.approx(0.5) and r["fidelity_reference"] == "hf-fp32"
        for r in engine
    )


@pytest.mark.parametrize(
    "fail, dtypes, why",
    [
        ({"st-default"}, {}, "st-default broke"),
        ((), {"st-default": "bfloat16"}, "it ran bfloat16"),
    ],
)
def test_st_default_that_cannot_be_the_reference_hands_over_to_hf_fp32(
    stubbed, tmp_path, caplog, fail, dtypes, why
):
    result, workers = stubbed(
        tmp_path, [], fail=fail, dtypes=dtypes, contenders=["st-default", "engine", "hf-fp32"]
    )
    assert [s["contender"] for s in workers.specs] == [
        "st-default",
        "hf-fp32",
        "engine",
    ]  # hf-fp32 once, moved up
    assert result["info"]["fidelity_reference"] == "hf-fp32" and why in caplog.text
    engine = [r for r in result["runs"] if r["contender"] == "engine"]
    assert len(engine) == 2 and all(r["fidelity_reference"] == "hf-fp32" for r in engine)
    assert all(r["max_abs_logit_diff"] == pytest.approx(0.5) for r in engine)
    assert [e["contender"] for e in result["errors"]] == (["st-default"] if fail else [])


def test_an_explicit_selection_equal_to_the_defaults_is_still_explicit():
    defaults = BenchmarkConfig()
    config = load_config(
        BenchmarkConfig,
        None,
        (),
        models=defaults.models,
        workloads=defaults.workloads,
        contenders=defaults.contenders,
    )
    assert config.contender_scope == {}
    assert load_config(BenchmarkConfig, None, ["contender_scope={}"]).contender_scope == {}


def test_a_scope_that_leaves_a_model_without_contenders_is_an_error(monkeypatch):
    with pytest.raises(ConfigError, match="leaves no contender on the models after the first"):
        load_config(
            BenchmarkConfig,
            None,
            ["contender_scope={engine: {other_models: []}, ort-int8: {other_models: []}}"],
            contenders=["engine", "ort-int8"],
        )
    # With a real checkpoint the run has one model: a contender for the other models only runs nowhere.
    monkeypatch.setenv(runner.REAL_CHECKPOINT_ENV, "/some/checkpoint")
    with pytest.raises(ConfigError, match="contender_scope.engine leaves it none"):
        load_config(
            BenchmarkConfig,
            None,
            ["contender_scope={engine: {workloads: [], other_models: [dl19]}}"],
            contenders=["engine", "st-best"],
        )


def test_a_decoder_whose_prompt_is_tokenized_in_pieces_is_refused_before_any_work():
    """Gemma's prompt cannot be handed to the libraries as text with the engine's tokens: refused by the
    config, before its checkpoint is built."""
    with pytest.raises(ConfigError, match="bge-reranker-v2-gemma.*tokenized in pieces"):
        load_config(BenchmarkConfig, None, [], models=["bge-reranker-v2-gemma"])
