"""The rerank job's own files that it reads back, each with its schema: a file edited by hand, truncated by a
full disk or copied from another version is one `error:` line naming it (storage.read_own_file), never a
KeyError halfway through a run.

    summary.json                      Summary          a finished output
    _work/job.json                    JobIdentity      what a resumed run must share with the run that began
    _work/manifests/shard-SSSSS.json  Manifest         a committed shard: its staging files and counts
    _work/ranked/bucket-BBBBB.json    BucketMarker     a ranked bucket: its row counts
    _work/scorers/<id>.json           ScorerRecord     what a scorer actor ran (dtype, device, kernels)

Only the fields the job reads are required; older files with fewer optional fields still validate.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Count = Field(ge=0)


class _OwnFile(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Fingerprint(BaseModel):
    """`pipeline.rerank.plan.input_fingerprint`: the input's files, bytes and a digest of their listing."""

    files: int = Count
    bytes: int = Count
    sha256: str


class Summary(_OwnFile):
    input_rows: int = Count
    scored_rows: int = Count
    rejected_rows: int = Count
    model: str
    config_hash: str
    input_uri: str | None = None
    input_fingerprint: Fingerprint | None = None
    settings: dict[str, Any] | None = (
        None  # RerankConfig.result_settings(); absent in older summaries
    )
    config: dict[str, Any] | None = None  # the whole config, secrets redacted


class JobIdentity(_OwnFile):
    config_hash: str
    input_fingerprint: Fingerprint
    num_buckets: int = Field(ge=1)
    shards: int = Count
    rank_per_shard: bool
    settings: dict[str, Any] | None = None  # for naming what differs; not part of the comparison


class FileReport(_OwnFile):
    """One staging file of a shard (`stages/write.REPORT_SCHEMA`)."""

    shard: int = Count
    kind: Literal["scored", "rejected", "cache", "waiting"]
    path: str
    bucket: int
    pairs: int = Count
    rows: int = Count
    tokens: int = Count
    windows_expected: int = Count
    hits: int | None = None
    same_texts: int | None = None


class Manifest(_OwnFile):
    shard: int = Count
    pairs: int = Count
    rejected: int = Count
    tokens: int = Count
    hits: int = 0
    same_texts: int = 0
    files: list[FileReport]


class BucketMarker(_OwnFile):
    bucket: int = Count
    scored: int = Count
    written: int = Count
    duplicates: int = Count


class ScorerRecord(_OwnFile):
    """`CrossEncoder.describe()` of one scorer actor, for summary.json and the output files' metadata."""

    model: str
    dtype: str
    device: str
    attention_backend: str
    layout: str | None = None
    random_weights: bool = False


class QuarantineRecord(_OwnFile):
    """`<work>/cache-quarantined/*.json`: a score cache file this run found unreadable and moved aside."""

    path: str
    reason: str
    moved_to: str | None = None


def flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """`{"output": {"top_k": 5}}` -> `{"output.top_k": 5}`."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_differences(before: dict | None, now: dict, limit: int = 6) -> str | None:
    """`output.top_k 5 there, 10 in this run; ...` for the settings of `now` whose value `before` does not share
    (None when `before` is unknown or nothing differs). `before` may be a whole config dump: keys that are not
    result settings are not compared."""
    if not before:
        return None
    old, new = flatten(before), flatten(now)
    missing = object()
    differ = [k for k in sorted(new) if old.get(k, missing) != new[k]]
    if not differ:
        return None
    shown = [
        f"`{k}` {'unset' if old.get(k, missing) is missing else repr(old[k])} there, {new[k]!r} in this run"
        for k in differ[:limit]
    ]
    return "; ".join(shown) + (f"; and {len(differ) - limit} more" if len(differ) > limit else "")
