"""The rerank job: read -> validate -> tokenize -> score -> rank -> write, exactly once, on Ray Data.

Its public API is `rerank()` and `RerankResult` (`api.py`) and `RerankConfig` (`config.py`). They are loaded on
first use, so that importing one stage (the driver's CPU stages run without torch) does not import the job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.rerank.api import RerankResult, rerank
    from pipeline.rerank.config import RerankConfig

__all__ = ["RerankConfig", "RerankResult", "rerank"]


def __getattr__(name: str):
    if name in ("rerank", "RerankResult"):
        from pipeline.rerank import api

        return getattr(api, name)
    if name == "RerankConfig":
        from pipeline.rerank.config import RerankConfig

        return RerankConfig
    raise AttributeError(f"module 'pipeline.rerank' has no attribute {name!r}")
