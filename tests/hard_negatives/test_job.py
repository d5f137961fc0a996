"""The job end to end: real DL19 candidates and NIST qrels, the rerank job on Ray with the engine's `dummy:tiny`
checkpoint (random weights, real loading, tokenizing and scoring), then selection and the training files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.hard_negatives import main
from pipeline.core import schema
from pipeline.core.config import load_config
from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.io import read_run_metadata
from pipeline.hard_negatives.job import read_positives
from pipeline.hard_negatives.select import IS_POSITIVE, KEEP, POS_MIN_SCORE

# A short max_length keeps the random-weight scoring quick; the pipeline is the same at any length.
FAST = [
    "--model",
    "dummy:tiny",
    "--dtype",
    "float32",
    "--set",
    "rerank.tokenizer.max_length=96",
    "--set",
    "selection.min_positive_label=2",
]


@pytest.fixture(scope="module")
def dl19_input(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """(input Parquet, qrels file): 4 DL19 queries with positives, 100 BM25 candidates each, with the first
    stage's columns named `rank` and `score` as a retrieval log has them."""
    from pipeline.datasets import trec_dl

    pairs, qrels = trec_dl(2019, shared_data)
    positive_queries = pc.unique(
        qrels.filter(pc.greater_equal(qrels[schema.LABEL], 2))[schema.QUERY_ID]
    )
    chosen = pc.unique(
        pairs.filter(pc.is_in(pairs[schema.QUERY_ID], value_set=positive_queries))[schema.QUERY_ID]
    )[:4]
    table = pairs.filter(pc.is_in(pairs[schema.QUERY_ID], value_set=chosen))
    table = table.rename_columns(
        [
            {schema.FIRST_STAGE_RANK: "rank", schema.FIRST_STAGE_SCORE: "score"}.get(n, n)
            for n in table.column_names
        ]
    )
    path = tmp_path_factory.mktemp("hn_input") / "dl19_four_queries.parquet"
    pq.write_table(table, path)
    return path, shared_data / "trec-dl" / "qrels.dl19-passage.txt"


@pytest.fixture(scope="module")
def mined(dl19_input, tmp_path_factory) -> Path:
    source, qrels = dl19_input
    output = tmp_path_factory.mktemp("hn_job") / "out"
    assert (
        main(["--input", str(source), "--positives", str(qrels), "--output", str(output), *FAST])
        == 0
    )
    return output


def outputs(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0] == "rerank"
    }


@pytest.mark.slow  # `mined`: the whole job, the rerank job on a local Ray included
def test_every_candidate_is_reranked_and_labelled(mined, dl19_input):
    source, qrels_path = dl19_input
    canonical = pq.read_table(mined / "candidates")
    ranked = pq.read_table(mined / "rerank" / "ranked")
    given = pq.read_table(source)
    assert canonical.num_rows == ranked.num_rows == given.num_rows == 400
    key = [(schema.QUERY_ID, "ascending"), (schema.DOC_ID, "ascending")]
    # The scores are the reranker's, the first-stage ranks the input's.
    assert canonical.sort_by(key)[schema.SCORE].equals(ranked.sort_by(key)[schema.SCORE])
    assert canonical.sort_by(key)[schema.FIRST_STAGE_RANK].equals(given.sort_by(key)["rank"])
    run = read_run_metadata(canonical.schema)
    assert run["model"] == "dummy:tiny" and run["random_weights"] is True and run["seed"] == 0

    qrels = read_qrels(str(qrels_path))
    positives = {
        (r[schema.QUERY_ID], r[schema.DOC_ID]) for r in qrels.to_pylist() if r[schema.LABEL] >= 2
    }
    rows = canonical.to_pylist()
    assert not [r for r in rows if r[KEEP] and (r[schema.QUERY_ID], r[schema.DOC_ID]) in positives]
    assert {(r[schema.QUERY_ID], r[schema.DOC_ID]) for r in rows if r[IS_POSITIVE]} == positives & {
        (r[schema.QUERY_ID], r[schema.DOC_ID]) for r in rows
    }
    lowest = {}
    for r in rows:
        if r[IS_POSITIVE]:
            lowest[r[schema.QUERY_ID]] = min(
                lowest.get(r[schema.QUERY_ID], np.inf), np.float32(r[schema.SCORE])
            )
    kept = [r for r in rows if r[KEEP]]
    assert kept
    for r in kept:
        pos_min = np.float32(lowest[r[schema.QUERY_ID]])
        assert r[POS_MIN_SCORE] == pos_min
        assert np.float32(r[schema.SCORE]) <= pos_min - abs(pos_min) * np.float32(0.05)


@pytest.mark.slow  # `mined`: the whole job, the rerank job on a local Ray included
def test_stats_and_training_files(mined):
    stats = json.loads((mined / "stats.json").read_text())
    canonical = pq.read_table(mined / "candidates")
    assert (
        stats["rows"] == canonical.num_rows
        and stats["kept_negatives"] == pc.sum(canonical[KEEP]).as_py()
    )
    assert stats["unscored_pairs"] == 0 and stats["queries"]["in"] == 4
    assert stats["run"]["model"] == "dummy:tiny"
    # Checked before scoring: every input query has a positive in the qrels.
    assert (
        stats["qrels"]["input_queries"] == 4
        and stats["qrels"]["input_queries_without_positives"] == 0
    )
    assert pq.read_table(mined / "triplet").num_rows == stats["projections"]["triplet_rows"] > 0
    assert pq.read_table(mined / "n-tuple").num_rows == stats["projections"]["n_tuple_rows"]
    lines = (mined / "flagembedding" / "train.jsonl").read_text().splitlines()
    assert len(lines) == stats["projections"]["flagembedding_lines"] > 0


@pytest.mark.slow  # `mined`: the whole job, the rerank job on a local Ray included
def test_reruns_reuse_the_scores_and_repeat_the_bytes(mined, dl19_input, tmp_path, capsys):
    source, qrels = dl19_input
    summary = (mined / "rerank" / "summary.json").read_bytes()
    before = outputs(mined)
    again = [
        "--input",
        str(source),
        "--positives",
        str(qrels),
        "--output",
        str(mined),
        *FAST,
        "--set",
        "selection.sampling=random",
        "--set",
        "selection.seed=5",
    ]
    assert main(again) == 0
    first_random = outputs(mined)
    assert (mined / "rerank" / "summary.json").read_bytes() == summary  # not scored again
    assert first_random != before
    assert main(again) == 0
    assert outputs(mined) == first_random  # same seed, same bytes
    out = capsys.readouterr().out
    assert (
        "queries in: 4" in out
        and "model: dummy:tiny" in out
        and "RANDOM WEIGHTS: dummy:tiny" in out
    )

    with pytest.raises(InputError, match="other rerank settings"):
        main(
            [
                "--input",
                str(source),
                "--positives",
                str(qrels),
                "--output",
                str(mined),
                *FAST,
                "--set",
                "rerank.tokenizer.max_length=64",
            ]
        )


def test_positives_from_an_input_label_column(dl19_input, tmp_path):
    source, _ = dl19_input
    config = load_config(HardNegativesConfig)
    with pytest.raises(InputError, match="no positives"):
        read_positives(config, str(source), None)
    table = pq.read_table(source)
    pq.write_table(
        table.append_column(schema.LABEL, pa.array([1] * table.num_rows, pa.int32())),
        tmp_path / "labelled.parquet",
    )
    assert read_positives(config, str(tmp_path / "labelled.parquet"), None) is None


def test_bad_input_is_one_line_and_exit_code_2(dl19_input, tmp_path, run_entry_point):
    source, _ = dl19_input
    # The entry point of `python -m jobs.hard_negatives`, in this process: the qrels are read before any work.
    result = run_entry_point(
        main,
        "--input",
        source,
        "--positives",
        tmp_path / "missing-qrels.txt",
        "--output",
        tmp_path / "out",
        "--model",
        "dummy:tiny",
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "missing-qrels.txt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow  # the whole job on a local Ray
def test_a_relative_output_lands_under_the_drivers_folder(
    dl19_input, tmp_path, monkeypatch, ray_local
):
    # The shared Ray was started from another folder: its workers must not resolve the relative path there.
    source, qrels = dl19_input
    workers_folder = Path.cwd()
    monkeypatch.chdir(tmp_path)
    assert (
        main(["--input", str(source), "--positives", str(qrels), "--output", "rel-out", *FAST]) == 0
    )
    written = {
        p.relative_to(tmp_path / "rel-out").parts[0] for p in (tmp_path / "rel-out").rglob("*")
    }
    assert {"candidates", "triplet", "stats.json", "rerank"} <= written
    assert not (workers_folder / "rel-out").exists()
