"""Converters from the real collections in `../shared/data` to the rerank job's input, and benchmark workloads.

Each collection function returns `(pairs, qrels)` (schemas in `tables.py`); each workload returns `pairs`.

    from pipeline.datasets import trec_dl
    pairs, qrels = trec_dl(2019)          # 4,300 pairs, 43 queries, BM25 first-stage columns

Command line: `python -m pipeline.datasets NAME --output pairs.parquet [--qrels-output qrels.txt]`.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from pipeline.datasets.bfcl import bfcl
from pipeline.datasets.cosqa import cosqa
from pipeline.datasets.noveleval import noveleval
from pipeline.datasets.spider import spider
from pipeline.datasets.tables import (default_data_dir, read_trec_qrels, sample_queries, take_pairs,
                                      write_trec_qrels)
from pipeline.datasets.trec_dl import trec_dl
from pipeline.datasets.vaswani import vaswani
from pipeline.datasets.workloads import WORKLOADS, dl19, long, multilingual
from pipeline.datasets.xquad_r import xquad_r

COLLECTIONS: dict[str, Callable[..., tuple[pa.Table, pa.Table]]] = {
    "trec_dl": trec_dl,
    "noveleval": noveleval,
    "vaswani": vaswani,
    "xquad_r": xquad_r,
    "bfcl": bfcl,
    "spider": spider,
    "cosqa": cosqa,
}

__all__ = [
    "COLLECTIONS", "WORKLOADS", "bfcl", "cosqa", "default_data_dir", "dl19", "long", "multilingual", "noveleval",
    "read_trec_qrels", "sample_queries", "spider", "take_pairs", "trec_dl", "vaswani", "write_trec_qrels", "xquad_r",
]
