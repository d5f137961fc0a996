"""Preflight: everything that can be wrong with the model, the cluster or the output folder is found before any
work, each as one line saying what to change. Nothing here writes but the output folder itself.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from fnmatch import fnmatchcase

from pipeline.core.dtypes import runs_on
from pipeline.core.errors import ConfigError, InputError, OutputError
from pipeline.core.faults import explain
from pipeline.core.storage import check_bucket, url_to_fs
from pipeline.model.checkpoint import inspect_checkpoint, resolve_model_directory
from pipeline.model.model_config import linear_layer_names
from pipeline.model.tokenization import check_prompt
from pipeline.rerank.cache import check_location
from pipeline.rerank.compose import scorer_pool
from pipeline.rerank.config import RerankConfig

logger = logging.getLogger("rerank")


def check_model(config: RerankConfig) -> dict:
    """Resolve the checkpoint and read its layout before any work starts (weights are loaded by the actors)."""
    check_int8_options(config)
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


def check_int8_options(config: RerankConfig) -> None:
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


def prepare_output(fs, root: str, uri: str, create_bucket: bool = False) -> None:
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


def check_cache(config: RerankConfig) -> None:
    """The score cache's location (cache.uri) exists, or may be created, and can be written."""
    cache_fs, cache_root = url_to_fs(config.cache.uri, config.storage_options)
    check_bucket(
        cache_fs, cache_root, config.cache.uri, config.io.create_bucket, "io.create_bucket"
    )
    check_location(config.cache.uri, config.storage_options)


def check_cluster(config: RerankConfig, protocol: str) -> None:
    """What the cluster must offer before any work: GPUs if asked for, shared storage if several nodes, and
    nodes that can host every actor pool as configured (label selector, GPUs and CPUs per actor)."""
    # Imported here, as Ray's own checks run only once Ray is up: a refused input never waits for `import ray`.
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
    size, resources = scorer_pool(config)
    # What the dtype-device rule (pipeline/core/dtypes.py) refuses, told in this job's terms.
    device = "cuda" if resources.get("num_gpus") else "cpu"
    if not runs_on(config.dtype, device) and device == "cuda":
        raise InputError(
            f"dtype {config.dtype} runs on CPU scorers only, and this cluster's GPUs would take the scorers; "
            "set scorer.device=cpu, or use dtype auto (bfloat16 on a GPU)"
        )
    if not runs_on(config.dtype, device):
        raise InputError(
            f"dtype {config.dtype} runs on GPU scorers with float8 tensor cores (Hopper or Ada) only, and this "
            "cluster's scorers would run on CPU; use dtype auto (or float32/bfloat16), or add GPUs"
        )
    fixed = len(hosts) == 1 and not (config.ray_address or os.environ.get("RAY_ADDRESS"))
    t = config.tokenizer
    check_pool(
        "tokenizer",
        t.num_actors,
        {"CPU": t.num_cpus},
        t.label_selector,
        nodes,
        fixed,
        "tokenizer.num_actors / tokenizer.num_cpus",
    )
    check_pool(
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
    for key, wanted in (selector or {}).items():
        negated = wanted.startswith("!")
        wanted = wanted[1:] if negated else wanted
        match = re.fullmatch(r"(?:in)?\((.*)\)", wanted)
        values = {v.strip() for v in match.group(1).split(",")} if match else {wanted}
        if (labels.get(key) in values) == negated:
            return False
    return True


def check_pool(
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
