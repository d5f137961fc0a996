"""Selection on real DL19 candidates and NIST qrels (positives = label >= 2), checked against values the tests
compute on their own from the input (plain dicts), not against the selection's own columns."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.core import schema
from pipeline.hard_negatives.config import SelectionConfig
from pipeline.hard_negatives.select import (
    CANONICAL_SCHEMA,
    DROP_REASON,
    DROP_REASONS,
    IS_POSITIVE,
    KEEP,
    POS_MIN_SCORE,
    PSEUDO_POSITIVE,
    sample_order_key,
    select_negatives,
)
from tests.hard_negatives.conftest import DL19_MIN_POSITIVE_LABEL


def config(**overrides) -> SelectionConfig:
    return SelectionConfig(**{"min_positive_label": DL19_MIN_POSITIVE_LABEL, **overrides})


def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def positives_of(qrels: pa.Table, min_label: int = DL19_MIN_POSITIVE_LABEL) -> dict[str, set[str]]:
    out = collections.defaultdict(set)
    for r in rows(qrels):
        if r[schema.LABEL] >= min_label:
            out[r[schema.QUERY_ID]].add(r[schema.DOC_ID])
    return out


def lowest_positive_scores(
    candidates: pa.Table, positives: dict[str, set[str]]
) -> dict[str, np.float32]:
    lowest: dict[str, np.float32] = {}
    for r in rows(candidates.select([schema.QUERY_ID, schema.DOC_ID, schema.SCORE])):
        if r[schema.DOC_ID] in positives.get(r[schema.QUERY_ID], ()):
            s = np.float32(r[schema.SCORE])
            lowest[r[schema.QUERY_ID]] = min(lowest.get(r[schema.QUERY_ID], s), s)
    return lowest


def with_row(table: pa.Table, **values) -> pa.Table:
    """`table` plus one row: the given values, nulls elsewhere."""
    row = pa.table(
        {
            name: pa.array([values.get(name)], table.schema.field(name).type)
            for name in table.column_names
        }
    )
    return pa.concat_tables([table, row])


def test_no_positive_is_ever_a_negative(dl19):
    candidates, qrels = dl19
    canonical = select_negatives(candidates, config(num_negatives=20), qrels)
    positives = positives_of(qrels)
    kept = [(r[schema.QUERY_ID], r[schema.DOC_ID]) for r in rows(canonical) if r[KEEP]]
    assert len(kept) > 300  # the check below is about many real negatives, not a handful
    assert not [pair for pair in kept if pair[1] in positives[pair[0]]]
    for r in rows(canonical):
        is_qrels_positive = r[schema.DOC_ID] in positives[r[schema.QUERY_ID]]
        assert r[IS_POSITIVE] == is_qrels_positive
        if is_qrels_positive:
            assert (r[KEEP], r[DROP_REASON]) == (False, "positive")


def test_every_kept_negative_clears_the_margin_of_its_lowest_positive(dl19):
    candidates, qrels = dl19
    canonical = select_negatives(candidates, config(num_negatives=20, relative_margin=0.05), qrels)
    lowest = lowest_positive_scores(candidates, positives_of(qrels))
    margin_drops = 0
    for r in rows(canonical):
        if r[schema.QUERY_ID] not in lowest:
            assert (r[KEEP], r[DROP_REASON], r[POS_MIN_SCORE]) == (False, "no_positive", None)
            continue
        pos_min = lowest[r[schema.QUERY_ID]]
        assert r[POS_MIN_SCORE] == pos_min
        threshold = np.float32(pos_min - abs(pos_min) * np.float32(0.05))
        if r[KEEP]:
            assert np.float32(r[schema.SCORE]) <= threshold
        elif r[DROP_REASON] == "margin":
            assert np.float32(r[schema.SCORE]) > threshold
            margin_drops += 1
    assert margin_drops > 0  # BM25 ranks many unjudged passages above the weakest positive


def test_queries_without_a_positive_are_skipped_whole(dl19):
    candidates, qrels = dl19
    canonical = select_negatives(
        candidates, config(min_positive_label=3), qrels
    )  # "perfectly relevant" only
    queries_with_positive = {
        q
        for q, docs in positives_of(qrels, 3).items()
        if docs
        & set(
            pc.filter(
                candidates[schema.DOC_ID], pc.equal(candidates[schema.QUERY_ID], q)
            ).to_pylist()
        )
    }
    skipped = {r[schema.QUERY_ID] for r in rows(canonical) if r[DROP_REASON] == "no_positive"}
    assert skipped and queries_with_positive
    assert skipped == set(candidates[schema.QUERY_ID].to_pylist()) - queries_with_positive
    assert not any(r[KEEP] for r in rows(canonical) if r[schema.QUERY_ID] in skipped)


def test_pseudo_positive_is_the_top_candidate_above_the_threshold(dl19):
    candidates, qrels = dl19
    threshold = 15.0  # a BM25 score some queries' top candidates reach and some do not
    canonical = select_negatives(
        candidates, config(min_positive_label=3, pseudo_positive_min_score=threshold), qrels
    )
    skipped_before = {
        r[schema.QUERY_ID]
        for r in rows(select_negatives(candidates, config(min_positive_label=3), qrels))
        if r[DROP_REASON] == "no_positive"
    }
    top = {}
    for r in rows(candidates):
        best = top.get(r[schema.QUERY_ID])
        if best is None or (r[schema.SCORE], -int(r[schema.DOC_ID])) > (best[0], -int(best[1])):
            top[r[schema.QUERY_ID]] = (r[schema.SCORE], r[schema.DOC_ID])
    expected = {q: top[q][1] for q in skipped_before if top[q][0] >= threshold}
    pseudo = {r[schema.QUERY_ID]: r[schema.DOC_ID] for r in rows(canonical) if r[PSEUDO_POSITIVE]}
    assert expected and len(expected) < len(skipped_before)
    assert pseudo == expected
    for r in rows(canonical):
        if r[schema.QUERY_ID] in pseudo and r[PSEUDO_POSITIVE]:
            assert (r[IS_POSITIVE], r[DROP_REASON]) == (True, "positive")
        if r[schema.QUERY_ID] in skipped_before and r[schema.QUERY_ID] not in pseudo:
            assert r[DROP_REASON] == "no_positive"


def test_top_sampling_keeps_the_hardest_survivors(dl19):
    candidates, qrels = dl19
    canonical = select_negatives(candidates, config(num_negatives=5), qrels)
    by_query = collections.defaultdict(lambda: {"kept": [], "not_sampled": []})
    for r in rows(canonical):
        if r[KEEP]:
            by_query[r[schema.QUERY_ID]]["kept"].append(r[schema.SCORE])
        elif r[DROP_REASON] == "not_sampled":
            by_query[r[schema.QUERY_ID]]["not_sampled"].append(r[schema.SCORE])
    assert by_query
    for q, groups in by_query.items():
        assert len(groups["kept"]) <= 5
        if groups["not_sampled"]:
            assert len(groups["kept"]) == 5 and min(groups["kept"]) >= max(groups["not_sampled"]), q


def test_random_sampling_follows_the_documented_hash_order(dl19):
    candidates, qrels = dl19
    canonical = select_negatives(
        candidates, config(num_negatives=4, sampling="random", seed=7), qrels
    )
    survivors = collections.defaultdict(list)
    for r in rows(canonical):
        if r[KEEP] or r[DROP_REASON] == "not_sampled":
            survivors[r[schema.QUERY_ID]].append(
                (
                    sample_order_key(7, r[schema.QUERY_ID], r[schema.DOC_ID]),
                    r[schema.DOC_ID],
                    r[KEEP],
                )
            )
    for q, items in survivors.items():
        expected = {d for _, d, _ in sorted(items)[:4]}
        assert {d for _, d, kept in items if kept} == expected, q


def test_a_different_seed_changes_only_the_random_sample(dl19):
    candidates, qrels = dl19
    first = select_negatives(candidates, config(num_negatives=4, sampling="random", seed=1), qrels)
    again = select_negatives(candidates, config(num_negatives=4, sampling="random", seed=1), qrels)
    other = select_negatives(candidates, config(num_negatives=4, sampling="random", seed=2), qrels)
    assert first.equals(again)
    sampled = lambda t: pc.or_(t[KEEP], pc.equal(t[DROP_REASON], "not_sampled").fill_null(False))
    fixed = [c for c in CANONICAL_SCHEMA.names if c not in (KEEP, DROP_REASON)]
    assert first.select(fixed).equals(other.select(fixed))
    assert sampled(first).equals(sampled(other))  # the same survivors to sample from
    outside = pc.invert(sampled(first))
    assert first.filter(outside).equals(
        other.filter(outside)
    )  # every other drop reason is unchanged
    assert not first[KEEP].equals(other[KEEP])  # and the sample itself moved
    assert pc.sum(first[KEEP]).as_py() == pc.sum(other[KEEP]).as_py()


def test_output_does_not_depend_on_input_row_order(dl19):
    candidates, qrels = dl19
    shuffled = candidates.take(np.random.default_rng(0).permutation(candidates.num_rows))
    for sampling in ("top", "random"):
        cfg = config(num_negatives=3, sampling=sampling)
        assert select_negatives(shuffled, cfg, qrels).equals(
            select_negatives(candidates, cfg, qrels)
        )


def test_copies_of_a_positive_under_other_ids_are_not_negatives(dl19):
    candidates, qrels = dl19
    query_id, positive_id = next(
        (r[schema.QUERY_ID], r[schema.DOC_ID])
        for r in rows(qrels)
        if r[schema.LABEL] >= 2 and r[schema.DOC_ID] in set(candidates[schema.DOC_ID].to_pylist())
    )
    original = next(
        r
        for r in rows(candidates)
        if (r[schema.QUERY_ID], r[schema.DOC_ID]) == (query_id, positive_id)
    )
    text = original[schema.DOCUMENT]
    # Same words, other case and spacing; given a low score, so only the duplicate rule can drop it.
    copy = "  " + text.upper().replace(" ", "\t ") + "\n"
    one_word_changed = text.rsplit(" ", 1)[0] + " elephant"
    extended = candidates
    for doc_id, document in (("copy-1", copy), ("near-1", one_word_changed)):
        extended = with_row(
            extended,
            **{
                schema.QUERY_ID: query_id,
                schema.QUERY: original[schema.QUERY],
                schema.DOC_ID: doc_id,
                schema.DOCUMENT: document,
                schema.SCORE: -100.0,
                schema.FIRST_STAGE_RANK: 101,
            },
        )
    reasons = lambda cfg: {
        r[schema.DOC_ID]: r[DROP_REASON]
        for r in rows(select_negatives(extended, cfg, qrels))
        if r[schema.QUERY_ID] == query_id
    }
    plain = reasons(config(num_negatives=200))
    assert plain["copy-1"] == "duplicate_of_positive"
    assert plain["near-1"] is None  # kept: near-duplicates are opt-in
    assert (
        reasons(config(num_negatives=200, near_duplicate_threshold=0.8))["near-1"]
        == "near_duplicate_of_positive"
    )


def test_score_and_rank_rules(dl19):
    candidates, qrels = dl19
    cfg = config(
        num_negatives=100,
        relative_margin=None,
        absolute_margin=1.0,
        max_score=12.0,
        min_score=5.0,
        range_min=5,
        range_max=60,
    )
    canonical = select_negatives(candidates, cfg, qrels)
    lowest = lowest_positive_scores(candidates, positives_of(qrels))
    counts = collections.Counter(r[DROP_REASON] for r in rows(canonical))
    for reason in ("rank_window", "margin", "max_score", "min_score"):
        assert counts[reason] > 0, reason
    for r in rows(canonical):
        if r[schema.QUERY_ID] not in lowest or r[IS_POSITIVE]:
            continue
        score, rank = np.float32(r[schema.SCORE]), r[schema.FIRST_STAGE_RANK]
        failing = [
            name
            for name, fails in (
                ("rank_window", not 5 < rank <= 60),
                ("margin", score + np.float32(1.0) > lowest[r[schema.QUERY_ID]]),
                ("max_score", score > 12.0),
                ("min_score", score < 5.0),
            )
            if fails
        ]
        if r[DROP_REASON] == "duplicate_of_positive":
            continue
        # The documented precedence: the first failing rule names the drop.
        assert r[DROP_REASON] == (failing[0] if failing else None), r


def test_negatives_per_positive_scales_the_quota(dl19):
    candidates, qrels = dl19
    canonical = select_negatives(
        candidates, config(num_negatives=2, negatives_per="positive", relative_margin=None), qrels
    )
    kept = collections.Counter(r[schema.QUERY_ID] for r in rows(canonical) if r[KEEP])
    positives = collections.Counter(r[schema.QUERY_ID] for r in rows(canonical) if r[IS_POSITIVE])
    survivors = collections.Counter(
        r[schema.QUERY_ID] for r in rows(canonical) if r[KEEP] or r[DROP_REASON] == "not_sampled"
    )
    assert any(p > 1 for p in positives.values())
    for q, p in positives.items():
        assert kept[q] == min(2 * p, survivors[q]), q


def test_canonical_table_schema_and_order(dl19):
    candidates, qrels = dl19
    canonical = select_negatives(candidates, config(), qrels)
    assert canonical.schema == CANONICAL_SCHEMA
    assert canonical.num_rows == candidates.num_rows
    assert set(canonical[DROP_REASON].drop_null().to_pylist()) <= set(DROP_REASONS)
    assert pc.all(pc.equal(canonical[KEEP], pc.is_null(canonical[DROP_REASON]))).as_py()
    order = canonical.sort_by(
        [(schema.QUERY_ID, "ascending"), (schema.SCORE, "descending"), (schema.DOC_ID, "ascending")]
    )
    assert order.equals(canonical)


@pytest.mark.parametrize("margin", [0.05, 0.5])
def test_relative_margin_uses_the_magnitude_for_negative_logits(margin):
    """A logit can be negative: the threshold moves down by |pos_min| * margin (sentence-transformers #3819)."""
    table = pa.table(
        {
            schema.QUERY_ID: ["q"] * 4,
            schema.DOC_ID: ["p", "a", "b", "c"],
            schema.DOCUMENT: ["pos", "a", "b", "c"],
            schema.SCORE: pa.array([-2.0, -2.05, -2.2, -4.0], pa.float32()),
            schema.LABEL: [1, None, None, None],
        }
    )
    canonical = select_negatives(table, SelectionConfig(relative_margin=margin, num_negatives=10))
    threshold = -2.0 - 2.0 * margin  # -2.1 or -3.0
    kept = {r[schema.DOC_ID] for r in rows(canonical) if r[KEEP]}
    assert kept == {d for d, s in (("a", -2.05), ("b", -2.2), ("c", -4.0)) if s <= threshold}
