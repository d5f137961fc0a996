"""The cross-encoder engine: packed-sequence model, strict checkpoint loading, jina-compatible API.

The names below load on first use, so that importing `pipeline.model.checkpoint` or `.tokenization` (the
driver, the tokenize and write stages) does not import torch.
"""

import importlib

_HOMES = {
    "CrossEncoder": "cross_encoder",
    "resolve_device": "cross_encoder",
    "resolve_dtype": "cross_encoder",
    "CrossEncoderModel": "modeling",
    "select_attention_backend": "modeling",
    "ModelConfig": "model_config",
    "PackedBatch": "packing",
    "pack": "packing",
    "token_budget_batches": "packing",
    "Int8Options": "quantization",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
