"""The job's config: the documented file holds the code's defaults, and mistakes name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.hard_negatives.config import HardNegativesConfig

CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "hard_negatives.yaml"


def test_the_documented_config_file_holds_the_defaults():
    assert load_config(HardNegativesConfig, str(CONFIG_FILE)) == HardNegativesConfig()
    overridden = load_config(HardNegativesConfig, str(CONFIG_FILE), ["selection.num_negatives=7",
                                                                     "projections.formats=[triplet]"])
    assert overridden.selection.num_negatives == 7 and overridden.projections.formats == ["triplet"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="range_max"):
        load_config(HardNegativesConfig, overrides=["selection.range_min=10", "selection.range_max=5"])
    with pytest.raises(ConfigError, match="unknown config key `selection.num_negative`"):
        load_config(HardNegativesConfig, overrides=["selection.num_negative=5"])
    with pytest.raises(ConfigError, match="selection.sampling"):
        load_config(HardNegativesConfig, overrides=["selection.sampling=hardest"])


def test_the_rerank_step_must_score_every_candidate_with_the_jobs_storage_options():
    with pytest.raises(ConfigError, match="config key `rerank`.*top_k must stay unset"):
        load_config(HardNegativesConfig, overrides=["rerank.output.top_k=10"])
    with pytest.raises(ConfigError, match="storage_options at the top level"):
        load_config(HardNegativesConfig, overrides=["rerank.storage_options.endpoint_url=http://127.0.0.1:9"])
    config = load_config(HardNegativesConfig, overrides=["storage_options.endpoint_url=http://127.0.0.1:9"],
                         rerank__model="dummy:tiny", rerank__dtype="float32")
    rerank = config.rerank_config()
    assert (rerank.model, rerank.dtype, rerank.storage_options) == ("dummy:tiny", "float32",
                                                                    {"endpoint_url": "http://127.0.0.1:9"})
