"""What a job's measures must equal: the engine's own scores of a table's pairs, as a ranking table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.core import schema
from pipeline.model import CrossEncoder


def engine_ranking(model: str, pairs: pa.Table, max_length: int, instruction=None) -> pa.Table:
    """(query_id, doc_id, score) of every row of `pairs` (query, document columns), scored in float32 by the
    engine in this process."""
    engine = CrossEncoder.from_pretrained(
        model, device="cpu", dtype="float32", instruction=instruction
    )
    scores = engine.compute_score(
        list(zip(pairs[schema.QUERY].to_pylist(), pairs[schema.DOCUMENT].to_pylist())),
        max_length=max_length,
        return_logits=True,
    )
    return pa.table(
        {
            schema.QUERY_ID: pairs[schema.QUERY_ID],
            schema.DOC_ID: pairs[schema.DOC_ID],
            schema.SCORE: pa.array(np.asarray(scores, dtype=np.float64)),
        }
    )
