"""`python -m pipeline.datasets NAME --output pairs.parquet [--qrels-output qrels.txt|qrels.parquet]`

Writes a collection (`trec_dl`, `noveleval`, `vaswani`, `xquad_r`, `bfcl`, `spider`, `cosqa`) or a benchmark
workload (`dl19`, `long`, `multilingual`) as Parquet in the rerank job's long format. Outputs may be local paths
or object-storage URIs. Converter arguments go through `--set`, e.g.
`python -m pipeline.datasets xquad_r --set languages=[en,de] --set pool_size=100 --output x.parquet`.

`python -m pipeline.datasets fetch [FOLDER ...] [--to DIR] [--from DIR] [--mirror URL]` puts the real data
folder the converters read (by default into `.data/` in the project) on a machine that lacks it.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections.abc import Sequence

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.core.cli import JobArgumentParser, run_main
from pipeline.core.config import parse_overrides
from pipeline.core.errors import InputError
from pipeline.core.storage import arrow_filesystem, url_to_fs
from pipeline.core.trec import write_qrels
from pipeline.datasets import COLLECTIONS, WORKLOADS, check_arguments, fetch, sample_queries


def _parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog="python -m pipeline.datasets", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "name",
        choices=sorted(COLLECTIONS) + sorted(WORKLOADS),
        help="a collection or workload to write (or `fetch`: see `python -m pipeline.datasets fetch "
        "--help`)",
    )
    parser.add_argument("--output", required=True, help="Parquet file for the pairs (path or URI)")
    parser.add_argument(
        "--qrels-output",
        default=None,
        help="qrels file (collections only): .parquet writes Parquet, anything else TREC qrels text",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder (default: $SHARED_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--max-queries",
        type=int,
        default=None,
        help="collections: keep this many queries, sampled with --seed",
    )
    parser.add_argument(
        "--n-pairs",
        type=int,
        default=None,
        help="workloads: exactly this many pairs (cut or tiled)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --max-queries' sample")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument of the converter, e.g. --set year=2020 (repeatable)",
    )
    return parser


def _fetch_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog="python -m pipeline.datasets fetch",
        description=(
            "Download the real data the tests and benchmarks read from the public repositories it was copied from "
            "(each file at a fixed commit, its sha256 checked before it gets its final name), or copy it from a "
            "folder that holds it. A rerun checks what is there and fetches only what is missing or differs."
        ),
    )
    parser.add_argument(
        "folders",
        nargs="*",
        metavar="FOLDER",
        help=f"only these entries of the data folder ({', '.join(fetch.folders())}); default all",
    )
    parser.add_argument(
        "--to",
        default=str(fetch.DEFAULT_DIR),
        metavar="DIR",
        help="the data folder to fill (default: .data/ in the project, where the tests look last)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="DIR",
        help="copy from this data folder where it holds a file, download the rest "
        f"(default: ${fetch.SHARED_DATA_ENV} when it names a folder)",
    )
    parser.add_argument(
        "--mirror",
        default=None,
        metavar="URL",
        help="a copy of the data folder at an http(s):// or file:// URL: read URL/<folder>/<file> "
        "instead of each file's public source",
    )
    return parser


def fetch_main(argv: Sequence[str]) -> int:
    args = _fetch_parser().parse_args(argv)
    source = args.source
    if source is None and os.path.isdir(os.environ.get(fetch.SHARED_DATA_ENV) or ""):
        source = os.environ[fetch.SHARED_DATA_ENV]
    print(json.dumps(fetch.fetch(args.to, args.folders, source_dir=source, mirror=args.mirror)))
    return 0


def _write_parquet(table, uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=arrow_filesystem(fs))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch"]:
        return fetch_main(argv[1:])
    args = _parser().parse_args(argv)
    arguments = parse_overrides(args.overrides)
    function = check_arguments(args.name, arguments)
    if args.name in WORKLOADS:
        if args.qrels_output or args.max_queries is not None:
            raise InputError(
                f"{args.name} is a benchmark workload: it has no qrels and takes --n-pairs, "
                "not --qrels-output or --max-queries; use a collection name for evaluation data"
            )
        pairs, qrels = function(data_dir=args.data_dir, n_pairs=args.n_pairs, **arguments), None
    else:
        if args.n_pairs is not None:
            raise InputError(
                f"{args.name} is a collection: size it with --max-queries (whole queries keep their "
                "qrels), not --n-pairs"
            )
        pairs, qrels = function(data_dir=args.data_dir, **arguments)
        pairs, qrels = sample_queries(pairs, qrels, args.max_queries, args.seed)
    _write_parquet(pairs, args.output)
    if args.qrels_output:
        write_qrels(qrels, args.qrels_output)
    summary = {
        "name": args.name,
        "pairs": pairs.num_rows,
        "queries": len(pc.unique(pairs[schema.QUERY_ID])),
        "output": args.output,
    }
    if qrels is not None:
        summary["qrels"] = qrels.num_rows
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
