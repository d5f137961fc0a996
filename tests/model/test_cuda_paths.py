"""The engine's CUDA code paths, run on this CPU-only machine with pure-torch stand-ins for the CUDA kernels.

How: the engine routes every CUDA decision and host<->device step through `pipeline.model.device.RUNTIME`.
`cuda_standins.install(monkeypatch)` swaps in a runtime that takes CPU tensors for CUDA ones and records
streams, events, pinned buffers and host waits instead of running them, and patches in stand-ins for
flash-attn's `flash_attn_varlen_func`, torch's `varlen_attn` and CUDA's `torch._scaled_mm` that raise when an
input breaks the real kernel's contract (dtype, int32 cu_seqlens, strides, Python-int max_seqlen, float8
layouts and row-wise scale shapes). Everything else is the engine's own code on real tensors: backend
choice and its fallbacks, packing, the padded SDPA grouping, float8 Linear layers, the scorer's copies and
syncs, and `ScoreStage`. What this cannot check (kernel speed, real GPU memory, stream races) is for
scripts/gpu_check.py on a GPU.
"""

from __future__ import annotations

import json
import logging

import cuda_standins
import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.stats import spearmanr

from pipeline.core import schema as S
from pipeline.model import CrossEncoder
from pipeline.model import device as engine_device
from pipeline.model.modeling import (
    ATEN_LINEAR,
    FLASH_ATTN,
    SCALED_MM_FP8,
    SDPA_GROUPED,
    TORCH_VARLEN,
    PackedView,
    varlen_attention,
)

PAIRS = [
    ("what is a cross-encoder", "a model that reads the query and the document together"),
    (
        "capital of france",
        "paris is the capital of france, on the seine, with about two million people",
    ),
    ("capital of france", "bananas"),
    ("how do tides work", "the moon's gravity pulls the oceans, giving two tides a day"),
    (
        "how do tides work",
        "tidal locking keeps one face of the moon toward the earth, and the far side "
        "was first photographed in 1959 by a soviet probe",
    ),
] * 3


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The CPU engine's bf16 logits for PAIRS (no stand-ins installed)."""
    encoder = CrossEncoder.from_pretrained("dummy:tiny", device="cpu", dtype="bfloat16")
    return np.asarray(encoder.compute_score(PAIRS, return_logits=True))


def _close(x, reference):
    # bf16 everywhere: the backends differ only in rounding.
    assert np.abs(np.asarray(x) - reference).max() < 0.05 * (reference.max() - reference.min())


@pytest.mark.parametrize(
    "flash_attn, varlen, backend",
    [
        ("ok", "current", FLASH_ATTN),
        (None, "current", TORCH_VARLEN),  # flash-attn not installed
        (
            "broken",
            "current",
            TORCH_VARLEN,
        ),  # flash-attn built for another torch: imports, fails at the first call
        (None, "no_scale", TORCH_VARLEN),  # an older torch's varlen_attn, without `scale`
        (None, None, SDPA_GROUPED),  # no varlen kernel at all: the padded SDPA groups
    ],
)
def test_each_cuda_backend_scores_like_the_cpu_engine(
    monkeypatch, caplog, reference, flash_attn, varlen, backend
):
    cuda_standins.install(monkeypatch, flash_attn=flash_attn, varlen=varlen)
    with caplog.at_level(logging.INFO, logger="pipeline.model.modeling"):
        encoder = CrossEncoder.from_pretrained("dummy:tiny", device="cuda", dtype="bfloat16")
        scores = encoder.compute_score(PAIRS, return_logits=True, max_tokens_per_batch=64)
    info = encoder.describe()
    assert (info["attention_backend"], info["linear_kernel"]) == (backend, ATEN_LINEAR)
    _close(scores, reference)
    called = {FLASH_ATTN: "flash_attn_varlen_func", TORCH_VARLEN: "varlen_attn"}.get(backend)
    # probe + 2 layers per micro-batch; none of the others ran
    assert all(
        (n > 2) == (name == called)
        for name, n in cuda_standins.CALLS.items()
        if name != "_scaled_mm"
    )
    fallbacks = [
        r.getMessage() for r in caplog.records if "unusable, falling back" in r.getMessage()
    ]
    if flash_attn == "broken":
        assert (
            len(fallbacks) == 1 and "undefined symbol" in fallbacks[0]
        )  # logged once, with the reason
        encoder2 = CrossEncoder.from_pretrained("dummy:tiny", device="cuda", dtype="bfloat16")
        assert encoder2.model.attention_backend == TORCH_VARLEN
        assert len([r for r in caplog.records if "unusable" in r.getMessage()]) == 1


def test_padded_sdpa_groups_are_exact_and_read_nothing_back(monkeypatch):
    runtime = cuda_standins.install(monkeypatch)
    torch.manual_seed(0)
    seqlens = [10, 9, 8, 4, 5, 1, 1]  # groups (10, 9, 8), (5, 4) padded under a mask, (1, 1) not
    starts = np.concatenate(([0], np.cumsum(seqlens[:-1]))).tolist()
    total, heads, head_dim = sum(seqlens), 2, 8
    q, k, v = (torch.randn(total, heads, head_dim, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0] + np.cumsum(seqlens).tolist(), dtype=torch.int32)
    expected = cuda_standins._reference_varlen(q, k, v, cu, cu, None)
    packed = PackedView(cu, max(seqlens), seqlens, starts, cu[:-1].long(), SDPA_GROUPED)
    with cuda_standins.count_host_reads(runtime) as reads:
        out = varlen_attention(SDPA_GROUPED, q, k, v, packed, cls_only=False, scale=head_dim**-0.5)
        first = varlen_attention(
            SDPA_GROUPED, q[cu[:-1].long()], k, v, packed, cls_only=True, scale=head_dim**-0.5
        )
    assert reads.reads == []
    assert (
        len(packed.padded_groups) == 3
        and sum(g.mask is not None for g in packed.padded_groups) == 2
    )
    assert (out.float() - expected.float()).abs().max() < 0.02
    assert (first.float() - expected[cu[:-1].long()].float()).abs().max() < 0.02
    assert all(g.gather.data_ptr() != 0 for g in packed.padded_groups)


@pytest.mark.parametrize("flash_attn, varlen", [("ok", "current"), (None, None)])
def test_the_gpu_scorer_syncs_once_per_micro_batch_and_overlaps_the_next_copy(
    monkeypatch, reference, flash_attn, varlen
):
    runtime = cuda_standins.install(monkeypatch, flash_attn=flash_attn, varlen=varlen)
    encoder = CrossEncoder.from_pretrained("dummy:tiny", device="cuda", dtype="bfloat16")
    ids, types = encoder.tokenizer.encode_pairs([p[0] for p in PAIRS], [p[1] for p in PAIRS], 128)
    runtime.log.clear()
    with cuda_standins.count_host_reads(runtime) as reads:
        logits = encoder.score_tokens(ids, types, max_tokens_per_batch=64)
    micro_batches = len([e for e in runtime.log if e[0] == "record" and e[1] == "copy"])
    assert micro_batches >= 4
    assert reads.reads == []  # no .item(), .tolist(), bool(), .cpu() on device values
    assert runtime.host_syncs == micro_batches  # exactly one host wait per micro-batch
    # Order: the host waits for batch i's logits only once batch i+1's forward and batch i+2's copy are
    # queued (so the GPU always has work), and the compute stream waits for each copy on the device.
    kinds = [
        e
        for e in runtime.log
        if e[0] in ("host_wait", "wait") or (e[0] == "record" and e[1] == "copy")
    ]
    copies_before = [
        sum(1 for e in kinds[:i] if e[0] == "record")
        for i, e in enumerate(kinds)
        if e[0] == "host_wait"
    ]
    assert copies_before == [min(i + 3, micro_batches) for i in range(micro_batches)]
    assert [e for e in kinds if e[0] == "wait"] == [("wait", "compute", "copy")] * micro_batches
    assert (
        len([e for e in runtime.log if e[0] == "pin"]) >= 2 * micro_batches
    )  # ids and cu_seqlens, pinned
    _close(logits, reference)


def test_float8_runs_cudas_scaled_mm_contract(monkeypatch):
    reference = CrossEncoder.from_pretrained("dummy:tiny", device="cpu", dtype="float32")
    x = np.asarray(reference.compute_score(PAIRS, return_logits=True))
    runtime = cuda_standins.install(monkeypatch)
    fp8 = CrossEncoder.from_pretrained("dummy:tiny", device="cuda", dtype="float8")
    assert fp8.describe()["linear_kernel"] == SCALED_MM_FP8
    assert fp8.model.emb_ln.weight.dtype == torch.bfloat16  # beside float8 on CUDA: bf16
    ids, types = fp8.tokenizer.encode_pairs([p[0] for p in PAIRS], [p[1] for p in PAIRS], 128)
    with cuda_standins.count_host_reads(runtime) as reads:
        y = fp8.score_tokens(
            ids, types, max_tokens_per_batch=100
        )  # token counts not multiples of 16
    assert reads.reads == []
    assert cuda_standins.CALLS["_scaled_mm"] >= 4 * 2
    assert spearmanr(x, y).correlation > 0.8
    assert np.abs(x - y).max() < 0.5 * (x.max() - x.min())


def test_the_score_stage_on_cuda(monkeypatch, tmp_path, reference):
    from pipeline.rerank.config import ScorerConfig, TokenizerConfig
    from pipeline.rerank.stages.score import ScoreStage
    from pipeline.rerank.stages.tokenize import TokenizeStage

    runtime = cuda_standins.install(monkeypatch)
    batch = pa.table(
        {
            S.QUERY: [p[0] for p in PAIRS],
            S.DOCUMENT: [p[1] for p in PAIRS],
            S.REASON: pa.nulls(len(PAIRS), pa.string()),
            "_row": list(range(len(PAIRS))),
        }
    )
    tokenized = TokenizeStage("dummy:tiny", None, TokenizerConfig(max_length=1024))(batch)
    stage = ScoreStage(
        "dummy:tiny",
        None,
        "bfloat16",
        ScorerConfig(device="cuda", max_tokens_per_batch=64),
        str(tmp_path),
        {},
    )
    runtime.host_syncs = 0
    scored = stage(tokenized)
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())["attention_backend"] == FLASH_ATTN
    assert runtime.host_syncs >= 4
    by_row = dict(zip(scored.column("_row").to_pylist(), scored.column(S.SCORE).to_pylist()))
    _close([by_row[r] for r in range(len(PAIRS))], reference)


def test_the_stand_ins_reject_what_the_cuda_kernels_reject(monkeypatch):
    cuda_standins.install(monkeypatch)
    import flash_attn
    from torch.nn.attention.varlen import varlen_attn

    q = torch.randn(7, 2, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4).shape == q.shape
    broken = {
        "int32": lambda: flash_attn.flash_attn_varlen_func(q, q, q, cu.long(), cu, 4, 4),
        "fp16 and bf16": lambda: varlen_attn(q.float(), q.float(), q.float(), cu, cu, 4, 4),
        "contiguous last dimension": lambda: varlen_attn(
            q.transpose(1, 2).contiguous().transpose(1, 2), q, q, cu, cu, 4, 4
        ),
        "Python int": lambda: varlen_attn(q, q, q, cu, cu, torch.tensor(4), 4),
        "max_seqlen smaller": lambda: flash_attn.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3),
    }
    for message, call in broken.items():
        with pytest.raises(cuda_standins.ContractError, match=message):
            call()
    a = torch.randn(5, 32).to(torch.float8_e4m3fn)
    b = torch.randn(48, 32).to(torch.float8_e4m3fn)
    good = dict(scale_a=torch.ones(5, 1), scale_b=torch.ones(1, 48), out_dtype=torch.bfloat16)
    assert torch._scaled_mm(a, b.t(), **good).shape == (5, 48)
    broken = {
        "col_major": lambda: torch._scaled_mm(a, b.t().contiguous(), **good),
        "divisible by 16": lambda: torch._scaled_mm(a[:, :24], b[:, :24].t(), **good),
        r"\(5, 1\)": lambda: torch._scaled_mm(a, b.t(), **(good | {"scale_a": torch.ones(5)})),
        "float32": lambda: torch._scaled_mm(
            a, b.t(), **(good | {"scale_b": torch.ones(1, 48).double()})
        ),
        "bfloat16 output": lambda: torch._scaled_mm(
            a, b.t(), **(good | {"out_dtype": torch.float32})
        ),
    }
    for message, call in broken.items():
        with pytest.raises(cuda_standins.ContractError, match=message):
            call()
    assert engine_device.is_cuda("cpu")  # the fake runtime is in place for the test ...


def test_the_real_runtime_is_back_after_a_test():
    assert not engine_device.is_cuda("cpu")  # ... and gone after it
