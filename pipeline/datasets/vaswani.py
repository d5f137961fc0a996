"""Vaswani (NPL): 11,429 physics/engineering abstracts, 93 queries, 2,083 binary judgements.

Source (`<data_dir>/vaswani/`): `doc-text.trec` (`<DOC><DOCNO>n</DOCNO> text </DOC>`), `query-text.trec`
(`<top><num>n</num><title> text </title></top>`), `qrels` (TREC). The collection has no candidate lists, so
the rerank candidates are BM25's top `depth` (our numpy BM25, see `bm25.py`).

The distributor lowercased the abstracts and stripped their punctuation; queries come in capitals, so we
lowercase them too, so a cased reranker does not see a casing mismatch the collection introduced.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.trec import read_qrels
from pipeline.datasets.bm25 import BM25
from pipeline.datasets.tables import collection_dir, only_queries, pairs_table

_DOC = re.compile(r"<DOC>\s*<DOCNO>\s*(.*?)\s*</DOCNO>(.*?)</DOC>", re.S)
_TOPIC = re.compile(r"<top>\s*<num>\s*(.*?)\s*</num>\s*<title>(.*?)</title>\s*</top>", re.S)


def _whitespace(text: str) -> str:
    return " ".join(text.split())


def read_documents(folder: Path) -> dict[str, str]:
    """docno -> abstract (line breaks folded to single spaces), in collection order."""
    docs = {
        docno: _whitespace(text)
        for docno, text in _DOC.findall((folder / "doc-text.trec").read_text("utf-8"))
    }
    if not docs:
        raise InputError(
            f"{folder / 'doc-text.trec'} holds no <DOC><DOCNO>...</DOCNO>...</DOC> records"
        )
    return docs


def read_queries(folder: Path) -> dict[str, str]:
    """qid -> query text, lowercased (see module docstring)."""
    return {
        num: _whitespace(text).lower()
        for num, text in _TOPIC.findall((folder / "query-text.trec").read_text("utf-8"))
    }


def vaswani(
    data_dir: str | os.PathLike | None = None, depth: int = 100
) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels): each of the 93 queries with BM25's top `depth` abstracts (`first_stage_rank`,
    `first_stage_score` from BM25), query by query, rank 1 first. 93 x 100 = 9,300 pairs by default."""
    folder = collection_dir(data_dir, "vaswani", ["doc-text.trec", "query-text.trec", "qrels"])
    docs, queries = read_documents(folder), read_queries(folder)
    docnos, texts = list(docs), list(docs.values())
    index = BM25(texts)
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
    for qid, query in queries.items():
        hits, scores = index.search(query, depth)
        columns[schema.QUERY_ID] += [qid] * len(hits)
        columns[schema.QUERY] += [query] * len(hits)
        columns[schema.DOC_ID] += [docnos[i] for i in hits]
        columns[schema.DOCUMENT] += [texts[i] for i in hits]
        columns[schema.FIRST_STAGE_RANK] += range(1, len(hits) + 1)
        columns[schema.FIRST_STAGE_SCORE] += scores.tolist()
    pairs = pairs_table(columns)
    return pairs, only_queries(read_qrels(str(folder / "qrels")), pairs)
