"""Every CUDA-specific decision and host<->device step of the engine, in one place.

The engine never tests `device.type == "cuda"` or calls `torch.cuda` itself: it asks `is_cuda(device)` and
uses the helpers below. On a GPU they are thin wrappers of torch.cuda (pinned host memory, a side stream for
host-to-device copies, events). Keeping them in one object (`RUNTIME`) also lets the CPU test suite swap in a
runtime that answers "cuda" for CPU tensors, so the CUDA code paths run on a machine without a GPU
(tests/model/cuda_standins.py).

The scorer's order of work per micro-batch on CUDA (`CrossEncoder.score_tokens`):
    host: pack batch i+1 into pinned memory, copy it on the side stream (non-blocking), record an event
    GPU:  batch i's forward on the compute stream, then its logits copied into pinned host memory
    host: wait for batch i's logits (the only host sync of the micro-batch)
"""

from __future__ import annotations

import torch


class CudaRuntime:
    """torch.cuda, as the engine uses it."""

    def is_cuda(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def available(self) -> bool:
        return torch.cuda.is_available()

    def placement(self, device: torch.device) -> torch.device:
        """Where tensors for `device` really live (itself on a real GPU)."""
        return device

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A page-locked copy: only from pinned memory is a non-blocking host-to-device copy asynchronous."""
        return tensor.pin_memory()

    def empty_pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def side_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def on(self, stream):
        """Context: kernels and copies issued inside run on `stream`."""
        return torch.cuda.stream(stream)

    def record(self, stream=None):
        """An event marking everything issued so far on `stream` (the current one when None)."""
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, event) -> None:
        """The current stream waits for `event` on the GPU; the host does not."""
        torch.cuda.current_stream().wait_event(event)

    def keep_for_current_stream(self, tensor: torch.Tensor) -> None:
        """`tensor` was made on a side stream and is used on the current one: keep the allocator from reusing
        its memory before the current stream is done with it."""
        tensor.record_stream(torch.cuda.current_stream())

    def host_wait(self, event) -> None:
        """The host waits for `event`: the one host sync per micro-batch."""
        event.synchronize()

    def supports_bf16(self) -> bool:
        return torch.cuda.is_bf16_supported()

    def capability(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.get_device_capability(device)


RUNTIME = CudaRuntime()


def is_cuda(device: torch.device | str) -> bool:
    """Whether the engine takes its CUDA code paths for `device`."""
    return RUNTIME.is_cuda(torch.device(device))
