"""`python -m pipeline.datasets NAME --output pairs.parquet [--qrels-output qrels.txt|qrels.parquet]`

Writes a collection (`trec_dl`, `noveleval`, `vaswani`, `xquad_r`, `bfcl`, `spider`, `cosqa`) or a benchmark
workload (`dl19`, `long`, `multilingual`) as Parquet in the rerank job's long format. Outputs may be local paths
or object-storage URIs. Converter arguments go through `--set`, e.g.
`python -m pipeline.datasets xquad_r --set languages=[en,de] --set pool_size=100 --output x.parquet`.
"""

from __future__ import annotations

import argparse
import json
import posixpath
from typing import Sequence

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.cli import JobArgumentParser, run_main
from pipeline.config import parse_overrides
from pipeline.datasets import COLLECTIONS, WORKLOADS, check_arguments, sample_queries
from pipeline.errors import InputError
from pipeline.storage import arrow_filesystem, url_to_fs
from pipeline.trec import write_qrels


def _parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(prog="python -m pipeline.datasets", description=__doc__.split("\n\n")[1])
    parser.add_argument("name", choices=sorted(COLLECTIONS) + sorted(WORKLOADS))
    parser.add_argument("--output", required=True, help="Parquet file for the pairs (path or URI)")
    parser.add_argument("--qrels-output", default=None,
                        help="qrels file (collections only): .parquet writes Parquet, anything else TREC qrels text")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (default: $SHARED_DATA or ../shared/data)")
    parser.add_argument("--max-queries", type=int, default=None, help="collections: keep this many queries, sampled with --seed")
    parser.add_argument("--n-pairs", type=int, default=None, help="workloads: exactly this many pairs (cut or tiled)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --max-queries' sample")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a keyword argument of the converter, e.g. --set year=2020 (repeatable)")
    return parser


def _write_parquet(table, uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=arrow_filesystem(fs))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    arguments = parse_overrides(args.overrides)
    function = check_arguments(args.name, arguments)
    if args.name in WORKLOADS:
        if args.qrels_output or args.max_queries is not None:
            raise InputError(f"{args.name} is a benchmark workload: it has no qrels and takes --n-pairs, "
                             "not --qrels-output or --max-queries; use a collection name for evaluation data")
        pairs, qrels = function(data_dir=args.data_dir, n_pairs=args.n_pairs, **arguments), None
    else:
        if args.n_pairs is not None:
            raise InputError(f"{args.name} is a collection: size it with --max-queries (whole queries keep their "
                             "qrels), not --n-pairs")
        pairs, qrels = function(data_dir=args.data_dir, **arguments)
        pairs, qrels = sample_queries(pairs, qrels, args.max_queries, args.seed)
    _write_parquet(pairs, args.output)
    if args.qrels_output:
        write_qrels(qrels, args.qrels_output)
    summary = {"name": args.name, "pairs": pairs.num_rows, "queries": len(pc.unique(pairs[schema.QUERY_ID])),
               "output": args.output}
    if qrels is not None:
        summary["qrels"] = qrels.num_rows
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
