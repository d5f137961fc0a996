"""Index quality with a decoder reranker: `--model dummy:tiny-qwen3` reranks a small DL19 run through the
rerank job on the session's local Ray, with an instruction from the `rerank:` section; the reranked measures
are those of the engine's own scores, and the metrics name the model."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.index_quality import main
from pipeline.core import schema
from pipeline.core.trec import read_qrels
from pipeline.quality.metrics import evaluate, means
from tests.engine_ranking import engine_ranking

MODEL = "dummy:tiny-qwen3"
INSTRUCTION = "Given a question, retrieve web passages that answer it"
MAX_LENGTH = (
    256  # room for Qwen3's prompt (about 180 tokens on the tiny vocabulary) and some document
)


@pytest.mark.slow  # the rerank job on the local Ray
def test_reranks_the_run_with_a_qwen3_reranker(ray_local, dl19_long, dl19_qrels, tmp_path):
    table = pq.read_table(dl19_long)
    queries = sorted(set(table[schema.QUERY_ID].to_pylist()))[:2]
    small = table.filter(
        pc.and_(
            pc.is_in(table[schema.QUERY_ID], value_set=pa.array(queries)),
            pc.less_equal(table[schema.FIRST_STAGE_RANK], 10),
        )
    )
    run = tmp_path / "run.parquet"
    pq.write_table(small, run)
    output = tmp_path / "night"
    argv = ["--run", run, "--output", output, "--qrels", dl19_qrels, "--model", MODEL]
    argv += ["--dtype", "float32", "--set", "metrics.relevance_level=2"]
    argv += ["--set", f"rerank.tokenizer.max_length={MAX_LENGTH}"]
    argv += ["--set", f"rerank.tokenizer.instruction={INSTRUCTION}"]
    assert main([str(a) for a in argv]) == 0

    summary = json.loads((output / "rerank" / "summary.json").read_text())
    assert summary["layout"] == "qwen3" and summary["scored_rows"] == small.num_rows == 20
    assert summary["settings"]["tokenizer"]["instruction"] == INSTRUCTION
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["reranker_model"] == MODEL and metrics["reranker_random_weights"] is True
    assert metrics["label_free"]["score_summary"]["count"] == 20

    # What reranking would add: the measures of the engine's own scores for these pairs.
    ranking = engine_ranking(MODEL, small, MAX_LENGTH, INSTRUCTION)
    expected = means(evaluate(ranking, read_qrels(str(dl19_qrels)), ["nDCG@10", "RR@10"], 2))
    assert metrics["reranked"]["reranked/nDCG@10"] == pytest.approx(expected["nDCG@10"], abs=1e-6)
    assert metrics["reranked"]["reranked/RR@10"] == pytest.approx(expected["RR@10"], abs=1e-6)
    assert "Reranked by <code>dummy:tiny-qwen3</code>" in (output / "report.html").read_text()
