"""NovelEval-2306 (RankGPT): 21 questions about events after 2023, 20 web passages each, all judged 0/1/2.

Source (`<data_dir>/noveleval/`): `queries.tsv` (qid<TAB>query), `corpus.tsv` (docid<TAB>content; docids are
`<qid>-<n>`), `qrels.txt` (TREC). The candidates of a query are the passages judged for it, in corpus order;
there is no first stage, so no first-stage columns.
"""

from __future__ import annotations

import csv
import os

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels
from pipeline.datasets.tables import collection_dir, only_queries, pairs_table


def _read_tsv(path) -> dict[str, str]:
    with open(path, encoding="utf-8", newline="") as f:
        # QUOTE_NONE: passages contain bare quotes, which are text, not CSV quoting.
        return {
            row[0]: row[1] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row
        }


def noveleval(data_dir: str | os.PathLike | None = None) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels): 21 queries x 20 candidates = 420 pairs, every pair judged."""
    folder = collection_dir(data_dir, "noveleval", ["queries.tsv", "corpus.tsv", "qrels.txt"])
    queries, corpus = _read_tsv(folder / "queries.tsv"), _read_tsv(folder / "corpus.tsv")
    qrels = read_qrels(str(folder / "qrels.txt"))
    judged: dict[str, list[str]] = {}
    for qid, did in zip(qrels[schema.QUERY_ID].to_pylist(), qrels[schema.DOC_ID].to_pylist()):
        judged.setdefault(qid, []).append(did)
    corpus_order = {did: i for i, did in enumerate(corpus)}
    columns: dict[str, list] = {
        name: [] for name in (schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT)
    }
    missing = [did for dids in judged.values() for did in dids if did not in corpus_order]
    if missing:
        raise InputError(f"noveleval: qrels judge {missing[:3]} but corpus.tsv lacks them")
    for qid, query in queries.items():
        for did in sorted(judged.get(qid, []), key=corpus_order.__getitem__):
            columns[schema.QUERY_ID].append(qid)
            columns[schema.QUERY].append(query)
            columns[schema.DOC_ID].append(did)
            columns[schema.DOCUMENT].append(corpus[did])
    pairs = pairs_table(columns)
    return pairs, only_queries(qrels, pairs)
