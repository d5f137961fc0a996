"""Score token lists with the cross-encoder on an accelerator (or CPU) actor.

Adds:  score float32 (raw logit; null for rejected rows). Drops the token lists: downstream needs none.
Pairs the score cache answered keep their cached score (`_cached` 1); pairs waiting for a twin of the same
texts (`_cached` 2) stay null until the ranker fills them (stages/lookup.py).
The actor cuts its own micro-batches by a token budget (`max_tokens_per_batch`) over the length-sorted
rows it receives; Ray's `batch_size` only sets how many rows arrive per call.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import schema as S
from pipeline.core.storage import atomic_write, join, url_to_fs
from pipeline.rerank.config import Int8Config, ScorerConfig
from pipeline.rerank.stages.tokenize import list_to_numpy
from pipeline.runtime.heap import release_free_heap

RECORD_EVERY_S = 10.0
HEARTBEAT_S = (
    10.0  # a long call reports "still working" to the progress counter this often (see _heartbeat)
)


def _ray_node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray): the summary says where each scorer ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class ScoreStage:
    def __init__(
        self,
        model: str,
        revision: str | None,
        dtype: str,
        config: ScorerConfig,
        scorers_uri: str,
        storage_options: dict,
        allow_pickle: bool = False,
        on_scored: Callable[[int, int], None] | None = None,
        int8: Int8Config | None = None,
        template: str | None = None,
    ):
        """`on_scored(pairs, rejected)` is called after each batch (progress); `allow_pickle` lets a pickle-only
        checkpoint load (the job's opt-in, checked on the driver); `int8`: the job's int8 section, dtype int8 only;
        `template`: `tokenizer.template` (a decoder reranker's answer tokens pick its score head)."""
        # Imported here, in the actor: the driver builds the plan with this class and never needs torch.
        import torch

        from pipeline.model import device as runtime
        from pipeline.model.cross_encoder import CrossEncoder
        from pipeline.model.quantization import Int8Options

        cuda = config.device == "cuda" or (config.device == "auto" and runtime.RUNTIME.available())
        device = "cuda" if cuda else "cpu"
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1), which would leave cores idle while scoring is
        # the bottleneck; on CPU the scorer takes every core it may run on unless told otherwise (tokenizing is cheap next to it);
        # set scorer.torch_threads when several CPU scorer actors share a node.
        threads = config.torch_threads or (
            len(os.sched_getaffinity(0)) if device == "cpu" else None
        )
        if threads:
            torch.set_num_threads(threads)
        options = (
            None
            if int8 is None
            else Int8Options(smooth_alpha=int8.smooth_alpha, fp32_layers=tuple(int8.fp32_layers))
        )
        self.encoder = CrossEncoder.from_pretrained(
            model,
            device=device,
            dtype=dtype,
            revision=revision,
            allow_pickle=allow_pickle,
            int8=options,
            template=template,
        )
        self.on_scored = on_scored
        self.max_tokens = config.max_tokens_per_batch
        # Record what really ran (dtype, kernel, device) for the job's summary.
        self.fs, path = url_to_fs(scorers_uri, storage_options)
        self.fs.makedirs(path, exist_ok=True)
        self.record_path = join(path, f"{uuid.uuid4().hex}.json")
        self.info = self.encoder.describe() | {
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
            "node_id": _ray_node_id(),
        }
        # How busy the scorer is: seconds inside its calls over seconds since it was ready (model loaded), as of
        # its record's last write; the summary's busy fraction. Well below 1 means it waited for tokens.
        self.ready, self.busy_s, self.written = time.monotonic(), 0.0, None
        self._beat = self.ready
        self.info["ready_unix"] = round(
            time.time(), 3
        )  # the driver counts this scorer's wall time up to the phase's end
        self._write_record()

    def _write_record(self) -> None:
        now = time.monotonic()
        info = self.info | {"busy_s": round(self.busy_s, 3), "wall_s": round(now - self.ready, 3)}
        # Atomic: a scorer killed mid-write (OOM) must not leave a torn record for the summary to trip on.
        atomic_write(self.fs, self.record_path, lambda f: f.write(json.dumps(info).encode()))
        self.written = now

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.monotonic()
        out = self._score(batch)
        first = self.busy_s == 0.0
        self.busy_s += time.monotonic() - start
        # Rewritten after the first batch and then at most every RECORD_EVERY_S: one small write, not one per
        # batch (a GPU scores a batch in well under a second); the figures lag the actor by at most that much.
        if first or time.monotonic() - self.written >= RECORD_EVERY_S:
            self._write_record()
        return out

    def _heartbeat(self) -> None:
        """Tells the progress counter that this scorer is still working through its batch, at most every
        HEARTBEAT_S: one call of `scorer.batch_size` long pairs can take minutes on a CPU, longer than the
        driver's stall watchdog waits for news."""
        now = time.monotonic()
        if self.on_scored is not None and now - self._beat >= HEARTBEAT_S:
            self._beat = now
            self.on_scored(0, 0)

    def _score(self, batch: pa.Table) -> pa.Table:
        valid = pc.is_null(batch.column(S.REASON)).to_numpy(zero_copy_only=False)
        cached = (
            batch.column(S.CACHED).to_numpy()
            if S.CACHED in batch.column_names
            else np.zeros(len(valid), np.int8)
        )
        index = np.flatnonzero(valid & (cached == 0))
        ids = list_to_numpy(batch.column(S.INPUT_IDS))
        types = (
            list_to_numpy(batch.column(S.TOKEN_TYPE_IDS))
            if S.TOKEN_TYPE_IDS in batch.column_names
            else None
        )
        logits = self.encoder.score_tokens(
            [ids[i] for i in index],
            None if types is None else [types[i] for i in index],
            max_tokens_per_batch=self.max_tokens,
            on_micro_batch=self._heartbeat,
        )
        score = np.zeros(batch.num_rows, dtype=np.float32)
        score[index] = logits
        missing = ~valid
        if (
            S.CACHED_SCORE in batch.column_names
        ):  # cache hits keep their score; pairs waiting for a twin have none
            hit = cached == 1
            score[hit] = batch.column(S.CACHED_SCORE).to_numpy(zero_copy_only=False)[hit]
            missing |= cached == 2
        out = batch.drop_columns(
            [c for c in (S.INPUT_IDS, S.TOKEN_TYPE_IDS, S.CACHED_SCORE) if c in batch.column_names]
        )
        if self.on_scored is not None:
            first = (
                pc.equal(batch.column(S.WINDOW), 0).to_numpy(zero_copy_only=False)
                if S.WINDOW in batch.column_names
                else np.ones(batch.num_rows, dtype=bool)
            )  # a pair's later windows are not more pairs
            self.on_scored(int((valid & first).sum()), int((~valid & first).sum()))
        # The actor lives for the whole job: without this its heap grows with every batch (see heap.py).
        release_free_heap()
        return out.append_column(S.SCORE, pa.array(score, mask=missing))
