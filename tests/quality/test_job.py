"""`python -m jobs.index_quality` end to end on real DL19 data: nights, history, alerts, configs, S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.index_quality import main
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.storage import url_to_fs
from pipeline.quality.config import IndexQualityConfig
from pipeline.quality.history import History

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("index_quality*.yaml"))


@pytest.fixture(scope="module")
def degraded_run(dl19_long, tmp_path_factory) -> Path:
    """The DL19 run after a bad index build: each query's BM25 top 3 sank to the bottom."""
    table = pq.read_table(dl19_long)
    score = np.where(
        table["first_stage_rank"].to_numpy() <= 3, -1e9, table["first_stage_score"].to_numpy()
    )
    table = table.set_column(
        table.schema.get_field_index("first_stage_score"), "first_stage_score", pa.array(score)
    )
    path = tmp_path_factory.mktemp("degraded") / "run.parquet"
    pq.write_table(table, path)
    return path


def _args(run, qrels, output, history, night, *extra):
    return [
        "--run",
        str(run),
        "--qrels",
        str(qrels),
        "--output",
        str(output),
        "--history",
        str(history),
        "--config",
        str(ROOT / "configs" / "index_quality_trec_dl.yaml"),
        "--set",
        f"night={night}",
        "--set",
        "input.judge_score_column=reranker_score",
        "--set",
        "segment_columns=[query_type]",
        *extra,
    ]


@pytest.mark.slow  # four nights end to end, each with its report and plots
def test_nights_history_and_a_planted_regression(
    dl19_long, dl19_qrels, degraded_run, tmp_path, capsys
):
    history = tmp_path / "history"
    assert main(_args(dl19_long, dl19_qrels, tmp_path / "n1", history, "2024-05-01")) == 0
    metrics = json.loads((tmp_path / "n1" / "metrics.json").read_text())
    assert set(metrics["overall"]) == {"nDCG@10", "RR@10", "R@100", "AP@100", "P@10", "Judged@10"}
    assert round(metrics["overall"]["nDCG@10"], 4) == 0.5058  # BM25 on DL19, the published figure
    assert (
        metrics["reranked"]["reranked/nDCG@10"] > 0.75
    )  # the label-aware judge reranks far better
    assert set(metrics["label_free"]["measures"]) == {
        "judge/nDCG@10",
        "judge/Overlap@10",
        "judge/RBO(p=0.9)@100",
        "judge/Held10@50",
    }
    assert metrics["segments"]["query_type"]["long"]["num_queries"] == 15
    assert metrics["comparison"]["previous_night"] is None and metrics["alerts"] == []
    per_query = pq.read_table(tmp_path / "n1" / "per_query.parquet")
    assert per_query.num_rows == 43 and "query_type" in per_query.column_names
    assert pc.mean(per_query["nDCG@10"]).as_py() == pytest.approx(metrics["overall"]["nDCG@10"])

    # Same index the next night: compared, no alert.
    assert main(_args(dl19_long, dl19_qrels, tmp_path / "n2", history, "2024-05-02")) == 0
    assert capsys.readouterr().out == ""
    # A bad build: exit 1, one ALERT line per regressed measure that has a threshold (nDCG@10 here; the
    # same candidates keep R@100 unchanged).
    assert main(_args(degraded_run, dl19_qrels, tmp_path / "n3", history, "2024-05-03")) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ALERT nDCG@10 regressed: 0.5058 -> ")
    metrics = json.loads((tmp_path / "n3" / "metrics.json").read_text())
    assert metrics["comparison"]["previous_night"] == "2024-05-02" and metrics["alerts"] == lines
    # Rerunning the bad night replaces its row.
    assert main(_args(degraded_run, dl19_qrels, tmp_path / "n3", history, "2024-05-03")) == 1
    assert History(str(history)).nights() == ["2024-05-01", "2024-05-02", "2024-05-03"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_run(config, dl19_long, dl19_qrels, tmp_path):
    loaded = load_config(IndexQualityConfig, str(config))
    assert loaded.metrics.measures
    # The label-free config reads the rerank job's output: reranker `score`, retriever `first_stage_rank`.
    table = pq.read_table(dl19_long).drop_columns(["first_stage_score"])
    table = table.append_column("score", table["reranker_score"])
    pq.write_table(table, tmp_path / "run.parquet")
    code = main(
        [
            "--run",
            str(tmp_path / "run.parquet"),
            "--qrels",
            str(dl19_qrels),
            "--output",
            str(tmp_path / "out"),
            "--config",
            str(config),
            "--set",
            "night=2024-05-01",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["overall"]) == set(loaded.metrics.measures)


def test_label_free_only_without_qrels(dl19_long, tmp_path):
    code = main(
        [
            "--run",
            str(dl19_long),
            "--output",
            str(tmp_path / "out"),
            "--set",
            "input.judge_score_column=reranker_score",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["overall"] == {} and metrics["label_free"]["measures"]["judge/Held10@50"] > 0.5
    assert metrics["label_free"]["score_summary"]["count"] == 4300


def test_output_and_history_on_s3(dl19_long, dl19_qrels, s3_bucket):
    uri, options = s3_bucket
    storage = [
        "--set",
        f"storage_options.endpoint_url={options['endpoint_url']}",
        "--set",
        "storage_options.key=testing",
        "--set",
        "storage_options.secret=testing",
    ]
    for night in ("2024-05-01", "2024-05-02", "2024-05-02"):
        assert (
            main(
                [
                    "--run",
                    str(dl19_long),
                    "--qrels",
                    str(dl19_qrels),
                    "--output",
                    f"{uri}/out/{night}",
                    "--history",
                    f"{uri}/history",
                    "--set",
                    f"night={night}",
                    *storage,
                ]
            )
            == 0
        )
    fs, _ = url_to_fs(uri, options)
    assert History(f"{uri}/history", options).nights() == ["2024-05-01", "2024-05-02"]
    metrics = json.loads(fs.cat(f"{uri}/out/2024-05-02/metrics.json"))
    assert metrics["comparison"]["previous_night"] == "2024-05-01"
    assert "storage_options" in metrics["config"] and "testing" not in json.dumps(
        metrics
    )  # secrets redacted
    assert fs.exists(f"{uri}/out/2024-05-02/report.html") and fs.exists(
        f"{uri}/out/2024-05-02/per_query.parquet"
    )


def test_rejected_rows_are_written_and_counted(tmp_path, dl19_qrels, dl19_long):
    table = pq.read_table(dl19_long)
    score = table["first_stage_score"].to_numpy().copy()
    score[:5] = np.nan
    table = table.set_column(
        table.schema.get_field_index("first_stage_score"), "first_stage_score", pa.array(score)
    )
    pq.write_table(table, tmp_path / "run.parquet")
    assert (
        main(
            [
                "--run",
                str(tmp_path / "run.parquet"),
                "--qrels",
                str(dl19_qrels),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    rejected = pq.read_table(tmp_path / "out" / "rejected.parquet")
    assert rejected.num_rows == 5 and set(rejected["reason"].to_pylist()) == {
        "null or NaN first-stage first_stage_score"
    }
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["rejected_rows"] == 5


@pytest.mark.parametrize(
    "extra, error, message",
    [
        ([], InputError, "nothing to measure"),
        (
            ["--set", "metrics.measures=[MRR@10]"],
            ConfigError,
            "metrics.measures.*unknown measure 'MRR@10'",
        ),
        (["--set", "alerts.alpha=2"], ConfigError, "alerts.alpha"),
        (["--set", "metric.measures=[AP]"], ConfigError, "unknown config key `metric`"),
    ],
)
def test_bad_requests_fail_before_work(dl19_long, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        main(["--run", str(dl19_long), "--output", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_command_line_exit_codes(shared_data, tmp_path, run_entry_point):
    """`python -m jobs.index_quality`'s entry point (pipeline.core.cli.run_main), in this process: exit codes, one line."""
    dl = shared_data / "trec-dl"
    ok = run_entry_point(
        main,
        "--run",
        dl / "runs" / "BM25_dl20.txt",
        "--qrels",
        dl / "qrels.dl20-passage.txt",
        "--output",
        tmp_path / "out",
        "--set",
        "metrics.relevance_level=2",
    )
    assert ok.returncode == 0, ok.stderr
    assert (
        round(json.loads((tmp_path / "out" / "metrics.json").read_text())["overall"]["nDCG@10"], 4)
        == 0.4796
    )
    bad = run_entry_point(
        main,
        "--run",
        tmp_path / "missing.txt",
        "--qrels",
        dl / "qrels.dl20-passage.txt",
        "--output",
        tmp_path / "out2",
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {str(tmp_path / 'missing.txt')!r} not found"
    ]


@pytest.mark.slow  # --model: the rerank job on a local Ray
def test_model_reranks_the_run_through_the_rerank_job(dl19_long, dl19_qrels, tmp_path):
    """--model: the run is reranked by the rerank job; label-free and reranked measures appear."""
    output = tmp_path / "night"
    code = main(
        [
            "--run",
            str(dl19_long),
            "--output",
            str(output),
            "--qrels",
            str(dl19_qrels),
            "--model",
            "dummy:tiny",
            "--dtype",
            "float32",
            "--set",
            "metrics.relevance_level=2",
            # Pairs cut at 64 tokens: 4,300 of them are scored, and what is checked is how the run goes
            # through the rerank job and its scores into the night's measures, not the scores themselves.
            "--set",
            "rerank.tokenizer.max_length=64",
        ]
    )
    assert code == 0
    rerank_summary = json.loads((output / "rerank" / "summary.json").read_text())
    assert rerank_summary["scored_rows"] == 4300 and rerank_summary["random_weights"] is True
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["overall"]["nDCG@10"] == pytest.approx(
        0.5058, abs=1e-4
    )  # the first stage itself
    assert {"judge/nDCG@10", "judge/Overlap@10"} <= set(metrics["label_free"]["measures"])
    assert metrics["label_free"]["score_summary"]["count"] == 4300
    assert "reranked/nDCG@10" in metrics["reranked"]
    # The model is named, and its random weights are said loudly: its "after reranking" is noise.
    assert metrics["reranker_model"] == "dummy:tiny" and metrics["reranker_random_weights"] is True
    assert metrics["warning"].startswith(
        "RANDOM WEIGHTS: the reranker dummy:tiny has random weights"
    )
    page = (output / "report.html").read_text()
    assert "Reranked by <code>dummy:tiny</code>" in page
    assert (
        page.count('class="caveat random"') == 3
    )  # at the top, after reranking, reranker as judge


@pytest.mark.slow  # --model: the rerank job on a local Ray
def test_trec_run_with_texts_and_model(dl19_long, dl19_qrels, shared_data, tmp_path):
    """A TREC run file has no texts: --texts supplies them, pairs of the run without text stay unscored."""
    texts = pq.read_table(dl19_long, columns=["query_id", "query", "doc_id", "document"])
    pq.write_table(texts.slice(0, 1000), tmp_path / "texts.parquet")
    output = tmp_path / "night"
    code = main(
        [
            "--run",
            str(shared_data / "trec-dl" / "runs" / "BM25_dl19.txt"),
            "--output",
            str(output),
            "--qrels",
            str(dl19_qrels),
            "--model",
            "dummy:tiny",
            "--texts",
            str(tmp_path / "texts.parquet"),
            "--set",
            "metrics.relevance_level=2",
            "--set",
            "rerank.tokenizer.max_length=64",  # which pairs get a score is tested, not the scores
        ]
    )
    assert code == 0
    assert json.loads((output / "rerank" / "summary.json").read_text())["input_rows"] == 1000
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["overall"]["nDCG@10"] == pytest.approx(0.5058, abs=1e-4)
    assert metrics["pairs_without_reranker_score"] > 0
    with pytest.raises(InputError, match="--texts"):
        main(
            [
                "--run",
                str(shared_data / "trec-dl" / "runs" / "BM25_dl19.txt"),
                "--output",
                str(tmp_path / "x"),
                "--model",
                "dummy:tiny",
            ]
        )
