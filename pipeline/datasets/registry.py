"""Collections and workloads by name, with their keyword arguments checked before any file is read."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.core.errors import InputError
from pipeline.datasets.bfcl import bfcl
from pipeline.datasets.cosqa import cosqa
from pipeline.datasets.noveleval import noveleval
from pipeline.datasets.spider import spider
from pipeline.datasets.trec_dl import trec_dl
from pipeline.datasets.vaswani import vaswani
from pipeline.datasets.workloads import WORKLOADS
from pipeline.datasets.xquad_r import xquad_r

COLLECTIONS: dict[str, Callable[..., tuple[pa.Table, pa.Table]]] = {
    "trec_dl": trec_dl,
    "noveleval": noveleval,
    "vaswani": vaswani,
    "xquad_r": xquad_r,
    "bfcl": bfcl,
    "spider": spider,
    "cosqa": cosqa,
}

# Arguments every converter takes, set by the caller rather than by a user's `arguments`.
_RESERVED = ("data_dir", "n_pairs")


def check_arguments(name: str, arguments: dict[str, Any]) -> Callable:
    """The converter or workload called `name`, after checking that it takes every key of `arguments`."""
    function = COLLECTIONS.get(name) or WORKLOADS.get(name)
    if function is None:
        raise InputError(
            f"unknown collection {name!r}; known: {', '.join(sorted(COLLECTIONS) + sorted(WORKLOADS))}"
        )
    known = [p for p in inspect.signature(function).parameters if p not in _RESERVED]
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise InputError(
            f"{name} has no argument {', '.join(unknown)}; its arguments are: {', '.join(known)}"
        )
    return function


def load_collection(
    name: str, data_dir: str | os.PathLike | None = None, **arguments: Any
) -> tuple[pa.Table, pa.Table]:
    """(pairs, qrels) of collection `name`, e.g. `load_collection("trec_dl", year=2020)`."""
    if name not in COLLECTIONS:
        raise InputError(f"unknown collection {name!r}; known: {', '.join(sorted(COLLECTIONS))}")
    return check_arguments(name, arguments)(data_dir=data_dir, **arguments)
