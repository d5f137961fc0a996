"""The random-weights marker: written by the dummy builder, read by the loader, no import cycle between them."""

from __future__ import annotations

import ast
import importlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pipeline.model.checkpoint as checkpoint
import pipeline.model.dummy as dummy
from pipeline.model import CrossEncoder


def _project_imports(module) -> tuple[list[str], list[str]]:
    """(top-level, inside-a-function) imports of `pipeline.*` modules in a module's source."""
    tree = ast.parse(Path(module.__file__).read_text())
    top = {id(node) for node in tree.body}
    top_level, nested = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            (top_level if id(node) in top else nested).append(node.module)
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("pipeline")]
            (top_level if id(node) in top else nested).extend(names)
    return top_level, nested


def test_no_cycle_between_loader_and_dummy_builder():
    # The dummy builder imports only leaves of the project (modules importing nothing of it, like the decoder
    # dummies' builder), so no cycle can run through it back to the loader.
    dummy_top, dummy_nested = _project_imports(dummy)
    for name in dummy_top + dummy_nested:
        leaf = importlib.import_module(name)
        assert _project_imports(leaf) == ([], []), (
            f"{name}, imported by the dummy builder, imports the project"
        )
    checkpoint_top, checkpoint_nested = _project_imports(checkpoint)
    assert "pipeline.model.dummy" in checkpoint_top
    assert checkpoint_nested == [], "no lazy project import left in the loader"
    # One object, re-exported by the loader for the engine.
    assert checkpoint.DUMMY_MARKER is dummy.DUMMY_MARKER == "rerank_pipeline_dummy"


def test_each_module_imports_first_in_a_fresh_interpreter():
    for first in ("pipeline.model.dummy", "pipeline.model.checkpoint"):
        code = (
            f"import {first}, sys; from pipeline.model.checkpoint import DUMMY_MARKER, resolve_model_directory; "
            "assert 'pipeline.model.dummy' in sys.modules"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_marker_written_by_builder_and_seen_by_loader(checkpoints, tmp_path, caplog):
    directory = checkpoints["bert"]
    with open(Path(directory) / "config.json") as f:
        assert json.load(f)[dummy.DUMMY_MARKER] is True
    with caplog.at_level(logging.WARNING, logger="pipeline.model.checkpoint"):
        encoder = CrossEncoder.from_pretrained(directory, device="cpu", dtype="float32")
    assert encoder.is_dummy and "RANDOM WEIGHTS" in caplog.text

    # The same weights without the marker: not reported as random.
    plain = tmp_path / "plain"
    shutil.copytree(directory, plain)
    config = json.loads((plain / "config.json").read_text())
    del config[dummy.DUMMY_MARKER]
    (plain / "config.json").write_text(json.dumps(config))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.model.checkpoint"):
        assert not CrossEncoder.from_pretrained(str(plain), device="cpu", dtype="float32").is_dummy
    assert "RANDOM WEIGHTS" not in caplog.text
