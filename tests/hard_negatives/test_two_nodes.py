"""The hard-negative job on a simulated two-node Ray cluster (ray.cluster_utils.Cluster: two raylets on this
machine) writes the same bytes as on one node, with its selection tasks run on the second node too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hard_negatives.conftest import hn_outputs

ROOT = Path(__file__).resolve().parents[2]

# argv: nodes (1 or 2), input, qrels, output, placement folder. One node: a head with 4 CPUs. Two nodes: a head
# with 1 CPU and a worker node with 3, so the two selection tasks at a time (1 CPU each, once the rerank's actors
# are gone) cannot both run on the head: Ray Data spreads them, and at least one runs on the worker node. Each
# selection call leaves a file named after its node in the placement folder (a subclass defined in this script,
# so Ray ships it by value to the workers); the production class is otherwise unchanged.
CLUSTER_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
import uuid
from pathlib import Path
from pipeline.core.config import load_config
from pipeline.hard_negatives import buckets
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.job import run_hard_negatives

nodes, source, qrels, output, placed = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
placed.mkdir(parents=True, exist_ok=True)


class PlacedSelectBucket(buckets.SelectBucket):
    def __call__(self, batch):
        out = super().__call__(batch)
        (placed / f"{ray.get_runtime_context().get_node_id()}.{uuid.uuid4().hex}").touch()
        return out


buckets.SelectBucket = PlacedSelectBucket
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4 if nodes == 1 else 1, "include_dashboard": False})
second = cluster.add_node(num_cpus=3) if nodes == 2 else None
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
config = load_config(HardNegativesConfig, None, [
    "rerank.model=dummy:tiny", "rerank.dtype=float32", "rerank.tokenizer.max_length=96",
    "rerank.output.rows_per_bucket=80", "selection.min_positive_label=2", "selection.sampling=random",
    "selection.seed=3", "output.rows_per_part=150", "workers.num_actors=2", "workers.num_cpus=1"])
stats = run_hard_negatives(config, source, qrels, output)
placement = {"SelectBucket": {path.name.split(".")[0] for path in placed.iterdir()}}
print(json.dumps({"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
                  "second": second.node_id if second else None,
                  "placement": {k: sorted(v) for k, v in placement.items()}, "rows": stats["rows"]}))
ray.shutdown()
cluster.shutdown()
"""


def _run(nodes: int, source: Path, qrels: Path, output: Path, script: Path) -> dict:
    for attempt in range(3):
        placed = output.parent / f"{output.name}-placed-{attempt}"
        result = subprocess.run(
            [
                sys.executable,
                str(script),
                str(nodes),
                str(source),
                str(qrels),
                str(output),
                str(placed),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=900,
        )
        # Ray gives a starting raylet a fixed 30 s to register: too little on a heavily loaded machine. A new
        # process starts a new cluster; the job's output is written afresh (its rerank resumes if it had begun).
        if result.returncode == 0 or "timed out during startup" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two simulated Ray clusters (one and two nodes), each in a process of its own
def test_two_nodes_write_the_same_bytes_as_one(four_queries, tmp_path):
    source, qrels = four_queries
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    one = _run(1, source, qrels, tmp_path / "one", script)
    two = _run(2, source, qrels, tmp_path / "two", script)

    assert len(one["nodes"]) == 1 and len(two["nodes"]) == 2
    # Selection ran on the second node (the head has 1 CPU, two tasks at a time need 2), and only on this
    # cluster's nodes.
    assert two["second"] in two["placement"]["SelectBucket"]
    assert set(two["placement"]["SelectBucket"]) <= set(two["nodes"])
    assert set(one["placement"]["SelectBucket"]) == set(one["nodes"])
    assert one["rows"] == two["rows"] == 400

    first, second = hn_outputs(tmp_path / "one"), hn_outputs(tmp_path / "two")
    assert {name for name in first if name.startswith("candidates/")} == {
        f"candidates/part-{p:05d}.parquet" for p in range(3)
    }  # 400 rows, 150 per part
    assert "stats.json" in first and "flagembedding/train-00000.jsonl" in first
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    # The rerank spread the 4 queries over several ranked parts on both clusters: the selection was per part.
    assert len(list((tmp_path / "two" / "rerank" / "ranked").glob("part-*.parquet"))) >= 2
