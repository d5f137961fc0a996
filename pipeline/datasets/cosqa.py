"""CoSQA (CodeXGLUE WebQuery dev) as code search: rank Python functions for a web query.

Source (`<data_dir>/cosqa/cosqa-dev.json`): a JSON list of 604 (`idx`, `doc` = web query, `code` = a Python
function, `label` 0/1) records; every query occurs once, 313 have label 1, and the 604 records hold 552
distinct functions. The retrieval task: each query with a relevant function against the distinct functions.

Candidates: all 552 functions (`pool_size=None`; 313 x 552 = 172,776 pairs), or a per-query pool of
`pool_size` (the query's own function plus functions drawn at random with a per-query seed).
Ids: query_id = the record's `idx`; doc_id `f<n>`, n = the order in which a function first appears.
qrels: every labelled record (1 relevant, 0 judged non-relevant) of the kept queries.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.datasets.tables import collection_dir, only_queries, pairs_table, qrels_table


def cosqa(
    data_dir: str | os.PathLike | None = None,
    pool_size: int | None = None,
    seed: int = 0,
    answerable_only: bool = True,
) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels). `answerable_only` keeps the 313 queries that have a relevant function (a query
    without one scores 0 on every measure whatever the model does); False keeps all 604."""
    folder = collection_dir(data_dir, "cosqa", ["cosqa-dev.json"])
    with open(folder / "cosqa-dev.json", encoding="utf-8") as f:
        records = json.load(f)
    function_ids: dict[str, str] = {}
    for record in records:
        function_ids.setdefault(record["code"], f"f{len(function_ids)}")
    functions = list(function_ids)  # position n holds function f<n>
    if pool_size is not None and not 1 <= pool_size <= len(functions):
        raise InputError(
            f"cosqa pool_size must be between 1 and {len(functions)} (the distinct functions), got {pool_size}"
        )

    columns: dict[str, list] = {
        name: [] for name in (schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT)
    }
    for record in records:
        if answerable_only and record["label"] != 1:
            continue
        own = int(function_ids[record["code"]][1:])
        if pool_size is None:
            pool = range(len(functions))
        else:
            others = np.delete(np.arange(len(functions)), own)
            rng = np.random.default_rng(zlib.crc32(f"{seed}:{record['idx']}".encode()))
            pool = sorted([own, *rng.choice(others, pool_size - 1, replace=False).tolist()])
        for n in pool:
            columns[schema.QUERY_ID].append(record["idx"])
            columns[schema.QUERY].append(record["doc"])
            columns[schema.DOC_ID].append(f"f{n}")
            columns[schema.DOCUMENT].append(functions[n])
    pairs = pairs_table(columns)
    qrels = qrels_table(
        [r["idx"] for r in records],
        [function_ids[r["code"]] for r in records],
        [int(r["label"]) for r in records],
    )
    return pairs, only_queries(qrels, pairs)
