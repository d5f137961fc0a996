"""Spider (dev) as schema retrieval: rank the tables of a question's database for a text-to-SQL step.

Source (`<data_dir>/spider/`): `dev.json` (1,034 questions: `db_id`, `question`, gold `query` and its parse
`sql`) and `tables.json` (166 schemas: `table_names_original`, `column_names_original` as
[table index, name], `column_types`, `primary_keys` and `foreign_keys` as column indices). The dev questions
use 20 databases of 2-11 tables.

Document: one table rendered as `CREATE TABLE` text (the form the model's release post uses in its text-to-SQL examples), with its
columns, primary key and foreign keys. doc_id: `<db_id>.<table name>`.
Gold tables: every table in a FROM clause of the gold SQL, subqueries and INTERSECT/UNION/EXCEPT parts
included (their parses nest `sql` dicts, so the walk is recursive). qrels: 1 for gold tables, 0 for the
other tables of the database (all are judged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.datasets.tables import collection_dir, pairs_table, qrels_table

DB_ID = "db_id"
# Spider's column types, written as the SQL types a schema dump would show.
SQL_TYPES = {
    "text": "TEXT",
    "number": "NUMERIC",
    "time": "DATETIME",
    "boolean": "BOOLEAN",
    "others": "TEXT",
}


def create_table_statements(db: dict) -> list[str]:
    """One `CREATE TABLE name (col TYPE, ..., PRIMARY KEY (...), FOREIGN KEY (...) REFERENCES t(c));` per table."""
    tables = db["table_names_original"]
    columns = db["column_names_original"]  # index 0 is (-1, "*")
    # Composite primary keys come as a list inside the list in newer releases; flatten either form.
    primary = {c for key in db["primary_keys"] for c in (key if isinstance(key, list) else [key])}
    statements = []
    for t, table in enumerate(tables):
        parts, keys = [], []
        for c, (owner, name) in enumerate(columns):
            if owner != t:
                continue
            parts.append(f"{name} {SQL_TYPES.get(db['column_types'][c], 'TEXT')}")
            if c in primary:
                keys.append(name)
        if keys:
            parts.append(f"PRIMARY KEY ({', '.join(keys)})")
        for source, target in db["foreign_keys"]:
            if columns[source][0] == t:
                parts.append(
                    f"FOREIGN KEY ({columns[source][1]}) REFERENCES "
                    f"{tables[columns[target][0]]}({columns[target][1]})"
                )
        statements.append(f"CREATE TABLE {table} ({', '.join(parts)});")
    return statements


def _table_units(sql: Any) -> Iterator[int]:
    """Table indices of every `["table_unit", i]` anywhere in a Spider SQL parse."""
    if isinstance(sql, dict):
        for key, value in sql.items():
            if key == "table_units":
                for kind, unit in value:
                    if kind == "table_unit":
                        yield unit
                    else:  # ["sql", {...}]: a subquery in FROM
                        yield from _table_units(unit)
            else:
                yield from _table_units(value)
    elif isinstance(sql, list):
        for item in sql:
            yield from _table_units(item)


def gold_tables(sql: dict) -> set[int]:
    return set(_table_units(sql))


def spider(data_dir: str | os.PathLike | None = None) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels): each dev question against every table of its database (1,034 questions, 4,677
    pairs). query_id: `dev-<index in dev.json>`. Extra column: `db_id`."""
    folder = collection_dir(data_dir, "spider", ["dev.json", "tables.json"])
    with open(folder / "dev.json", encoding="utf-8") as f:
        questions = json.load(f)
    with open(folder / "tables.json", encoding="utf-8") as f:
        databases = {db["db_id"]: db for db in json.load(f)}
    rendered: dict[str, list[str]] = {}
    columns: dict[str, list] = {
        name: [] for name in (schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT, DB_ID)
    }
    qrels: list[tuple[str, str, int]] = []
    for index, question in enumerate(questions):
        db_id, query_id = question["db_id"], f"dev-{index}"
        if db_id not in databases:
            raise InputError(
                f"spider: question {index} uses database {db_id!r}, which tables.json lacks"
            )
        db = databases[db_id]
        if db_id not in rendered:
            rendered[db_id] = create_table_statements(db)
        gold = gold_tables(question["sql"])
        if not gold:
            raise InputError(
                f"spider: the gold SQL of question {index} names no table: {question['query']!r}"
            )
        for t, table in enumerate(db["table_names_original"]):
            doc_id = f"{db_id}.{table}"
            columns[schema.QUERY_ID].append(query_id)
            columns[schema.QUERY].append(question["question"])
            columns[schema.DOC_ID].append(doc_id)
            columns[schema.DOCUMENT].append(rendered[db_id][t])
            columns[DB_ID].append(db_id)
            qrels.append((query_id, doc_id, int(t in gold)))
    return pairs_table(columns, {DB_ID: pa.string()}), qrels_table(*zip(*qrels))
