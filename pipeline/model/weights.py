"""Reading a checkpoint's weights into the model: names converted per layout, every key and shape checked.

Weights load from safetensors; a pickle `.bin` only when the caller opts in, and then with
`torch.load(weights_only=True)`. Finding the checkpoint and its layout is `checkpoint.py`'s (torch-free).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re

import torch

from pipeline.core.errors import CheckpointError
from pipeline.model.checkpoint import (
    DUMMY_MARKER,
    Layout,
    detect_layout,
    model_config_from_json,
    pickle_files,
    read_config,
    refuse_pickles,
    unreadable_weights,
)
from pipeline.model.modeling import CrossEncoderModel
from pipeline.model.rope_encoders import ROPE_MODELS

logger = logging.getLogger(
    "pipeline.model.checkpoint"
)  # the RANDOM WEIGHTS warning's logger, as users filter it


def convert_state_dict(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Checkpoint names -> our names, dropping known-unused weights; an unrecognised name is an error."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in state.items():
        if any(re.match(p, name) for p in layout.ignored):
            continue
        for pattern, replacement in layout.renames:
            if re.match(pattern, name):
                out[re.sub(pattern, replacement, name)] = tensor
                break
        else:
            unexpected.append(name)
    if unexpected:
        raise CheckpointError(
            f"unexpected weight(s) for the {layout.name} layout: {', '.join(sorted(unexpected)[:5])}"
        )
    if layout.fuse_qkv:
        for q_name in [n for n in out if ".mixer.query." in n]:
            names = [q_name.replace(".query.", f".{p}.") for p in ("query", "key", "value")]
            absent = [n for n in names if n not in out]
            if absent:
                raise CheckpointError(
                    f"checkpoint lacks {absent[0]} (needed to fuse query, key, value)"
                )
            out[q_name.replace(".query.", ".Wqkv.")] = torch.cat([out.pop(n) for n in names], dim=0)
    for fused, parts in layout.fuse:
        first = f".{parts[0]}."
        for name in [n for n in out if first in n]:
            names = [name.replace(first, f".{p}.") for p in parts]
            absent = [n for n in names if n not in out]
            if absent:
                raise CheckpointError(
                    f"checkpoint lacks {absent[0]} (needed to fuse {', '.join(parts)})"
                )
            out[name.replace(first, f".{fused}.")] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def read_weights(directory: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        state: dict[str, torch.Tensor] = {}
        for path in files:
            try:
                state.update(load_file(path))
            except (
                Exception
            ) as e:  # SafetensorError, OSError: a truncated download or another format
                raise unreadable_weights(path, e) from None
        return state
    pickles = pickle_files(directory)
    if not pickles:
        raise CheckpointError(f"no weights in {directory!r}: expected model.safetensors")
    if not allow_pickle:
        refuse_pickles(directory, pickles)
    state = {}
    for path in pickles:
        try:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # torch's own message advises weights_only=False: never pass that on
            raise CheckpointError(
                f"{path} cannot be read as plain tensors ({type(e).__name__}); it may hold "
                "code or be corrupt. Convert the checkpoint to safetensors"
            ) from None
    return state


# The torch.nn.init functions a module's reset_parameters calls. On the meta device they run through
# torch._refs, whose first call imports torch._dynamo: 2.3 s of a scorer actor's 4 s start (measured
# 2026-12-01, AMD EPYC, torch 2.13 CPU) for values load_state_dict then replaces anyway.
_INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "trunc_normal_",
    "ones_",
    "zeros_",
    "constant_",
)


@contextlib.contextmanager
def _no_init():
    """Modules built inside skip their random initialisation (transformers' `no_init_weights` does the same)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def assign_checked(model_class, config, converted: dict[str, torch.Tensor], layout: Layout):
    """`model_class(config)` holding the `converted` weights, every key and shape checked against it first.

    Built on the meta device without random initialisation: the weights are assigned, not copied.
    Raises CheckpointError naming the missing, unexpected or misshapen weight.
    """
    with torch.device("meta"), _no_init():
        model = model_class(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise CheckpointError(
            f"checkpoint lacks weight(s) for the {layout.name} layout: {', '.join(missing[:5])}"
        )
    extra = sorted(set(converted) - set(expected))
    if extra:
        raise CheckpointError(
            f"unexpected weight(s) for a {config.num_hidden_layers}-layer {layout.name} model: "
            f"{', '.join(extra[:5])}"
        )
    for name, shape in expected.items():
        if tuple(converted[name].shape) != shape:
            raise CheckpointError(
                f"weight {name} has shape {tuple(converted[name].shape)}, the config implies {shape}"
            )
    model.load_state_dict(converted, assign=True)
    return model


def warn_if_dummy(raw_config: dict, directory: str) -> None:
    """Logs the RANDOM WEIGHTS warning when config.json marks a dummy checkpoint."""
    if raw_config.get(DUMMY_MARKER):
        logger.warning(
            "RANDOM WEIGHTS: %s is a dummy checkpoint; its scores mean nothing", directory
        )


def load_model(
    directory: str, allow_pickle: bool = False
) -> tuple[CrossEncoderModel, Layout, dict]:
    """Build the model from a checkpoint directory, checking every key and shape. Returns (model, layout, config.json)."""
    raw_config = read_config(directory)
    state = read_weights(directory, allow_pickle)
    layout = detect_layout(list(state))
    converted = convert_state_dict(state, layout)
    config = model_config_from_json(raw_config, layout)
    model = assign_checked(
        ROPE_MODELS.get(layout.name, CrossEncoderModel), config, converted, layout
    )
    warn_if_dummy(raw_config, directory)
    return model.eval(), layout, raw_config
