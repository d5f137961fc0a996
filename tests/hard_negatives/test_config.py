"""The job's config: the documented file holds the code's defaults, and mistakes name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.hard_negatives.config import HardNegativesConfig

CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "hard_negatives.yaml"


def test_the_documented_config_file_holds_the_defaults():
    assert load_config(HardNegativesConfig, str(CONFIG_FILE)) == HardNegativesConfig()
    overridden = load_config(
        HardNegativesConfig,
        str(CONFIG_FILE),
        ["selection.num_negatives=7", "projections.formats=[triplet]"],
    )
    assert overridden.selection.num_negatives == 7 and overridden.projections.formats == ["triplet"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="range_max"):
        load_config(
            HardNegativesConfig, overrides=["selection.range_min=10", "selection.range_max=5"]
        )
    with pytest.raises(ConfigError, match="unknown config key `selection.num_negative`"):
        load_config(HardNegativesConfig, overrides=["selection.num_negative=5"])
    with pytest.raises(ConfigError, match="selection.sampling"):
        load_config(HardNegativesConfig, overrides=["selection.sampling=hardest"])


def test_the_rerank_step_must_score_every_candidate_with_the_jobs_storage_options():
    with pytest.raises(ConfigError, match="config key `rerank`.*top_k must stay unset"):
        load_config(HardNegativesConfig, overrides=["rerank.output.top_k=10"])
    with pytest.raises(ConfigError, match="storage_options at the top level"):
        load_config(
            HardNegativesConfig,
            overrides=["rerank.storage_options.endpoint_url=http://127.0.0.1:9"],
        )
    config = load_config(
        HardNegativesConfig,
        overrides=["storage_options.endpoint_url=http://127.0.0.1:9"],
        rerank__model="dummy:tiny",
        rerank__dtype="float32",
    )
    rerank = config.rerank_config()
    assert (rerank.model, rerank.dtype, rerank.storage_options) == (
        "dummy:tiny",
        "float32",
        {"endpoint_url": "http://127.0.0.1:9"},
    )


@pytest.mark.parametrize("job", ["hard_negatives", "index_quality"])
def test_a_rerank_key_without_its_section_is_answered_with_the_full_key(
    job, run_entry_point, capsys
):
    """These jobs keep the rerank step's settings under `rerank.`: their help shows such a key, and the rerank
    job's key given bare is refused with the key it would be."""
    import importlib

    module = importlib.import_module(f"jobs.{job}")
    help_text = module.build_parser().format_help()
    assert "--set rerank.scorer.max_tokens_per_batch=8192" in " ".join(help_text.split())
    inputs = ["--input", "in.parquet"] if job == "hard_negatives" else ["--run", "run.txt"]
    result = run_entry_point(
        module.main, *inputs, "--output", "out", "--set", "scorer.max_tokens_per_batch=8192"
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "unknown config key `scorer.max_tokens_per_batch`" in errors[0]
    assert "did you mean rerank.scorer.max_tokens_per_batch?" in errors[0]
    # A key of no section is refused as before, naming the keys of its place.
    with pytest.raises(
        ConfigError,
        match=r"unknown config key `rerank.scorer.max_tokens`; known keys here: .*"
        "max_tokens_per_batch",
    ):
        load_config(HardNegativesConfig, overrides=["rerank.scorer.max_tokens=1"])
