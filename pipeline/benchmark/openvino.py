"""OpenVINO contenders: the checkpoint's transformers model converted with `openvino.convert_model` (from the
torch model, as optimum-intel does) and compiled for the CPU plugin.

- `ov-fp32`: INFERENCE_PRECISION_HINT f32, float32 throughout;
- `ov-default`: no hint: the plugin's own choice (bf16 on CPUs with AVX512-BF16 or AMX, f32 on AVX2-only ones;
  the row's dtype says which it picked);
- `ov-int8`: static post-training quantization with `nncf.quantize` (ModelType.TRANSFORMER, its default
  preset with SmoothQuant), calibrated on the workloads' own pairs that come after the timed ones (one
  unpadded pair per sample, `calibration_pairs` per workload): what sentence-transformers'
  `export_static_quantized_openvino_model` does through optimum-intel's `OVQuantizer` with
  `OVQuantizationConfig()` defaults, without the GLUE SST-2 download it calibrates on. The parts left in
  floating point run at the plugin's default precision.

Conversion and calibration happen in the worker's load time, not its timed pass. A conversion from the ONNX
export compiles in f32 but its nncf-quantized graph failed to compile (OpenVINO 2026.4: constant folding of a
Convert node), hence the torch route.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.benchmark.exported import (
    SortedPaddedScorer,
    example_inputs,
    load_transformers_model,
    logger,
    model_input_names,
    require,
)
from pipeline.benchmark.scored import Pairs

PRECISIONS = ("f32", "default", "int8")
OV_TYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


class OpenVinoContender(SortedPaddedScorer):
    """An OpenVINO CompiledModel on the CPU plugin at `precision` (one of PRECISIONS)."""

    def __init__(
        self, directory: str, max_length: int, precision: str, calibration_pairs: Pairs = ()
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown OpenVINO precision {precision!r}; choose from {PRECISIONS}")
        ov = require("openvino", "ov-fp32, ov-default and ov-int8")
        super().__init__(directory, max_length)
        names = model_input_names(directory)
        start = time.perf_counter()
        with torch.inference_mode():
            model = ov.convert_model(
                load_transformers_model(directory), example_input=example_inputs(directory, names)
            )
        logger.info("converted %s to OpenVINO in %.1f s", directory, time.perf_counter() - start)
        self.settings = {"openvino": ov.get_version(), "device": "CPU"}
        if precision == "int8":
            nncf = require("nncf", "ov-int8")
            if not calibration_pairs:
                raise ValueError(
                    "ov-int8 needs calibration pairs (the worker passes the workloads' pairs after "
                    "the timed ones)"
                )
            start = time.perf_counter()
            samples = self.feeds(calibration_pairs)
            model = nncf.quantize(
                model,
                nncf.Dataset(samples),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(samples),
            )
            self.settings.update(
                {
                    "quantization": "static int8 (nncf.quantize, ModelType.TRANSFORMER)",
                    "calibration_pairs": len(samples),
                    "calibration_seconds": time.perf_counter() - start,
                }
            )
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        chosen = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.settings["inference_precision"] = chosen
        self.dtype = "int8" if precision == "int8" else OV_TYPES.get(chosen, chosen)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.request.infer(feeds)[0][:, 0].astype(np.float32)
