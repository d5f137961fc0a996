"""XQuAD-R (LAReQA): 1,190 parallel questions per language; the answer is a sentence of the same article.

Source (`<data_dir>/xquad-r/<lang>.json`): SQuAD JSON (`data[].title`, `paragraphs[].context`, `qas[]`) plus
`sentences` and `sentence_breaks` ([start, end) character spans of `context`) per paragraph. The gold sentence
of a question is the one whose span holds `answers[0].answer_start`. Question ids and article titles are the
same in every language (the questions are translations), which is what makes cross-lingual pools possible.

Candidate pools (the full LAReQA task ranks every sentence of every language, ~9,000 candidates per question,
too many to rerank exhaustively; we keep counts sane):
- `pool_size=None`: the sentences of the question's article, in each candidate language (12-45 per language);
- `pool_size=N`: those sentences plus sentences drawn at random (seeded per query) from the other articles of
  the candidate languages, up to N candidates (never fewer than the article's own sentences): the article's
  sentences are the hard negatives, the drawn ones keep the task from being a topic-matching test only.
Candidate languages default to the question's own (monolingual, the "X -> X" setting); with several, the gold
sentences are the answer sentence in each candidate language, as in LAReQA.

Ids: query_id `<squad id>/<lang>`, doc_id `<lang>/<article index>/<paragraph index>/<sentence index>`.
Extra columns: `language` (the question's) and `doc_language` (the candidate sentence's).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.errors import InputError
from pipeline.datasets.tables import collection_dir, only_queries, pairs_table, qrels_table

LANGUAGES = ("ar", "de", "en", "es", "hi", "ru", "th", "zh")
LANGUAGE = "language"
DOC_LANGUAGE = "doc_language"


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    article: int
    gold: str  # doc_id of the sentence holding the answer


@dataclass
class Language:
    """One language file: its questions and its sentences (doc_id -> text), grouped by article."""

    questions: list[Question]
    sentences: dict[str, str]
    by_article: list[list[str]]  # article index -> doc_ids of its sentences, in text order
    gold_by_question: dict[str, str]


def read_language(folder, lang: str) -> Language:
    with open(folder / f"{lang}.json", encoding="utf-8") as f:
        articles = json.load(f)["data"]
    questions, sentences, by_article = [], {}, []
    for a, article in enumerate(articles):
        ids = []
        for p, paragraph in enumerate(article["paragraphs"]):
            spans = paragraph["sentence_breaks"]
            for s, text in enumerate(paragraph["sentences"]):
                doc_id = f"{lang}/{a}/{p}/{s}"
                sentences[doc_id] = text
                ids.append(doc_id)
            for qa in paragraph["qas"]:
                start = qa["answers"][0]["answer_start"]
                holding = [s for s, (begin, end) in enumerate(spans) if begin <= start < end]
                if len(holding) != 1:
                    raise InputError(
                        f"xquad-r {lang}: answer_start {start} of question {qa['id']} lies in "
                        f"{len(holding)} sentences of its paragraph, expected exactly one"
                    )
                questions.append(
                    Question(qa["id"], qa["question"], a, f"{lang}/{a}/{p}/{holding[0]}")
                )
        by_article.append(ids)
    return Language(questions, sentences, by_article, {q.id: q.gold for q in questions})


def _check_languages(languages: Sequence[str], what: str) -> None:
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown or not languages:
        raise InputError(
            f"xquad-r {what}: {list(languages)} must be a non-empty subset of {list(LANGUAGES)}"
        )


def _seed(seed: int, query_id: str) -> int:
    # A per-query stream, so a query's pool does not change when other queries or languages are added.
    return zlib.crc32(f"{seed}:{query_id}".encode())


def xquad_r(
    data_dir: str | os.PathLike | None = None,
    languages: Sequence[str] = LANGUAGES,
    candidate_languages: Sequence[str] | None = None,
    pool_size: int | None = None,
    seed: int = 0,
) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels) for the questions of each of `languages` against candidate sentences (see module doc).

    Queries are interleaved across languages (question 1 in every language, then question 2, ...) so any
    prefix of the table holds every language. qrels: label 1 for each gold sentence; every other candidate
    is unjudged (non-relevant).
    """
    _check_languages(languages, "languages")
    if candidate_languages is not None:
        _check_languages(candidate_languages, "candidate_languages")
    needed = sorted(set(languages) | set(candidate_languages or ()))
    folder = collection_dir(data_dir, "xquad-r", [f"{lang}.json" for lang in needed])
    data = {lang: read_language(folder, lang) for lang in needed}

    columns: dict[str, list] = {
        name: []
        for name in (
            schema.QUERY_ID,
            schema.QUERY,
            schema.DOC_ID,
            schema.DOCUMENT,
            LANGUAGE,
            DOC_LANGUAGE,
        )
    }
    qrels: list[tuple[str, str, int]] = []
    reference = [q.id for q in data[languages[0]].questions]
    for lang in needed:
        if [q.id for q in data[lang].questions] != reference:
            raise InputError(
                f"xquad-r: the questions of {lang}.json are not those of {languages[0]}.json in the "
                "same order; the files must be the parallel LAReQA release"
            )
    num_questions = len(reference)
    for i in range(num_questions):
        for lang in languages:
            question = data[lang].questions[i]
            query_id = f"{question.id}/{lang}"
            targets = list(candidate_languages or (lang,))
            pool = [d for t in targets for d in data[t].by_article[question.article]]
            if pool_size is not None and len(pool) < pool_size:
                others = [
                    d
                    for t in targets
                    for a, ids in enumerate(data[t].by_article)
                    if a != question.article
                    for d in ids
                ]
                drawn = np.random.default_rng(_seed(seed, query_id)).choice(
                    len(others), pool_size - len(pool), replace=False
                )
                pool += [others[j] for j in sorted(drawn)]
            for doc_id in pool:
                columns[schema.QUERY_ID].append(query_id)
                columns[schema.QUERY].append(question.text)
                columns[schema.DOC_ID].append(doc_id)
                columns[schema.DOCUMENT].append(data[doc_id.split("/", 1)[0]].sentences[doc_id])
                columns[LANGUAGE].append(lang)
                columns[DOC_LANGUAGE].append(doc_id.split("/", 1)[0])
            qrels += [(query_id, data[t].gold_by_question[question.id], 1) for t in targets]
    pairs = pairs_table(columns, {LANGUAGE: pa.string(), DOC_LANGUAGE: pa.string()})
    return pairs, only_queries(qrels_table(*zip(*qrels)), pairs)
