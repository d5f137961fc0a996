"""What the ONNX Runtime and OpenVINO contenders share: the checkpoint exported to ONNX once, and scoring in
padded, length-sorted batches of numpy arrays.

The export is `torch.onnx.export` of the checkpoint's transformers model (`AutoModelForSequenceClassification`,
float32) with the dynamo exporter (torch >= 2.9's default; it needs `onnxscript`), dynamic batch and sequence
axes, opset 18. optimum's exporter (`optimum-onnx`) would do the same but pins transformers < 4.58. Exports
are cached beside the benchmark checkpoints (`$RERANK_CACHE/benchmark-exports/`), keyed by the checkpoint's
path, its weights' size and modification time, and the torch version; a worker that needs one builds it in
its load time, never in its timed pass.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.benchmark.scored import Pairs, Scored

logger = logging.getLogger(__name__)

ONNX_OPSET = 18
ONNX_FILE = "model.onnx"


class BackendUnavailable(RuntimeError):
    """An optional backend (onnxruntime, openvino, nncf, onnxscript) is not installed: the row is skipped."""


def require(module: str, purpose: str):
    """`import module`, or a BackendUnavailable that says what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise BackendUnavailable(
            f"{module} is not installed ({error}); {purpose} needs it: "
            f"pip install torch==2.13.0 -e '.[dev]'"
        ) from error


def cache_dir(directory: str, kind: str) -> str:
    """The cache folder of one derived model (`kind`: onnx-fp32, onnx-int8, ...) of checkpoint `directory`."""
    weights = sorted(
        glob.glob(os.path.join(directory, "*.safetensors"))
        + glob.glob(os.path.join(directory, "*.bin"))
    )
    stamp = [(os.path.basename(w), os.path.getsize(w), int(os.path.getmtime(w))) for w in weights]
    recipe = json.dumps([os.path.realpath(directory), stamp, torch.__version__, ONNX_OPSET, kind])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    root = os.environ.get(
        "RERANK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rerank-pipeline")
    )
    return os.path.join(
        root, "benchmark-exports", f"{os.path.basename(os.path.normpath(directory))}-{kind}-{key}"
    )


def build_once(target: str, build) -> str:
    """`target` (a folder), built by `build(staging_folder)` unless it is there; atomic under concurrent builders."""
    if os.path.isfile(os.path.join(target, "done")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}-")
    try:
        build(staging)
        open(os.path.join(staging, "done"), "w").close()
        os.rename(staging, target)
    except OSError:
        if not os.path.isfile(os.path.join(target, "done")):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_input_names(directory: str) -> list[str]:
    """The inputs the exported model takes: token_type_ids only where the model has more than one type (BERT)."""
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    names = ["input_ids", "attention_mask"]
    return names + ["token_type_ids"] if config.get("type_vocab_size", 1) > 1 else names


def load_transformers_model(directory: str):
    """The checkpoint as `AutoModelForSequenceClassification` in float32, its default attention (SDPA)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()


class _Logits(torch.nn.Module):
    """The model with the (batch, 1) logits as its only output (what the ONNX graph returns)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).logits  # (batch, 1)


def example_inputs(directory: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Three padded rows of different lengths: enough for the exporter to keep batch and sequence dynamic."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    features = tokenizer(
        ["what is a reranker", "query", "a longer query about documents"],
        ["a model that scores query and document pairs", "a short document", "text"],
        padding=True,
        return_tensors="pt",
    )
    return {name: features[name] for name in names}


def export_onnx(directory: str) -> str:
    """The path of `directory`'s float32 ONNX export (built once; ~10 s for a tiny model, ~1 min for jina's base)."""
    require("onnxscript", "torch.onnx.export (the dynamo exporter)")

    def build(folder: str) -> None:
        start = time.perf_counter()
        names = model_input_names(directory)
        wrapper = _Logits(load_transformers_model(directory))
        inputs = example_inputs(directory, names)
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        torch.onnx.export(
            wrapper,
            tuple(inputs[n] for n in names),
            os.path.join(folder, ONNX_FILE),
            input_names=names,
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamo=True,
            dynamic_shapes={n: {0: batch, 1: sequence} for n in names},
            external_data=True,
            verbose=False,
        )
        logger.info("exported %s to ONNX in %.1f s", directory, time.perf_counter() - start)

    return os.path.join(build_once(cache_dir(directory, "onnx-fp32"), build), ONNX_FILE)


class SortedPaddedScorer:
    """Pairs tokenized (the checkpoint's tokenizer, truncated at `max_length`), sorted by token count (longest
    first, as FlagEmbedding's reranker does; sentence-transformers sorts by characters), padded per batch to
    its longest row, run through `self._run(feeds) -> (batch,) logits`, and put back in input order.

    Subclasses set `self.dtype` and `self.settings` and define `_run`.
    """

    dtype: str
    settings: dict

    def __init__(self, directory: str, max_length: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.max_length = max_length
        self.input_names = model_input_names(directory)

    def feeds(self, pairs: Pairs) -> list[dict[str, np.ndarray]]:
        """One unpadded feed per pair (batch of 1): what the int8 calibration runs on."""
        encoded = self.tokenizer(
            [q for q, _ in pairs],
            [d for _, d in pairs],
            truncation=True,
            max_length=self.max_length,
        )
        return [
            {n: np.asarray([encoded[n][i]], dtype=np.int64) for n in self.input_names}
            for i in range(len(pairs))
        ]

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _sorted(self, pairs: Pairs, batch_size: int) -> tuple[np.ndarray, int, int]:
        encoded = self.tokenizer(
            [q for q, _ in pairs],
            [d for _, d in pairs],
            truncation=True,
            max_length=self.max_length,
        )
        lengths = np.asarray([len(ids) for ids in encoded["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        pad_id = self.tokenizer.pad_token_id
        logits = np.empty(len(pairs), dtype=np.float32)
        processed = 0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            width = int(lengths[index].max())
            feeds = {}
            for name in self.input_names:
                fill = pad_id if name == "input_ids" else 0
                array = np.full((len(index), width), fill, dtype=np.int64)  # (batch, width)
                for row, i in enumerate(index):
                    array[row, : lengths[i]] = encoded[name][i]
                feeds[name] = array
            logits[index] = self._run(feeds)
            processed += len(index) * width
        return logits, int(lengths.sum()), processed

    def score(self, pairs: Pairs, batch_size: int = 32) -> Scored:
        pairs = list(pairs)
        start = time.perf_counter()
        logits, real, processed = self._sorted(pairs, batch_size)
        seconds = time.perf_counter() - start
        return Scored(
            logits,
            seconds,
            real,
            processed,
            self.dtype,
            {"batch_size": batch_size, "length_sorted": True, **self.settings},
        )
