"""Batch reranking of large query-candidate tables with neural cross-encoders."""
