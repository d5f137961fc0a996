"""The shipped GPU cluster config on a simulated GPU cluster: Ray nodes on this machine (`ray.cluster_utils.Cluster`,
one raylet each) shaped like configs/cluster/rayjob.yaml, the node labels given as the README's `ray start
--labels` gives them: a head with no CPUs for stages, a CPU node labelled `rerank/role=tokenizer`, and two nodes
labelled `rerank/role=scorer` that advertise one GPU each (a GPU as Ray counts it; this machine has no CUDA).

The job runs with configs/rerank_gpu_cluster.yaml as shipped, its counts scaled down with `--set` (its placement
keys untouched), on S3 (a moto server on loopback), as `python -m jobs.rerank` attached to the cluster by
RAY_ADDRESS, the way `ray job submit` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "rerank_gpu_cluster.yaml"

# Counts only, for 2 cores: one tokenizer and one actor per io pool, fractions of a CPU each.
SCALED_DOWN = [
    "scorer.device=auto",
    "tokenizer.num_actors=1",
    "tokenizer.num_cpus=0.5",
    "scorer.num_cpus=0.25",
    "io.num_actors=1",
    "io.num_cpus=0.25",
    "io.in_flight_mb=256",
    "scorer.max_tokens_per_batch=4096",
    "tokenizer.max_length=128",
]

# argv: config, input URI, output root URI, then the runs as JSON: [[name, [overrides...]], ...]. Prints one JSON
# line: the nodes (id, labels, GPUs), each run's exit status and output, and the actors of the first run by class.
CLUSTER_SCRIPT = r"""
import json, os, subprocess, sys
import ray
import ray._private.state as state  # the GCS actor table; the state API would need the dashboard
from ray.cluster_utils import Cluster

config, source, out_root, runs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1, labels={"rerank/role": "tokenizer"})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1, labels={"rerank/role": "scorer"})
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": os.getcwd()}
    report = {"runs": {}}
    for name, overrides in runs:
        argv = [sys.executable, "-m", "jobs.rerank", "--config", config, "--model", "dummy:tiny",
                "--input", source, "--output", f"{out_root}/{name}"]
        for o in overrides:
            argv += ["--set", o]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        report["runs"][name] = {"rc": r.returncode, "stdout": r.stdout[-3000:], "stderr": r.stderr[-3000:]}
        if "actors" not in report:  # the first run's actors (the GCS keeps those of finished jobs)
            ray.init(address=cluster.address, log_to_driver=False)
            report["nodes"] = [{"id": n["NodeID"], "labels": n.get("Labels") or {},
                                "gpus": n["Resources"].get("GPU", 0), "cpus": n["Resources"].get("CPU", 0)}
                               for n in ray.nodes() if n["Alive"]]
            report["actors"] = {}
            for a in state.actors().values():
                for stage in ("TokenizeStage", "ScoreStage"):
                    if stage in a["ActorClassName"]:
                        report["actors"].setdefault(stage, []).append(a["Address"]["NodeID"])
            ray.shutdown()
    print(json.dumps(report))
finally:
    cluster.shutdown()
"""


@pytest.fixture
def candidates(shared_data, s3_bucket) -> tuple[str, list[tuple], dict]:
    """40 DL19 pairs (two queries' top 20) and one repeated pair, on S3: (URI, keys, storage_options)."""
    import s3fs

    with open(shared_data / "trec-dl" / "retrieve_results_dl19.json") as f:
        topics = json.load(f)
    rows = [
        dict(query_id=h["qid"], query=t["query"], doc_id=h["docid"], document=h["content"])
        for t in topics[:2]
        for h in t["hits"][:20]
    ]
    rows.append(dict(rows[7]))
    bucket, options = s3_bucket
    with s3fs.S3FileSystem(**options).open(f"{bucket}/in/dl19-40.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    return f"{bucket}/in/", [(r["query_id"], r["doc_id"]) for r in rows], options


def _cluster_runs(tmp_path: Path, source: str, out_root: str, runs: list, endpoint: str) -> dict:
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, str(script), str(CONFIG), source, out_root, json.dumps(runs)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        # Ray gives a starting raylet a fixed 30 s to register: too little on a heavily loaded machine.
        if result.returncode == 0 or "timed out during startup" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _one_error_line(run: dict) -> str:
    errors = [line for line in run["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run["stderr"], run["stderr"]
    return errors[0]


def _read(fs, folder: str) -> pa.Table:
    files = sorted(fs.glob(f"{folder}/*.parquet"))
    assert files, f"no Parquet files in {folder}"
    return pa.concat_tables(
        [pq.read_table(fs.open(f, "rb")) for f in files], promote_options="default"
    )


@pytest.mark.slow  # a four-node Ray cluster and five jobs in processes of their own
def test_gpu_cluster_config_places_scorers_per_gpu_and_tokenizers_where_labelled(
    candidates, tmp_path, s3_endpoint
):
    import s3fs

    source, keys, options = candidates
    out_root = source.rsplit("/in/", 1)[0] + "/out"
    runs = [
        ["ok", SCALED_DOWN],
        # refused before any work, each in one line
        ["no-such-label", SCALED_DOWN + ['tokenizer.label_selector={"rerank/role": "tokenizers"}']],
        ["two-gpus-per-scorer", SCALED_DOWN + ["scorer.num_gpus_per_actor=2"]],
        ["tokenizer-too-big", SCALED_DOWN + ["tokenizer.num_cpus=2"]],
        # the shipped device: the advertised GPUs have no CUDA behind them
        ["cuda-without-cuda", [o for o in SCALED_DOWN if not o.startswith("scorer.device")]],
    ]
    report = _cluster_runs(tmp_path, source, out_root, runs, s3_endpoint)
    ok = report["runs"]["ok"]
    assert ok["rc"] == 0, ok["stderr"]

    labels = {n["id"]: n["labels"].get("rerank/role") for n in report["nodes"]}
    gpu_nodes = {n["id"] for n in report["nodes"] if n["gpus"] == 1}
    assert len(report["nodes"]) == 4 and len(gpu_nodes) == 2
    # One scorer per GPU node (scorer.num_actors null: one per GPU), tokenizers only on the labelled node.
    assert sorted(report["actors"]["ScoreStage"]) == sorted(gpu_nodes)
    assert report["actors"]["TokenizeStage"]
    assert {labels[n] for n in report["actors"]["TokenizeStage"]} == {"tokenizer"}

    fs = s3fs.S3FileSystem(**options)
    out = out_root.removeprefix("s3://") + "/ok"
    summary = json.loads(fs.cat(f"{out}/summary.json"))
    assert summary["input_rows"] == len(keys) == 41
    assert (summary["scored_rows"], summary["rejected_rows"]) == (40, 1)
    # scorer.device=auto on GPUs without CUDA: the scorers ran on CPU, on the GPU nodes, and the summary says so
    # per scorer. Ray Data starts a pool's actors without waiting for all of them, so on an input this small one
    # scorer may be done before the other has loaded the model: the summary lists those that loaded it.
    assert summary["device"] == ["cpu"]
    assert summary["scorers"] and {s["device"] for s in summary["scorers"]} == {"cpu"}
    assert {s["node_id"] for s in summary["scorers"]} <= gpu_nodes
    ranked = _read(fs, f"{out}/ranked")
    ranked_keys = list(
        zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist())
    )
    assert Counter(ranked_keys) == Counter(set(keys))  # every input pair, exactly once
    rejected = _read(fs, f"{out}/rejected")
    assert list(
        zip(rejected.column("query_id").to_pylist(), rejected.column("doc_id").to_pylist())
    ) == [keys[7]]

    refused = {
        name: report["runs"][name]
        for name in ("no-such-label", "two-gpus-per-scorer", "tokenizer-too-big")
    }
    assert {name: r["rc"] for name, r in refused.items()} == dict.fromkeys(refused, 2)
    line = _one_error_line(refused["no-such-label"])
    assert "tokenizer.label_selector {'rerank/role': 'tokenizers'} matches no node" in line
    assert (
        "rerank/role=scorer" in line and "rerank/role=tokenizer" in line
    )  # the labels the cluster does have
    assert "a scorer actor asks for 0.25 CPU, 2 GPU" in _one_error_line(
        refused["two-gpus-per-scorer"]
    )
    assert "a tokenizer actor asks for 2 CPU" in _one_error_line(refused["tokenizer-too-big"])
    for name in refused:  # refused before any work: nothing written under its output
        assert not fs.exists(out_root.removeprefix("s3://") + f"/{name}/_work/manifests")

    cuda = report["runs"]["cuda-without-cuda"]
    assert cuda["rc"] == 2, cuda["stderr"]
    assert "cuda" in _one_error_line(cuda).lower()
