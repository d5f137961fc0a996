"""The cross-encoder engine: packed-sequence model, strict checkpoint loading, jina-compatible API."""

from pipeline.model.cross_encoder import CrossEncoder, resolve_device, resolve_dtype
from pipeline.model.modeling import CrossEncoderModel, ModelConfig, select_attention_backend
from pipeline.model.packing import PackedBatch, pack, token_budget_batches
from pipeline.model.quantization import Int8Options

__all__ = [
    "CrossEncoder", "CrossEncoderModel", "Int8Options", "ModelConfig", "PackedBatch", "pack", "resolve_device",
    "resolve_dtype", "select_attention_backend", "token_budget_batches",
]
