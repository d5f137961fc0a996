"""Real DL19 candidates scored by a real, cheap, deterministic scorer: BM25 over the candidate passages.

The selection is model-agnostic (it reads a `score` column), so a lexical scorer exercises it on real text
and real judgements; the cross-encoder path is covered by the job's end-to-end test.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import schema
from pipeline.datasets import trec_dl
from pipeline.datasets.bm25 import BM25

DL19_MIN_POSITIVE_LABEL = (
    2  # TREC DL passage: relevance 2 ("highly relevant") and 3 ("perfectly relevant")
)


def bm25_scores(pairs: pa.Table) -> np.ndarray:
    """BM25 (k1=0.9, b=0.4) of each pair's document for its query, over the table's distinct passages. -> (n,) float32"""
    doc_ids = pairs[schema.DOC_ID].to_pylist()
    texts = dict(zip(doc_ids, pairs[schema.DOCUMENT].to_pylist()))
    index_of = {doc_id: i for i, doc_id in enumerate(texts)}
    bm25 = BM25(list(texts.values()))
    by_query: dict[str, np.ndarray] = {}
    scores = np.empty(pairs.num_rows, dtype=np.float32)
    for row, (qid, query, doc_id) in enumerate(
        zip(pairs[schema.QUERY_ID].to_pylist(), pairs[schema.QUERY].to_pylist(), doc_ids)
    ):
        if qid not in by_query:
            by_query[qid] = bm25.scores(query)
        scores[row] = by_query[qid][index_of[doc_id]]
    return scores


@pytest.fixture(scope="session")
def dl19(shared_data) -> tuple[pa.Table, pa.Table]:
    """(scored candidates, qrels): the 4,300 DL19 pairs with `score` = BM25 as float32, and the NIST qrels."""
    pairs, qrels = trec_dl(2019, shared_data)
    return pairs.append_column(schema.SCORE, pa.array(bm25_scores(pairs), pa.float32())), qrels


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, dl19) -> dict[str, str]:
    """Two tiny random-weight BERT checkpoints (2 layers, hidden 32) with a WordPiece vocabulary trained here on
    the DL19 texts: {"cross_encoder": dir of a BertForSequenceClassification (1 label), "bi_encoder": dir of a
    BertModel}. Built locally because nothing can be downloaded; seeded, so the weights are the same every run."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    candidates, _ = dl19
    texts = list(
        dict.fromkeys(
            candidates[schema.QUERY].to_pylist() + candidates[schema.DOCUMENT].to_pylist()
        )
    )
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(vocab_size=3000, special_tokens=specials, show_progress=False),
    )
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    config = BertConfig(
        vocab_size=wordpiece.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        initializer_range=0.5,
    )  # wide weights: scores spread out instead of all near one value
    root = tmp_path_factory.mktemp("tiny_bert")
    paths = {}
    torch.manual_seed(0)
    for name, model_class in (
        ("cross_encoder", BertForSequenceClassification),
        ("bi_encoder", BertModel),
    ):
        paths[name] = str(root / name)
        model_class(config).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def four_queries(shared_data, tmp_path_factory):
    """4 DL19 queries with positives, 100 candidates each (400 pairs), and the NIST qrels."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pairs, qrels = trec_dl(2019, shared_data)
    positive_queries = pc.unique(
        qrels.filter(pc.greater_equal(qrels[schema.LABEL], 2))[schema.QUERY_ID]
    )
    chosen = pc.unique(
        pairs.filter(pc.is_in(pairs[schema.QUERY_ID], value_set=positive_queries))[schema.QUERY_ID]
    )[:4]
    path = tmp_path_factory.mktemp("hn_four_queries") / "input.parquet"
    pq.write_table(
        pairs.filter(pc.is_in(pairs[schema.QUERY_ID], value_set=chosen)), path, row_group_size=100
    )
    return path, shared_data / "trec-dl" / "qrels.dl19-passage.txt"


def hn_outputs(root) -> dict[str, bytes]:
    """Every file a hard-negative output holds outside rerank/ (the rerank job's own), by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "rerank"
    }
