"""Tonight against the previous night: per-measure deltas, a paired significance test, alerts.

Both nights are paired by query: only queries evaluated on both nights count, so the delta is the mean of
the per-query differences (tonight - previous) and the two means shown are over the same queries.

Significance: a two-sided paired randomization (sign-flip) test of the mean difference, the test Smucker,
Allan & Carterette (CIKM 2007) recommend for IR evaluation, run by `scipy.stats.permutation_test` with
`permutation_type="samples"`: exact when 2^queries <= `permutations`, otherwise `permutations` random sign
flips from a fixed seed, so a rerun gives the same p-value.

An alert fires for a measure when it dropped by more than its `max_drop` (an absolute drop of the mean;
every measure here is better when higher) AND the drop is significant (p < alpha). Measures without a
threshold are compared and reported, never alerted on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from pipeline.core.schema import QUERY_ID


@dataclass
class Comparison:
    """One measure, tonight vs the previous night, over the queries both nights evaluated."""

    measure: str
    tonight: float | None  # None when no query was evaluated on both nights
    previous: float | None
    delta: float  # tonight - previous (mean of per-query differences), 0 without paired queries
    p_value: float | None  # None when fewer than 2 paired queries
    num_paired: int
    max_drop: float | None  # the alert threshold, None = not alerted on
    alpha: float
    alert: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def alert_line(self) -> str:
        return (
            f"ALERT {self.measure} regressed: {self.previous:.4f} -> {self.tonight:.4f} "
            f"(delta {self.delta:+.4f}, beyond the allowed drop {self.max_drop:g}; "
            f"p={self.p_value:.4f} < {self.alpha:g}, paired randomization test over {self.num_paired} queries)"
        )


def paired_p_value(
    tonight: np.ndarray, previous: np.ndarray, permutations: int = 10_000, seed: int = 0
) -> float:
    """Two-sided p-value of the paired randomization test of mean(tonight - previous) == 0. Inputs (n,)."""
    difference = tonight - previous
    if np.all(difference == 0):
        return 1.0  # no evidence of any change; the test itself would also give 1
    result = stats.permutation_test(
        (tonight, previous),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=permutations,
        batch=max(1, 4_000_000 // max(len(tonight), 1)),  # bounds memory at ~32 MB per batch
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def _measures(table: pa.Table) -> list[str]:
    return [n for n in table.column_names if pa.types.is_floating(table.schema.field(n).type)]


def compare_nights(
    tonight: pa.Table,
    previous: pa.Table,
    max_drop: dict[str, float] | None = None,
    default_max_drop: float | None = None,
    alpha: float = 0.05,
    permutations: int = 10_000,
    seed: int = 0,
) -> list[Comparison]:
    """Per-query tables (query_id, <measure>: float64 ...) of two nights -> one Comparison per shared measure."""
    max_drop = max_drop or {}
    shared = [m for m in _measures(tonight) if m in set(_measures(previous))]
    paired = tonight.select([QUERY_ID, *shared]).join(
        previous.select([QUERY_ID, *shared]),
        keys=QUERY_ID,
        join_type="inner",
        right_suffix=".previous",
    )
    comparisons = []
    for measure in shared:
        both = paired.filter(
            pc.and_(pc.is_valid(paired[measure]), pc.is_valid(paired[f"{measure}.previous"]))
        )
        now = both[measure].to_numpy().astype(np.float64)
        before = both[f"{measure}.previous"].to_numpy().astype(np.float64)
        n = len(now)
        delta = float(np.mean(now - before)) if n else 0.0
        p_value = paired_p_value(now, before, permutations, seed) if n >= 2 else None
        threshold = max_drop.get(measure, default_max_drop)
        alert = (
            threshold is not None and p_value is not None and delta < -threshold and p_value < alpha
        )
        comparisons.append(
            Comparison(
                measure=measure,
                tonight=float(np.mean(now)) if n else None,
                previous=float(np.mean(before)) if n else None,
                delta=delta,
                p_value=p_value,
                num_paired=n,
                max_drop=threshold,
                alpha=alpha,
                alert=alert,
            )
        )
    return comparisons
