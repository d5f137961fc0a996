"""The one way every consumer reranks: run the rerank job, get back its summary and a reader of ranked/.

    result = rerank(config, input_uri, output_uri)
    result.summary                  summary.json (row accounting, model, dtype, config hash...)
    result.ranked_uri               <output>/ranked
    result.parts()                  ranked/part-BBBBB.parquet URIs: one per ranking bucket, each holding
                                    whole queries (a query's rows never span two parts)
    result.iter_batches(columns)    pyarrow RecordBatches, part by part, a row group at a time
    result.dataset(columns)         the same rows as a Ray Dataset, for work that stays on the cluster

Nothing here reads all of ranked/ at once: a consumer that needs a query's rows together works per part
(hard negatives, index quality), one that streams reads batches. Input columns reach ranked/ as the rerank
job carries them (labels and other extra columns as they are, the first stage's rank/score as
first_stage_rank/first_stage_score, texts with `output.carry_texts`), so no consumer re-reads the input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import arrow_filesystem, join, protocol_prefix, url_to_fs
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job import run_rerank
from pipeline.runtime import ray_runtime

RANKED = "ranked"


@dataclass(frozen=True)
class RerankResult:
    summary: dict
    output_uri: str
    storage_options: dict

    @property
    def ranked_uri(self) -> str:
        return join(self.output_uri, RANKED)

    def parts(self) -> list[str]:
        """The ranked part files, in bucket order, as URIs with the output's protocol."""
        fs, root = url_to_fs(self.ranked_uri, self.storage_options)
        protocol = protocol_prefix(self.output_uri)
        return [
            protocol + p if protocol and not p.startswith(protocol) else p
            for p in sorted(fs.glob(join(root, "part-*.parquet")))
        ]

    def iter_batches(
        self, columns: Sequence[str] | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Ranked rows, part by part; at most one row group of one part is held at a time."""
        for uri in self.parts():
            yield from iter_part(uri, self.storage_options, columns, batch_size)

    def dataset(self, columns: Sequence[str] | None = None):
        """ranked/ as a Ray Dataset (read on the cluster's workers, not on the driver)."""
        import ray

        fs, _ = url_to_fs(self.ranked_uri, self.storage_options)
        paths = [url_to_fs(uri, self.storage_options)[1] for uri in self.parts()]
        return ray.data.read_parquet(
            paths,
            filesystem=arrow_filesystem(fs),
            columns=list(columns) if columns is not None else None,
        )


def iter_part(
    uri: str,
    storage_options: dict | None = None,
    columns: Sequence[str] | None = None,
    batch_size: int = 65_536,
) -> Iterator[pa.RecordBatch]:
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(
            batch_size=batch_size, columns=list(columns) if columns is not None else None
        )


def read_part(
    uri: str, storage_options: dict | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """One ranked part (whole queries), e.g. on the actor that works on that bucket."""
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns is not None else None)


def rerank(config: RerankConfig, input_uri: str, output_uri: str) -> RerankResult:
    """Rerank `input_uri` into `output_uri` (resuming or reusing a finished run as the job does)."""
    summary = run_rerank(config, input_uri, output_uri)
    return RerankResult(summary, output_uri, dict(config.storage_options))


def ensure_ray(config: RerankConfig) -> None:
    """The Ray the rerank runs on (started or joined as the job does), for consumers that work on ranked/ with
    their own actors, also when the rerank had nothing left to do."""
    ray_runtime.ensure_ray(config.ray_address)


def worker_errors(batches):
    """Batches of a consumer's Ray Dataset, with a fault inside a worker re-raised as one line, as in the job."""
    return ray_runtime.worker_errors(batches)
