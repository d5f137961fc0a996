"""The driver and the CPU-only stages never import torch: only the scorers need it.

Each process that imports torch carries ~190 MB more resident memory and seconds more start-up; the driver
and the tokenize/write actors run once per CPU core on a cluster, so that is paid many times over.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TORCH_FREE = [
    "jobs.rerank",
    "jobs.hard_negatives",
    "jobs.index_quality",
    "pipeline.rerank.api",
    "pipeline.rerank.compose",
    "pipeline.rerank.stages.score",
    "pipeline.rerank.stages.read",
    "pipeline.rerank.stages.tokenize",
    "pipeline.rerank.stages.lookup",
    "pipeline.rerank.stages.rank",
    "pipeline.rerank.stages.write",
    "pipeline.model.checkpoint",
    "pipeline.model.tokenization",
]


def test_the_driver_and_the_cpu_stages_do_not_import_torch():
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {TORCH_FREE!r}]; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_engine_names_still_load_from_the_package():
    code = (
        "import pipeline.model as m, sys; assert 'torch' not in sys.modules; "
        "print(m.CrossEncoder.__module__, m.ModelConfig.__module__, m.Int8Options.__name__,"
        " 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [
        "pipeline.model.cross_encoder",
        "pipeline.model.model_config",
        "Int8Options",
        "True",
    ]


def test_loading_and_scoring_do_not_import_torch_dynamo(tmp_path):
    """Building the model on the meta device skips its random initialisation: on meta, torch.nn.init runs
    through torch._refs, whose first call imports torch._dynamo (seconds of every scorer actor's start)."""
    from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

    directory = build_checkpoint(str(tmp_path / "tiny"), ARCHITECTURES["tiny"])
    code = (
        "import sys; from pipeline.model import CrossEncoder; "
        f"m = CrossEncoder.from_pretrained({directory!r}); s = m.compute_score([('q', 'a passage')] * 3); "
        "assert len(s) == 3 and abs(s[0] - s[2]) < 1e-5; "
        "print(next(m.model.parameters()).device, 'torch._dynamo' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The weights are the checkpoint's, on the CPU (not left on meta), and dynamo was never imported.
    assert result.stdout.split() == ["cpu", "False"]
