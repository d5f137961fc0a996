"""Pure-torch stand-ins for the CUDA kernels the engine calls, enforcing the real kernels' input contracts.

How the CUDA code paths run on a CPU-only machine, without mocking the engine: every CUDA decision and every
host<->device step of the engine goes through `pipeline.model.device.RUNTIME`. `install` swaps in a
`FakeCudaRuntime` that answers "cuda" for CPU tensors (and places "cuda" tensors on the CPU), and patches in
the three CUDA-only kernels the engine then calls:

    flash_attn.flash_attn_varlen_func   (a `flash_attn` module in sys.modules)
    torch.nn.attention.varlen.varlen_attn
    torch._scaled_mm                    (CUDA's contract: the CPU op accepts layouts CUDA rejects)

The engine's own code (backend choice, packing, the padded SDPA grouping, float8 Linear layers, the scorer's
copies, streams and syncs) runs unchanged on CPU tensors. Each stand-in computes the exact result in float32
and raises `ContractError` (a RuntimeError, as the real kernels raise) when an input breaks what the real
kernel requires, so a change that would crash on a GPU fails here:

    flash_attn_varlen_func / varlen_attn: q, k, v 3-D (tokens, heads, head_dim), float16 or bfloat16, one
        dtype, last dimension contiguous (stride(-1) == 1), head_dim a multiple of 8 and <= 256; cu_seqlens
        int32, 1-D, contiguous, q's and k's the same length; max_seqlen a Python int >= every sequence.
        Sources: flash-attention's csrc/flash_attn/flash_api.cpp (mha_varlen_fwd: CHECK_CONTIGUOUS(cu_seqlens),
        cu_seqlens dtype int32, "Input tensor must have contiguous last dimension", "FlashAttention only
        support fp16 and bf16 data type"); torch's aten _flash_attention_forward (same kernel) behind
        torch.nn.attention.varlen.
    _scaled_mm (row-wise scaling, as fp8.py uses it): a and b float8, a row-major (stride(1) == 1),
        b column-major (stride(0) == 1), K and N multiples of 16 (M is free), scale_a (M, 1) and scale_b
        (1, N) float32 contiguous, out_dtype bfloat16, bias (N,) bfloat16. Source: torch's
        _meta_registrations.py (_check_scaled_mm_sizes, the non-CPU branch) and Blas.cpp's row-wise path.

`FakeCudaRuntime` also records the order of copies, events and host waits (`log`) and counts host syncs,
so tests check the scorer's order of work, not its timing. `count_host_reads` counts the tensor reads that
would make a GPU wait (.item(), .tolist(), .cpu(), bool(), int(), ...).
"""

from __future__ import annotations

import functools
import importlib.machinery
import math
import sys
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import pipeline.model.device as engine_device

HALF = (torch.float16, torch.bfloat16)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# > 0 while a stand-in kernel runs: its own reads of values (checking contracts, looping over sequences)
# are the stand-in's, not the engine's; a real kernel reads nothing back to the host.
_in_kernel = [0]


def _kernel(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        _in_kernel[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _in_kernel[0] -= 1

    return run


class ContractError(RuntimeError):
    """An input the real CUDA kernel rejects (or computes wrongly with)."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ContractError(message)


# --- attention ------------------------------------------------------------------------------------------


def _check_varlen(kernel, q, k, v, cu_q, cu_k, max_q, max_k, gqa: bool = False) -> None:
    """gqa: k and v may have fewer heads than q (a divisor of q's), as flash-attn always allows and
    varlen_attn with enable_gqa=True."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(
            t.dim() == 3,
            f"{kernel}: {name} must be (tokens, heads, head_dim), got {tuple(t.shape)}",
        )
        _check(t.dtype in HALF, f"{kernel} only supports fp16 and bf16, got {name} {t.dtype}")
        _check(t.dtype == q.dtype, f"{kernel}: q, k, v must share one dtype")
        _check(
            t.stride(-1) == 1,
            f"{kernel}: {name} must have contiguous last dimension, stride {t.stride()}",
        )
    head_dim = q.shape[-1]
    _check(
        head_dim % 8 == 0 and head_dim <= 256,
        f"{kernel}: head_dim {head_dim} must be a multiple of 8, <= 256",
    )
    if gqa:
        _check(
            k.shape[1:] == v.shape[1:]
            and k.shape[-1] == q.shape[-1]
            and q.shape[1] % k.shape[1] == 0,
            f"{kernel}: k, v heads must divide q's and head_dims match",
        )
    else:
        _check(
            k.shape[1:] == v.shape[1:] == q.shape[1:], f"{kernel}: q, k, v heads/head_dim differ"
        )
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        _check(
            isinstance(cu, torch.Tensor) and cu.dtype == torch.int32,
            f"{kernel}: {name} must be int32, got {getattr(cu, 'dtype', type(cu))}",
        )
        _check(
            cu.dim() == 1 and cu.is_contiguous(),
            f"{kernel}: {name} must be a contiguous 1-D tensor",
        )
        _check(cu.device == q.device, f"{kernel}: {name} must be on q's device")
    _check(
        cu_q.numel() == cu_k.numel(),
        f"{kernel}: cu_seqlens_q and cu_seqlens_k give different batch sizes",
    )
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        _check(type(m) is int, f"{kernel}: {name} must be a Python int, got {type(m).__name__}")
    lengths_q, lengths_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    _check(cu_q[0].item() == 0 and cu_k[0].item() == 0, f"{kernel}: cu_seqlens must start at 0")
    _check(
        max(lengths_q) <= max_q and max(lengths_k) <= max_k,
        f"{kernel}: max_seqlen smaller than a sequence (the kernel would read past it)",
    )
    _check(
        cu_q[-1].item() <= q.shape[0] and cu_k[-1].item() <= k.shape[0],
        f"{kernel}: cu_seqlens past the tokens",
    )


def _reference_varlen(q, k, v, cu_q, cu_k, scale, causal: bool = False):
    """Exact attention per sequence in float32; `causal` aligned bottom-right as flash-attn (>= 2.1) does:
    query i of n sees key j of m when j <= i + m - n."""
    out = torch.zeros_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
        mask = None
        if causal:
            n, m = qe - qs, ke - ks
            mask = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        o = F.scaled_dot_product_attention(
            q[qs:qe].float().transpose(0, 1),
            k[ks:ke].float().transpose(0, 1),
            v[ks:ke].float().transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[qs:qe] = o.transpose(0, 1).to(q.dtype)
    return out


@_kernel
def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn 2's `flash_attn_varlen_func`, forward only (inference), causal or not, grouped-query
    heads allowed (as the real kernel)."""
    _check_varlen(
        "flash_attn_varlen_func",
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        gqa=True,
    )
    _check(
        dropout_p == 0.0 and tuple(window_size) == (-1, -1),
        "stand-in: only inference without a window is implemented",
    )
    CALLS["flash_attn_varlen_func"] += 1
    return _reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal=causal)


@_kernel
def varlen_attn(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch.nn.attention.varlen.varlen_attn as torch 2.13 has it (same signature); window_size (-1, -1)
    (full) or (-1, 0) (causal)."""
    _check_varlen(
        "varlen_attn", query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=enable_gqa
    )
    _check(num_splits in (None, 1), "stand-in: num_splits other than 1")
    _check(tuple(window_size) in ((-1, -1), (-1, 0)), "stand-in: only full or causal windows")
    CALLS["varlen_attn"] += 1
    return _reference_varlen(
        query, key, value, cu_seq_q, cu_seq_k, scale, causal=tuple(window_size) == (-1, 0)
    )


@_kernel
def varlen_attn_without_scale(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None
):
    """torch 2.9's varlen_attn (its documented signature): no `scale` (always 1/sqrt(head_dim)), no `num_splits`."""
    _check_varlen("varlen_attn", query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    CALLS["varlen_attn"] += 1
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, None, causal=is_causal)


# --- float8 GEMM ----------------------------------------------------------------------------------------


@_kernel
def scaled_mm_cuda(
    a,
    b,
    scale_a=None,
    scale_b=None,
    bias=None,
    scale_result=None,
    out_dtype=None,
    use_fast_accum=False,
):
    """CUDA `torch._scaled_mm` with row-wise scales: cuBLASLt / CUTLASS's layout, size and dtype rules."""
    _check(a.dim() == 2 and b.dim() == 2, "_scaled_mm: inputs must be 2-D")
    _check(
        a.dtype in FP8 and b.dtype in FP8,
        f"_scaled_mm: expected float8 inputs, got {a.dtype} and {b.dtype}",
    )
    m, k = a.shape
    _check(
        b.shape[0] == k, f"_scaled_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply"
    )
    n = b.shape[1]
    _check(
        m == 0 or (a.stride(1) == 1 and a.stride(0) >= k),
        f"_scaled_mm: self must be row_major, got stride {a.stride()}",
    )
    _check(
        b.stride(0) == 1 and b.stride(1) >= k,
        f"_scaled_mm: mat2 must be col_major, got stride {b.stride()}",
    )
    _check(k % 16 == 0, f"_scaled_mm: expected self.size(1) divisible by 16, got {k}")
    _check(
        k % 16 == 0 and n % 16 == 0,
        f"_scaled_mm: expected both dimensions of mat2 divisible by 16, got {tuple(b.shape)}",
    )
    for name, s, shape in (("scale_a", scale_a, (m, 1)), ("scale_b", scale_b, (1, n))):
        _check(isinstance(s, torch.Tensor), f"_scaled_mm: {name} missing")
        _check(
            tuple(s.shape) == shape,
            f"_scaled_mm: row-wise {name} must be {shape}, got {tuple(s.shape)}",
        )
        _check(
            s.dtype == torch.float32 and s.is_contiguous(),
            f"_scaled_mm: {name} must be contiguous float32",
        )
    _check(
        out_dtype == torch.bfloat16,
        f"_scaled_mm: row-wise scaling only supports bfloat16 output, got {out_dtype}",
    )
    if bias is not None:
        _check(
            bias.shape == (n,) and bias.dtype == torch.bfloat16,
            "_scaled_mm: bias must be (N,) bfloat16",
        )
    _check(scale_result is None, "stand-in: scale_result is not used with row-wise scaling")
    CALLS["_scaled_mm"] += 1
    out = (a.float() @ b.float()) * scale_a * scale_b
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# --- the runtime ----------------------------------------------------------------------------------------


class FakeStream:
    def __init__(self, name: str):
        self.name = name


class FakeEvent:
    def __init__(self, runtime: FakeCudaRuntime, stream: FakeStream):
        self.stream = stream.name
        self.number = len(runtime.log)


class FakeCudaRuntime(engine_device.CudaRuntime):
    """CPU tensors taken for CUDA ones; streams and events recorded in `log` instead of run."""

    def __init__(self):
        self.log: list[tuple] = []
        self.host_syncs = 0
        self.pinned: set[int] = set()  # data_ptr of every tensor pinned so far
        self._compute = FakeStream("compute")
        self._current = self._compute

    def is_cuda(self, device):
        return device.type in ("cuda", "cpu")

    def available(self):
        return True

    def placement(self, device):
        return torch.device("cpu")

    def pin(self, tensor):
        pinned = tensor.clone()  # a real pin_memory() copies too
        self.pinned.add(pinned.data_ptr())
        self.log.append(("pin", self._current.name))
        return pinned

    def empty_pinned(self, shape, dtype):
        t = torch.empty(shape, dtype=dtype)
        self.pinned.add(t.data_ptr())
        return t

    def side_stream(self, device):
        return FakeStream("copy")

    @contextmanager
    def on(self, stream):
        previous, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = previous

    def record(self, stream=None):
        event = FakeEvent(self, stream or self._current)
        self.log.append(("record", event.stream))
        return event

    def wait(self, event):
        self.log.append(("wait", self._current.name, event.stream))

    def keep_for_current_stream(self, tensor):
        pass

    def host_wait(self, event):
        self.host_syncs += 1
        self.log.append(("host_wait", event.stream))

    def supports_bf16(self):
        return True

    def capability(self, device):
        return (9, 0)


CALLS = {"flash_attn_varlen_func": 0, "varlen_attn": 0, "_scaled_mm": 0}


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by the host: on a GPU each one waits for the device."""

    NAMES = (
        "item",
        "tolist",
        "cpu",
        "numpy",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
    )

    def __init__(self, runtime: FakeCudaRuntime | None = None):
        super().__init__()
        self.reads: list[str] = []
        self.pinned = (
            set() if runtime is None else runtime.pinned
        )  # host memory: reading it waits for nothing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        host = (
            bool(args) and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.pinned
        )
        if host or _in_kernel[0]:
            pass
        elif name in self.NAMES:
            self.reads.append(name)
        elif (
            name == "__getitem__"
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
            and args[1].dtype == torch.bool
        ):
            self.reads.append("boolean mask")  # its output size depends on the values
        return func(*args, **(kwargs or {}))


def count_host_reads(runtime: FakeCudaRuntime | None = None) -> HostReads:
    """`with count_host_reads(runtime) as reads: ...`; then `reads.reads` lists the reads of device values made
    inside (reads of the runtime's pinned host buffers excluded)."""
    return HostReads(runtime)


def _flash_attn_module(broken: bool = False) -> types.ModuleType:
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.__version__ = "2.8.3"
    if broken:

        def flash_attn_varlen_func_broken(*args, **kwargs):
            # What an extension built for another torch does at its first call.
            raise ImportError(
                "flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                "_ZN3c104cuda9SetDeviceEi"
            )

        module.flash_attn_varlen_func = flash_attn_varlen_func_broken
    else:
        module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


class _Patcher:
    """What `install` does when given no monkeypatch: the same setattr calls, undone by `undo()`."""

    def __init__(self):
        self._undo: list = []

    def setattr(self, target, name, value, raising=True):
        old = getattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))
        setattr(target, name, value)

    def setitem(self, mapping, key, value):
        missing = key not in mapping
        old = mapping.get(key)
        self._undo.append(
            lambda: mapping.pop(key, None) if missing else mapping.__setitem__(key, old)
        )
        mapping[key] = value

    def delitem(self, mapping, key, raising=True):
        if key in mapping:
            old = mapping[key]
            self._undo.append(lambda: mapping.__setitem__(key, old))
            del mapping[key]

    def undo(self):
        while self._undo:
            self._undo.pop()()


def install(
    monkeypatch_or_none=None,
    *,
    flash_attn: str | None = "ok",
    varlen: str | None = "current",
    scaled_mm: bool = True,
) -> FakeCudaRuntime:
    """Make the engine take its CUDA code paths on CPU tensors, with the stand-in kernels.

    monkeypatch_or_none: pytest's `monkeypatch` (undone after the test), or None: patched until
        `runtime.undo()` is called on the returned runtime. The engine remembers its kernel probes per
        runtime object, so every `install` starts with fresh probes.
    flash_attn: "ok" (the stand-in), "broken" (imports, fails at the first call, as a build for another
        torch does) or None (not installed: `import flash_attn` fails).
    varlen: "current" (torch 2.13's signature), "no_scale" (torch 2.9's, without `scale`) or None (absent,
        as before 2.9).
    scaled_mm: patch `torch._scaled_mm` with the CUDA contract.
    Returns the fake runtime: `log`, `host_syncs`, `pinned`.
    """
    mp = monkeypatch_or_none if monkeypatch_or_none is not None else _Patcher()
    import torch.nn.attention.varlen as varlen_module

    runtime = FakeCudaRuntime()
    runtime.undo = getattr(mp, "undo", lambda: None)
    mp.setattr(engine_device, "RUNTIME", runtime)
    if flash_attn is None:
        mp.setitem(
            sys.modules, "flash_attn", None
        )  # None in sys.modules: `import flash_attn` raises ImportError
    else:
        mp.setitem(sys.modules, "flash_attn", _flash_attn_module(broken=flash_attn == "broken"))
    if varlen == "current":
        mp.setattr(varlen_module, "varlen_attn", varlen_attn)
    elif varlen == "no_scale":
        mp.setattr(varlen_module, "varlen_attn", varlen_attn_without_scale)
    else:
        mp.delitem(varlen_module.__dict__, "varlen_attn")
    if scaled_mm:
        mp.setattr(torch, "_scaled_mm", scaled_mm_cuda)
    for key in CALLS:
        CALLS[key] = 0
    return runtime
