"""Is this candidate the same text as a positive under another id?

Exact duplicates: the normalized text's hash. Normalization is Unicode NFKC, case folding, and runs of
whitespace collapsed to one space, so copies that differ only in formatting are caught (MS MARCO holds many
passages duplicated under several ids). Near duplicates (opt-in): Jaccard similarity of word n-gram sets.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_hash(text: str) -> str:
    """Hex sha256 of the normalized text (hashlib, so equal on every machine and Python process)."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


def text_hashes(texts: Iterable[str | None]) -> list[str | None]:
    return [None if t is None else text_hash(t) for t in texts]


def shingles(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """The set of word n-grams of the normalized text; a text shorter than n words is one shingle."""
    words = _WORD.findall(normalize_text(text))
    if len(words) <= n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
