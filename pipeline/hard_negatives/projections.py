"""Training files from the canonical table: the formats that trainers read, joined with the texts.

texts (the input table, or any table with these columns): query_id, query, doc_id, document.

sentence-transformers (Parquet; load with `datasets.Dataset.from_parquet`):
    triplet:  query, positive, negative                  one row per (query, positive, negative)
    n-tuple:  query, positive, negative_1 .. negative_n   one row per (query, positive) that has n negatives
    optional: label = positive score - negative score (float32; a list for n-tuples), what MarginMSELoss
              reads, or scores = [positive score, negative score...] as mine_hard_negatives(output_scores=True)
              writes it.
FlagEmbedding (JSONL, one line per query that has a positive and a negative):
    {"query": str, "pos": [str], "neg": [str], "pos_scores": [float], "neg_scores": [float]}

Positives and negatives appear hardest first: score descending, ties by doc_id. With negatives_per = "query"
each positive is paired with all the query's negatives (as mine_hard_negatives does); with "positive" the
negatives are dealt round-robin in that order, so positive i gets negatives i, i + p, i + 2p, ...
(p = the query's number of positives). The n-tuple format keeps only rows with exactly num_negatives
negatives, as mine_hard_negatives does; the rows left out are counted in stats.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.hard_negatives.config import ProjectionsConfig, SelectionConfig
from pipeline.hard_negatives.select import IS_POSITIVE, KEEP


@dataclass
class Passage:
    doc_id: str
    text: str
    score: float  # float32 value


@dataclass
class QueryExamples:
    """One query's positives and kept negatives, hardest first."""

    query_id: str
    query: str
    positives: list[Passage] = field(default_factory=list)
    negatives: list[Passage] = field(default_factory=list)

    def pairs(self, negatives_per: str) -> list[tuple[Passage, list[Passage]]]:
        """(positive, its negatives) for every positive."""
        if negatives_per == "query":
            return [(positive, self.negatives) for positive in self.positives]
        p = len(self.positives)
        return [(positive, self.negatives[i::p]) for i, positive in enumerate(self.positives)]


def query_examples(canonical: pa.Table, texts: pa.Table) -> Iterator[QueryExamples]:
    """Group the positives and kept negatives of each query that has a positive, with their texts."""
    missing = [
        c
        for c in (schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT)
        if c not in texts.column_names
    ]
    if missing:
        raise InputError(
            f"the texts for the training files lack column(s) {missing}; they have {texts.column_names}"
        )
    rows = canonical.filter(pc.or_(canonical[IS_POSITIVE], canonical[KEEP]))
    key = lambda t: pc.binary_join_element_wise(
        t[schema.QUERY_ID].cast(pa.string()), t[schema.DOC_ID].cast(pa.string()), "\x00"
    )
    text_keys = key(texts)
    wanted = pc.is_in(text_keys, value_set=key(rows).combine_chunks())
    documents = dict(
        zip(text_keys.filter(wanted).to_pylist(), texts[schema.DOCUMENT].filter(wanted).to_pylist())
    )
    queries = dict(
        zip(texts[schema.QUERY_ID].cast(pa.string()).to_pylist(), texts[schema.QUERY].to_pylist())
    )

    current: QueryExamples | None = None
    for qid, did, positive, score in zip(
        rows[schema.QUERY_ID].to_pylist(),
        rows[schema.DOC_ID].to_pylist(),
        rows[IS_POSITIVE].to_pylist(),
        rows[schema.SCORE].to_pylist(),
    ):
        if current is None or current.query_id != qid:
            if current is not None:
                yield current
            current = QueryExamples(qid, queries[qid])
        document = documents.get(f"{qid}\x00{did}")
        if document is None:
            raise InputError(
                f"no text for query {qid!r}, document {did!r}: the texts table must hold every "
                "candidate of the canonical table"
            )
        (current.positives if positive else current.negatives).append(Passage(did, document, score))
    if current is not None:
        yield current


def triplets(
    examples: list[QueryExamples], selection: SelectionConfig, projections: ProjectionsConfig
) -> pa.Table:
    columns: dict[str, list] = {"query": [], "positive": [], "negative": []}
    pos_scores, neg_scores = [], []
    for example in examples:
        for positive, negatives in example.pairs(selection.negatives_per):
            for negative in negatives:
                columns["query"].append(example.query)
                columns["positive"].append(positive.text)
                columns["negative"].append(negative.text)
                pos_scores.append(positive.score)
                neg_scores.append(negative.score)
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    pos = np.array(pos_scores, dtype=np.float32)
    neg = np.array(neg_scores, dtype=np.float32)
    if projections.scores == "margin":
        table = table.append_column("label", pa.array(pos - neg, pa.float32()))
    elif projections.scores == "scores":
        table = table.append_column(
            "scores", pa.array(np.stack([pos, neg], axis=1).tolist(), pa.list_(pa.float32()))
        )
    return table


def n_tuples(
    examples: list[QueryExamples], selection: SelectionConfig, projections: ProjectionsConfig
) -> pa.Table:
    n = selection.num_negatives
    columns: dict[str, list] = {
        "query": [],
        "positive": [],
        **{f"negative_{i}": [] for i in range(1, n + 1)},
    }
    scores: list[list[float]] = []
    for example in examples:
        for positive, negatives in example.pairs(selection.negatives_per):
            if len(negatives) < n:
                continue
            columns["query"].append(example.query)
            columns["positive"].append(positive.text)
            for i, negative in enumerate(negatives[:n], start=1):
                columns[f"negative_{i}"].append(negative.text)
            scores.append([positive.score] + [negative.score for negative in negatives[:n]])
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    matrix = np.array(scores, dtype=np.float32).reshape(len(scores), n + 1)
    if projections.scores == "margin":
        table = table.append_column(
            "label", pa.array((matrix[:, :1] - matrix[:, 1:]).tolist(), pa.list_(pa.float32()))
        )
    elif projections.scores == "scores":
        table = table.append_column("scores", pa.array(matrix.tolist(), pa.list_(pa.float32())))
    return table


def flagembedding_records(examples: list[QueryExamples]) -> list[dict]:
    """FlagEmbedding's training lines; a query with no negative is left out (its trainer needs one)."""
    return [
        {
            "query": e.query,
            "pos": [p.text for p in e.positives],
            "neg": [p.text for p in e.negatives],
            "pos_scores": [p.score for p in e.positives],
            "neg_scores": [p.score for p in e.negatives],
        }
        for e in examples
        if e.negatives
    ]


def tuple_rows_short(examples: list[QueryExamples], selection: SelectionConfig) -> int:
    """(query, positive) rows the n-tuple format leaves out for having fewer than num_negatives negatives."""
    return sum(
        len(negs) < selection.num_negatives
        for e in examples
        for _, negs in e.pairs(selection.negatives_per)
    )
