"""Entry points: `python -m jobs.rerank`, `jobs.hard_negatives`, `jobs.index_quality`, `jobs.benchmark`."""
