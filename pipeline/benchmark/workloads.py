"""The benchmark's inputs: `pipeline.datasets` workloads as (query, document) string pairs.

`long` grows documents to a target length counted with the checkpoint's own tokenizer (not the word
estimate), so its 300-1,000-token range holds for the tokenizer the contenders use; pairs are then
truncated at `max_length` (1,024, the model's limit) by each contender.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from tokenizers import Tokenizer

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.datasets import WORKLOADS


@lru_cache(maxsize=4)
def _token_counter(directory: str):
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.no_truncation()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


@lru_cache(maxsize=4)
def _pair_tokenizer(directory: str):
    from pipeline.model.tokenization import PairTokenizer

    return PairTokenizer.from_dir(directory, return_token_types=False)


def pair_token_counts(directory: str, pairs: list[tuple[str, str]], max_length: int) -> np.ndarray:
    """(n,) int64: tokens of each pair as every contender sees it (the checkpoint's tokenizer, truncated at
    `max_length`; our PairTokenizer is tested equal to transformers' on these files)."""
    ids, _ = _pair_tokenizer(directory).encode_pairs(
        [q for q, _ in pairs], [d for _, d in pairs], max_length
    )
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def workload_pairs(
    name: str, n_pairs: int, directory: str, data_dir: str | None = None
) -> list[tuple[str, str]]:
    """The first `n_pairs` pairs of workload `name` (deterministic; see `pipeline.datasets.workloads`)."""
    if name not in WORKLOADS:
        raise InputError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    kwargs = {"count_tokens": _token_counter(directory)} if name == "long" else {}
    table = WORKLOADS[name](data_dir, n_pairs=n_pairs, **kwargs)
    return list(zip(table[schema.QUERY].to_pylist(), table[schema.DOCUMENT].to_pylist()))
