"""The rerank job's Python API under its earlier name; `from pipeline.rerank import rerank` is the same."""

from pipeline.rerank.api import RerankResult, rerank

__all__ = ["RerankResult", "rerank"]
