"""Input validation: table-level problems stop the job before any work; row-level ones reject the row.

Table level (driver, from Parquet schemas alone): a missing column, a text column that is not text, an id
column that is neither integer nor string, a grouped `candidates` column without doc_id/document fields.
Each is an `InputError` that names the column and the config key to set.

Row level (`row_reasons`, in the read stage): null or empty query, null or empty document, missing ids,
a grouped query with no candidates, text that is not UTF-8. Duplicate (query_id, doc_id) pairs are found
later, when a query's rows meet in the ranking stage. Rejected rows keep their input columns and get a `reason`.

Invalid UTF-8 (`invalid_utf8`): Parquet does not check that a string column holds UTF-8, so a file written by
a tool that skipped validation reads fine and fails only when a kernel or Python decodes the bytes. Every
string column of a row (query, document, string ids, carried string columns, a grouped candidate's string
fields) is checked after normalization; a row with invalid bytes in any of them is rejected with reason
`invalid_utf8`, the rest of its batch goes on. In `rejected/`, the offending values hold the input bytes
decoded with U+FFFD for each invalid sequence (Python's `errors="replace"`): a string column cannot hold the
raw bytes, and this keeps the row readable and findable by its other columns. Nested carried columns (lists,
structs) are not checked.

Ids may be strings or integers; when input files disagree (ints in one, strings in another) every id is
read as a string, so one query never splits into two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema as S
from pipeline.core.errors import InputError
from pipeline.rerank.config import InputConfig

# Input columns renamed on the way in, so the reranker's own `score` and `rank` do not overwrite them.
FIRST_STAGE_RENAMES = {S.SCORE: S.FIRST_STAGE_SCORE, S.RANK: S.FIRST_STAGE_RANK}
NO_CANDIDATES = "query has no candidates"
INVALID_UTF8 = "invalid_utf8"
UNREADABLE_FILE = (
    "unreadable_file"  # set by the read stage (input.on_unreadable=reject), see read.py
)
# Rows validated per call when looking for invalid UTF-8: a block that validates as a whole is clean; only a
# failing block is checked row by row.
UTF8_BLOCK = 1024


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _id_type(column: str, types: set[pa.DataType], key: str) -> pa.DataType:
    if all(pa.types.is_integer(t) for t in types):
        return pa.int64()
    if all(pa.types.is_integer(t) or _is_text(t) or pa.types.is_null(t) for t in types):
        return pa.string()
    found = ", ".join(sorted(str(t) for t in types))
    raise InputError(
        f"id column `{column}` has type {found}; ids must be integers or strings "
        f"(cast the column, or point `{key}` at another column)"
    )


@dataclass
class InputLayout:
    """What the input looks like, decided once on the driver from every file's schema."""

    grouped: bool
    config: InputConfig
    query_id_type: pa.DataType
    doc_id_type: pa.DataType
    carried: list[pa.Field] = field(default_factory=list)  # query-level extra columns, output names
    candidate_carried: list[pa.Field] = field(
        default_factory=list
    )  # grouped: extra candidate struct fields
    renamed: dict[str, str] = field(default_factory=dict)  # output name -> input name (score, rank)

    @property
    def candidates(self) -> str:
        return self.config.candidates_column

    @property
    def read_columns(self) -> list[str]:
        c = self.config
        base = [c.query_id_column, c.query_column]
        base += [c.candidates_column] if self.grouped else [c.doc_id_column, c.document_column]
        return base + [self._source_name(f.name) for f in self.carried]

    def _source_name(self, out_name: str) -> str:
        return self.renamed.get(out_name, out_name)

    @property
    def pair_schema(self) -> pa.Schema:
        """Long-format rows after normalization (before stage bookkeeping columns)."""
        return pa.schema(
            [
                pa.field(S.QUERY_ID, self.query_id_type),
                pa.field(S.QUERY, pa.string()),
                pa.field(S.DOC_ID, self.doc_id_type),
                pa.field(S.DOCUMENT, pa.string()),
                *self.carried,
                *self.candidate_carried,
            ]
        )

    @property
    def carried_names(self) -> list[str]:
        return [f.name for f in self.carried] + [f.name for f in self.candidate_carried]

    def empty_rows(self) -> pa.Table:
        schema = self.pair_schema.append(pa.field(S.SHARD, pa.int32())).append(
            pa.field(S.ROW, pa.int64())
        )
        return schema.append(pa.field(S.REASON, pa.string())).empty_table()

    @classmethod
    def from_schemas(
        cls, schemas: list[pa.Schema], config: InputConfig, files: list[str] | None = None
    ) -> InputLayout:
        """The layout of input files with these schemas (one per file, in `files` order), checked in order:
        required columns present, text columns text, ids integer or string, grouped candidates well formed,
        extra columns of one type across files and clear of the output's names. Raises InputError."""
        c = config
        grouped = _is_grouped(schemas, c)
        required = _required_columns(c, grouped)
        keys = _config_keys(c)
        _check_required_columns(schemas, required, keys, files)
        _check_text_columns(
            schemas, [c.query_column] + ([] if grouped else [c.document_column]), keys
        )
        query_id_type = _id_type(
            c.query_id_column, _column_types(schemas, c.query_id_column), keys[c.query_id_column]
        )
        if grouped:
            doc_id_type, candidate_carried = _candidate_fields(schemas, c, keys)
        else:
            doc_id_type = _id_type(
                c.doc_id_column, _column_types(schemas, c.doc_id_column), keys[c.doc_id_column]
            )
            candidate_carried = []
        carried, renamed = _carried_columns(schemas, set(required))
        _check_no_clash([f.name for f in carried] + [f.name for f in candidate_carried])
        return cls(grouped, config, query_id_type, doc_id_type, carried, candidate_carried, renamed)

    def normalize(self, table: pa.Table) -> pa.Table:
        """Raw input rows -> long-format pair rows with canonical names and types (grouped input exploded)."""
        c = self.config
        columns = {
            f.name: (
                table.column(self._source_name(f.name)).cast(f.type)
                if self._source_name(f.name) in table.column_names
                else pa.nulls(table.num_rows, f.type)
            )
            for f in self.carried
        }
        query_id = table.column(c.query_id_column).cast(self.query_id_type)
        query = table.column(c.query_column).cast(pa.string())
        if not self.grouped:
            out = {
                S.QUERY_ID: query_id,
                S.QUERY: query,
                S.DOC_ID: table.column(c.doc_id_column).cast(self.doc_id_type),
                S.DOCUMENT: table.column(c.document_column).cast(pa.string()),
                **columns,
            }
            return pa.table(out, schema=self.pair_schema.remove_metadata())
        # Grouped: one row per candidate; a query with no candidates keeps one row (rejected later), a null
        # candidate in its place. Arrow kernels only: Python objects would decode (and choke on) every text.
        lists = table.column(c.candidates_column).combine_chunks()
        struct_type = lists.type.value_type
        lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
        empty_rows = np.flatnonzero(lengths == 0)
        values = pc.list_flatten(lists)
        parents = np.concatenate(
            [pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), empty_rows]
        )
        order = np.argsort(parents, kind="stable")  # back to row order, candidates in list order
        take = np.concatenate([np.arange(len(values)), np.full(len(empty_rows), -1)])[order]
        flat = values.take(pa.array(take, mask=take < 0))
        parent = pa.array(parents[order])
        empty = pa.array(lengths == 0)
        out = {
            S.QUERY_ID: query_id.take(parent),
            S.QUERY: query.take(parent),
            S.DOC_ID: pc.struct_field(flat, c.doc_id_column).cast(self.doc_id_type),
            S.DOCUMENT: pc.struct_field(flat, c.document_column).cast(pa.string()),
        }
        for f in self.carried:
            out[f.name] = columns[f.name].take(parent)
        inverse = {v: k for k, v in FIRST_STAGE_RENAMES.items()}
        for f in self.candidate_carried:
            src = (
                f.name if struct_type.get_field_index(f.name) >= 0 else inverse.get(f.name, f.name)
            )
            out[f.name] = (
                pc.struct_field(flat, src).cast(f.type)
                if struct_type.get_field_index(src) >= 0
                else pa.nulls(len(flat), f.type)
            )
        result = pa.table(out, schema=self.pair_schema.remove_metadata())
        no_candidates = empty.take(parent)
        return result.append_column(S.NO_CANDIDATES_FLAG, no_candidates)


def _is_grouped(schemas: list[pa.Schema], c: InputConfig) -> bool:
    """Grouped input (a candidates list per query): as configured, or, for `auto`, when a file has the column."""
    names = set().union(*(s.names for s in schemas))
    return c.format == "grouped" or (c.format == "auto" and c.candidates_column in names)


def _required_columns(c: InputConfig, grouped: bool) -> list[str]:
    return [c.query_id_column, c.query_column] + (
        [c.candidates_column] if grouped else [c.doc_id_column, c.document_column]
    )


def _config_keys(c: InputConfig) -> dict[str, str]:
    """{input column: the config key that names it}, for error messages that say what to set."""
    return {
        c.query_id_column: "input.query_id_column",
        c.query_column: "input.query_column",
        c.doc_id_column: "input.doc_id_column",
        c.document_column: "input.document_column",
        c.candidates_column: "input.candidates_column",
    }


def _column_types(schemas: list[pa.Schema], column: str) -> set[pa.DataType]:
    """The types `column` has across the files that have it."""
    return {s.field(column).type for s in schemas if column in s.names}


def _check_required_columns(
    schemas: list[pa.Schema], required: list[str], keys: dict[str, str], files: list[str] | None
) -> None:
    """Each file has every required column; the first file lacking some names them all."""
    for i, s in enumerate(schemas):
        # Every missing column in one line: a user fixing them one run at a time reruns once per column.
        missing = [col for col in required if col not in s.names]
        if missing:
            where = files[i] if files else f"input file {i + 1}"
            plural = len(missing) > 1
            raise InputError(
                f"column{'s' if plural else ''} {', '.join(f'`{col}`' for col in missing)} not "
                f"found in {where}; columns are {s.names}; set "
                f"{', '.join(f'`{keys[col]}`' for col in missing)} to the right "
                f"name{'s' if plural else ''}"
            )


def _check_text_columns(schemas: list[pa.Schema], columns: list[str], keys: dict[str, str]) -> None:
    """The query (and, long format, document) columns are text in every file (or all null)."""
    for col in columns:
        bad = [t for t in _column_types(schemas, col) if not (_is_text(t) or pa.types.is_null(t))]
        if bad:
            raise InputError(
                f"text column `{col}` has type {bad[0]}, not string; cast it to string "
                f"or set `{keys[col]}` to the text column"
            )


def _candidate_fields(
    schemas: list[pa.Schema], c: InputConfig, keys: dict[str, str]
) -> tuple[pa.DataType, list[pa.Field]]:
    """Grouped input: (doc_id type, the candidate structs' other fields under their output names).

    The candidates column is a list of structs with doc_id and document fields in every file, document text.
    """
    doc_id_types, doc_types, extra = set(), set(), {}
    for t in _column_types(schemas, c.candidates_column):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(
            t.value_type
        ):
            raise InputError(
                f"`{c.candidates_column}` has type {t}; grouped input needs "
                "list<struct<doc_id, document, ...>>"
            )
        struct = t.value_type
        for need in (c.doc_id_column, c.document_column):
            if struct.get_field_index(need) < 0:
                raise InputError(
                    f"`{c.candidates_column}` structs lack the field `{need}`; fields are "
                    f"{[f.name for f in struct]}"
                )
        doc_id_types.add(struct.field(c.doc_id_column).type)
        doc_types.add(struct.field(c.document_column).type)
        for f in struct:
            if f.name not in (c.doc_id_column, c.document_column):
                extra[f.name] = f
    if any(not (_is_text(t) or pa.types.is_null(t)) for t in doc_types):
        raise InputError(
            f"candidate field `{c.document_column}` is not text ({doc_types}); cast it to string"
        )
    doc_id_type = _id_type(c.doc_id_column, doc_id_types, keys[c.doc_id_column])
    return doc_id_type, [pa.field(FIRST_STAGE_RENAMES.get(n, n), f.type) for n, f in extra.items()]


def _carried_columns(
    schemas: list[pa.Schema], required: set[str]
) -> tuple[list[pa.Field], dict[str, str]]:
    """(the other columns of any file, each of one type across files, under its output name;
    {output name: input name} of those renamed to first_stage_*)."""
    others: dict[str, list[pa.DataType]] = {}
    for s in schemas:
        for f in s:
            if f.name not in required:
                others.setdefault(f.name, []).append(f.type)
    carried, renamed = [], {}
    for name, ts in others.items():
        try:
            unified = (
                pa.unify_schemas(
                    [pa.schema([pa.field(name, t)]) for t in ts], promote_options="permissive"
                )
                .field(name)
                .type
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise InputError(
                f"column `{name}` has different types across input files ({sorted(map(str, ts))}); "
                "make them agree"
            ) from None
        out = FIRST_STAGE_RENAMES.get(name, name)
        if out != name:
            if out in others:
                out = name  # the input already has first_stage_*: keep both under their own names
            else:
                renamed[out] = name
        carried.append(pa.field(out, unified))
    return carried, renamed


def _check_no_clash(names_out: list[str]) -> None:
    """Carried columns may not take an output column's name or a leading underscore (the job's own)."""
    reserved = {S.SCORE, S.RANK, S.REASON, S.QUERY_ID, S.DOC_ID, S.QUERY, S.DOCUMENT}
    clash = [n for n in names_out if n in reserved or n.startswith("_")]
    if clash:
        raise InputError(f"input column(s) {clash} collide with output columns; rename them")


def _binary(t: pa.DataType) -> pa.DataType:
    return (
        pa.large_binary()
        if pa.types.is_large_string(t)
        else pa.binary_view()
        if pa.types.is_string_view(t)
        else pa.binary()
    )


def _is_utf8(values: pa.Array) -> bool:
    try:
        values.validate(full=True)  # full validation checks every string's UTF-8
    except pa.ArrowInvalid:
        return False
    return True


def invalid_utf8(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) bool: the rows of a string column whose bytes are not valid UTF-8 (null rows are valid).

    pyarrow has no per-row UTF-8 check (no `utf8_is_valid` kernel), so blocks of UTF8_BLOCK rows are validated
    whole and only a failing block row by row: clean data costs one pass over its bytes.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = [np.zeros(len(chunk), dtype=bool) for chunk in chunks]
    for chunk, bad in zip(chunks, out):
        if _is_utf8(chunk):
            continue
        for start in range(0, len(chunk), UTF8_BLOCK):
            block = chunk.slice(start, UTF8_BLOCK)
            if not _is_utf8(block):
                bad[start : start + len(block)] = [
                    not _is_utf8(block.slice(i, 1)) for i in range(len(block))
                ]
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def repair_utf8(table: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """(table with every invalid UTF-8 value of its top-level string columns decoded with U+FFFD replacement
    characters, (n,) bool mask of the rows that had one): the rows to reject as `invalid_utf8`."""
    rows = np.zeros(table.num_rows, dtype=bool)
    for i, f in enumerate(table.schema):
        if not _is_text(f.type):
            continue
        bad = invalid_utf8(table.column(i))
        if not bad.any():
            continue
        rows |= bad
        column = table.column(i).combine_chunks()
        index = pa.array(np.flatnonzero(bad))
        raw = column.take(index).view(_binary(f.type)).to_pylist()
        work = (
            pa.large_string() if pa.types.is_string_view(f.type) else f.type
        )  # replace_with_mask lacks views
        fixed = pa.array([b.decode("utf-8", errors="replace") for b in raw], work)
        repaired = pc.replace_with_mask(column.cast(work), pa.array(bad), fixed).cast(f.type)
        table = table.set_column(i, f, repaired)
    return table, rows


def row_reasons(table: pa.Table, invalid_utf8_rows: np.ndarray | None = None) -> pa.Array:
    """Why each row cannot be scored (null where it can), first failing check wins. The texts must be valid
    UTF-8 by now (`repair_utf8`); `invalid_utf8_rows` is its mask."""
    n = table.num_rows
    no_candidates = (
        table.column(S.NO_CANDIDATES_FLAG)
        if S.NO_CANDIDATES_FLAG in table.column_names
        else pa.array(np.zeros(n, dtype=bool))
    )
    bad_utf8 = pa.array(np.zeros(n, dtype=bool) if invalid_utf8_rows is None else invalid_utf8_rows)
    query, document = table.column(S.QUERY), table.column(S.DOCUMENT)
    checks = [
        (no_candidates, NO_CANDIDATES),
        (bad_utf8, INVALID_UTF8),
        (pc.is_null(table.column(S.QUERY_ID)), "missing query_id"),
        (pc.is_null(table.column(S.DOC_ID)), "missing doc_id"),
        (pc.is_null(query), "query is null"),
        (
            pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(query, "x"))), 0),
            "empty query",
        ),
        (pc.is_null(document), "document is null"),
        (
            pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(document, "x"))), 0),
            "empty document",
        ),
    ]
    reason = pa.nulls(n, pa.string())
    for mask, text in reversed(checks):
        reason = pc.if_else(pc.fill_null(mask, False), pa.scalar(text), reason)
    return reason.combine_chunks() if isinstance(reason, pa.ChunkedArray) else reason
