"""Converters from the real collections in `../shared/data` to the rerank job's input, and benchmark workloads.

Each collection function returns `(pairs, qrels)` (schemas in `tables.py`); each workload returns `pairs`.

    from pipeline.datasets import trec_dl
    pairs, qrels = trec_dl(2019)          # 4,300 pairs, 43 queries, BM25 first-stage columns

Command line: `python -m pipeline.datasets NAME --output pairs.parquet [--qrels-output qrels.txt]`.
"""

from __future__ import annotations

from pipeline.datasets.bfcl import bfcl
from pipeline.datasets.cosqa import cosqa
from pipeline.datasets.noveleval import noveleval
from pipeline.datasets.registry import COLLECTIONS, check_arguments, load_collection
from pipeline.datasets.spider import spider
from pipeline.datasets.tables import default_data_dir, sample_queries, take_pairs
from pipeline.datasets.trec_dl import trec_dl
from pipeline.datasets.vaswani import vaswani
from pipeline.datasets.workloads import WORKLOADS, dl19, long, multilingual
from pipeline.datasets.xquad_r import xquad_r

__all__ = [
    "COLLECTIONS",
    "WORKLOADS",
    "bfcl",
    "check_arguments",
    "cosqa",
    "default_data_dir",
    "dl19",
    "load_collection",
    "long",
    "multilingual",
    "noveleval",
    "sample_queries",
    "spider",
    "take_pairs",
    "trec_dl",
    "vaswani",
    "xquad_r",
]
