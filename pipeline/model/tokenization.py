"""Pair tokenization with jina-reranker-v2's semantics, on the checkpoint's own fast tokenizer.

- A pair is encoded as the tokenizer's post-processor lays it out: `<s> q </s></s> d </s>` for XLM-RoBERTa,
  `[CLS] q [SEP] d [SEP]` (token types 0/1) for BERT.
- Pairs longer than `max_length` are cut with `longest_first` truncation (what jina's `compute_score`
  gets from `tokenizer(..., truncation=True)`); the Rust `tokenizers` library does it, exactly as the
  transformers fast tokenizer does (tested).
- Before tokenizing, texts are cut to `max_length * max_chars_per_token` characters, so a 10 MB document
  costs no more than its window.
- `windows` reproduces jina's `rerank` chunking (reranker_tokenize_preproc in the model's remote code):
  query capped at `max_query_length` tokens, long documents split into windows of
  `max_length - query - specials` tokens overlapping by `min(overlap, window // 4)`, the last window
  right-aligned and full.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.model.templates import PromptEncoder, PromptTemplate, resolve_template

# No piece of the XLM-R sentencepiece or BERT WordPiece vocabularies spans more characters than this,
# so capping a text at max_length * 32 characters never changes its first max_length tokens.
DEFAULT_MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class PairTemplate:
    """Where the special tokens go around a (query, document) pair, read off the post-processor."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    middle_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    query_type: int
    document_type: int
    single_specials: int  # specials around a lone query (<s> q </s> -> 2)

    @property
    def pair_specials(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> PairTemplate:
        pair = tokenizer.encode("a", "b", add_special_tokens=True)
        seq = pair.sequence_ids
        first_a, last_a = seq.index(0), len(seq) - 1 - seq[::-1].index(0)
        first_b, last_b = seq.index(1), len(seq) - 1 - seq[::-1].index(1)
        ids, types = pair.ids, pair.type_ids
        single_with = tokenizer.encode("a", add_special_tokens=True)
        single_without = tokenizer.encode("a", add_special_tokens=False)
        return cls(
            prefix=tuple(ids[:first_a]),
            middle=tuple(ids[last_a + 1 : first_b]),
            suffix=tuple(ids[last_b + 1 :]),
            prefix_types=tuple(types[:first_a]),
            middle_types=tuple(types[last_a + 1 : first_b]),
            suffix_types=tuple(types[last_b + 1 :]),
            query_type=types[first_a],
            document_type=types[first_b],
            single_specials=len(single_with.ids) - len(single_without.ids),
        )

    def build(
        self, query_ids: Sequence[int], document_ids: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """prefix + query + middle + document + suffix, and the matching token types."""
        ids = np.concatenate(
            [self.prefix, query_ids, self.middle, document_ids, self.suffix]
        ).astype(np.int32)
        types = np.concatenate(
            [
                self.prefix_types,
                np.full(len(query_ids), self.query_type),
                self.middle_types,
                np.full(len(document_ids), self.document_type),
                self.suffix_types,
            ]
        ).astype(np.int8)
        return ids, types


def load_tokenizer(directory: str) -> Tokenizer:
    """The checkpoint's fast tokenizer: `tokenizer.json`, or one converted by transformers (no remote code)."""
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            directory, use_fast=True, trust_remote_code=False
        ).backend_tokenizer
    except Exception as e:  # transformers raises many types here; all mean the same to the user
        raise CheckpointError(
            f"no usable tokenizer in {directory!r}: tokenizer.json is missing and transformers could not "
            f"build a fast tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "copy the model's tokenizer.json into the checkpoint directory"
        ) from None


class PairTokenizer:
    """Encodes (query, document) pairs into unpadded token id arrays."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        return_token_types: bool,
        max_chars_per_token: int = DEFAULT_MAX_CHARS_PER_TOKEN,
        prompt: PromptTemplate | None = None,
        instruction: str | None = None,
    ):
        """prompt: a decoder reranker's template (`templates.py`); pairs are then encoded through it, with
        `instruction` (None: the template's default)."""
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.template = PairTemplate.from_tokenizer(tokenizer)
        self.prompt = None if prompt is None else PromptEncoder(tokenizer, prompt, instruction)
        self.return_token_types = return_token_types
        self.max_chars_per_token = max_chars_per_token
        self._truncation: int | None = None

    @classmethod
    def from_dir(cls, directory: str, *, return_token_types: bool, **kwargs) -> PairTokenizer:
        return cls(load_tokenizer(directory), return_token_types=return_token_types, **kwargs)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def _set_truncation(self, max_length: int | None) -> None:
        if max_length != self._truncation:
            if max_length is None:
                self.tokenizer.no_truncation()
            else:
                self.tokenizer.enable_truncation(max_length, strategy="longest_first")
            self._truncation = max_length

    def _cap(self, text: str, max_length: int) -> str:
        limit = max_length * self.max_chars_per_token
        return text if len(text) <= limit else text[:limit]

    def encode_pairs(
        self, queries: Sequence[str], documents: Sequence[str], max_length: int
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Token ids (and token types for BERT) per pair, each (seqlen,) with seqlen <= max_length."""
        if self.prompt is not None:
            limit = max_length * self.max_chars_per_token
            return self.prompt.encode_pairs(queries, documents, max_length, limit), None
        min_length = self.template.pair_specials + 2
        if max_length < min_length:
            raise ValueError(
                f"max_length={max_length} leaves no room for text; use at least {min_length}"
            )
        self._set_truncation(max_length)
        pairs = [
            (self._cap(q, max_length), self._cap(d, max_length)) for q, d in zip(queries, documents)
        ]
        encodings: list[Encoding] = self.tokenizer.encode_batch(pairs, add_special_tokens=True)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        types = (
            [np.asarray(e.type_ids, dtype=np.int8) for e in encodings]
            if self.return_token_types
            else None
        )
        return ids, types

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Content token ids of lone texts, no special tokens, no truncation."""
        self._set_truncation(None)
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def windows(
        self,
        query: str,
        documents: Sequence[str],
        max_length: int = 1024,
        max_query_length: int = 512,
        overlap: int = 80,
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[int]]:
        """jina's rerank chunking. Returns (input_ids per window, token types or None, document index per window)."""
        if self.prompt is not None:
            raise ValueError(
                "windows (long_documents=windows, rerank()) are not available with a prompt template; "
                "long documents are truncated (long_documents=truncate, compute_score)"
            )
        if max_length < 2 * max_query_length:
            raise ValueError(
                f"max_length ({max_length}) must be at least 2 * max_query_length ({max_query_length})"
            )
        query_ids = self.encode_texts([query])[0][
            : max_query_length - self.template.single_specials
        ]
        window = max_length - len(query_ids) - self.template.pair_specials
        stride_overlap = min(overlap, window // 4)
        all_ids, all_types, owners = [], [], []
        for index, doc_ids in enumerate(self.encode_texts(documents)):
            for chunk in _chunks(doc_ids, window, stride_overlap):
                ids, types = self.template.build(query_ids, chunk)
                all_ids.append(ids)
                all_types.append(types)
                owners.append(index)
        return all_ids, (all_types if self.return_token_types else None), owners


def _chunks(doc_ids: list[int], window: int, overlap: int) -> list[list[int]]:
    """Windows of `window` tokens stepping by `window - overlap`; the last one right-aligned and full.

    A document that fits (including an empty one) is a single window.
    """
    if len(doc_ids) <= window:
        return [doc_ids]
    chunks, start = [], 0
    while start < len(doc_ids):
        end = start + window
        if end >= len(doc_ids):
            chunks.append(doc_ids[-window:])
            break
        chunks.append(doc_ids[start:end])
        start = end - overlap
    return chunks


def check_prompt(
    template: str | None,
    instruction: str | None,
    model: str,
    directory: str,
    layout: str | None,
    max_length: int,
    long_documents: str,
) -> dict | None:
    """The driver's check of a job's prompt settings before any work, and what of them changes a score (the
    template's fields and the instruction, for the score cache's fingerprint); None for a cross-encoder.

    Raises (one line each): a decoder without a known template, a template or instruction for a
    cross-encoder, windows mode with a prompt, a max_length that leaves the prompt no room for text."""
    prompt = resolve_template(template, model, directory, layout)
    if prompt is None:
        if instruction is not None:
            raise ConfigError(
                f"tokenizer.instruction is set, but {model} is a cross-encoder, which reads pairs "
                "without a prompt; remove tokenizer.instruction"
            )
        return None
    if long_documents == "windows":
        raise ConfigError(
            f"tokenizer.long_documents=windows is not available for {model}, a decoder reranker "
            "read through a prompt; use long_documents=truncate (the document's tail is cut)"
        )
    encoder = PromptEncoder(load_tokenizer(directory), prompt, instruction)
    if max_length < encoder.min_length:
        raise ConfigError(
            f"tokenizer.max_length={max_length} leaves no room for text in the {prompt.name} prompt "
            f"(with this instruction); use at least {encoder.min_length}"
        )
    return prompt.as_dict() | {"instruction": encoder.instruction}
