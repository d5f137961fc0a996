"""What the figures were measured on: CPU model and flags, cores, torch, the GPU if any, the load."""

from __future__ import annotations

import os
import platform

import torch


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu
        )
        flags = next(
            (line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []
        )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "bf16_matrix_units": [f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16")],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load_average() -> float:
    """1-minute load average: runnable processes; above the core count, other work shared the CPUs."""
    return os.getloadavg()[0]
