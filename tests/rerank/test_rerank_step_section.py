"""The `rerank:` section of the jobs that rerank as one of their steps (hard negatives, index quality) is
checked by one validator, `pipeline.rerank.config.validate_rerank_step`: each job says what it would lose."""

from __future__ import annotations

import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.quality.config import IndexQualityConfig
from pipeline.rerank.config import RerankConfig, validate_rerank_step

WHY = {
    HardNegativesConfig: "every candidate needs its score (a positive ranked below k would go unseen); "
    "limit candidates with selection.range_max",
    IndexQualityConfig: "the label-free measures need every candidate's score (an unscored pair counts "
    "as unjudged)",
}


@pytest.mark.parametrize("job", list(WHY), ids=lambda c: c.__name__)
def test_each_job_refuses_a_top_k_and_its_own_storage_options_in_its_rerank_section(job):
    with pytest.raises(ConfigError) as top_k:
        load_config(job, None, ["rerank.output.top_k=10"])
    assert str(top_k.value) == (
        f"config key `rerank`: Value error, rerank.output.top_k must stay unset: {WHY[job]}"
    )
    with pytest.raises(ConfigError) as options:
        load_config(job, None, ['rerank.storage_options={"anon": true}'])
    assert str(options.value) == (
        "config key `rerank`: Value error, set storage_options at the top level; the rerank step "
        "uses the same options"
    )
    assert (
        load_config(job, None, ["rerank.output.rows_per_bucket=5"]).rerank.output.rows_per_bucket
        == 5
    )


def test_the_validator_passes_a_section_that_scores_every_candidate_unchanged():
    section = RerankConfig(model="dummy:tiny")
    assert validate_rerank_step(section, "why") is section
    with pytest.raises(ValueError, match="^rerank.output.top_k must stay unset: why$"):
        validate_rerank_step(RerankConfig(output={"top_k": 1}), "why")
