"""The two tables every converter returns, built once here so their schemas never drift.

pairs (long format, one row per (query, candidate)):
    query_id: string, query: string, doc_id: string, document: string,
    [first_stage_rank: int32 (1 = best), first_stage_score: float64], [extra columns, e.g. language: string]
qrels (one row per judgement):
    query_id: string, doc_id: string, label: int32 (graded or binary; unjudged pairs are simply absent)

TREC qrels text is read and written by `pipeline.core.trec` (`read_qrels`, `write_qrels`).

`first_stage_score` keeps the source's float64 precision: trec_eval breaks ties on the run's scores, and
rounding to float32 would create ties the published figures do not have.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.core.trec import QRELS_SCHEMA

PAIRS_SCHEMA = pa.schema(
    [
        (schema.QUERY_ID, pa.string()),
        (schema.QUERY, pa.string()),
        (schema.DOC_ID, pa.string()),
        (schema.DOCUMENT, pa.string()),
    ]
)
FIRST_STAGE_FIELDS = [
    pa.field(schema.FIRST_STAGE_RANK, pa.int32()),
    pa.field(schema.FIRST_STAGE_SCORE, pa.float64()),
]

# Separates a replica number from the original query id when a workload is tiled past its source size.
REPLICA_SEPARATOR = "#"


def default_data_dir() -> Path:
    """`$SHARED_DATA`, else `../shared/data` beside the project root (where the real collections live), else
    `.data/` in the project, where `python -m pipeline.datasets fetch` puts them on a machine without it."""
    env = os.environ.get("SHARED_DATA")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    shared = root.parent / "shared" / "data"
    return shared if shared.is_dir() or not (root / ".data").is_dir() else root / ".data"


def collection_dir(data_dir: str | os.PathLike | None, name: str, required: Sequence[str]) -> Path:
    """`data_dir/name`, checked to hold `required` files, so a wrong path fails before any parsing."""
    folder = Path(data_dir if data_dir is not None else default_data_dir()) / name
    missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        raise InputError(
            f"{folder} lacks {', '.join(missing)}; pass the shared data folder (the one holding "
            f"{name}/) as data_dir / --data-dir, or set SHARED_DATA; `python -m pipeline.datasets fetch` "
            "downloads it into .data/"
        )
    return folder


def pairs_table(
    columns: dict[str, Iterable], extra_types: dict[str, pa.DataType] | None = None
) -> pa.Table:
    """Build a pairs table from column lists; first-stage and extra columns are typed here, in one place."""
    fields = list(PAIRS_SCHEMA)
    if schema.FIRST_STAGE_RANK in columns:
        fields += FIRST_STAGE_FIELDS
    fields += [pa.field(name, dtype) for name, dtype in (extra_types or {}).items()]
    target = pa.schema(fields)
    unknown = set(columns) - set(target.names)
    if unknown:  # a converter bug, not user input: say which column lacks a type
        raise ValueError(f"columns {sorted(unknown)} have no declared type")
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in target}, schema=target)


def qrels_table(query_ids: Iterable, doc_ids: Iterable, labels: Iterable) -> pa.Table:
    return pa.table(
        [
            pa.array(list(query_ids), pa.string()),
            pa.array(list(doc_ids), pa.string()),
            pa.array(list(labels), pa.int32()),
        ],
        schema=QRELS_SCHEMA,
    )


def only_queries(qrels: pa.Table, pairs: pa.Table) -> pa.Table:
    """The judgements of the queries that `pairs` holds (all their judged documents, candidates or not:
    trec_eval's ideal ranking for nDCG needs every judged document of a query)."""
    return qrels.filter(
        pc.is_in(qrels[schema.QUERY_ID], value_set=pc.unique(pairs[schema.QUERY_ID]))
    )


def sample_queries(
    pairs: pa.Table, qrels: pa.Table, max_queries: int | None, seed: int = 0
) -> tuple[pa.Table, pa.Table]:
    """Keep `max_queries` queries chosen at random with `seed` (all of them when None), in their original
    order, with all their candidates and judgements. Deterministic for a given table and seed."""
    query_ids = pc.unique(pairs[schema.QUERY_ID])
    if max_queries is None or max_queries >= len(query_ids):
        return pairs, only_queries(qrels, pairs)
    if max_queries < 1:
        raise InputError(f"max_queries must be at least 1, got {max_queries}")
    keep = np.sort(
        np.random.default_rng(seed).choice(len(query_ids), size=max_queries, replace=False)
    )
    kept = pairs.filter(pc.is_in(pairs[schema.QUERY_ID], value_set=query_ids.take(pa.array(keep))))
    return kept, only_queries(qrels, kept)


def take_pairs(pairs: pa.Table, n_pairs: int | None) -> pa.Table:
    """Exactly `n_pairs` rows: the first rows of `pairs`, or `pairs` tiled when it is shorter.

    Tiled copies get `#1`, `#2`, ... appended to their query ids, so (query_id, doc_id) stays a unique key.
    """
    if n_pairs is None:
        return pairs
    if n_pairs < 1:
        raise InputError(f"n_pairs must be at least 1, got {n_pairs}")
    if pairs.num_rows == 0:
        raise InputError("cannot take pairs from an empty table")
    copies = []
    for replica in range(-(-n_pairs // pairs.num_rows)):
        copy = pairs
        if replica:
            ids = pc.binary_join_element_wise(
                pairs[schema.QUERY_ID], f"{REPLICA_SEPARATOR}{replica}", ""
            )
            copy = pairs.set_column(
                pairs.schema.get_field_index(schema.QUERY_ID), schema.QUERY_ID, ids
            )
        copies.append(copy)
    return pa.concat_tables(copies).slice(0, n_pairs).combine_chunks()
