"""Hard-negative mining: from retrieval logs (queries with scored candidates) and known positives to
training sets that never hold a positive as a negative, reproducible on any machine.

    select.py       the canonical long table: every candidate kept or dropped, with the reason
    dedup.py        normalized-text hashes and n-gram Jaccard (copies of a positive are not negatives)
    projections.py  sentence-transformers triplet / n-tuple Parquet, FlagEmbedding JSONL
    stats.py        stats.json and the printed summary, reconciled with the canonical table
    io.py           reading candidates and positives, writing the outputs
    config.py       every setting, with the source of its default
"""
