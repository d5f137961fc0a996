"""The benchmark's inputs: `pipeline.datasets` workloads as (query, document) string pairs.

`long` grows documents to a target length counted with the checkpoint's own tokenizer (not the word
estimate), so its 300-1,000-token range holds for the tokenizer the contenders use; pairs are then
truncated at `max_length` (1,024) by each contender, as the issue asks.
"""

from __future__ import annotations

import os
from functools import lru_cache

from tokenizers import Tokenizer

from pipeline import schema
from pipeline.datasets import WORKLOADS
from pipeline.errors import InputError


@lru_cache(maxsize=4)
def _token_counter(directory: str):
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.no_truncation()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def workload_pairs(name: str, n_pairs: int, directory: str, data_dir: str | None = None) -> list[tuple[str, str]]:
    """The first `n_pairs` pairs of workload `name` (deterministic; see `pipeline.datasets.workloads`)."""
    if name not in WORKLOADS:
        raise InputError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    kwargs = {"count_tokens": _token_counter(directory)} if name == "long" else {}
    table = WORKLOADS[name](data_dir, n_pairs=n_pairs, **kwargs)
    return list(zip(table[schema.QUERY].to_pylist(), table[schema.DOCUMENT].to_pylist()))
