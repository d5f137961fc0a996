"""The two tie rules of `pipeline.core.ranking`: the job's ranks (doc_id ascending) and trec_eval's order
(doc_id descending, in byte order), each where it is used."""

from __future__ import annotations

import pyarrow as pa

from pipeline.core import schema as S
from pipeline.core.ranking import job_order, rank_by_score, trec_eval_order
from pipeline.rerank.stages.rank import rank_rows

# Three documents tie at 1.0 (their ids differ in byte order from any locale's: "B" < "a" < "é").
TIED = pa.table(
    {
        S.QUERY_ID: ["q", "q", "q", "q"],
        S.DOC_ID: ["a", "é", "top", "B"],
        S.SCORE: pa.array([1.0, 1.0, 2.0, 1.0], pa.float32()),
    }
)


def test_the_job_breaks_ties_by_doc_id_ascending_and_trec_eval_descending():
    assert TIED.sort_by(job_order())[S.DOC_ID].to_pylist() == ["top", "B", "a", "é"]
    assert TIED.sort_by(trec_eval_order())[S.DOC_ID].to_pylist() == ["top", "é", "a", "B"]
    ranked = rank_by_score(TIED)
    assert ranked[S.DOC_ID].to_pylist() == ["top", "é", "a", "B"]
    assert ranked[S.RANK].to_pylist() == [1, 2, 3, 4]


def test_the_rank_stage_follows_the_jobs_rule():
    staged = TIED.append_column("_row", pa.array(range(4), pa.int64()))
    staged = staged.append_column(S.WINDOW, pa.array([0] * 4, pa.int32()))
    staged = staged.append_column("_shard", pa.array([0] * 4, pa.int32()))
    ranked, _, _ = rank_rows(staged, top_k=None)
    assert ranked[S.DOC_ID].to_pylist() == ["top", "B", "a", "é"]
    assert ranked[S.RANK].to_pylist() == [1, 2, 3, 4]
