"""TREC qrels and run files <-> Arrow tables, plus their Parquet equivalents.

Qrels (text):  `qid iter docno label` per line (the iter field is ignored, `0` or `Q0`).
  -> table (query_id: string, doc_id: string, label: int32)
Run (text):    `qid Q0 docno rank score tag` per line.
  -> table (query_id: string, doc_id: string, rank: int32, score: float64, tag: string)

Parsing follows trec_eval's readers (usnistgov/trec_eval, get_qrels.c / get_trec_results.c): fields are
separated by any whitespace, blank lines and lines starting with `#` are skipped, fields after a run's tag
are ignored (trec_eval's own test file `results.trunc` has such trailing text). Ids are always strings, so
`0012` and `12` stay different documents, as they are for trec_eval. A line that cannot be read is an
`InputError` naming the file and the line number. Duplicate (query_id, doc_id) pairs are errors too,
because trec_eval refuses them ("duplicate docs") and silently keeping one would change the numbers.

A `.parquet` file (or any file starting with Parquet's `PAR1` magic) is read as a table with the same
column names instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import InputError
from pipeline.core.ranking import rank_by_score
from pipeline.core.schema import DOC_ID, LABEL, QUERY_ID, RANK, SCORE
from pipeline.core.storage import url_to_fs

TAG = "tag"

QRELS_SCHEMA = pa.schema([(QUERY_ID, pa.string()), (DOC_ID, pa.string()), (LABEL, pa.int32())])
RUN_SCHEMA = pa.schema(
    [
        (QUERY_ID, pa.string()),
        (DOC_ID, pa.string()),
        (RANK, pa.int32()),
        (SCORE, pa.float64()),
        (TAG, pa.string()),
    ]
)

_PARQUET_MAGIC = b"PAR1"


def is_parquet(uri: str, storage_options: dict | None = None) -> bool:
    """True for a `.parquet` path, a directory (a Parquet dataset), or a file that starts with `PAR1`."""
    fs, path = url_to_fs(uri, storage_options)
    if path.endswith(".parquet") or fs.isdir(path):
        return True
    try:
        with fs.open(path, "rb") as f:
            return f.read(4) == _PARQUET_MAGIC
    except FileNotFoundError:
        raise InputError(f"{uri!r} not found") from None


def _lines(uri: str, storage_options: dict | None) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) for every non-blank, non-comment line."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        f = fs.open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{uri!r} not found") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                fields = line.split()
                if fields and not fields[0].startswith("#"):
                    yield number, fields
        except UnicodeDecodeError:
            # Decoding runs ahead in blocks, so the line number would be a guess: name the file only.
            raise InputError(f"{uri!r} is not UTF-8 text; is it a binary file?") from None


def _read_parquet(
    uri: str,
    storage_options: dict | None,
    required: dict[str, pa.DataType],
    what: str,
    optional: dict[str, pa.DataType] | None = None,
) -> pa.Table:
    """The `required` (and present `optional`) columns of a Parquet file or dataset, cast to their types."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise InputError(f"{uri!r} not found") from None
    except pa.ArrowInvalid as e:
        raise InputError(f"{what} {uri!r} is not readable Parquet: {e}") from None
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise InputError(
            f"{what} {uri!r} lacks column(s) {missing}; columns are {table.column_names}; "
            f"a {what} table needs {list(required)}"
        )
    wanted = {**required, **{k: v for k, v in (optional or {}).items() if k in table.column_names}}
    columns = {}
    for name, dtype in wanted.items():
        try:
            columns[name] = table.column(name).cast(dtype)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(
                f"{what} {uri!r}: column `{name}` cannot be read as {dtype}: {e}"
            ) from None
    return pa.table(columns)


def _check_unique(table: pa.Table, uri: str, what: str) -> None:
    counts = table.group_by([QUERY_ID, DOC_ID]).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts["count_all"], 1))
    if dup.num_rows:
        q, d = dup[QUERY_ID][0].as_py(), dup[DOC_ID][0].as_py()
        raise InputError(
            f"{what} {uri!r} lists document {d!r} for query {q!r} more than once "
            f"({dup.num_rows} duplicated pair(s)); trec_eval refuses duplicates, remove them"
        )


def read_qrels(uri: str, storage_options: dict | None = None) -> pa.Table:
    """TREC qrels text or Parquet -> (query_id, doc_id, label: int32). Negative labels mean 'unjudged'."""
    if is_parquet(uri, storage_options):
        table = _read_parquet(uri, storage_options, {f.name: f.type for f in QRELS_SCHEMA}, "qrels")
    else:
        qids, docs, labels = [], [], []
        for number, fields in _lines(uri, storage_options):
            if len(fields) != 4:
                raise InputError(
                    f"qrels {uri!r} line {number}: expected 4 fields `qid iter docno label`, got {len(fields)}"
                )
            try:
                labels.append(int(fields[3]))
            except ValueError:
                raise InputError(
                    f"qrels {uri!r} line {number}: label {fields[3]!r} is not an integer"
                ) from None
            qids.append(fields[0])
            docs.append(fields[2])
        table = pa.table([qids, docs, pa.array(labels, pa.int32())], schema=QRELS_SCHEMA)
    if table.num_rows == 0:
        raise InputError(f"qrels {uri!r} holds no judgements")
    _check_unique(table, uri, "qrels")
    return table


def read_run(uri: str, storage_options: dict | None = None) -> pa.Table:
    """TREC run text or Parquet -> (query_id, doc_id, rank: int32, score: float64, tag: string).

    A Parquet run needs query_id, doc_id and score; rank and tag are null when absent (trec_eval ignores
    the rank field anyway: it ranks by score, see `pipeline.core.ranking`).
    """
    if is_parquet(uri, storage_options):
        table = _read_parquet(
            uri,
            storage_options,
            {QUERY_ID: pa.string(), DOC_ID: pa.string(), SCORE: pa.float64()},
            "run",
            optional={RANK: pa.int32(), TAG: pa.string()},
        )
        for name in (RANK, TAG):
            if name not in table.column_names:
                table = table.append_column(
                    name, pa.nulls(table.num_rows, RUN_SCHEMA.field(name).type)
                )
        table = table.select(RUN_SCHEMA.names)
    else:
        qids, docs, ranks, scores, tags = [], [], [], [], []
        for number, fields in _lines(uri, storage_options):
            if len(fields) < 6:
                raise InputError(
                    f"run {uri!r} line {number}: expected 6 fields `qid Q0 docno rank score tag`, got {len(fields)}"
                )
            try:
                rank = int(fields[3])
            except ValueError:
                raise InputError(
                    f"run {uri!r} line {number}: rank {fields[3]!r} is not an integer"
                ) from None
            try:
                score = float(fields[4])
            except ValueError:
                raise InputError(
                    f"run {uri!r} line {number}: score {fields[4]!r} is not a number"
                ) from None
            qids.append(fields[0])
            docs.append(fields[2])
            ranks.append(rank)
            scores.append(score)
            tags.append(fields[5])
        table = pa.table(
            [qids, docs, pa.array(ranks, pa.int32()), pa.array(scores, pa.float64()), tags],
            schema=RUN_SCHEMA,
        )
    if table.num_rows == 0:
        raise InputError(f"run {uri!r} holds no results")
    _check_unique(table, uri, "run")
    return table


def _write_lines(uri: str, storage_options: dict | None, lines: Iterable[str]) -> None:
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)


def write_qrels(table: pa.Table, uri: str, storage_options: dict | None = None) -> None:
    """(query_id, doc_id, label) -> TREC qrels text (`.parquet` -> Parquet)."""
    if uri.endswith(".parquet"):
        fs, path = url_to_fs(uri, storage_options)
        pq.write_table(table.select([QUERY_ID, DOC_ID, LABEL]), path, filesystem=fs)
        return
    rows = zip(*(table[c].to_pylist() for c in (QUERY_ID, DOC_ID, LABEL)))
    _write_lines(uri, storage_options, (f"{q} 0 {d} {label}\n" for q, d, label in rows))


def write_run(
    table: pa.Table, uri: str, storage_options: dict | None = None, tag: str = "run"
) -> None:
    """(query_id, doc_id, score[, rank][, tag]) -> TREC run text (`.parquet` -> Parquet).

    Rows are written per query in trec_eval's order (score descending, doc_id descending) with ranks
    1..n, so the file reads the same to trec_eval and to a human.
    """
    if TAG not in table.column_names:
        table = table.append_column(TAG, pa.array([tag] * table.num_rows, pa.string()))
    ranked = rank_by_score(table.select([QUERY_ID, DOC_ID, SCORE, TAG]))
    if uri.endswith(".parquet"):
        fs, path = url_to_fs(uri, storage_options)
        pq.write_table(ranked.select(RUN_SCHEMA.names).cast(RUN_SCHEMA), path, filesystem=fs)
        return
    rows = zip(*(ranked[c].to_pylist() for c in (QUERY_ID, DOC_ID, RANK, SCORE, TAG)))
    _write_lines(uri, storage_options, (f"{q} Q0 {d} {r} {s!r} {t}\n" for q, d, r, s, t in rows))
