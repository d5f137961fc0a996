"""Planning a night: tokenizer pools sized from the cluster and rates, and `--dry-run` with its GPU estimates.

Node lists are plain dicts shaped like `ray.nodes()` output (data the sizing reads, as the job gets it from Ray).
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.rerank import main as rerank_main
from pipeline.core.config import build_config, load_config
from pipeline.rerank import capacity as C
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.dry_run import gpus_for_deadline

from .conftest import ROOT

JINA_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072}
GPU_CLUSTER = ROOT / "configs" / "rerank_gpu_cluster.yaml"


def _node(cpus: float, gpus: float = 0, **labels) -> dict:
    return {
        "Alive": True,
        "Labels": labels,
        "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})},
    }


def _cluster(gpu_nodes: int, tokenizer_cpus: list[float]) -> list[dict]:
    return [_node(4, 1, **{"rerank/role": "scorer"}) for _ in range(gpu_nodes)] + [
        _node(c, **{"rerank/role": "tokenizer"}) for c in tokenizer_cpus
    ]


def _gpu_config(**tokenizer) -> RerankConfig:
    config = load_config(RerankConfig, str(GPU_CLUSTER))
    return config.model_copy(update={"tokenizer": config.tokenizer.model_copy(update=tokenizer)})


# A core that tokenizes 3,000 pairs/s whatever their length, and GPUs that score 30,000: 10 cores a GPU.
FLAT = C.TokenizeCost(1 / 3000, 0.0, "measured (test)")
GPU_RATE = C.Rate(30_000, "measured (test)")


def test_the_gpu_cluster_config_sizes_its_tokenizers():
    assert load_config(RerankConfig, str(GPU_CLUSTER)).tokenizer.num_actors == "auto"
    assert (
        load_config(RerankConfig, str(ROOT / "configs" / "rerank_local.yaml")).tokenizer.num_actors
        == 1
    )
    assert (
        build_config(RerankConfig, {"tokenizer": {"num_actors": None}}).tokenizer.num_actors is None
    )


def test_enough_tokenizers_to_feed_the_gpus():
    config = _gpu_config(num_actors="auto")
    sizing = C.size_tokenizers(config, _cluster(4, [42, 42]), GPU_RATE, FLAT)
    assert sizing.actors == sizing.wanted == 40  # 4 GPUs x 30,000 / 3,000 per 1-CPU actor
    assert sizing.actors * sizing.tokenizer.pairs_per_s >= 4 * GPU_RATE.pairs_per_s
    # Twice the GPUs: twice the tokenizers.
    assert C.size_tokenizers(config, _cluster(8, [84]), GPU_RATE, FLAT).actors == 80
    # Half-CPU actors tokenize at half a core each: twice as many of them.
    half = _gpu_config(num_actors="auto", num_cpus=0.5)
    assert C.size_tokenizers(half, _cluster(4, [42, 42]), GPU_RATE, FLAT).actors == 80


def test_tokenizers_are_capped_by_the_cpus_of_the_labelled_nodes():
    config = _gpu_config(num_actors="auto")
    # 10 + 8 tokenizer CPUs less the read and write actors' 2 (4 x 0.25 each): 16, however many CPUs the GPU
    # nodes have (the label selector keeps tokenizers off them).
    sizing = C.size_tokenizers(
        config, _cluster(4, [10, 8]) + [_node(64, 0, **{"rerank/role": "other"})], GPU_RATE, FLAT
    )
    assert (sizing.wanted, sizing.cpu_cap, sizing.actors) == (40, 16, 16)
    assert "capped by CPUs from 40" in sizing.line(config) and "measured (test)" in sizing.line(
        config
    )
    # A dead node's CPUs are no room.
    dead = _node(100, **{"rerank/role": "tokenizer"}) | {"Alive": False}
    assert C.size_tokenizers(config, _cluster(4, [10, 8]) + [dead], GPU_RATE, FLAT).actors == 16


def test_cpu_scorers_get_one_tokenizer_and_explicit_counts_win():
    local = build_config(RerankConfig, {"tokenizer": {"num_actors": "auto"}})
    assert C.size_tokenizers(local, [_node(2)], GPU_RATE, FLAT).actors == 1
    explicit = _gpu_config(num_actors=7)
    assert (
        C.resolve_tokenizer_actors(explicit, _cluster(4, [42]), JINA_BASE).tokenizer.num_actors == 7
    )
    for auto in ("auto", None):
        resolved = C.resolve_tokenizer_actors(
            _gpu_config(num_actors=auto), _cluster(4, [42]), JINA_BASE
        )
        assert (
            isinstance(resolved.tokenizer.num_actors, int)
            and 1 < resolved.tokenizer.num_actors <= 40
        )


def test_rates_name_their_source(tmp_path):
    cost = C.tokenize_cost()  # results/tokenize-cpu.json, from the tokenize benchmark
    assert cost.source.startswith("measured (tokenize-cpu.json")
    measured = json.loads((ROOT / "results" / "tokenize-cpu.json").read_text())["workloads"]
    for w in measured:  # the line through the measured workloads passes through them (two points)
        assert cost.rate(w["mean_tokens_per_pair"]).pairs_per_s == pytest.approx(
            w["pairs_per_s_per_core"], rel=1e-6
        )
    assert C.tokenize_cost(str(tmp_path / "absent.json")).source.startswith("estimate (built-in")

    estimate = C.scorer_rate(JINA_BASE, [96], mfu=0.5)
    assert (
        estimate.source == "estimate (model FLOPs at 50% MFU of 989 bf16 TFLOP/s)"
        and not estimate.measured
    )
    assert C.scorer_rate(JINA_BASE, [96], mfu=0.25).pairs_per_s == pytest.approx(
        estimate.pairs_per_s / 2
    )
    # A score cache's run on GPU is a measurement (the pool's rate over its actors); a CPU run says nothing of a GPU.
    runs = [
        {
            "model_pairs_per_s": 50_000.0,
            "pairs_scored": 2_000_000,
            "scorer_actors": 2,
            "device": "cuda",
        },
        {"model_pairs_per_s": 40.0, "pairs_scored": 5_000_000, "scorer_actors": 1, "device": "cpu"},
    ]
    from_cache = C.scorer_rate(JINA_BASE, [96], cache_runs=runs)
    assert from_cache.pairs_per_s == 25_000 and from_cache.measured
    assert not C.scorer_rate(JINA_BASE, [96], cache_runs=runs[1:]).measured
    check = tmp_path / "gpu-check.json"
    report = {
        "device": "cuda",
        "environment": {"device_name": "NVIDIA H100 80GB HBM3"},
        "scorer_throughput": {
            "rows": [
                {
                    "dtype": "bfloat16",
                    "workload": "dl19",
                    "mean_tokens": 96.0,
                    "pairs_per_s": 20_000.0,
                    "tokens_per_s": 1_920_000.0,
                }
            ]
        },
    }
    check.write_text(json.dumps(report))
    from_check = C.scorer_rate(JINA_BASE, [96], gpu_check=str(check))
    assert from_check.pairs_per_s == pytest.approx(20_000)
    assert from_check.source.startswith("measured (gpu-check.json, NVIDIA H100 80GB HBM3, bfloat16")
    # Pairs twice as long: the check's tokens/s over twice the tokens a pair.
    assert C.scorer_rate(JINA_BASE, [192], gpu_check=str(check)).pairs_per_s == pytest.approx(
        10_000
    )
    check.write_text(json.dumps(report | {"device": "cpu"}))  # a check run on CPU: no GPU figure
    assert not C.scorer_rate(JINA_BASE, [96], gpu_check=str(check)).measured


def test_the_fewest_gpus_for_a_deadline():
    # 500M pairs by 6 am (8 hours) at 10,000 pairs/s per GPU: 1.74 GPUs' worth, so 2.
    assert gpus_for_deadline(500_000_000, 10_000, 8) == 2
    assert gpus_for_deadline(288_000_000, 10_000, 8) == 1  # exactly one GPU's night
    assert gpus_for_deadline(288_000_001, 10_000, 8) == 2


@pytest.fixture(scope="module")
def small_input(dl19_rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "in.parquet"
    rows = [
        {k: str(r[k]) for k in ("query_id", "query", "doc_id", "document")} for r in dl19_rows[:600]
    ]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=150)
    return path


def test_dry_run_prints_the_plan_and_writes_nothing(run_entry_point, small_input, tmp_path):
    output, plan_file = tmp_path / "out", tmp_path / "plan.json"
    result = run_entry_point(
        rerank_main,
        "--dry-run",
        "--input",
        small_input,
        "--output",
        output,
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=300",
        "--set",
        "tokenizer.max_length=128",
        "--sample-pairs",
        "100",
        "--dry-run-json",
        plan_file,
    )
    assert result.returncode == 0, result.stderr
    assert not output.exists()  # no lease, no _work, not even the folder
    plan = json.loads(plan_file.read_text())
    assert plan["pairs"] == 600 and plan["shards"] == 2 and plan["files"] == 1
    sample = plan["sample"]
    # Token counts after truncation to max_length, with the model's tokenizer (DL19 passages run past 128).
    assert (
        sample["pairs"] == 100
        and 0 < sample["tokens_p50"] <= sample["tokens_p90"] <= sample["tokens_max"] == 128
    )
    assert plan["rates"]["scorer_source"].startswith("estimate (model FLOPs at 50% MFU")
    assert plan["rates"]["tokenizer_source"].startswith("measured (tokenize-cpu.json")
    assert [r["gpus"] for r in plan["estimates"]] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    out = result.stdout
    for fragment in (
        "600 pairs in 2 shard(s)",
        f"p50 {sample['tokens_p50']}",
        f"max {sample['tokens_max']}",
        "estimate (model FLOPs at 50% MFU",
        "measured (tokenize-cpu.json",
        "nothing written under",
    ):
        assert fragment in out, out


def test_dry_run_picks_the_fewest_gpus_for_the_deadline(run_entry_point, small_input, tmp_path):
    plan_file = tmp_path / "plan.json"
    common = [
        "--dry-run",
        "--input",
        small_input,
        "--output",
        tmp_path / "out",
        "--model",
        "dummy:tiny",
        "--sample-pairs",
        "50",
        "--dry-run-json",
        plan_file,
        "--gpus",
        "1,2,4,8",
    ]
    assert run_entry_point(rerank_main, *common).returncode == 0
    rate = json.loads(plan_file.read_text())["rates"]["scorer_pairs_per_s_per_gpu"]
    hours = (
        600 / (3.5 * rate) / 3600
    )  # 3.5 GPUs' worth of work: 4 is the fewest whole count that fits
    result = run_entry_point(rerank_main, *common, "--deadline-hours", repr(hours))
    plan = json.loads(plan_file.read_text())
    assert plan["fewest_gpus_for_deadline"] == 4 and "at least 4 GPU(s)" in result.stdout
    assert [r["fits_deadline"] for r in plan["estimates"]] == [False, False, True, True]
    assert not (tmp_path / "out").exists()
    # Planning flags without --dry-run are refused, not silently ignored by a real run.
    refused = run_entry_point(rerank_main, *common[1:-2], "--deadline-hours", "6")
    assert (
        refused.returncode == 2
        and "add --dry-run" in refused.stderr
        and not (tmp_path / "out").exists()
    )
    assert math.isfinite(rate)


def test_dry_run_expects_the_hits_of_the_cache_made_for_this_checkpoint(
    run_entry_point, small_input, tmp_path
):
    from pipeline.model.checkpoint import resolve_model_directory
    from pipeline.rerank import cache as K

    directory, _ = resolve_model_directory("dummy:tiny", None)
    checkpoint = K.checkpoint_digest(directory)
    rows = pq.read_table(small_input)
    cached = 300  # the first half of the input was scored by an earlier run
    folders = {}
    for name, fingerprint, digest in (
        ("this", "a" * 32, checkpoint),
        ("other", "b" * 32, {"model.safetensors": "0"}),
    ):
        spec = K.open_cache(
            str(tmp_path / "cache"),
            {},
            fingerprint,
            {
                "model": "dummy:tiny",
                "checkpoint": digest,
                "settings": {"dtype": "float32", "max_length": 128},
            },
            4,
        )
        keys = K.pair_keys(
            spec.fingerprint,
            rows.column("query").to_pylist()[:cached],
            rows.column("document").to_pylist()[:cached],
        )
        buckets = K.bucket_of_keys(keys, spec.buckets)
        fs, root = spec.fs()
        for b in range(spec.buckets):
            chosen = keys.filter(pa.array(buckets == b))
            K.publish(
                fs,
                root,
                b,
                pa.table({"key": chosen, "score": pa.array([0.5] * len(chosen), pa.float32())}),
            )
        folders[name] = spec
    plan_file = tmp_path / "plan.json"
    result = run_entry_point(
        rerank_main,
        "--dry-run",
        "--input",
        small_input,
        "--output",
        tmp_path / "out",
        "--model",
        "dummy:tiny",
        "--dtype",
        "float32",
        "--set",
        "tokenizer.max_length=128",
        "--set",
        f"cache.uri={tmp_path / 'cache'}",
        "--sample-pairs",
        "600",
        "--dry-run-json",
        plan_file,
    )
    assert result.returncode == 0, result.stderr
    cache = json.loads(plan_file.read_text())["cache"]
    spec = folders["this"]
    assert (
        cache["folder"] == spec.uri
    )  # not the folder of another checkpoint, where these pairs would hit too
    # Of the sample's keys in the buckets read (every pair is sampled), those of the first 300 pairs hit: about half.
    assert 0 < cache["hits"] < cache["looked_up"] and cache["hits"] / cache[
        "looked_up"
    ] == pytest.approx(0.5, abs=0.15)
    assert f"{cache['hits']} of {cache['looked_up']} sampled keys found" in result.stdout
    assert not (tmp_path / "out").exists()


def test_dry_run_failures_are_one_line(run_entry_point, small_input, tmp_path, monkeypatch):
    common = [
        "--dry-run",
        "--input",
        small_input,
        "--output",
        tmp_path / "out",
        "--model",
        "dummy:tiny",
        "--sample-pairs",
        "20",
    ]
    unwritable = run_entry_point(
        rerank_main, *common, "--dry-run-json", tmp_path / "absent" / "plan.json"
    )
    assert unwritable.returncode == 2 and unwritable.stderr.count("error:") == 1
    assert (
        "cannot write --dry-run-json" in unwritable.stderr and "Traceback" not in unwritable.stderr
    )
    missing = run_entry_point(rerank_main, *common[:2], tmp_path / "nothing.parquet", *common[3:])
    assert (
        missing.returncode == 2
        and missing.stderr.count("error:") == 1
        and "Traceback" not in missing.stderr
    )
    assert not (tmp_path / "out").exists()


def test_dry_run_counts_a_pairs_windows_in_its_rate(run_entry_point, small_input, tmp_path):
    plans = {}
    for mode in ("truncate", "windows"):
        plan_file = tmp_path / f"{mode}.json"
        result = run_entry_point(
            rerank_main,
            "--dry-run",
            "--input",
            small_input,
            "--output",
            tmp_path / "out",
            "--model",
            "dummy:tiny",
            "--sample-pairs",
            "60",
            "--dry-run-json",
            plan_file,
            "--set",
            f"tokenizer.long_documents={mode}",
            "--set",
            "tokenizer.max_length=64",
            "--set",
            "tokenizer.max_query_length=24",
        )
        assert result.returncode == 0, result.stderr
        plans[mode] = json.loads(plan_file.read_text())
    windows, truncate = plans["windows"], plans["truncate"]
    assert (
        windows["sample"]["sequences"]
        > windows["sample"]["valid"]
        == truncate["sample"]["sequences"]
        == 60
    )
    # Every window is a sequence of up to 64 tokens to score: a pair costs its windows' FLOPs.
    per_pair = windows["sample"]["sequences"] / windows["sample"]["valid"]
    ratio = (
        truncate["rates"]["scorer_pairs_per_s_per_gpu"]
        / windows["rates"]["scorer_pairs_per_s_per_gpu"]
    )
    assert ratio == pytest.approx(per_pair, rel=0.35)
