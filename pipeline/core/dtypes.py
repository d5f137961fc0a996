"""The compute dtypes a scorer runs in, by the names the command line and the configs take, and which device
each may run on.

Declared here, without torch, so that the CLI, the rerank config and the driver read them without importing
torch (the driver never does: tests/test_imports.py); the engine (`pipeline.model.cross_encoder`) maps the
same names to torch dtypes through `TORCH_NAMES` and refuses what `runs_on` refuses.
"""

from __future__ import annotations

from typing import Literal, get_args

# auto: bf16 on CUDA; on CPU bf16 where a short GEMM probe finds it faster than float32, else float32. auto never
# picks int8 or float8: each trades fidelity for speed, so they are used only when asked for by name.
Dtype = Literal["auto", "float32", "bfloat16", "float16", "int8", "float8"]
AUTO = "auto"
# Every name `--dtype` and the configs' `dtype:` accept, `auto` first (the order --help lists them in).
CHOICES: tuple[str, ...] = get_args(Dtype)

# The torch dtype each name stands for (the attribute of `torch`): float8 is e4m3, the format the encoder's
# Linear layers are quantized to (pipeline/model/fp8.py); int8 and float8 name the Linear layers' dtype only.
TORCH_NAMES = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "int8": "int8",
    "float8": "float8_e4m3fn",
}

# The dtype-device rule: the devices a scorer may run a dtype on; a dtype not named runs on every device.
# int8: CPU only, through oneDNN's int8 linear (pipeline/model/quantization.py); GPUs run bf16 faster.
# float8: CUDA only, on GPUs with float8 tensor cores (Hopper or Ada, torch._scaled_mm); the engine also runs
# it on CPU, but only as a reference for tests (pipeline/model/fp8.py), never in a job's scorer.
SCORER_DEVICES = {"int8": ("cpu",), "float8": ("cuda",)}
# Where the engine itself accepts each dtype: the rule above, plus float8 on CPU as that reference.
ENGINE_DEVICES = {"int8": ("cpu",), "float8": ("cuda", "cpu")}


def runs_on(dtype: str, device_type: str, *, reference: bool = False) -> bool:
    """Whether a scorer may run `dtype` ("int8", ...) on a device of type `device_type` ("cpu", "cuda").

    reference: the engine's own rule (`ENGINE_DEVICES`), which also accepts float8 on CPU for tests; a job's
    scorers follow `SCORER_DEVICES`. `auto` runs everywhere (it resolves per device).
    """
    devices = (ENGINE_DEVICES if reference else SCORER_DEVICES).get(dtype)
    return devices is None or device_type in devices
