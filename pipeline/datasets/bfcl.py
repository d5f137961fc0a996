"""BFCL (Berkeley Function-Calling Leaderboard) as tool retrieval: rank a question's candidate functions.

Source (`<data_dir>/bfcl/`): `BFCL_v4_<split>.json` (JSON lines: `id`, `question` (a list of turns, each a list
of `{role, content}` messages), `function` (2-37 candidate schemas with `name`, `description`, `parameters`))
and `answer_BFCL_v4_<split>.json` (JSON lines: `id`, `ground_truth`: a list of `{function name: arguments}`).
Splits: `multiple` (200 questions), `live_multiple` (1,053).

Query: the user messages of the first turn, joined by a newline (the system prompts of some live questions
describe the agent, not the request). Document: the candidate's schema as JSON text, the form tool-aware
rerankers are trained on. doc_id: the function name (unique among a question's candidates).
qrels: label 1 for each function in `ground_truth`, label 0 for every other candidate (all are judged).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.datasets.tables import collection_dir, pairs_table, qrels_table

SPLITS = ("multiple", "live_multiple")
SPLIT = "split"


def _read_json_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def bfcl(
    data_dir: str | os.PathLike | None = None, splits: Sequence[str] = SPLITS
) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels) for the questions of `splits`, in file order, candidates in schema order.
    Extra column: `split`. Both splits: 1,253 questions, 4,735 pairs."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise InputError(f"bfcl splits {list(splits)} must be a non-empty subset of {list(SPLITS)}")
    files = [name for s in splits for name in (f"BFCL_v4_{s}.json", f"answer_BFCL_v4_{s}.json")]
    folder = collection_dir(data_dir, "bfcl", files)
    columns: dict[str, list] = {
        name: [] for name in (schema.QUERY_ID, schema.QUERY, schema.DOC_ID, schema.DOCUMENT, SPLIT)
    }
    qrels: list[tuple[str, str, int]] = []
    for split in splits:
        answers = {
            a["id"]: a["ground_truth"]
            for a in _read_json_lines(folder / f"answer_BFCL_v4_{split}.json")
        }
        for entry in _read_json_lines(folder / f"BFCL_v4_{split}.json"):
            query_id = entry["id"]
            if query_id not in answers:
                raise InputError(
                    f"bfcl {split}: question {query_id} has no ground truth in answer_BFCL_v4_{split}.json"
                )
            query = "\n".join(m["content"] for m in entry["question"][0] if m["role"] == "user")
            gold = {name for call in answers[query_id] for name in call}
            names = [function["name"] for function in entry["function"]]
            if not gold <= set(names):
                raise InputError(
                    f"bfcl {split}: question {query_id}'s gold functions {sorted(gold - set(names))} "
                    "are not among its candidates"
                )
            for function in entry["function"]:
                columns[schema.QUERY_ID].append(query_id)
                columns[schema.QUERY].append(query)
                columns[schema.DOC_ID].append(function["name"])
                columns[schema.DOCUMENT].append(json.dumps(function, ensure_ascii=False))
                columns[SPLIT].append(split)
                qrels.append((query_id, function["name"], int(function["name"] in gold)))
    return pairs_table(columns, {SPLIT: pa.string()}), qrels_table(*zip(*qrels))
