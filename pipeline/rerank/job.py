"""The rerank job's driver: check everything, plan shards, run the pipeline, commit, summarise.

Output layout under `--output`:
    ranked/part-BBBBB.parquet       query_id, doc_id, score (float32 raw logit), rank, carried columns
    rejected/*.parquet              input columns + reason
    summary.json                    written last: its presence means the output is complete
    _work/                          staging, manifests and markers of an unfinished run (removed at the end)

Resume: why our own manifests rather than Ray Data's checkpointing. Ray Data can skip already-written
rows by id, but the ranking step needs to know that *every* row of a query has been scored before it
ranks, and the rejected rows need the same exactly-once guarantee. So the unit of work is a shard
(whole Parquet row groups, planned from metadata) and a shard is committed by a manifest written only
after the write stage has reported files covering all of its rows (datatrove's completion markers). A
rerun skips committed shards, deletes the staging files of uncommitted ones (written before a crash,
never listed anywhere), and ranks only buckets that have no done-marker. Files are named by a hash of
their rows, and ranking drops repeated (row, window) keys, so a task Ray retried after it had written
still counts each pair once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import schema as S
from pipeline.core.config import redact
from pipeline.core.errors import (
    ConfigError,
    InfrastructureError,
    InputError,
    OutputError,
    PipelineError,
)
from pipeline.core.faults import RESUME, explain
from pipeline.core.storage import (
    atomic_write,
    check_bucket,
    check_storage_options,
    join,
    map_paths,
    protocol_prefix,
    read_own_file,
    read_own_files,
    url_to_fs,
    write_json,
)
from pipeline.model.checkpoint import inspect_checkpoint, resolve_model_directory
from pipeline.model.model_config import linear_layer_names
from pipeline.model.tokenization import check_prompt
from pipeline.rerank.cache import CacheSpec
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.job_files import (
    BucketMarker,
    JobIdentity,
    Manifest,
    QuarantineRecord,
    ScorerRecord,
    Summary,
    settings_differences,
)
from pipeline.rerank.lease import OutputLease
from pipeline.rerank.progress import Progress
from pipeline.rerank.stages.read import (
    Shard,
    list_input_files,
    plan_shards,
    query_ids_unique,
    read_schemas,
)
from pipeline.rerank.stages.validate import InputLayout
from pipeline.runtime.local_ray import init_ray, quiet_ray_console

logger = logging.getLogger("rerank")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _rejected_schema(layout: InputLayout, metadata: dict | None = None) -> pa.Schema:
    return layout.pair_schema.append(pa.field(S.REASON, pa.string())).with_metadata(metadata)


def _job_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rerank-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def output_metadata(config: RerankConfig, model: dict, scorers: list[dict]) -> dict[str, str]:
    """Parquet key-value metadata on every file under ranked/ and rejected/: a file copied out of an output
    still says what produced it (and that a smoke run's scores are random). No timestamps: a rerun of the same
    job writes the same bytes."""
    return {
        "rerank.model": config.model,
        "rerank.revision": str(model["revision"]),
        "rerank.dtype": ",".join(sorted({s["dtype"] for s in scorers})) or str(config.dtype),
        "rerank.random_weights": json.dumps(
            any(s.get("random_weights") for s in scorers) or config.model.startswith("dummy:")
        ),
        "rerank.config_hash": settings_hash(config),
        "rerank.job_version": _job_version(),
        "rerank.score": "raw logit (float32); sigmoid gives jina's compute_score",
    }


def check_model(config: RerankConfig) -> dict:
    """Resolve the checkpoint and read its layout before any work starts (weights are loaded by the actors)."""
    _check_int8_options(config)
    directory, revision = resolve_model_directory(config.model, config.revision)
    layout, model_config = inspect_checkpoint(directory, allow_pickle=config.allow_pickle)
    fp32_layers = (
        _fp32_layers(config, model_config.num_hidden_layers) if config.dtype == "int8" else []
    )
    max_length = min(config.tokenizer.max_length, model_config.max_tokens_per_sequence)
    t = config.tokenizer
    if t.long_documents == "windows" and max_length < 2 * t.max_query_length:
        raise ConfigError(
            f"tokenizer.long_documents=windows needs max_length ({max_length}"
            + ("" if max_length == t.max_length else ", the model's limit")
            + ") at least twice "
            f"tokenizer.max_query_length ({t.max_query_length}); lower max_query_length"
        )
    # A decoder reranker's template and instruction (None for a cross-encoder): refused here, before any work.
    prompt = check_prompt(
        t.template,
        t.instruction,
        config.model,
        directory,
        layout and layout.name,
        max_length,
        t.long_documents,
    )
    return {
        "directory": directory,
        "revision": revision,
        "layout": layout.name if layout else None,
        "max_length": max_length,
        "fp32_layers": fp32_layers,
        "prompt": prompt,
    }


def _check_int8_options(config: RerankConfig) -> None:
    """int8.* tunes dtype int8 only: set under another dtype it would be silently ignored (auto never picks int8)."""
    if config.dtype == "int8":
        return
    defaults = type(config.int8)()
    changed = [
        k for k in type(config.int8).model_fields if getattr(config.int8, k) != getattr(defaults, k)
    ]
    if changed:
        keys = ("config keys " if len(changed) > 1 else "config key ") + ", ".join(
            f"`int8.{k}`" for k in changed
        )
        raise ConfigError(
            f"{keys} tune{'' if len(changed) > 1 else 's'} dtype int8 only (dtype is {config.dtype}); "
            "set dtype: int8, or remove int8.*"
        )


def _fp32_layers(config: RerankConfig, num_hidden_layers: int) -> list[str]:
    """The Linear layers `int8.fp32_layers` keeps in float32, by name; a pattern that matches none is a typo (or
    a layer index past this checkpoint's last) that would otherwise quantize what the user meant to keep."""
    names = linear_layer_names(num_hidden_layers)
    unmatched = [p for p in config.int8.fp32_layers if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        patterns = ", ".join(map(repr, unmatched)) + (
            " match" if len(unmatched) > 1 else " matches"
        )
        raise ConfigError(
            f"config key `int8.fp32_layers`: {patterns} no Linear layer of {config.model}, whose "
            "names are layers.<i>.mixer.Wqkv, layers.<i>.mixer.out_proj, layers.<i>.mlp.fc1, "
            f"layers.<i>.mlp.fc2 for i in 0..{num_hidden_layers - 1} (for example "
            f"`layers.{num_hidden_layers - 1}.mlp.fc2`, `layers.*.mlp.fc2`); fix or remove the pattern"
        )
    return sorted(n for n in names if any(fnmatchcase(n, p) for p in config.int8.fp32_layers))


def settings_hash(config: RerankConfig) -> str:
    """summary.json's `config_hash`: a hash of `RerankConfig.result_settings()` (what changes the output)."""
    return hashlib.sha256(
        json.dumps(config.result_settings(), sort_keys=True).encode()
    ).hexdigest()[:16]


def input_fingerprint(fs, files: list[str]) -> dict:
    """What identifies the input without reading it: every file's path, size and version (ETag on object
    storage, modification time on disks), from the listing. Any rewrite of a file changes it."""

    def version(path: str) -> list:
        info = fs.info(path)
        tag = next(
            (
                info[k]
                for k in (
                    "ETag",
                    "etag",
                    "md5Hash",
                    "generation",
                    "mtime",
                    "LastModified",
                    "updated",
                    "last_modified",
                )
                if info.get(k) is not None
            ),
            None,
        )
        return [path, int(info.get("size") or 0), str(tag)]

    listing = map_paths(version, files)
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return {"files": len(files), "bytes": sum(v[1] for v in listing), "sha256": digest}


def _describe_input(uri: str | None, fingerprint: dict | None) -> str:
    if not fingerprint:
        return f"{uri or 'an unknown input'} (no input fingerprint recorded)"
    return f"{uri} ({fingerprint['files']} file(s), {fingerprint['bytes']:,} bytes, fingerprint {fingerprint['sha256']})"


# What this job writes at the top of --output; anything else there is someone else's.
_OWN_ENTRIES = {"ranked", "rejected", "summary.json", "summary.json.tmp", "_work", "_lease.json"}
# Files that say which other job's output a folder is, to name it in the refusal.
_OTHER_OUTPUTS = {
    "stats.json": "a hard-negatives output",
    "candidates": "a hard-negatives output",
    "metrics.json": "an index-quality output",
    "report.html": "an index-quality output",
    "history.parquet": "an index-quality history",
}


def _foreign_entries(fs, root: str) -> list[str]:
    """The names at the top of `root` that this job did not write (dot files aside), sorted."""
    try:
        listed = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = {posixpath.basename(p.rstrip("/")) for p in listed}
    return sorted(n for n in names if n and not n.startswith(".") and n not in _OWN_ENTRIES)


def _prepare_output(fs, root: str, uri: str, create_bucket: bool = False) -> None:
    """The output folder exists, is a folder and holds nothing but this job's files, or one line saying why not."""
    try:
        if fs.isfile(root):
            raise OutputError(f"--output {uri} is a file; pass a folder (it is created if absent)")
        foreign = _foreign_entries(fs, root)
        if foreign:
            kinds = sorted({_OTHER_OUTPUTS[n] for n in foreign if n in _OTHER_OUTPUTS})
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            )
            raise OutputError(
                f"--output {uri} holds files this job did not write ({shown}"
                + (f": {' and '.join(kinds)}" if kinds else "")
                + "); choose a new or empty folder, "
                "or the folder of an earlier run of this job"
            )
        check_bucket(fs, root, uri, create_bucket, "io.create_bucket")
        fs.makedirs(root, exist_ok=True)
    except OSError as e:
        known = explain(e)
        if known is not None and not isinstance(known, OutputError):
            raise known from None
        raise OutputError(
            f"cannot create --output {uri} ({e.strerror or type(e).__name__}); choose a folder this "
            "job can write"
        ) from None


def _ensure_ray(config: RerankConfig) -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS is set by `ray job submit` and on cluster nodes; otherwise start a fresh local Ray rather
        # than attach to whatever cluster this machine ran last.
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        # The job's console is its own lines: what Ray prints for itself stays in its session folder (-v: both).
        started = quiet_ray_console(verbose=logger.isEnabledFor(logging.DEBUG))
        init_ray(
            address,
            ignore_reinit_error=True,
            log_to_driver=False,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        started()
    logger.debug("Ray at %s: %s", ray.get_runtime_context().gcs_address, ray.cluster_resources())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    _quiet_ray_data_console()


def _quiet_ray_data_console() -> None:
    """Ray Data prints each worker failure's full stack trace on the console; the job reports the fault in
    one line instead (`faults.explain`). Its log file in the Ray session folder keeps everything, and -v
    brings the console lines back."""
    if logger.isEnabledFor(logging.DEBUG):
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.CRITICAL)


def _check_cluster(config: RerankConfig, protocol: str) -> None:
    """What the cluster must offer before any work: GPUs if asked for, shared storage if several nodes, and
    nodes that can host every actor pool as configured (label selector, GPUs and CPUs per actor)."""
    import ray

    if config.scorer.device == "cuda" and not ray.cluster_resources().get("GPU"):
        raise InputError(
            "scorer.device is cuda but the Ray cluster has no GPU; use scorer.device=auto or cpu, "
            "or wait for GPU workers to join"
        )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    hosts = {n.get("NodeManagerAddress") for n in nodes}
    if len(hosts) > 1 and protocol in ("", "file://", "local://"):
        raise InputError(
            f"a cluster of {len(hosts)} machines cannot share a local --output; use object storage "
            "(s3://, gs://) or a shared filesystem's URI"
        )
    # The scoring phase's actor pools are fixed-size and all start together: an actor no node can host makes
    # Ray Data wait for resources forever. What the alive nodes cannot host is refused whatever the cluster:
    # an autoscaler adds nodes of the shapes it was given, and a node group scaled down to zero is invisible
    # from here, so such a cluster needs one node of each kind up (minReplicas >= 1) before the job starts.
    # Counts beyond the alive nodes' total are refused on a Ray of this machine alone, which cannot grow;
    # attached to a remote cluster they are a warning, since its autoscaler may add more nodes of a kind it has.
    from pipeline.rerank.compose import scorer_pool

    size, resources = scorer_pool(config)
    if config.dtype == "int8" and resources.get("num_gpus"):
        raise InputError(
            "dtype int8 runs on CPU scorers only, and this cluster's GPUs would take the scorers; set "
            "scorer.device=cpu, or use dtype auto (bfloat16 on a GPU)"
        )
    if config.dtype == "float8" and not resources.get("num_gpus"):
        raise InputError(
            "dtype float8 runs on GPU scorers with float8 tensor cores (Hopper or Ada) only, and this "
            "cluster's scorers would run on CPU; use dtype auto (or float32/bfloat16), or add GPUs"
        )
    fixed = len(hosts) == 1 and not (config.ray_address or os.environ.get("RAY_ADDRESS"))
    t = config.tokenizer
    _check_pool(
        "tokenizer",
        t.num_actors,
        {"CPU": t.num_cpus},
        t.label_selector,
        nodes,
        fixed,
        "tokenizer.num_actors / tokenizer.num_cpus",
    )
    _check_pool(
        "scorer",
        size,
        {"CPU": resources["num_cpus"], "GPU": resources.get("num_gpus", 0)},
        None,
        nodes,
        fixed,
        "scorer.num_gpus_per_actor / scorer.num_cpus"
        if resources.get("num_gpus")
        else "scorer.num_cpus",
    )
    asks = {
        "tokenizer": config.tokenizer.num_actors * config.tokenizer.num_cpus,
        "scorer": size * resources["num_cpus"],
        "io (read + write)": 2 * config.io.num_actors * config.io.num_cpus,
    }
    have = ray.cluster_resources().get("CPU", 0)
    if sum(asks.values()) > have + 1e-9:
        message = (
            f"the scoring phase asks for {sum(asks.values()):g} CPUs ("
            + ", ".join(f"{k} {v:g}" for k, v in asks.items())
            + f") but the Ray cluster has {have:g}; lower "
            "tokenizer.num_actors / tokenizer.num_cpus, io.num_actors / io.num_cpus or scorer.num_cpus"
        )
        if fixed:
            raise InputError(message)
        logger.warning("%s (waiting for the autoscaler, if any)", message)


def label_selector_matches(labels: dict[str, str], selector: dict[str, str] | None) -> bool:
    """Whether a node with `labels` satisfies a Ray label selector: per key `value`, `!value`, `in(a,b)` or
    `!in(a,b)`; a node without the key satisfies only the negations (as Ray's scheduler decides)."""
    import re

    for key, wanted in (selector or {}).items():
        negated = wanted.startswith("!")
        wanted = wanted[1:] if negated else wanted
        match = re.fullmatch(r"(?:in)?\((.*)\)", wanted)
        values = {v.strip() for v in match.group(1).split(",")} if match else {wanted}
        if (labels.get(key) in values) == negated:
            return False
    return True


def _check_pool(
    name: str,
    actors: int,
    need: dict[str, float],
    selector: dict[str, str] | None,
    nodes: list[dict],
    fixed: bool,
    knobs: str,
) -> None:
    """One fixed-size actor pool (`actors` actors, `need` resources each, on nodes matching `selector`) against
    the alive nodes (`ray.nodes()`): no node that may host it, or none big enough, is an InputError; more
    actors than those nodes hold together is one too where the cluster cannot grow (`fixed`), else a warning."""
    need = {k: v for k, v in need.items() if v}
    eligible = [n for n in nodes if label_selector_matches(n.get("Labels") or {}, selector)]
    where = f"nodes labelled {selector}" if selector else "nodes"
    if selector and not eligible:
        carried = sorted(
            {
                f"{k}={v}"
                for n in nodes
                for k, v in (n.get("Labels") or {}).items()
                if not k.startswith("ray.io/node-id")
            }
        )
        plain = all(
            v[:1].isalnum() and "(" not in v for v in selector.values()
        )  # no `!`, no `in(...)`
        labels = (
            ",".join(f"{k}={v}" for k, v in selector.items())
            if plain
            else "with labels that match it"
        )
        raise InputError(
            f"{name}.label_selector {selector} matches no node of the Ray cluster (node labels: "
            f"{', '.join(carried) or 'none'}); start the {name} machines with `ray start --labels "
            f"{labels}` (KubeRay: the worker group's `labels`), or change {name}.label_selector"
        )

    def fits(node: dict) -> int:
        have = node.get("Resources") or {}
        return min((int(have.get(k, 0) / v + 1e-9) for k, v in need.items()), default=actors)

    room = [fits(n) for n in eligible]
    if not any(room):
        has = ", ".join(
            f"{max((n.get('Resources') or {}).get(k, 0) for n in eligible):g} {k}" for k in need
        )
        raise InputError(
            f"a {name} actor asks for "
            + ", ".join(f"{v:g} {k}" for k, v in need.items())
            + f" but no node of the Ray cluster has that much (the most any of its {where} has: {has}); "
            f"lower {knobs}, or add bigger nodes"
        )
    if sum(room) < actors:
        message = (
            f"the {name} pool needs {actors} actors of "
            + ", ".join(f"{v:g} {k}" for k, v in need.items())
            + f" but the Ray cluster's {where} hold {sum(room)}; lower {knobs}, or add nodes"
        )
        if fixed:
            raise InputError(message)
        logger.warning("%s (waiting for the autoscaler, if any)", message)


def _worker_errors(batches, lease: OutputLease | None = None):
    """Re-raise a fault inside a Ray worker as one line (`faults.explain`), not a Ray traceback; stop when the
    output's lease was lost to another run."""
    try:
        for batch in batches:
            if lease is not None:
                lease.check()
            yield batch
    except PipelineError:
        raise
    except Exception as e:
        known = explain(e)
        if known is None:
            raise
        raise known from None


@dataclass
class RunPlan:
    """What one run works on, decided on the driver before any work: small (paths, counts, shard plan), never data."""

    config: RerankConfig
    input_uri: str
    output_uri: (
        str  # absolute, with its protocol: workers resolve it the same way wherever they run
    )
    out_fs: Any
    out_root: str
    files: list[str]
    fingerprint: dict  # input_fingerprint(files)
    layout: InputLayout
    model: dict  # check_model()
    shards: list[Shard]
    rank_per_shard: (
        bool  # grouped input whose query ids are unique: a shard is its own ranking bucket
    )
    num_buckets: int
    committed: set[int] = field(default_factory=set)  # shards whose manifest an earlier run wrote
    cache: CacheSpec | None = (
        None  # the score cache's folder for this model and settings (cache.uri set)
    )
    dtype: str | None = None  # the scorers' dtype, when the cache needed `auto` resolved up front
    input_row_bytes: int = (
        0  # bytes of one input pair as read (`_input_row_bytes`): sizes the hand-offs
    )

    @property
    def protocol(self) -> str:
        return protocol_prefix(self.output_uri)

    @property
    def work(self) -> str:
        return join(self.out_root, "_work")

    @property
    def work_uri(self) -> str:
        return self.protocol + self.work

    @property
    def manifests_dir(self) -> str:
        return join(self.work, "manifests")

    def manifest(self, shard: int) -> str:
        return join(self.manifests_dir, f"shard-{shard:05d}.json")

    @property
    def total_pairs(self) -> int:
        return sum(s.num_pairs for s in self.shards)

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.shard not in self.committed]

    def identity(self) -> dict:
        """What a resumed run must share with the run that started the output."""
        return {
            "config_hash": settings_hash(self.config),
            "input_fingerprint": self.fingerprint,
            "num_buckets": self.num_buckets,
            "shards": len(self.shards),
            "rank_per_shard": self.rank_per_shard,
        }


class ShardCommits:
    """The commit state machine of the scoring phase: write reports arrive in any order, possibly repeated (a
    task Ray retried rewrites the same file), and a shard is complete once reports account for every one of its
    rows and, in windows mode, every window of them (a row's windows may arrive in different reports)."""

    def __init__(self, pending: list[Shard]):
        self.shards = {s.shard: s for s in pending}
        self.state = {
            s.shard: {
                "pairs": 0,
                "rejected": 0,
                "tokens": 0,
                "windows": 0,
                "windows_expected": 0,
                "hits": 0,
                "same_texts": 0,
                "files": {},
            }
            for s in pending
        }
        self.done: set[int] = set()

    def add(self, report: dict) -> dict | None:
        """Count one write report; returns the shard's manifest when this report completes it."""
        state = self.state[report["shard"]]
        if report["path"] in state["files"]:
            return None
        state["files"][report["path"]] = report
        if report["kind"] in (
            "cache",
            "waiting",
        ):  # score-cache staging: listed in the manifest, not rows
            return None
        if report["kind"] == "rejected":
            state["rejected"] += report["pairs"]
        else:
            state["pairs"] += report["pairs"]
            state["tokens"] += report["tokens"]
            state["windows"] += report["rows"]
            state["windows_expected"] += report["windows_expected"]
            state["hits"] += report.get("hits") or 0
            state["same_texts"] += report.get("same_texts") or 0
        shard = self.shards[report["shard"]]
        if (
            shard.shard in self.done
            or state["pairs"] + state["rejected"] < shard.num_pairs
            or state["windows"] < state["windows_expected"]
        ):
            return None
        self.done.add(shard.shard)
        return {
            "shard": shard.shard,
            "pairs": state["pairs"],
            "rejected": state["rejected"],
            "tokens": state["tokens"],
            "hits": state["hits"],
            "same_texts": state["same_texts"],
            "files": list(state["files"].values()),
        }

    def check_complete(self) -> None:
        for shard, state in self.state.items():
            if shard not in self.done:
                raise PipelineError(
                    f"shard {shard} finished with {state['pairs'] + state['rejected']} of "
                    f"{self.shards[shard].num_pairs} rows accounted for; rerun to retry it"
                )


def run_rerank(config: RerankConfig, input_uri: str, output_uri: str) -> dict:
    """Rerank `input_uri` into `output_uri`; returns the summary (also written to summary.json)."""
    start_time, t0 = _now(), time.monotonic()
    check_storage_options([input_uri, output_uri, config.cache.uri], config.storage_options)
    out_fs, out_root = url_to_fs(output_uri, config.storage_options)
    protocol = protocol_prefix(output_uri)
    output_uri = protocol + out_root
    in_fs, files = list_input_files(input_uri, config.storage_options)
    fingerprint = input_fingerprint(in_fs, files)
    previous = _finished_run(config, out_fs, out_root, output_uri, input_uri, fingerprint)
    if previous is not None:
        return previous

    # Everything that can be wrong with the input or the model is found here, before anything is written.
    layout = InputLayout.from_schemas(read_schemas(in_fs, files), config.input, files=files)
    model = check_model(config)
    row_bytes = _input_row_bytes(in_fs, files, layout)
    _hand_offs(
        config, row_bytes, model["max_length"]
    )  # a pair too big for io.in_flight_mb: refused now
    if config.cache.uri:
        from pipeline.rerank.cache import check_location

        cache_fs, cache_root = url_to_fs(config.cache.uri, config.storage_options)
        check_bucket(
            cache_fs, cache_root, config.cache.uri, config.io.create_bucket, "io.create_bucket"
        )
        check_location(config.cache.uri, config.storage_options)
    _prepare_output(out_fs, out_root, output_uri, config.io.create_bucket)
    with OutputLease(
        out_fs,
        out_root,
        output_uri,
        heartbeat_s=config.io.lease_heartbeat_s,
        timeout_s=config.io.lease_timeout_s,
    ) as lease:
        if out_fs.exists(join(out_root, "summary.json")):
            raise OutputError(
                f"{output_uri} was completed by another run just now; rerun to see its result"
            )
        plan = _plan(
            config,
            input_uri,
            output_uri,
            out_fs,
            out_root,
            in_fs,
            files,
            fingerprint,
            layout,
            model,
        )
        plan.input_row_bytes = row_bytes
        _ensure_ray(config)
        plan.config = _tokenizer_actors(config, plan)
        _check_cluster(plan.config, plan.protocol)
        if config.cache.uri:
            _open_cache(plan)
            if not isinstance(
                config.tokenizer.num_actors, int
            ):  # the cache may hold this model's measured rate
                from pipeline.rerank.cache import read_runs

                runs = read_runs(plan.cache)
                if any(r.get("device") == "cuda" for r in runs):
                    plan.config = _tokenizer_actors(config, plan, runs)
                    _check_cluster(plan.config, plan.protocol)
            _lookup(plan, lease)
        t_score, started_unix = time.monotonic(), time.time()
        this_run = _score(plan, lease)
        this_run["score_seconds"] = time.monotonic() - t_score
        this_run["score_window_unix"] = (started_unix, time.time())
        manifests = [
            m.model_dump()
            for m in _read_manifests(plan, [plan.manifest(s.shard) for s in plan.shards])
        ]
        fill_files = _publish(plan, manifests, lease, this_run) if plan.cache else []
        bucket_reports = _rank(plan, manifests, lease, fill_files)
        return _commit(plan, manifests, bucket_reports, lease, this_run, start_time, t0)


def _tokenizer_actors(
    config: RerankConfig, plan: RunPlan, cache_runs: list[dict] = ()
) -> RerankConfig:
    """`config` with tokenizer.num_actors auto sized from the cluster (pipeline/rerank/capacity.py); a number is kept."""
    import ray

    from pipeline.rerank.capacity import model_config_of, resolve_tokenizer_actors

    if isinstance(config.tokenizer.num_actors, int):
        return config
    return resolve_tokenizer_actors(
        config, ray.nodes(), model_config_of(plan.model["directory"]), cache_runs
    )


def _finished_run(config, out_fs, out_root, output_uri, input_uri, fingerprint) -> dict | None:
    """The summary of a finished run of the same settings and input, None if there is none; any other finished
    run is refused rather than reported as this run's result."""
    summary_path = join(out_root, "summary.json")
    if not out_fs.exists(summary_path):
        return None
    protocol = protocol_prefix(output_uri)
    summary = read_own_file(
        out_fs,
        summary_path,
        Summary,
        "summary of a finished run",
        f"delete {output_uri} to run again, or use another --output",
        protocol,
    )
    previous = summary.model_dump(mode="json")
    if summary.config_hash != settings_hash(config):
        differ = settings_differences(summary.settings or summary.config, config.result_settings())
        raise OutputError(
            f"{output_uri} already holds a finished run with other settings ("
            + (
                differ
                or f"model {summary.model!r}, settings hash {summary.config_hash} there, "
                f"{settings_hash(config)} in this run"
            )
            + "); use another --output, or delete it to "
            "run again"
        )
    if previous.get("input_fingerprint") != fingerprint:
        raise OutputError(
            f"{output_uri} already holds a finished run of another input: it ranked "
            f"{_describe_input(previous.get('input_uri'), previous.get('input_fingerprint'))}, this "
            f"run's input is {_describe_input(input_uri, fingerprint)}; use another --output, "
            "or delete it to run again"
        )
    if out_fs.exists(
        join(out_root, "_work")
    ):  # a crash after the summary, before the staging was removed
        out_fs.rm(join(out_root, "_work"), recursive=True)
    logger.info(
        "%s is already complete (summary.json exists, same settings and input); nothing to do",
        output_uri,
    )
    return previous


def _plan(
    config, input_uri, output_uri, out_fs, out_root, in_fs, files, fingerprint, layout, model
) -> RunPlan:
    """The shard plan (from Parquet metadata), checked against an unfinished run's, whose committed shards
    are kept."""
    shards = plan_shards(in_fs, files, layout, config.input.rows_per_shard)
    total_pairs = sum(s.num_pairs for s in shards)
    # Grouped input ranks each shard on its own (no shuffle) only if no query id spans two rows.
    rank_per_shard = layout.grouped and query_ids_unique(in_fs, files, config.input.query_id_column)
    if layout.grouped and not rank_per_shard:
        logger.info(
            "grouped input repeats query ids across rows: ranking by hash(query_id) buckets instead"
        )
    num_buckets = (
        len(shards) if rank_per_shard else max(1, -(-total_pairs // config.output.rows_per_bucket))
    )
    plan = RunPlan(
        config,
        input_uri,
        output_uri,
        out_fs,
        out_root,
        files,
        fingerprint,
        layout,
        model,
        shards,
        rank_per_shard,
        num_buckets,
    )

    identity_path = join(plan.work, "job.json")
    identity = plan.identity() | {"settings": config.result_settings()}
    # glob, not ls: object stores have no folders, an empty prefix simply lists nothing.
    manifests = sorted(out_fs.glob(join(plan.manifests_dir, "shard-*.json")))
    if out_fs.exists(identity_path):
        work_uri = plan.protocol + plan.work
        earlier = read_own_file(
            out_fs,
            identity_path,
            JobIdentity,
            "record of an unfinished run",
            f"delete {work_uri} to start this output over (its committed shards are scored again)",
            plan.protocol,
        )
        if (
            earlier.model_dump(mode="json", exclude={"settings"}, include=set(plan.identity()))
            != plan.identity()
        ):
            if manifests:
                differ = settings_differences(earlier.settings, config.result_settings())
                what = differ or (
                    "another input"
                    if earlier.input_fingerprint.model_dump() != fingerprint
                    else "other settings or input"
                )
                raise OutputError(
                    f"{output_uri} holds an unfinished run with other settings or input ({what}; "
                    f"{len(manifests)} shard(s) committed); rerun it with its settings to finish it, "
                    "use another --output, or delete it to start over"
                )
            # A run that committed no shard (refused before any work, or stopped before its first commit) left
            # nothing worth resuming: this run starts the output over with its own settings.
            logger.info(
                "the unfinished run in %s committed no shard; starting over with this run's settings",
                output_uri,
            )
            out_fs.rm(plan.work, recursive=True)
            out_fs.makedirs(plan.work, exist_ok=True)
            write_json(out_fs, identity_path, identity)
        else:
            logger.info("resuming the unfinished run in %s", output_uri)
    else:
        out_fs.makedirs(plan.work, exist_ok=True)
        write_json(out_fs, identity_path, identity)
    out_fs.makedirs(plan.manifests_dir, exist_ok=True)
    # Every committed manifest is checked now, before any work, not after an hour of scoring the others.
    plan.committed = {m.shard for m in _read_manifests(plan, manifests)}
    for (
        shard
    ) in plan.pending:  # staging files of a shard that never committed were written before a crash
        stale = join(plan.work, "scored", f"shard-{shard.shard:05d}")
        if out_fs.exists(stale):
            out_fs.rm(stale, recursive=True)
    logger.debug(
        "shards: %s; ranking buckets: %d (%s); input fingerprint %s",
        ", ".join(
            f"{s.shard}={posixpath.basename(s.path)}:{len(s.row_groups)} row groups/{s.num_pairs} pairs"
            for s in shards[:20]
        )
        + (f" ... (+{len(shards) - 20})" if len(shards) > 20 else ""),
        num_buckets,
        "one per shard" if rank_per_shard else "hash(query_id)",
        fingerprint["sha256"],
    )
    logger.info(
        "%s pairs in %d shard(s) (%s input); %d already done, %d to score; model %s (%s layout)",
        f"{total_pairs:,}",
        len(shards),
        "grouped" if layout.grouped else "long",
        len(plan.committed),
        len(plan.pending),
        config.model,
        model["layout"] or "read by the scorers",
    )
    return plan


def _read_manifests(plan: RunPlan, paths: list[str]) -> list[Manifest]:
    """The shard manifests at `paths`, each checked (its schema, and the shard its name says)."""
    fix = "delete it: its shard is scored again on the next run"
    manifests = read_own_files(plan.out_fs, paths, Manifest, "shard manifest", fix, plan.protocol)
    for path, manifest in zip(paths, manifests):
        named = posixpath.basename(path)
        if named != f"shard-{manifest.shard:05d}.json" or manifest.shard >= len(plan.shards):
            raise OutputError(
                f"{plan.protocol}{path} is not a valid shard manifest: it is for shard {manifest.shard} "
                f"(this run has {len(plan.shards)}); {fix}"
            )
    return manifests


def _open_cache(plan: RunPlan) -> None:
    """The score cache's folder for this model and settings (created if new): the fingerprint covers the
    checkpoint's bytes and every setting that changes a score. `dtype: auto` is resolved here, on a task placed
    like a scorer, and the scorers are given the result, so the fingerprint names the dtype they really run."""
    from pipeline.rerank.cache import checkpoint_digest, fingerprint, open_cache
    from pipeline.rerank.compose import scorer_pool

    config = plan.config
    _, resources = scorer_pool(config)
    device = "cuda" if resources.get("num_gpus") else "cpu"
    dtype = config.dtype if config.dtype != "auto" else _scorer_dtype(device, resources)
    tokenizer = {"max_chars_per_token", "long_documents"} | (
        {"max_query_length", "overlap"} if config.tokenizer.long_documents == "windows" else set()
    )
    settings = {
        "dtype": dtype,
        "device": device,
        "max_length": plan.model["max_length"],
        "tokenizer": config.tokenizer.model_dump(mode="json", include=tokenizer),
    }
    if dtype == "int8":
        settings["int8"] = int8_settings(config, plan.model["fp32_layers"], **_scorer_int8())
    if plan.model.get("prompt"):  # a decoder reranker's template and instruction
        settings["prompt"] = plan.model["prompt"]
    checkpoint = checkpoint_digest(plan.model["directory"])
    name = fingerprint(checkpoint, settings)
    plan.cache = open_cache(
        config.cache.uri,
        config.storage_options,
        name,
        {
            "model": config.model,
            "revision": str(plan.model["revision"]),
            "checkpoint": checkpoint,
            "settings": settings,
        },
        config.cache.buckets,
    )
    plan.dtype = dtype
    logger.info(
        "score cache %s (%d buckets) for %s, %s on %s",
        plan.cache.uri,
        plan.cache.buckets,
        config.model,
        dtype,
        device,
    )


def int8_settings(
    config: RerankConfig, fp32_layers: list[str], weight_qmax: int, calibration: str
) -> dict:
    """What changes an int8 score besides the weights, for the cache's fingerprint: the configured options, the
    float32 layers by name (patterns that pick the same layers score the same), and what `_scorer_int8` found."""
    return {
        "weight_qmax": weight_qmax,
        "smooth_alpha": config.int8.smooth_alpha,
        "fp32_layers": fp32_layers,
        "calibration": calibration,
    }


def _scorer_int8() -> dict:
    """What a scorer's CPU and the engine decide about int8: the weights' range (63 on CPUs without VNNI, 127
    with it, so the two never share entries) and a digest of the pairs SmoothQuant calibrates on."""
    import ray

    @ray.remote(num_cpus=0)
    def resolve() -> dict:
        import hashlib
        import json

        from pipeline.model.quantization import CALIBRATION_PAIRS, Int8Options, weight_qmax

        calibration = Int8Options().calibration_pairs or CALIBRATION_PAIRS
        digest = hashlib.blake2b(json.dumps(calibration).encode(), digest_size=8).hexdigest()
        return {"weight_qmax": weight_qmax(), "calibration": digest}

    return ray.get(resolve.remote())


def _scorer_dtype(device: str, resources: dict) -> str:
    """What `dtype: auto` resolves to where a scorer runs (a GPU node, or any CPU node)."""
    import ray

    @ray.remote(num_cpus=0, num_gpus=resources.get("num_gpus", 0) and 0.01)
    def resolve(device: str) -> str:
        import torch

        from pipeline.model.cross_encoder import resolve_dtype

        return str(resolve_dtype("auto", torch.device(device))).replace("torch.", "")

    return ray.get(resolve.remote(device))


def _lookup(plan: RunPlan, lease: OutputLease) -> None:
    """Phase 0 (score cache): find the pending shards' pairs in the cache, per cache bucket, before any
    tokenizing. Writes the found files the read stage attaches (stages/lookup.py)."""
    from pipeline.rerank.compose import lookup_datasets

    if not plan.pending:
        return
    lookup_dir = join(plan.work, "lookup")
    if plan.out_fs.exists(lookup_dir):  # an earlier run's lookup: the cache may hold more by now
        plan.out_fs.rm(lookup_dir, recursive=True)
    keys, join_buckets = lookup_datasets(
        plan.pending, plan.layout, plan.config, plan.input_uri, plan.work_uri, plan.cache
    )
    files: dict[int, list[str]] = {}
    for report in _worker_errors(
        keys().iter_batches(batch_size=None, batch_format="pyarrow"), lease
    ):
        for row in report.to_pylist():
            listed = files.setdefault(row["bucket"], [])
            if row["path"] not in listed:  # a retried task reports the file it rewrote again
                listed.append(row["path"])
    counts = {"hits": 0, "same_texts": 0, "to_score": 0}
    if files:
        ds = join_buckets([{"bucket": b, "files": f} for b, f in sorted(files.items())])
        for report in _worker_errors(
            ds.iter_batches(batch_size=None, batch_format="pyarrow"), lease
        ):
            for row in report.to_pylist():
                for k in counts:
                    counts[k] += row[k]
    logger.info(
        "score cache: %s pairs found, %s repeat another pair of this run, %s to score",
        f"{counts['hits']:,}",
        f"{counts['same_texts']:,}",
        f"{counts['to_score']:,}",
    )


def _publish(plan: RunPlan, manifests: list[dict], lease: OutputLease, this_run: dict) -> list[str]:
    """Phase 1b (score cache): every shard is committed; publish their new scores to the cache and give the
    pairs that waited for a twin their score. Returns the fill files the ranker reads."""
    from pipeline.rerank.compose import publish_dataset

    new: dict[int, list[str]] = {}
    waiting: dict[int, list[str]] = {}
    for m in manifests:
        for f in m["files"]:
            if f["kind"] in ("cache", "waiting"):
                (new if f["kind"] == "cache" else waiting).setdefault(f["bucket"], []).append(
                    f["path"]
                )
    items = [
        {"bucket": b, "new_files": new.get(b, []), "waiting_files": waiting.get(b, [])}
        for b in sorted(set(new) | set(waiting))
    ]
    fill_files, added = [], 0
    if items:
        ds = publish_dataset(items, plan.config, plan.work_uri, plan.cache)
        for report in _worker_errors(
            ds.iter_batches(batch_size=None, batch_format="pyarrow"), lease
        ):
            for row in report.to_pylist():
                added += row["entries_added"]
                if row["filled"]:
                    fill_files.append(join(plan.work, "cache", f"fill-{row['bucket']:05d}.parquet"))
    this_run["entries_added"] = added
    logger.info("score cache: %s new entries published", f"{added:,}")
    return sorted(fill_files)


def _score(plan: RunPlan, lease: OutputLease) -> dict:
    """Phase 1: score the pending shards, writing each shard's manifest once its rows are all accounted for.
    Returns this run's counts: pairs (scored or cached), rejected rows, tokens, cache hits, pairs that
    repeated another pair's texts."""
    from pipeline.rerank.compose import scoring_dataset

    pending = plan.pending
    totals = {"pairs": 0, "rejected": 0, "tokens": 0, "hits": 0, "same_texts": 0}
    if not pending:
        return totals
    batches = _hand_offs(plan.config, plan.input_row_bytes, plan.model["max_length"])
    if batches.cut(plan.config):
        logger.info(
            "pairs of about %s KB on their way to the scorer: batches cut to fit io.in_flight_mb=%d (%s)",
            f"{batches.row_bytes['scorer'] / 2**10:,.1f}",
            plan.config.io.in_flight_mb,
            ", ".join(batches.cut(plan.config)),
        )
    progress = Progress(
        plan.total_pairs,
        plan.total_pairs - sum(s.num_pairs for s in pending),
        plan.config.progress_interval_s,
    )
    commits = ShardCommits(pending)
    try:
        ds = scoring_dataset(
            pending,
            plan.layout,
            plan.config,
            plan.input_uri,
            plan.work_uri,
            plan.num_buckets,
            plan.rank_per_shard,
            progress_counter=progress.counter,
            cache=plan.cache,
            dtype=plan.dtype,
            batches=batches,
        )
        for report in _worker_errors(_watched(ds, progress, plan.config, batches), lease):
            progress.moved()
            for row in report.to_pylist():
                manifest = commits.add(row)
                if manifest is not None:
                    write_json(plan.out_fs, plan.manifest(manifest["shard"]), manifest)
                    for k in totals:
                        totals[k] += manifest[k]
        commits.check_complete()
    except BaseException:
        progress.close()
        raise
    progress.finish(totals["pairs"], totals["rejected"])
    return totals


def _input_row_bytes(fs, files: list[str], layout: InputLayout) -> int:
    """Bytes of one input pair as read (the columns the job reads, uncompressed), from the Parquet footers of
    every file (metadata only, read in parallel): the largest row group's mean, so a few big-document files are
    not averaged away. A single outsize pair inside a row group of small ones is not seen here; the stall
    watchdog names the batch it blocks."""
    columns = set(layout.read_columns)
    doc_ids = f"{layout.candidates}.list.element.{layout.config.doc_id_column}"

    def per_pair(path: str) -> float:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        worst = 0.0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            chunks = [group.column(c) for c in range(group.num_columns)]
            size = sum(
                c.total_uncompressed_size
                for c in chunks
                if c.path_in_schema.split(".")[0] in columns
            )
            pairs = group.num_rows
            if layout.grouped:  # a row is a query: its candidates are the pairs
                pairs = next((c.num_values for c in chunks if c.path_in_schema == doc_ids), pairs)
            if pairs:
                worst = max(worst, size / pairs)
        return worst

    return int(max(map_paths(per_pair, files), default=0))


def _hand_offs(config: RerankConfig, input_row_bytes: int, max_length: int):
    """Rows per batch of each stage, sized to io.in_flight_mb (`compose.hand_offs`); ConfigError if a pair
    alone cannot fit."""
    from pipeline.rerank.compose import hand_offs

    return hand_offs(config, input_row_bytes, max_length)


# Ray Data's names of our stages (`MapBatches(<class>)`), as a user knows them.
_STAGE_NAMES = {
    "ReadShard": "reader",
    "ReadShardCached": "reader",
    "TokenizeStage": "tokenizer",
    "ScoreStage": "scorer",
    "WriteScored": "writer",
}
_BATCH_SETTINGS = {
    "reader": "input.rows_per_shard",
    "tokenizer": "tokenizer.batch_size",
    "scorer": "scorer.batch_size",
    "writer": "io.rows_per_write",
}


def _watched(ds, progress: Progress, config: RerankConfig, batches):
    """`ds`'s report batches, consumed on a thread of their own so that the driver notices when nothing was
    scored or written for io.stall_timeout_s: then Ray Data's execution is shut down and the job ends with an
    InfrastructureError saying which stage waits on which (a rerun resumes the committed shards)."""
    import queue
    import threading

    # Ray Data's StreamingExecutor is the one handle that stops a running execution from another thread; the
    # dataset creates it (`_create_executor`) and only hands it out after the first output, which a stalled
    # pipeline never makes, so it is kept here as it is created. A Ray Data without that method still gets the
    # stall's error line; the job's process then ends, and its execution with it.
    executors = []
    make = getattr(ds, "_create_executor", None)

    def keep_executor():
        executor = make()
        executors.append(executor)
        return executor

    if make is not None:
        ds._create_executor = keep_executor
    reports: queue.Queue = queue.Queue()
    stop = threading.Event()

    def consume() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                reports.put(("batch", batch))
                if stop.is_set():
                    return
            reports.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the driver's thread, which raises it
            reports.put(("error", e))

    thread = threading.Thread(target=consume, name="scoring-reports", daemon=True)
    thread.start()
    timeout = config.io.stall_timeout_s
    try:
        while True:
            try:
                kind, item = reports.get(timeout=min(1.0, timeout))
            except queue.Empty:
                if progress.idle_s() < timeout:
                    continue
                raise InfrastructureError(
                    _stall_message(
                        executors[0] if executors else None, progress.idle_s(), config, batches
                    )
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        if (
            thread.is_alive()
        ):  # stopped early (a stall, a worker's fault, a lost lease): no stage may go on
            for executor in executors:
                try:
                    executor.shutdown(force=True)
                except Exception:  # noqa: BLE001 - the reason the run stops must reach the user, not this
                    logger.debug("Ray Data's execution did not shut down cleanly", exc_info=True)
            thread.join(timeout=30)


def _stall_message(executor, idle: float, config: RerankConfig, batches) -> str:
    """One line: which stage waits on which, and the setting to change. Reads Ray Data's live topology (what
    each stage runs and holds), best effort: a generic line if it cannot."""
    head = f"nothing was scored or written for {idle:.0f} s (io.stall_timeout_s={config.io.stall_timeout_s:g}) while work remains"
    tail = f"; {RESUME}"
    try:
        stages = []
        for op, state in executor._topology.items():
            cls = op.name.rsplit("(", 1)[-1].rstrip(")")
            if op.name.startswith("MapBatches("):
                actors = op.get_actor_info() if hasattr(op, "get_actor_info") else None
                stages.append(
                    (
                        _STAGE_NAMES.get(cls, cls),
                        op.num_active_tasks(),
                        state.total_enqueued_input_blocks_bytes(),
                        (actors.pending + actors.restarting) if actors else 0,
                    )
                )
    except Exception:  # noqa: BLE001 - a diagnosis must not hide the stall itself
        logger.debug("no diagnosis of the stall from Ray Data's topology", exc_info=True)
        stages = []
    # The most downstream stage with a task in flight: a stage after it holding rows waits for a batch the budget
    # keeps from filling (the reader's task streams a whole shard, so it stays in flight while held back);
    # with none, that stage itself has been busy all along.
    running = max((i for i, s in enumerate(stages) if s[1]), default=-1)
    queued = [i for i, s in enumerate(stages) if i > running and s[2]]
    if queued:
        i = max(queued, key=lambda i: stages[i][2])  # the batch that cannot fill
        name, held = stages[i][0], stages[i][2]
        upstream = stages[i - 1][0] if i else "input"
        rows = getattr(batches, name, None)
        return (
            f"{head}: the {name} waits for a full batch"
            + (f" of {rows:,} rows" if rows else "")
            + f" ({held / 2**20:,.1f} MB gathered) from the {upstream}, which io.in_flight_mb="
            f"{config.io.in_flight_mb} holds back; raise io.in_flight_mb or lower "
            f"{_BATCH_SETTINGS.get(name, 'the batch sizes')}" + tail
        )
    if running >= 0:
        name = stages[running][0]
        waiting = [s[0] for s in stages[running + 1 :]]
        return (
            f"{head}: the {name} has been running a batch all that time"
            + (
                f" and the {', '.join(waiting)} wait{'s' if len(waiting) == 1 else ''} on it"
                if waiting
                else ""
            )
            + f"; if it is only slow, raise io.stall_timeout_s or lower {_BATCH_SETTINGS.get(name, 'its batch')}"
            + tail
        )
    starting = [s for s in stages if s[3]]
    if starting:
        name, pending = starting[0][0], starting[0][3]
        return (
            f"{head}: {pending} {name} actor{'s' if pending > 1 else ''} could not start all that time (a slow "
            "start, or a cluster short of the CPUs/GPUs they ask for); see the Ray logs, and raise "
            f"io.stall_timeout_s if they only start slowly" + tail
        )
    return (
        f"{head}: no stage is running or holding rows; raise io.in_flight_mb or lower tokenizer.batch_size, "
        f"scorer.batch_size and io.rows_per_write" + tail
    )


def _rank(
    plan: RunPlan, manifests: list[dict], lease: OutputLease, fill_files: list[str]
) -> dict[int, dict]:
    """Phase 2: rank every bucket that has no done-marker yet. Returns every bucket's report."""
    from pipeline.rerank.compose import ranking_dataset

    bucket_files: dict[int, list[str]] = {}
    for m in manifests:
        for f in m["files"]:
            if f["kind"] == "scored":
                bucket_files.setdefault(f["bucket"], []).append(f["path"])
    ranked_dir = join(plan.work, "ranked")
    plan.out_fs.makedirs(ranked_dir, exist_ok=True)
    # One listing, not one existence check per bucket (a round trip each on object storage).
    markers = sorted(plan.out_fs.glob(join(ranked_dir, "bucket-*.json")))
    bucket_reports = {
        r.bucket: r.model_dump()
        for r in read_own_files(
            plan.out_fs,
            markers,
            BucketMarker,
            "ranked bucket's marker",
            "delete it: its bucket is ranked again on the next run",
            plan.protocol,
        )
        if r.bucket in bucket_files
    }
    todo = [
        {"bucket": b, "files": files_}
        for b, files_ in sorted(bucket_files.items())
        if b not in bucket_reports
    ]
    if todo:
        metadata = output_metadata(plan.config, plan.model, _scorers(plan))
        ds = ranking_dataset(
            todo,
            plan.config,
            plan.output_uri,
            _rejected_schema(plan.layout, metadata),
            plan.shards,
            plan.layout,
            plan.input_uri,
            file_metadata=metadata,
            fill_files=fill_files,
        )
        for report in _worker_errors(
            ds.iter_batches(batch_size=None, batch_format="pyarrow"), lease
        ):
            for row in report.to_pylist():
                write_json(plan.out_fs, join(ranked_dir, f"bucket-{row['bucket']:05d}.json"), row)
                bucket_reports[row["bucket"]] = row
    return bucket_reports


def _scorers(plan: RunPlan) -> list[dict]:
    """What each scorer actor recorded about the model it ran (dtype, kernel, device), this run or earlier."""
    return [
        r.model_dump()
        for r in read_own_files(
            plan.out_fs,
            plan.out_fs.glob(join(plan.work, "scorers", "*.json")),
            ScorerRecord,
            "scorer record",
            "delete it: it only describes one scorer for summary.json",
            plan.protocol,
        )
    ]


def _move_rejected(plan: RunPlan, manifests: list[dict], scorers: list[dict]) -> dict[str, int]:
    """Rejected rows from staging to rejected/ (an empty table if none); returns rejected rows by reason."""
    fs, rejected_dir = plan.out_fs, join(plan.out_root, "rejected")
    fs.makedirs(rejected_dir, exist_ok=True)
    schema = _rejected_schema(plan.layout, output_metadata(plan.config, plan.model, scorers))
    reasons: dict[str, int] = {}
    for m in manifests:
        for k, f in enumerate(x for x in m["files"] if x["kind"] == "rejected"):
            with fs.open(f["path"], "rb") as fh:
                table = pq.read_table(fh)
            for reason in table.column(S.REASON).to_pylist():
                reasons[reason] = reasons.get(reason, 0) + 1
            table = table.select(schema.names).replace_schema_metadata(schema.metadata)
            atomic_write(
                fs,
                join(rejected_dir, f"shard-{m['shard']:05d}-{k:03d}.parquet"),
                lambda fh, t=table: pq.write_table(t, fh),
            )
    if not fs.glob(join(rejected_dir, "*.parquet")):
        # Nothing rejected: an empty table with the schema, so that readers of rejected/*.parquet find a file.
        atomic_write(
            fs,
            join(rejected_dir, "part-empty.parquet"),
            lambda fh: pq.write_table(schema.empty_table(), fh),
        )
    return reasons


def _cache_summary(plan: RunPlan, manifests: list[dict], this_run: dict) -> dict:
    """What the score cache did: over the whole output (hits, repeats, misses) and in this run (pairs the model
    scored, scorer-seconds it saved at the model's measured rate); recorded in the cache for later estimates."""
    scored_now = this_run["pairs"] - this_run["hits"] - this_run["same_texts"]
    seconds = this_run["score_seconds"]
    fields = {
        "pairs_scored": scored_now,
        "model_pairs_per_s": round(scored_now / seconds, 2) if seconds > 0 and scored_now else None,
    }
    if plan.cache is None:
        return fields | {"cache": None}
    from pipeline.rerank.cache import read_runs, record_run
    from pipeline.rerank.compose import scorer_pool
    from pipeline.rerank.stages.lookup import QUARANTINED

    actors = scorer_pool(plan.config)[0]
    # Cache files that did not read: skipped (their pairs scored again) and moved aside by the lookup.
    quarantined = [
        r.model_dump()
        for r in read_own_files(
            plan.out_fs,
            sorted(plan.out_fs.glob(join(plan.work, QUARANTINED, "*.json"))),
            QuarantineRecord,
            "note of a quarantined cache file",
            "delete it: it only names a moved cache file for summary.json",
            plan.protocol,
        )
    ]
    for q in quarantined:
        logger.warning(
            "score cache: %s does not read (%s); skipped, its pairs scored again, moved to %s",
            q["path"],
            q["reason"],
            q["moved_to"] or "the quarantine by another run",
        )
    # The model's rate: this run's, if it scored enough pairs to measure it, else the best measured run of the
    # same cache folder (a warm run that scored nothing still gets an estimate).
    rate = fields["model_pairs_per_s"] if scored_now >= 1000 else None
    if rate is None:
        measured = [
            r
            for r in read_runs(plan.cache)
            if r.get("model_pairs_per_s") and r.get("pairs_scored", 0) >= 1000
        ]
        best = max(measured, key=lambda r: r["pairs_scored"], default=None)
        rate = best["model_pairs_per_s"] if best else None
    saved = this_run["hits"] + this_run["same_texts"]
    hits = sum(m.get("hits", 0) for m in manifests)
    same = sum(m.get("same_texts", 0) for m in manifests)
    cache = {
        "uri": plan.config.cache.uri,
        "fingerprint": plan.cache.fingerprint,
        "buckets": plan.cache.buckets,
        "entries_added": this_run.get("entries_added", 0),
        "quarantined_files": len(quarantined),
        "quarantined": [q["path"] for q in quarantined],
        "this_run": {
            "hits": this_run["hits"],
            "same_texts": this_run["same_texts"],
            "scored": scored_now,
        },
    }
    record_run(
        plan.cache,
        {
            "output_uri": plan.output_uri,
            "end_time": _now(),
            "hits": this_run["hits"],
            "same_texts": this_run["same_texts"],
            "pairs_scored": scored_now,
            "model_pairs_per_s": fields["model_pairs_per_s"],
            "scorer_actors": actors,
            # which device the rate was measured on: only a GPU run's sizes GPU pools
            "device": ",".join(sorted({s["device"] for s in _scorers(plan)})) or None,
            "entries_added": cache["entries_added"],
        },
    )
    return fields | {
        "cache_hits": hits,
        "cache_same_texts": same,
        "cache_misses": sum(m["pairs"] for m in manifests) - hits - same,
        # Scorer-seconds (GPU-seconds on a GPU pool) this run did not spend: pairs it took from the cache or
        # from a repeated pair, at the model's rate per actor. An estimate: null when no rate was ever measured.
        "scorer_seconds_saved": round(saved * actors / rate, 1) if rate else None,
        "cache": cache,
    }


def _number(value) -> float | None:
    return (
        value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        else None
    )


def _busy(record: dict, window: tuple[float, float] | None = None) -> dict:
    """A scorer record's busy seconds, wall seconds and their ratio (None where the record has no numbers).
    A scorer of this run (ready within `window`, the scoring phase's start and end, Unix time) is counted up
    to the phase's end: the record is written only inside calls, so a scorer that waited for tokens after its
    last call would otherwise look busier than it was."""
    busy, wall, ready = (
        _number(record.get("busy_s")),
        _number(record.get("wall_s")),
        _number(record.get("ready_unix")),
    )
    if window is not None and ready is not None and window[0] <= ready <= window[1]:
        wall = round(window[1] - ready, 3)
    return {
        "busy_s": busy,
        "wall_s": wall,
        "busy_fraction": round(min(1.0, busy / wall), 3) if busy is not None and wall else None,
    }


def _mean_busy(scorers: list[dict], window: tuple[float, float] | None = None) -> float | None:
    fractions = [f for f in (_busy(s, window)["busy_fraction"] for s in scorers) if f is not None]
    return round(sum(fractions) / len(fractions), 3) if fractions else None


def _commit(
    plan: RunPlan, manifests, bucket_reports, lease, this_run: dict, start_time, t0
) -> dict:
    """Rejected rows out of staging, counts reconciled, summary.json last, staging removed."""
    config, fs = plan.config, plan.out_fs
    new_pairs, new_tokens = this_run["pairs"] + this_run["rejected"], this_run["tokens"]
    score_seconds = this_run["score_seconds"]
    scorers = _scorers(plan)
    reasons = _move_rejected(plan, manifests, scorers)
    duplicates = sum(r["duplicates"] for r in bucket_reports.values())
    if duplicates:
        reasons["duplicate (query_id, doc_id)"] = duplicates
    scored_rows = sum(r["scored"] for r in bucket_reports.values())
    rejected_rows = sum(reasons.values())
    if scored_rows + rejected_rows != plan.total_pairs:
        raise PipelineError(
            f"row accounting failed: {plan.total_pairs} input pairs but {scored_rows} scored + "
            f"{rejected_rows} rejected; the output in {plan.output_uri} is left incomplete"
        )
    engine = scorers[0] if scorers else {}
    elapsed = time.monotonic() - t0
    summary = {
        "input_rows": plan.total_pairs,
        "scored_rows": scored_rows,
        "rejected_rows": rejected_rows,
        "ranked_rows_written": sum(r["written"] for r in bucket_reports.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "input_uri": plan.input_uri,
        "input_fingerprint": plan.fingerprint,
        "input_format": "grouped" if plan.layout.grouped else "long",
        "input_files": len(plan.files),
        "shards": len(plan.shards),
        "shards_resumed": len(plan.committed),
        "ranking_buckets": plan.num_buckets,
        "pairs_this_run": new_pairs,
        "tokens": sum(m["tokens"] for m in manifests),
        "pairs_per_s": round(new_pairs / score_seconds, 2)
        if score_seconds > 0 and new_pairs
        else None,
        "tokens_per_s": round(new_tokens / score_seconds, 1)
        if score_seconds > 0 and new_tokens
        else None,
        "seconds": round(elapsed, 2),
        # Dense layers always run on packed tokens; attention is padding-free with the varlen kernels and with
        # SDPA on CPU (runs of equal length). Only SDPA on a GPU pads inside length groups, not counted: null.
        "padding_efficiency": None
        if any(
            s["attention_backend"] == "sdpa_length_grouped" and s["device"] != "cpu"
            for s in scorers
        )
        else 1.0,
        "model": config.model,
        "revision": plan.model["revision"],
        "layout": plan.model["layout"]
        or (sorted({s["layout"] for s in scorers})[0] if scorers else None),
        "dtype": sorted({s["dtype"] for s in scorers}) if scorers else None,
        "attention_backend": sorted({s["attention_backend"] for s in scorers}) if scorers else None,
        "device": sorted({s["device"] for s in scorers}) if scorers else None,
        # where each scorer actor ran (this run or an earlier one of this output): its device and Ray node
        # and how busy it was: seconds scoring over seconds since it was ready (null in records that predate it)
        "scorers": sorted(
            (
                {
                    "device": s["device"],
                    "node_id": s.get("node_id"),
                    **_busy(s, this_run.get("score_window_unix")),
                }
                for s in scorers
            ),
            key=lambda s: (s["node_id"] or "", s["device"]),
        ),
        # the pool's mean busy fraction: near 1, the scorers set the pace; well below, they waited for tokens
        "scorer_busy_fraction": _mean_busy(scorers, this_run.get("score_window_unix")),
        "random_weights": bool(engine.get("random_weights", config.model.startswith("dummy:"))),
        "max_length": plan.model["max_length"],
        "long_documents": config.tokenizer.long_documents,
        "top_k": config.output.top_k,
        **_cache_summary(plan, manifests, this_run),
        "config_hash": settings_hash(config),
        "settings": config.result_settings(),
        "config": redact(config.model_dump(mode="json")),
        "start_time": start_time,
        "end_time": _now(),
    }
    if summary["random_weights"]:
        logger.warning(
            "RANDOM WEIGHTS: %s is a dummy model; these scores mean nothing", config.model
        )
    lease.check()  # never publish a summary over another run's files
    write_json(fs, join(plan.out_root, "summary.json"), summary)
    fs.rm(plan.work, recursive=True)
    logger.info(
        "done: %s scored, %s rejected in %.1fs -> %s",
        f"{scored_rows:,}",
        f"{rejected_rows:,}",
        elapsed,
        plan.output_uri,
    )
    return summary
