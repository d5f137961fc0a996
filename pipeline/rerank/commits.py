"""Shard commits: a shard is committed by its manifest, written once the write reports account for every one of
its rows (and every window of them), never before and never twice. A rerun skips the committed shards.

See job.py for why the job keeps its own manifests rather than Ray Data's checkpointing.
"""

from __future__ import annotations

import posixpath

from pipeline.core.errors import OutputError, PipelineError
from pipeline.core.storage import read_own_files
from pipeline.rerank.job_files import Manifest
from pipeline.rerank.stages.read import Shard


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


def read_manifests(fs, paths: list[str], num_shards: int, protocol: str) -> list[Manifest]:
    """The shard manifests at `paths`, each checked (its schema, and the shard its name says, one of the plan's
    `num_shards`)."""
    fix = "delete it: its shard is scored again on the next run"
    manifests = read_own_files(fs, paths, Manifest, "shard manifest", fix, protocol)
    for path, manifest in zip(paths, manifests):
        named = posixpath.basename(path)
        if named != f"shard-{manifest.shard:05d}.json" or manifest.shard >= num_shards:
            raise OutputError(
                f"{protocol}{path} is not a valid shard manifest: it is for shard {manifest.shard} "
                f"(this run has {num_shards}); {fix}"
            )
    return manifests
