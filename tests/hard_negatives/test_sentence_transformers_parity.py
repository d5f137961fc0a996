"""Parity with sentence-transformers' `mine_hard_negatives` (v6.2) where the two coincide.

How the same scores reach both: mine_hard_negatives retrieves candidates with a bi-encoder, then (when a
margin is set) rescores every candidate and every positive with its `cross_encoder`. With `range_max` at
least the corpus size, every corpus text is a candidate of every query, so the bi-encoder no longer matters,
and the cross-encoder's scores decide. We give our selection the same cross-encoder's scores for the same
(query, passage) pairs (`batch_size=1` on both sides, so each pair is scored alone and the floats are equal).
Texts are DL19 queries and passages; positives are the NIST qrels' label >= 2 among the corpus.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import schema
from pipeline.hard_negatives import projections as proj
from pipeline.hard_negatives.config import ProjectionsConfig, SelectionConfig
from pipeline.hard_negatives.dedup import normalize_text
from pipeline.hard_negatives.select import DROP_REASON, select_negatives

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tiny_bert):
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    # One thread: batch-of-one calls on a tiny model are ~40x slower when two threads spin on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bi_encoder = SentenceTransformer(tiny_bert["bi_encoder"], device="cpu")
    # Identity activation: raw logits, as our reranker returns them (sigmoid would be the library's default).
    cross_encoder = CrossEncoder(
        tiny_bert["cross_encoder"], device="cpu", activation_fn=torch.nn.Identity()
    )
    yield bi_encoder, cross_encoder
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case(dl19, models):
    """(candidates: every query x every corpus passage with the cross-encoder's score, qrels, queries, corpus)."""
    candidates, qrels = dl19
    _, cross_encoder = models
    positive_pairs = {
        (r[schema.QUERY_ID], r[schema.DOC_ID]) for r in qrels.to_pylist() if r[schema.LABEL] >= 2
    }
    by_query = collections.defaultdict(list)
    for r in candidates.sort_by(
        [(schema.QUERY_ID, "ascending"), (schema.FIRST_STAGE_RANK, "ascending")]
    ).to_pylist():
        by_query[r[schema.QUERY_ID]].append(r)
    queries, corpus, seen_texts = {}, {}, set()
    for qid, hits in by_query.items():
        positives = [h for h in hits if (qid, h[schema.DOC_ID]) in positive_pairs][:2]
        if not positives:
            continue
        queries[qid] = hits[0][schema.QUERY]
        for hit in hits[:8] + positives:
            # One id per text, as mine_hard_negatives de-duplicates its corpus by text.
            if (
                hit[schema.DOC_ID] not in corpus
                and normalize_text(hit[schema.DOCUMENT]) not in seen_texts
            ):
                corpus[hit[schema.DOC_ID]] = hit[schema.DOCUMENT]
                seen_texts.add(normalize_text(hit[schema.DOCUMENT]))
        if len(queries) == 6:
            break
    pairs = [(qid, did) for qid in queries for did in corpus]
    scores = cross_encoder.predict(
        [(queries[q], corpus[d]) for q, d in pairs],
        batch_size=1,
        convert_to_numpy=True,
        show_progress_bar=False,
    ).astype(np.float32)
    per_query = collections.defaultdict(set)
    for (qid, _), score in zip(pairs, scores.tolist()):
        per_query[qid].add(score)
    # A tie within a query would let the two orders differ legitimately (torch.topk does not say which comes first).
    assert sum(map(len, per_query.values())) == len(pairs)
    table = pa.table(
        {
            schema.QUERY_ID: [q for q, _ in pairs],
            schema.QUERY: [queries[q] for q, _ in pairs],
            schema.DOC_ID: [d for _, d in pairs],
            schema.DOCUMENT: [corpus[d] for _, d in pairs],
            schema.SCORE: pa.array(scores, pa.float32()),
        }
    )
    return table, qrels, queries, corpus, positive_pairs


def sentence_transformers_triplets(
    case, models, **settings
) -> list[tuple[str, str, str, float, float]]:
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    _, _, queries, corpus, positive_pairs = case
    bi_encoder, cross_encoder = models
    rows = [(queries[q], corpus[d]) for q in queries for d in corpus if (q, d) in positive_pairs]
    dataset = Dataset.from_dict({"query": [q for q, _ in rows], "positive": [p for _, p in rows]})
    mined = mine_hard_negatives(
        dataset,
        bi_encoder,
        corpus=list(corpus.values()),
        cross_encoder=cross_encoder,
        range_max=len(corpus),
        sampling_strategy="top",
        output_format="triplet",
        output_scores=True,
        batch_size=1,
        verbose=False,
        **settings,
    )
    return [
        (r["query"], r["positive"], r["negative"], r["scores"][0], r["scores"][1]) for r in mined
    ]


def our_triplets(
    case, **settings
) -> tuple[list[tuple[str, str, str, float, float]], collections.Counter]:
    table, qrels, *_ = case
    selection = SelectionConfig(
        **{"min_positive_label": 2, "sampling": "top", "relative_margin": None, **settings}
    )
    canonical = select_negatives(table, selection, qrels)
    examples = list(proj.query_examples(canonical, table))
    triplets = proj.triplets(examples, selection, ProjectionsConfig(scores="scores")).to_pylist()
    rows = [
        (r["query"], r["positive"], r["negative"], r["scores"][0], r["scores"][1]) for r in triplets
    ]
    return rows, collections.Counter(canonical[DROP_REASON].to_pylist())


@pytest.mark.parametrize(
    "settings",
    [
        {"relative_margin": 0.05, "num_negatives": 3},
        {"relative_margin": 0.5, "num_negatives": 5},
        {"absolute_margin": 0.002, "max_score": 0.01, "num_negatives": 4},
    ],
    ids=["nv-retriever-topk-percpos", "wide-margin", "absolute-margin-and-max-score"],
)
def test_same_negatives_as_mine_hard_negatives(case, models, settings):
    ours, reasons = our_triplets(case, **settings)
    theirs = sentence_transformers_triplets(case, models, **settings)
    # The comparison means something only if the filters removed candidates and some queries came up short.
    assert reasons["margin"] > 0 and reasons["not_sampled"] > 0
    assert sorted(ours) == sorted(theirs)
    # Within each (query, positive), the negatives come in the same order: hardest first.
    ordered = lambda rows: {
        (q, p): [n for q2, p2, n, *_ in rows if (q2, p2) == (q, p)] for q, p, *_ in rows
    }
    assert ordered(ours) == ordered(theirs)
