"""The benchmark's inputs: `pipeline.datasets` workloads as (query, document) string pairs.

`long` grows documents to a target length counted with the checkpoint's own tokenizer (not the word
estimate), so its 300-1,000-token range holds for the tokenizer the contenders use; pairs are then
truncated at `max_length` (1,024, the model's limit) by each contender.

Decoder rerankers (Qwen3-Reranker) read each pair through their prompt template (`pipeline.model.templates`).
The engine and the Ray job apply it themselves; sentence-transformers and transformers are given the pairs
formatted as the seq-cls conversions' model cards do (`prompt_pairs`): the prompt split at the line where
the document starts,

    (prefix + "<Instruct>: {instruction}\n<Query>: {query}\n",  "<Document>: {document}" + suffix)

which their tokenizers encode as the two texts' tokens one after the other: the engine's tokens exactly
(prefix, body and suffix tokenized alone; a line break ends a pre-token in the byte-level BPE, so
splitting there changes no token). Truncation does not match: the engine cuts the document and keeps the
suffix, the libraries cut the end of the pair. `untruncated_token_counts` is what the runner checks
max_length against for decoders.
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
def prompt_template(directory: str):
    """The prompt template of a decoder reranker's checkpoint (`templates.PromptTemplate`), None for a
    cross-encoder."""
    from pipeline.model.checkpoint import read_config
    from pipeline.model.decoder_config import DECODER_LAYOUTS
    from pipeline.model.templates import resolve_template

    layout = read_config(directory).get("model_type")
    if layout not in DECODER_LAYOUTS:
        return None
    return resolve_template(None, directory, directory, layout)


@lru_cache(maxsize=4)
def _pair_tokenizer(directory: str):
    from pipeline.model.tokenization import PairTokenizer

    return PairTokenizer.from_dir(
        directory, return_token_types=False, prompt=prompt_template(directory)
    )


def prompt_pairs(template, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`pairs` as a library is given them for a decoder reranker with `template` (the template's default
    instruction): (prompt up to the document's line, the rest of the prompt). The split is at the last line
    break before the document field (the model cards' `format_queries` / `format_document`); a template
    without one there is split where the document field starts."""
    head, _ = template.body.split("{document}")
    head = template.prefix + head.replace("{instruction}", template.default_instruction)
    cut = head.rfind("\n") + 1 or len(head)
    first, second = head[:cut], head[cut:]
    return [
        (first.replace("{query}", q), second.replace("{query}", q) + d + template.suffix)
        for q, d in pairs
    ]


def pair_token_counts(directory: str, pairs: list[tuple[str, str]], max_length: int) -> np.ndarray:
    """(n,) int64: tokens of each pair as every contender sees it (the checkpoint's tokenizer, truncated at
    `max_length`; our PairTokenizer is tested equal to transformers' on these files)."""
    ids, _ = _pair_tokenizer(directory).encode_pairs(
        [q for q, _ in pairs], [d for _, d in pairs], max_length
    )
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def untruncated_token_counts(directory: str, pairs: list[tuple[str, str]]) -> np.ndarray:
    """(n,) int64: tokens of each pair with no truncation at all (the whole prompt for a decoder)."""
    # A limit no pair reaches: no token and, through the character cap, no character is cut.
    longest = max((len(q) + len(d) for q, d in pairs), default=0)
    return pair_token_counts(directory, pairs, 4 * longest + 1024)


def workload_pairs(
    name: str, n_pairs: int, directory: str, data_dir: str | None = None
) -> list[tuple[str, str]]:
    """The first `n_pairs` pairs of workload `name` (deterministic; see `pipeline.datasets.workloads`)."""
    if name not in WORKLOADS:
        raise InputError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    kwargs = {"count_tokens": _token_counter(directory)} if name == "long" else {}
    table = WORKLOADS[name](data_dir, n_pairs=n_pairs, **kwargs)
    return list(zip(table[schema.QUERY].to_pylist(), table[schema.DOCUMENT].to_pylist()))
