"""ONNX Runtime contenders: the checkpoint's ONNX export (`exported.export_onnx`) on the CPUExecutionProvider.

- `ort-fp32`: the export as it is (float32), the session's default graph optimizations (ORT_ENABLE_ALL);
- `ort-int8`: `onnxruntime.quantization.quantize_dynamic` of it, per-channel QInt8 weights (activations
  quantized per batch at run time), what sentence-transformers' `export_dynamic_quantized_onnx_model`
  does through optimum for its "avx2"/"avx512_vnni" configs.

Both run padded, length-sorted batches with as many intra-op threads as torch uses in the same worker.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from pipeline.benchmark.exported import (
    ONNX_FILE,
    SortedPaddedScorer,
    build_once,
    cache_dir,
    export_onnx,
    logger,
    require,
)

# Above ~2 GB an ONNX file must keep its weights outside the protobuf (bge-reranker-v2-m3 in fp32: 2.3 GB).
EXTERNAL_DATA_BYTES = 1 << 30


def quantize_int8(directory: str) -> str:
    """The path of the dynamic int8 quantization of `directory`'s ONNX export (built once)."""
    quantization = require("onnxruntime.quantization", "ort-int8")
    source = export_onnx(directory)

    def build(folder: str) -> None:
        start = time.perf_counter()
        size = sum(
            os.path.getsize(os.path.join(os.path.dirname(source), f))
            for f in os.listdir(os.path.dirname(source))
        )
        quantization.quantize_dynamic(
            source,
            os.path.join(folder, ONNX_FILE),
            per_channel=True,
            weight_type=quantization.QuantType.QInt8,
            use_external_data_format=size > EXTERNAL_DATA_BYTES,
        )
        logger.info("quantized %s to int8 in %.1f s", source, time.perf_counter() - start)

    return os.path.join(build_once(cache_dir(directory, "onnx-int8"), build), ONNX_FILE)


class OnnxRuntimeContender(SortedPaddedScorer):
    """An ONNX Runtime InferenceSession on the fp32 export or its dynamic int8 quantization."""

    def __init__(self, directory: str, max_length: int, int8: bool):
        ort = require("onnxruntime", "ort-fp32 and ort-int8")
        super().__init__(directory, max_length)
        path = quantize_int8(directory) if int8 else export_onnx(directory)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.dtype = "int8" if int8 else "float32"
        self.settings = {
            "onnxruntime": ort.__version__,
            "provider": "CPUExecutionProvider",
            "quantization": "dynamic, per-channel QInt8 weights" if int8 else None,
            "intra_op_num_threads": options.intra_op_num_threads,
        }

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0][:, 0]
