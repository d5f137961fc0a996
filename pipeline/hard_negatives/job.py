"""The hard-negative job's driver: check inputs, rerank through the rerank job, select, write.

    positives (qrels, or the input's label column) checked first, before any scoring
    -> rerank(input -> <output>/rerank/)            the rerank pipeline and engine, texts carried to ranked/
    -> per ranked part (whole queries), in Ray tasks: select_negatives + training rows -> fragments by output part
    -> per output part, in Ray tasks: fragments merged in query order -> candidates/, triplet/, n-tuple/, flagembedding/
    -> stats.json (last), reduced here from each bucket's small stats piece

<output>/rerank/ is the rerank job's own output, so its resume applies: an interrupted run continues where it
stopped, and a rerun with other selection or projection settings reuses the scores (it never rescores
with the same rerank settings; other rerank settings are refused, so scores never mix).
"""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import redact
from pipeline.core.errors import InputError
from pipeline.core.storage import (
    absolute_uri,
    join,
    protocol_prefix,
    read_json,
    url_to_fs,
    write_json,
)
from pipeline.core.trec import read_qrels
from pipeline.hard_negatives import buckets, io
from pipeline.hard_negatives.config import HardNegativesConfig
from pipeline.hard_negatives.stats import reduce_stats
from pipeline.rerank.api import RerankResult, ensure_ray, rerank, worker_errors
from pipeline.rerank.plan import settings_hash
from pipeline.rerank.stages.read import list_input_files
from pipeline.runtime.ray_runtime import stage_task

log = logging.getLogger("hard_negatives")

RERANK = "rerank"
WORK = (
    "_work"  # fragments of the output parts while the actors write them; removed before stats.json
)


def hash_settings(settings: dict) -> str:
    return hashlib.sha256(json.dumps(redact(settings), sort_keys=True).encode()).hexdigest()[:16]


def read_positives(
    config: HardNegativesConfig, input_uri: str, positives_uri: str | None
) -> pa.Table | None:
    """The qrels table (TREC qrels text or Parquet), or None when the input's `label` column says instead."""
    if positives_uri is not None:
        return read_qrels(positives_uri, config.storage_options)
    rerank = config.rerank_config()
    fs, files = list_input_files(input_uri, rerank.storage_options)
    if schema.LABEL not in io.input_layout(fs, files, rerank).carried_names:
        raise InputError(
            "no positives: pass --positives (TREC qrels text or Parquet query_id, doc_id, label) "
            f"or give the input a `{schema.LABEL}` column (label >= selection.min_positive_label "
            "is a positive)"
        )
    return None


def check_positives_meet_input(
    config: HardNegativesConfig, input_uri: str, positives_uri: str, qrels: pa.Table
) -> dict:
    """The positives file's query ids against the input's, from the input's query id column alone, before any
    scoring: none in common is an error naming examples of both (a qrels file of another collection, or ids
    written another way, would otherwise cost a whole rerank for 0 negatives); some in common is a warning.
    Returns {"input_queries": N, "input_queries_without_positives": M} for stats.json."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rerank = config.rerank_config()
    fs, files = list_input_files(input_uri, rerank.storage_options)
    column = rerank.input.query_id_column
    ids = [
        pc.unique(pq.read_table(path, columns=[column], filesystem=fs)[column].cast(pa.string()))
        for path in files
    ]
    input_ids = pc.unique(pa.chunked_array(ids, pa.string())).drop_null()
    judged = pc.unique(qrels[schema.QUERY_ID].cast(pa.string()))
    positive = qrels.filter(
        pc.greater_equal(qrels[schema.LABEL], config.selection.min_positive_label)
    )
    positive_ids = pc.unique(positive[schema.QUERY_ID].cast(pa.string()))
    if len(input_ids) and not pc.any(pc.is_in(input_ids, value_set=judged)).as_py():
        raise InputError(
            f"no query of --input {input_uri} is in --positives {positives_uri} (input query ids like "
            f"{sorted(input_ids.to_pylist())[:3]}, positives query ids like {sorted(judged.to_pylist())[:3]}); "
            "pass the positives of this input's queries, with the same query ids"
        )
    without = int(pc.sum(pc.invert(pc.is_in(input_ids, value_set=positive_ids))).as_py() or 0)
    if without:
        log.warning(
            "%s of %s input queries have no positive in %s (label >= selection.min_positive_label); "
            "they get no negatives (stats.json: qrels.input_queries_without_positives)",
            f"{without:,}",
            f"{len(input_ids):,}",
            positives_uri,
        )
    return {"input_queries": len(input_ids), "input_queries_without_positives": without}


def check_reusable_scores(config: HardNegativesConfig, output_uri: str) -> None:
    """A finished rerank/ written with other result-changing settings (another model, say) is refused: the
    rerank job returns a finished output as it is, so reusing it silently would mix in other scores."""
    fs, root = url_to_fs(join(output_uri, RERANK), config.storage_options)
    summary_path = join(root, "summary.json")
    if not fs.exists(summary_path):
        return
    try:
        previous = read_json(fs, summary_path)
    except (ValueError, UnicodeDecodeError) as e:  # json's errors are ValueErrors
        previous = f"is not JSON ({str(e).splitlines()[0][:120]})"
    if not isinstance(previous, dict) or not isinstance(previous.get("config_hash"), str):
        what = (
            previous if isinstance(previous, str) else "is not a rerank summary (no `config_hash`)"
        )
        raise InputError(
            f"{join(output_uri, RERANK, 'summary.json')} {what}; delete the folder "
            f"{join(output_uri, RERANK)} to score again, or use another --output"
        )
    if previous.get("config_hash") != settings_hash(config.rerank_config()):
        raise InputError(
            f"{join(output_uri, RERANK)} holds scores from other rerank settings (model there: "
            f"{previous.get('model')!r}); use another --output, or delete that folder to score again"
        )


def run_hard_negatives(
    config: HardNegativesConfig, input_uri: str, positives_uri: str | None, output_uri: str
) -> dict:
    """Mine `input_uri` into `output_uri`; returns the stats (also written to stats.json)."""
    output_uri = absolute_uri(
        output_uri
    )  # the selection's workers write under it, wherever they run
    qrels = read_positives(config, input_uri, positives_uri)
    coverage = (
        None
        if qrels is None
        else check_positives_meet_input(config, input_uri, positives_uri, qrels)
    )
    check_reusable_scores(config, output_uri)
    rerank_uri = join(output_uri, RERANK)
    result = rerank(config.rerank_config(), input_uri, rerank_uri)
    summary = result.summary
    log.info(
        "selecting negatives among %s scored pairs in %d bucket(s) (%s rejected by the rerank, see %s)",
        f"{summary['scored_rows']:,}",
        len(result.parts()),
        f"{summary['rejected_rows']:,}",
        join(rerank_uri, "rejected"),
    )
    run = {
        "model": summary["model"],
        "revision": summary["revision"],
        "dtype": summary["dtype"],
        "random_weights": summary["random_weights"],
        "seed": config.selection.seed,
        "config_hash": hash_settings(config.result_settings()),
        "config": redact(config.result_settings()),
    }
    return select_per_bucket(config, result, qrels, output_uri, run, coverage)


def select_per_bucket(
    config: HardNegativesConfig,
    result: RerankResult,
    qrels: pa.Table | None,
    output_uri: str,
    run: dict,
    coverage: dict | None = None,
) -> dict:
    """Select in Ray tasks, one ranked part (whole queries) per task, then merge the output parts in tasks;
    only the stats pieces (counts and a few scores per query) reach this process. Returns the stats.
    Both steps hold nothing between calls, so they run as tasks (at most `workers.num_actors` at a time) in
    Ray's pooled workers rather than on an actor pool each, which would start its own worker processes.
    coverage: `check_positives_meet_input`'s counts, added to stats.json's qrels section."""
    import ray
    from ray.data import TaskPoolStrategy

    fs, root = url_to_fs(output_uri, config.storage_options)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(join(root, io.STATS)):
        fs.rm(join(root, io.STATS))  # a stale marker must not vouch for half-written files
    for folder in (*buckets.KINDS, WORK):  # an earlier run's parts, whatever their number
        if fs.exists(join(root, folder)):
            fs.rm(join(root, folder), recursive=True)
    protocol = protocol_prefix(output_uri)
    work_uri = protocol + join(root, WORK)
    num_parts = max(1, -(-result.summary["scored_rows"] // config.output.rows_per_part))

    rerank_config = config.rerank_config()
    ensure_ray(rerank_config)
    workers = config.workers
    have = ray.cluster_resources().get("CPU", 0)
    if workers.num_actors * workers.num_cpus > have + 1e-9:
        raise InputError(
            f"workers.num_actors x workers.num_cpus asks for {workers.num_actors * workers.num_cpus:g} "
            f"CPUs but the Ray cluster has {have:g}; lower workers.num_actors or workers.num_cpus"
        )
    pool = dict(
        compute=TaskPoolStrategy(size=workers.num_actors),
        num_cpus=workers.num_cpus,
        batch_size=1,
        batch_format="pyarrow",
    )
    items = [{"bucket": b, "uri": uri} for b, uri in enumerate(result.parts())]
    pieces = []
    if items:
        # The positives travel inside the task function, which Ray Data puts in the object store once per
        # operator; each task reads them from there (Arrow buffers, not copied per row).
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            stage_task(
                buckets.SelectBucket,
                dict(config=config, qrels=qrels, work_uri=work_uri, num_parts=num_parts),
            ),
            **pool,
        )
        for batch in worker_errors(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            pieces += [json.loads(piece) for piece in batch["piece"].to_pylist()]
    ds = ray.data.from_items(
        [{"part": p} for p in range(num_parts)], override_num_blocks=num_parts
    ).map_batches(
        stage_task(
            buckets.WritePart,
            dict(
                config=config,
                work_uri=work_uri,
                output_uri=output_uri,
                num_parts=num_parts,
                run=run,
            ),
        ),
        **pool,
    )
    for _ in worker_errors(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        pass

    stats = reduce_stats(pieces, config.selection, qrels)
    if coverage is not None and "qrels" in stats:
        stats["qrels"].update(coverage)
    counts = buckets.projection_counts([], config)
    for piece in pieces:
        counts = {name: counts[name] + piece["projections"][name] for name in counts}
    stats["projections"] = counts
    stats["unscored_pairs"] = result.summary["rejected_rows"]
    stats["run"] = run
    if fs.exists(join(root, WORK)):
        fs.rm(join(root, WORK), recursive=True)
    write_json(fs, join(root, io.STATS), stats)
    return stats
