"""The dtype names and the dtype-device rule, declared once in `pipeline.core.dtypes`: the command line, the
rerank config and the engine accept exactly those names, and the engine refuses what the rule refuses."""

from __future__ import annotations

import pytest
import torch

from pipeline.core import dtypes
from pipeline.core.cli import base_parser
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.model.cross_encoder import DTYPES as ENGINE_DTYPES
from pipeline.model.cross_encoder import resolve_dtype
from pipeline.rerank.config import RerankConfig


def test_the_cli_the_config_and_the_engine_take_the_same_names():
    assert dtypes.CHOICES == ("auto", "float32", "bfloat16", "float16", "int8", "float8")
    help_text = base_parser("python -m jobs.rerank", "rerank").format_help()
    assert "--dtype {" + ",".join(dtypes.CHOICES) + "}" in help_text
    for name in dtypes.CHOICES:
        assert RerankConfig(dtype=name).dtype == name
    assert ("auto", *ENGINE_DTYPES) == dtypes.CHOICES
    assert ENGINE_DTYPES["float8"] == torch.float8_e4m3fn and ENGINE_DTYPES["int8"] == torch.int8
    assert all(str(ENGINE_DTYPES[n]) == f"torch.{t}" for n, t in dtypes.TORCH_NAMES.items())


def test_a_name_outside_the_list_is_refused_by_each_with_the_list():
    with pytest.raises(ConfigError, match="invalid choice: 'float64'"):
        base_parser("python -m jobs.rerank", "rerank").parse_args(
            ["--model", "m", "--dtype", "float64"]
        )
    with pytest.raises(
        ValueError, match="'auto', 'float32', 'bfloat16', 'float16', 'int8' or 'float8'"
    ):
        RerankConfig(dtype="float64")
    with pytest.raises(
        CheckpointError, match="choose auto, float32, bfloat16, float16, int8, float8"
    ):
        resolve_dtype("float64", torch.device("cpu"))


def test_the_rule_int8_on_cpu_float8_on_cuda_the_rest_anywhere():
    assert dtypes.runs_on("int8", "cpu") and not dtypes.runs_on("int8", "cuda")
    assert dtypes.runs_on("float8", "cuda") and not dtypes.runs_on("float8", "cpu")
    assert all(
        dtypes.runs_on(d, dev)
        for d in ("auto", "float32", "bfloat16", "float16")
        for dev in ("cpu", "cuda")
    )
    # The engine also runs float8 on CPU, as the reference the tests compare with; never int8 on a GPU.
    assert dtypes.runs_on("float8", "cpu", reference=True)
    assert not dtypes.runs_on("int8", "cuda", reference=True)
    assert not dtypes.runs_on("float8", "mps", reference=True)


def test_the_engine_follows_the_rule():
    with pytest.raises(CheckpointError, match="int8 runs on CPU only"):
        resolve_dtype("int8", torch.device("cuda"))
    with pytest.raises(CheckpointError, match="float8 needs float8 tensor cores"):
        resolve_dtype("float8", torch.device("meta"))
    assert resolve_dtype("int8", torch.device("cpu")) == torch.int8
