"""Crash and resume, a dying actor, object storage and credentials, cluster placement, the command line."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from jobs.rerank import main as rerank_main
from pipeline.core.config import load_config
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.plan import StageClasses
from pipeline.rerank.stages.score import ScoreStage

from .conftest import ROOT, read_dir, run_cli

JOB = ("jobs.rerank",)


def _ranked_keys(output: Path) -> list:
    ranked = read_dir(output / "ranked")
    return list(zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist()))


@pytest.mark.slow  # kill -9 needs the job in a process of its own (and it starts a Ray)
def test_resume_after_the_driver_is_killed(ray_local, dl19_1000, tmp_path, run_entry_point):
    output = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        *JOB,
        "--input",
        str(dl19_1000),
        "--output",
        str(output),
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=200",
        "--set",
        "tokenizer.max_length=64",
        "--set",
        "tokenizer.batch_size=100",
        "--set",
        "scorer.batch_size=100",
        "--set",
        "io.rows_per_write=100",
    ]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    manifests = output / "_work" / "manifests"
    deadline = time.time() + 600
    while time.time() < deadline and not list(manifests.glob("shard-*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-run
    proc.wait()
    committed = {p.name: p.stat().st_mtime_ns for p in manifests.glob("shard-*.json")}
    assert 1 <= len(committed) < 5, "the kill must land after the first shard and before the last"
    assert not (output / "summary.json").exists()

    # Only the killed driver needed a process of its own: the resume runs on the session's Ray.
    result = run_entry_point(
        rerank_main,
        "--input",
        str(dl19_1000),
        "--output",
        str(output),
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=200",
        "--set",
        "tokenizer.max_length=64",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["shards_resumed"] == len(committed)  # finished shards were not redone
    assert summary["pairs_this_run"] == 1000 - 200 * len(committed)
    keys = _ranked_keys(output)
    assert len(keys) == len(set(keys)) == 1000 == summary["scored_rows"]


@pytest.mark.slow
def test_a_scorer_actor_that_dies_mid_batch_is_retried(
    ray_local, dl19_1000, tmp_path, run_entry_point
):
    marker = tmp_path / "killed-once"
    output = tmp_path / "out"

    class ScorerKilledOnce(ScoreStage):
        """The first scorer to receive a batch creates `marker` and exits mid-batch (a real process exit, as an
        OOM kill would be); every later batch, on any actor, is scored. A local class: Ray's pickle sends it by
        value, with the marker's path, to the actors of the session's Ray (whose environment is fixed)."""

        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    killed_once = functools.partial(rerank_main, stages=StageClasses(score=ScorerKilledOnce))
    result = run_entry_point(
        killed_once,
        "--input",
        dl19_1000,
        "--output",
        output,
        "--model",
        "dummy:tiny",
        "--set",
        "input.rows_per_shard=200",
        "--set",
        "scorer.batch_size=100",
        "--set",
        "tokenizer.max_length=64",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.exists()  # an actor really died
    keys = _ranked_keys(output)
    assert len(keys) == len(set(keys)) == 1000
    summary = json.loads((output / "summary.json").read_text())
    assert summary["scored_rows"] + summary["rejected_rows"] == summary["input_rows"] == 1000


@pytest.mark.slow  # the job as a user runs it, credentials in its environment, on a Ray of its own
def test_object_storage_in_and_out_with_credentials_kept_secret(dl19_1000, s3_bucket, s3_endpoint):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(dl19_1000), f"{bucket[5:]}/in/dl19_1000.parquet")
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": options["key"],
        "AWS_SECRET_ACCESS_KEY": options["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = run_cli(
        *JOB,
        "--input",
        f"{bucket}/in/",
        "--output",
        f"{bucket}/out",
        "--model",
        "dummy:tiny",
        "--set",
        "output.top_k=5",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary_text = fs.cat(f"{bucket[5:]}/out/summary.json").decode()
    summary = json.loads(summary_text)
    assert summary["scored_rows"] == 1000 and summary["ranked_rows_written"] == 10 * 5
    with fs.open(fs.glob(f"{bucket[5:]}/out/ranked/*.parquet")[0]) as f:
        assert pq.read_table(f).num_rows == 10 * 5
    assert not fs.exists(f"{bucket[5:]}/out/_work")
    for text in (summary_text, result.stdout, result.stderr):
        assert options["secret"] not in text
    # Progress a person can read: pairs done / total and pairs/s.
    assert "scored 1,000/1,000 pairs (100.0%)" in result.stderr and "pairs/s" in result.stderr


def test_bad_input_fails_before_work_with_one_line(tmp_path, dl19_long, run_entry_point):
    """Found before Ray starts: the entry point in this process gives the command's exit code and stderr."""

    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"query_id": ["q"], "query": ["x"], "doc_id": ["d"], "text": ["y"]}), bad
    )
    result = run_entry_point(
        rerank_main, "--input", bad, "--output", tmp_path / "out", "--model", "dummy:tiny"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: column `document` not found")
    assert "input.document_column" in result.stderr
    # Found before anything is written: not even the output folder exists.
    assert not (tmp_path / "out").exists()
    result = run_entry_point(
        rerank_main,
        "--input",
        dl19_long,
        "--output",
        tmp_path / "o2",
        "--model",
        "dummy:tiny",
        "--set",
        "scorer.max_tokens_per_batch=lots",
    )
    assert result.returncode == 2 and "scorer.max_tokens_per_batch" in result.stderr
    result = run_entry_point(
        rerank_main,
        "--input",
        dl19_long,
        "--output",
        tmp_path / "o3",
        "--model",
        "dummy:tiny",
        "--set",
        "scorer.gpus=2",
    )
    assert result.returncode == 2 and "unknown config key `scorer.gpus`" in result.stderr


def test_shipped_configs_validate():
    for path in ["configs/rerank_local.yaml", "configs/rerank_gpu_cluster.yaml"]:
        config = load_config(RerankConfig, str(ROOT / path))
        assert config.model == "jinaai/jina-reranker-v2-base-multilingual"
    manifest = yaml.safe_load((ROOT / "configs/cluster/rayjob.yaml").read_text())
    assert manifest["kind"] == "RayJob" and "jobs.rerank" in manifest["spec"]["entrypoint"]
    assert "configs/rerank_gpu_cluster.yaml" in manifest["spec"]["entrypoint"]


CLUSTER_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
import ray._private.state as state  # GCS actor table; the state API would need the dashboard
from pipeline.core.config import build_config
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.plan import StageClasses
from pipeline.rerank.stages.score import ScoreStage
from pipeline.rerank.job import run_rerank

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "labels": {"node-kind": "cpu"}})
gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, labels={"node-kind": "gpu"})
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
config = build_config(RerankConfig, {"model": "dummy:tiny", "dtype": "float32",
                                     "tokenizer": {"label_selector": {"node-kind": "cpu"}}})
summary = run_rerank(config, sys.argv[1], sys.argv[2])
placement = {}
for a in state.actors().values():
    for stage in ("ScoreStage", "TokenizeStage"):
        if stage in a["ActorClassName"]:
            placement.setdefault(stage, set()).add(a["Address"]["NodeID"])
print(json.dumps({"gpu_node": gpu_node.node_id, "placement": {k: sorted(v) for k, v in placement.items()},
                  "scored": summary["scored_rows"]}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow  # a simulated two-node Ray cluster, in a process of its own
def test_scorers_land_on_the_gpu_node_and_tokenizers_on_cpu_nodes(dl19_rows, tmp_path):
    """A simulated two-node cluster: a CPU head and a node declaring one GPU (the scorer falls back to CPU)."""
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    source = tmp_path / "in.parquet"  # one query's pairs: where the actors run needs no more
    pq.write_table(pa.Table.from_pylist(dl19_rows[:100]), source)
    result = subprocess.run(
        [sys.executable, str(script), str(source), str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["scored"] == 100
    assert report["placement"]["ScoreStage"] == [report["gpu_node"]]
    assert report["gpu_node"] not in report["placement"]["TokenizeStage"]
