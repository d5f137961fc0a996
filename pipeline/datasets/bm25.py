"""A small BM25 first stage in numpy, for collections that ship without candidates (Vaswani).

Why our own: no BM25 library is among the project's dependencies, and a first stage for an 11k-document
collection needs about fifty lines; adding a package (bm25s, rank-bm25) for that is not worth it.
Scoring follows Lucene's BM25Similarity (the one Anserini uses):
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)),
    score(q, d) = sum over query terms t of idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl)),
with Anserini's defaults k1 = 0.9, b = 0.4. Analysis: lowercase, `\\w+` tokens, Lucene's English stop words,
no stemming (so scores differ from Terrier's or Anserini's stemmed runs; the candidate sets are comparable).
A repeated query term counts once per occurrence, as in Lucene's BooleanQuery of term clauses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# org.apache.lucene.analysis.en.EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with".split()
)
_TOKEN = re.compile(r"\w+")


def analyze(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOP_WORDS]


class BM25:
    """An inverted index over `documents`; `search(query, k)` -> (doc indices, scores), best first.

    Ties in score are broken by document index (ascending), so results are deterministic.
    """

    def __init__(self, documents: Sequence[str], k1: float = 0.9, b: float = 0.4):
        self.k1, self.b = k1, b
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(len(documents), dtype=np.float64)
        for index, text in enumerate(documents):
            terms = Counter(analyze(text))
            lengths[index] = sum(terms.values())
            for term, tf in terms.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(index)
                tfs.append(tf)
        self.num_docs = len(documents)
        # Per-document length normalisation, computed once: k1 * (1 - b + b * dl / avgdl).
        avgdl = lengths.mean() if len(documents) else 1.0
        self._norm = k1 * (1 - b + b * lengths / avgdl)  # (num_docs,)
        self._postings = {
            t: (np.array(d, dtype=np.int64), np.array(f, dtype=np.float64))
            for t, (d, f) in postings.items()
        }

    def idf(self, term: str) -> float:
        df = len(self._postings[term][0]) if term in self._postings else 0
        return float(np.log1p((self.num_docs - df + 0.5) / (df + 0.5)))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`, shape (num_docs,); 0 where no term matches."""
        scores = np.zeros(self.num_docs, dtype=np.float64)
        for term in analyze(query):
            if term not in self._postings:
                continue
            docs, tfs = self._postings[term]
            scores[docs] += self.idf(term) * tfs * (self.k1 + 1) / (tfs + self._norm[docs])
        return scores

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best documents that match at least one query term: (indices (k,), scores (k,))."""
        scores = self.scores(query)
        matching = np.flatnonzero(scores > 0)
        # lexsort's last key is primary: score descending, then document index ascending.
        order = matching[np.lexsort((matching, -scores[matching]))][:k]
        return order, scores[order]
