"""The report's statistics over per-query values: the bootstrap interval of a mean, and per-query change.

Every figure here is a function of the per-query table (query_id, <measure>: float64 ...), one row per query.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.schema import QUERY_ID

# The interval of each mean: percentile bootstrap over queries. 2,000 resamples keep the 2.5% and 97.5%
# quantiles stable to ~0.001 on a few dozen queries (Efron & Tibshirani suggest 1,000-2,000 for intervals);
# a fixed seed makes a rerun of the same night print the same interval.
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2_000
BOOTSTRAP_SEED = 0
BOOTSTRAP_METHOD = (
    f"percentile bootstrap of the mean over queries, {BOOTSTRAP_RESAMPLES:,} resamples, "
    f"seed {BOOTSTRAP_SEED}"
)


def bootstrap_interval(
    values: np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of (n,) per-query values; None with fewer than 2 values.

    Every measure of a night draws the same resamples from the same seed, so intervals are reproducible.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = len(values)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    batch = max(1, 4_000_000 // n)  # bounds the index matrix at ~32 MB for any number of queries
    resampled = np.empty(resamples)
    for start in range(0, resamples, batch):
        stop = min(resamples, start + batch)
        resampled[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(low), float(high)


def measured_values(per_query: pa.Table, measure: str) -> np.ndarray:
    """(n,) float64 values of one measure, the queries it was measured on (nulls dropped)."""
    if measure not in per_query.column_names:
        return np.empty(0)
    return pc.drop_null(per_query[measure]).to_numpy().astype(np.float64)


def paired_changes(tonight: pa.Table, previous: pa.Table, measure: str) -> np.ndarray:
    """(n,) tonight - previous of `measure` for the queries measured on both nights, sorted ascending."""
    if measure not in tonight.column_names or measure not in previous.column_names:
        return np.empty(0)
    both = tonight.select([QUERY_ID, measure]).join(
        previous.select([QUERY_ID, measure]),
        keys=QUERY_ID,
        join_type="inner",
        right_suffix=".previous",
    )
    both = both.filter(
        pc.and_(pc.is_valid(both[measure]), pc.is_valid(both[f"{measure}.previous"]))
    )
    now = both[measure].to_numpy().astype(np.float64)
    before = both[f"{measure}.previous"].to_numpy().astype(np.float64)
    return np.sort(now - before)
