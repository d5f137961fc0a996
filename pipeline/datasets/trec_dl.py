"""TREC Deep Learning 2019/2020 passage reranking: the BM25 top-100 candidates with their passage text.

Source (`<data_dir>/trec-dl/`): `retrieve_results_dl19.json` (and `_dl20`), a list of
`{"query": str, "hits": [{"content", "qid", "docid", "rank", "score"}]}` from castorini/rank_llm, and the
official NIST qrels `qrels.dl19-passage.txt` (graded 0-3). DL19: 43 queries x 100 = 4,300 pairs;
DL20: 54 x 100 = 5,400. Unjudged candidates are absent from the qrels (trec_eval counts them non-relevant).
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels
from pipeline.datasets.tables import collection_dir, only_queries, pairs_table

YEARS = {2019: "dl19", 2020: "dl20"}


def trec_dl(
    year: int = 2019, data_dir: str | os.PathLike | None = None
) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels) for TREC DL `year`; pairs carry BM25's `first_stage_rank` and `first_stage_score`,
    in the source's order (query by query, rank 1 first)."""
    if year not in YEARS:
        raise InputError(f"TREC DL year must be one of {sorted(YEARS)}, got {year!r}")
    tag = YEARS[year]
    candidates, qrels_file = f"retrieve_results_{tag}.json", f"qrels.{tag}-passage.txt"
    folder = collection_dir(data_dir, "trec-dl", [candidates, qrels_file])
    with open(folder / candidates, encoding="utf-8") as f:
        queries = json.load(f)
    columns: dict[str, list] = {
        name: []
        for name in (
            schema.QUERY_ID,
            schema.QUERY,
            schema.DOC_ID,
            schema.DOCUMENT,
            schema.FIRST_STAGE_RANK,
            schema.FIRST_STAGE_SCORE,
        )
    }
    for entry in queries:
        for hit in entry["hits"]:
            columns[schema.QUERY_ID].append(
                str(hit["qid"])
            )  # ints in the JSON; strings everywhere else
            columns[schema.QUERY].append(entry["query"])
            columns[schema.DOC_ID].append(str(hit["docid"]))
            columns[schema.DOCUMENT].append(hit["content"])
            columns[schema.FIRST_STAGE_RANK].append(hit["rank"])
            columns[schema.FIRST_STAGE_SCORE].append(hit["score"])
    pairs = pairs_table(columns)
    return pairs, only_queries(read_qrels(str(folder / qrels_file)), pairs)
