"""Hard negatives with a decoder reranker: Qwen3's layout by its dummy id, read through its prompt with an
instruction set in the job's `rerank:` section, on the session's local Ray with real DL19 candidates and NIST
qrels. The scores in candidates/ are the engine's own for those pairs. (The cross-encoder families differ from
`dummy:tiny` only inside the engine and the rerank job, which their own tests cover.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.hard_negatives import main
from pipeline.core import schema
from pipeline.core.trec import read_qrels
from pipeline.datasets import trec_dl
from pipeline.hard_negatives.io import read_run_metadata
from pipeline.hard_negatives.select import IS_POSITIVE, KEEP
from pipeline.model import CrossEncoder
from pipeline.model.checkpoint import resolve_model_directory
from pipeline.model.decoder_dummy import TEMPLATE_KEY

INSTRUCTION = "Given a question, retrieve web passages that answer it"
MAX_LENGTH = (
    256  # room for Qwen3's prompt (about 180 tokens on the tiny vocabulary) and some document
)


@pytest.fixture(scope="module")
def small_input(shared_data, tmp_path_factory):
    """(input Parquet, qrels file): 2 DL19 queries, each with its 6 best BM25 candidates and 2 positives
    (label >= 2) from further down, so every query has negatives to choose among."""
    pairs, _ = trec_dl(2019, shared_data)
    qrels_path = shared_data / "trec-dl" / "qrels.dl19-passage.txt"
    qrels = read_qrels(str(qrels_path))
    positives = {
        (r[schema.QUERY_ID], r[schema.DOC_ID]) for r in qrels.to_pylist() if r[schema.LABEL] >= 2
    }
    rows, per_query = [], {}
    for row in pairs.sort_by(schema.FIRST_STAGE_RANK).to_pylist():
        kind = "positive" if (row[schema.QUERY_ID], row[schema.DOC_ID]) in positives else "other"
        taken = per_query.setdefault(row[schema.QUERY_ID], {"positive": 0, "other": 0})
        if taken[kind] < {"positive": 2, "other": 6}[kind]:
            taken[kind] += 1
            rows.append(row)
    chosen = sorted(q for q, taken in per_query.items() if taken == {"positive": 2, "other": 6})
    table = pairs.from_pylist([r for r in rows if r[schema.QUERY_ID] in chosen[:2]])
    path = tmp_path_factory.mktemp("hn_new_families") / "input.parquet"
    pq.write_table(table, path)
    return path, qrels_path, table


@pytest.mark.slow  # the rerank job on the local Ray
def test_mines_with_a_qwen3_reranker_and_its_instruction(ray_local, small_input, tmp_path):
    source, qrels, given = small_input
    output, model = tmp_path / "out", "dummy:tiny-qwen3"
    argv = ["--input", source, "--positives", qrels, "--output", output, "--model", model]
    argv += ["--dtype", "float32", "--set", f"rerank.tokenizer.max_length={MAX_LENGTH}"]
    argv += ["--set", f"rerank.tokenizer.instruction={INSTRUCTION}"]
    assert main([str(a) for a in argv] + ["--set", "selection.min_positive_label=2"]) == 0

    summary = json.loads((output / "rerank" / "summary.json").read_text())
    assert summary["layout"] == "qwen3" and summary["scored_rows"] == given.num_rows == 16
    assert summary["settings"]["tokenizer"]["instruction"] == INSTRUCTION
    canonical = pq.read_table(output / "candidates")
    assert canonical.num_rows == 16 and pc.sum(canonical[IS_POSITIVE]).as_py() == 4
    run = read_run_metadata(canonical.schema)
    assert run["model"] == model and run["random_weights"] is True
    assert run["config"]["rerank"]["tokenizer"]["instruction"] == INSTRUCTION

    # The scores are the engine's for these pairs, through the job's prompt and instruction.
    engine = CrossEncoder.from_pretrained(
        model, device="cpu", dtype="float32", instruction=INSTRUCTION
    )
    key = [(schema.QUERY_ID, "ascending"), (schema.DOC_ID, "ascending")]
    rows = canonical.sort_by(key).to_pylist()
    texts = {(r[schema.QUERY_ID], r[schema.DOC_ID]): r for r in given.to_pylist()}
    pairs = [texts[(r[schema.QUERY_ID], r[schema.DOC_ID])] for r in rows]
    expected = engine.compute_score(
        [(r[schema.QUERY], r[schema.DOCUMENT]) for r in pairs],
        max_length=MAX_LENGTH,
        return_logits=True,
    )
    got = np.asarray([r[schema.SCORE] for r in rows])
    assert np.abs(got - np.asarray(expected)).max() <= 1e-4 and np.std(expected) > 1e-3

    stats = json.loads((output / "stats.json").read_text())
    assert stats["run"]["model"] == model and stats["rows"] == 16
    assert stats["kept_negatives"] == pc.sum(canonical[KEEP]).as_py()
    assert not [r for r in rows if r[KEEP] and r[IS_POSITIVE]]
    assert pq.read_table(output / "triplet").num_rows == stats["projections"]["triplet_rows"]


def test_a_decoder_folder_without_a_known_template_is_refused_before_scoring(
    small_input, tmp_path, run_entry_point
):
    """By path: a Qwen3 checkpoint whose name and config.json name no template is refused in one line that
    says how to name one, before any score is written."""
    source, qrels, _ = small_input
    folder = tmp_path / "my-reranker"
    shutil.copytree(resolve_model_directory("dummy:tiny-qwen3")[0], folder)
    config = json.loads((folder / "config.json").read_text())
    del config[TEMPLATE_KEY]
    (folder / "config.json").write_text(json.dumps(config))
    output = tmp_path / "out"
    argv = ["--input", source, "--positives", qrels, "--output", output, "--model", folder]
    result = run_entry_point(main, *argv, "--set", "selection.min_positive_label=2")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "prompt template is not known" in errors[0] and "rerank.tokenizer.template" in errors[0]
    assert not (output / "stats.json").exists() and not (output / "rerank" / "ranked").exists()
