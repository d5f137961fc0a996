"""The rerank job with a decoder reranker (Qwen3-Reranker's layout and prompt, bge-reranker-v2-gemma's): the
engine's scores end to end, the prompt's instruction in the score cache's fingerprint, and the refusals decided
before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.rerank import main as rerank_main
from pipeline.core import schema as S
from pipeline.core.config import build_config
from pipeline.model import CrossEncoder
from pipeline.model.checkpoint import resolve_model_directory
from pipeline.model.templates import QWEN3_RERANKER
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank

from .conftest import read_dir

MODEL = "dummy:tiny-qwen3"


def _config(cache: str, instruction: str | None, model: str = MODEL) -> RerankConfig:
    return build_config(
        RerankConfig,
        {
            "model": model,
            "dtype": "float32",
            "progress_interval_s": 1.0,
            "tokenizer": {"max_length": 512, "instruction": instruction},
            "cache": {"uri": cache},
        },
    )


@pytest.mark.slow
def test_qwen3_job_scores_like_the_engine_and_the_instruction_keys_the_cache(
    ray_local, dl19_rows, tmp_path
):
    rows = dl19_rows[:20] + dl19_rows[100:120]  # two queries, 20 candidates each
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cache = str(tmp_path / "cache")
    pairs = [(r["query"], r["document"]) for r in rows]

    first = run_rerank(_config(cache, None), str(path), str(tmp_path / "a"))
    ranked = read_dir(tmp_path / "a" / "ranked")
    assert first["scored_rows"] == 40 and first["rejected_rows"] == 0 and ranked.num_rows == 40
    assert first["layout"] == "qwen3"
    # The prompt it ran with is recorded, the template's default instruction included.
    assert first["settings"]["tokenizer"].get("instruction") is None
    assert first["prompt"]["name"] == "qwen3-reranker" and first["prompt"]["instruction"] == (
        QWEN3_RERANKER.default_instruction
    )
    by_doc = {(r[S.QUERY_ID], r[S.DOC_ID]): r for r in ranked.to_pylist()}
    got = np.asarray([by_doc[(r["query_id"], r["doc_id"])][S.SCORE] for r in rows])
    engine = CrossEncoder.from_pretrained(MODEL, device="cpu", dtype="float32")
    expected = np.asarray(engine.compute_score(pairs, max_length=512, return_logits=True))
    assert np.abs(got - expected).max() <= 1e-4 and expected.std() > 0.05
    for query_id in {r["query_id"] for r in rows}:  # rank 1 is the best score of its query
        ours = sorted(
            (r for r in by_doc.values() if r[S.QUERY_ID] == query_id), key=lambda r: r[S.RANK]
        )
        assert [r[S.RANK] for r in ours] == list(range(1, 21))
        assert all(a[S.SCORE] >= b[S.SCORE] for a, b in zip(ours, ours[1:]))

    # Another instruction is another prompt: other scores, and the cache's other folder (nothing hits).
    told = "Given a skincare question, retrieve passages that answer it"
    second = run_rerank(_config(cache, told), str(path), str(tmp_path / "b"))
    assert second["cache_hits"] == 0 and second["pairs_scored"] == 40
    assert second["cache"]["fingerprint"] != first["cache"]["fingerprint"]
    assert second["settings"]["tokenizer"]["instruction"] == told
    assert second["prompt"]["instruction"] == told
    again = read_dir(tmp_path / "b" / "ranked").to_pylist()
    told_engine = CrossEncoder.from_pretrained(
        MODEL, device="cpu", dtype="float32", instruction=told
    )
    rescored = {(r[S.QUERY_ID], r[S.DOC_ID]): r[S.SCORE] for r in again}
    expected_told = told_engine.compute_score(pairs, max_length=512, return_logits=True)
    assert (
        max(abs(rescored[(r["query_id"], r["doc_id"])] - e) for r, e in zip(rows, expected_told))
        <= 1e-4
    )
    assert np.abs(np.asarray(expected_told) - expected).max() > 1e-3


def test_gemma_job_ranks_with_the_engines_scores(ray_local, dl19_rows, tmp_path):
    """dummy:tiny-gemma (bge-reranker-v2-gemma's layout and FlagEmbedding's prompt) through the rerank job:
    every row scored as the engine scores it, ranked per query."""
    model = "dummy:tiny-gemma"
    rows = dl19_rows[:5] + dl19_rows[100:105]  # two queries, 5 candidates each
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    summary = run_rerank(
        _config(str(tmp_path / "cache"), None, model), str(path), str(tmp_path / "a")
    )
    ranked = read_dir(tmp_path / "a" / "ranked").to_pylist()
    assert summary["scored_rows"] == 10 and summary["rejected_rows"] == 0 and len(ranked) == 10
    assert summary["layout"] == "gemma" and summary["random_weights"]
    assert summary["prompt"]["name"] == "bge-reranker-v2-gemma"
    engine = CrossEncoder.from_pretrained(model, device="cpu", dtype="float32")
    expected = engine.compute_score(
        [(r["query"], r["document"]) for r in rows], max_length=512, return_logits=True
    )
    by_doc = {(r[S.QUERY_ID], r[S.DOC_ID]): r for r in ranked}
    got = [by_doc[(r["query_id"], r["doc_id"])][S.SCORE] for r in rows]
    assert np.abs(np.asarray(got) - expected).max() <= 1e-4 and np.std(expected) > 0.05
    for query_id in {r["query_id"] for r in rows}:
        ours = sorted((r for r in ranked if r[S.QUERY_ID] == query_id), key=lambda r: r[S.RANK])
        assert [r[S.RANK] for r in ours] == list(range(1, 6))
        assert all(a[S.SCORE] >= b[S.SCORE] for a, b in zip(ours, ours[1:]))


def test_decoder_refusals_are_one_line_before_any_work(run_entry_point, tmp_path):
    source, _ = resolve_model_directory(MODEL)
    unknown = tmp_path / "my-qwen3"
    shutil.copytree(source, unknown)
    config = json.loads((unknown / "config.json").read_text())
    del config["rerank_pipeline_template"]
    (unknown / "config.json").write_text(json.dumps(config))
    data = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"query_id": "q", "query": "a", "doc_id": "d", "document": "b"}]),
        data,
    )
    cases = [
        (
            [f"--model={unknown}"],
            "prompt template is not known; name one with `--set tokenizer.template",
        ),
        (
            [
                f"--model={unknown}",
                "--set",
                "tokenizer.template=qwen3-reranker",
                "--set",
                "tokenizer.long_documents=windows",
                "--set",
                "tokenizer.max_query_length=64",
            ],
            "tokenizer.long_documents=windows is not available",
        ),
        ([f"--model={MODEL}", "--set", "tokenizer.max_length=40"], "leaves no room for text"),
        (["--model=dummy:tiny", "--set", "tokenizer.template=qwen3-reranker"], "cross-encoder"),
    ]
    for i, (args, message) in enumerate(cases):
        result = run_entry_point(
            rerank_main, *args, "--input", data, "--output", tmp_path / f"out{i}"
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert not (tmp_path / f"out{i}" / "summary.json").exists()
