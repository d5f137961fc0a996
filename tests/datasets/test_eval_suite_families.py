"""The evaluation suite with the newer reranker families by their dummy ids: a Qwen3 decoder read through its
prompt (with `scoring.instruction`) and a ModernBERT cross-encoder. The table's value is the measure of the
engine's own scores for the sampled pairs, and the JSON names the model (and the decoder's prompt)."""

from __future__ import annotations

import json

import pytest

from jobs.eval_suite import load_suite_config, main
from pipeline.datasets import load_collection, sample_queries
from pipeline.quality.metrics import evaluate, means
from tests.engine_ranking import engine_ranking

INSTRUCTION = "Given a question, retrieve web passages that answer it"
MAX_LENGTH = (
    256  # room for Qwen3's prompt (about 180 tokens on the tiny vocabulary) and some document
)


@pytest.mark.parametrize(
    "model, layout, instruction",
    [("dummy:tiny-qwen3", "qwen3", INSTRUCTION), ("dummy:tiny-modernbert", "modernbert", None)],
)
def test_suite_scores_with_the_model_named(
    shared_data, tmp_path, monkeypatch, model, layout, instruction
):
    monkeypatch.setenv("SHARED_DATA", str(shared_data))
    output = tmp_path / "suite.json"
    told = [] if instruction is None else ["--set", f"scoring.instruction={instruction}"]
    argv = ["--model", model, "--dtype", "float32", "--collections", "trec_dl19"]
    argv += ["--max-queries", "1", "--output", str(output), "--set", "scoring.device=cpu"]
    assert main([*argv, "--set", f"scoring.max_length={MAX_LENGTH}", *told]) == 0

    results = json.loads(output.read_text())
    described = results["model"]
    assert described["model"] == model and described["layout"] == layout
    assert described["random_weights"] is True
    assert described.get("instruction") == instruction
    assert described.get("template") == (None if instruction is None else "qwen3-reranker")
    result = results["collections"]["trec_dl19"]
    assert result["num_queries"] == 1 and result["num_pairs"] == 100

    # The value is nDCG@10 of the engine's scores for the same sampled pairs.
    entry = load_suite_config().collections["trec_dl19"]
    pairs, qrels = load_collection(entry.collection, shared_data, **entry.arguments)
    pairs, qrels = sample_queries(pairs, qrels, 1, entry.seed)
    ranking = engine_ranking(model, pairs, MAX_LENGTH, instruction)
    expected = means(evaluate(ranking, qrels, entry.measures, entry.relevance_level))
    assert result["measures"] == pytest.approx(expected, abs=1e-9)
    assert result["measures"] != result["first_stage_measures"]  # the model's order, not BM25's


@pytest.mark.parametrize(
    "model, extra, message",
    [
        (
            "dummy:tiny-qwen3",
            ["scoring.max_length=64"],
            "scoring.max_length=64 leaves no room for text in the qwen3-reranker prompt",
        ),
        (
            "dummy:tiny-modernbert",
            ["scoring.template=qwen3-reranker"],
            "is a cross-encoder (modernbert layout)",
        ),
        ("dummy:tiny-modernbert", ["scoring.instruction=Find answers"], "drop the instruction"),
    ],
)
def test_prompt_settings_that_cannot_work_are_one_line(
    run_entry_point, tmp_path, model, extra, message
):
    overrides = [arg for key in extra for arg in ("--set", key)]
    output = tmp_path / "suite.json"
    result = run_entry_point(
        main, "--model", model, "--collections", "trec_dl19", "--output", output, *overrides
    )
    lines = result.stderr.strip().splitlines()  # the model's load logs come first
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == 2 and errors == lines[-1:], result.stderr
    assert message in errors[0] and "Traceback" not in result.stderr
    assert not output.exists()
