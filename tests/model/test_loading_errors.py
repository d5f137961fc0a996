"""Every way a checkpoint can be wrong gives one clear line that says what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.errors import CheckpointError
from pipeline.model import CrossEncoder
from pipeline.model.checkpoint import LAYOUTS, detect_layout
from pipeline.model.weights import convert_state_dict


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_weights(directory: str, edit) -> None:
    path = f"{directory}/model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_directory_says_so(tmp_path):
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained(str(tmp_path / "nope"))
    assert "not found" in _one_line(e)


def test_unknown_layout_names_the_weights(checkpoints, tmp_path):
    d = _copy(checkpoints["jina_flash"], tmp_path / "c")
    save_file({"encoder.block.0.weight": torch.zeros(2, 2)}, f"{d}/model.safetensors")
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained(d)
    assert "unknown checkpoint layout" in _one_line(e) and "encoder.block.0.weight" in str(e.value)


def test_missing_key_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["jina_flash"], tmp_path / "c")
    _edit_weights(d, lambda s: s.pop("roberta.encoder.layers.1.norm2.weight"))
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained(d)
    assert "layers.1.norm2.weight" in _one_line(e)


def test_unexpected_key_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["xlm_roberta"], tmp_path / "c")
    _edit_weights(d, lambda s: s.__setitem__("lm_head.dense.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained(d)
    assert "lm_head.dense.weight" in _one_line(e)


def test_shape_mismatch_is_named(checkpoints, tmp_path):
    d = _copy(checkpoints["bert"], tmp_path / "c")
    with open(f"{d}/config.json") as f:
        config = json.load(f)
    config["intermediate_size"] = 96
    with open(f"{d}/config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained(d)
    assert "mlp.fc1.weight" in _one_line(e) and "shape" in str(e.value)


def test_pickle_refused_without_opt_in(checkpoints, tmp_path):
    d = _copy(checkpoints["bert"], tmp_path / "c")
    torch.save(load_file(f"{d}/model.safetensors"), f"{d}/pytorch_model.bin")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained(d)
    assert "pickle" in _one_line(e) and "allow_pickle" in str(e.value)
    reference = CrossEncoder.from_pretrained(checkpoints["bert"], dtype="float32").compute_score(
        ("q", "d")
    )
    assert (
        CrossEncoder.from_pretrained(d, dtype="float32", allow_pickle=True).compute_score(
            ("q", "d")
        )
        == reference
    )


def test_hub_id_offline_says_to_pass_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained("jinaai/jina-reranker-v2-base-multilingual")
    assert "local checkpoint directory" in _one_line(e)


def test_unknown_dummy_architecture():
    with pytest.raises(CheckpointError) as e:
        CrossEncoder.from_pretrained("dummy:gpt-17")
    assert "jina-reranker-v2-base" in _one_line(e)


def test_renames_cover_every_weight_of_each_layout(checkpoints):
    """The rename tables are data: every checkpoint name maps to exactly one of our names."""
    for layout_name, directory in checkpoints.items():
        state = load_file(f"{directory}/model.safetensors")
        layout = detect_layout(list(state))
        assert layout is LAYOUTS[layout_name]
        converted = convert_state_dict(state, layout)
        model = CrossEncoder.from_pretrained(directory, dtype="float32").model
        assert set(converted) == set(model.state_dict())
