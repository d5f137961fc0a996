"""Local paths and object-storage URIs, resolved once through fsspec.

Credentials and endpoints come from the standard places: the AWS environment variables (including
`AWS_ENDPOINT_URL` for S3-compatible stores such as MinIO, read by botocore), the usual credential
files, or a job's `storage_options` config. They are passed to the filesystem and never logged.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Callable

import fsspec
import pyarrow.fs as pafs

from pipeline.errors import InputError


def url_to_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`s3://bucket/x` -> (s3fs filesystem, "bucket/x"); a plain path -> (local filesystem, absolute path)."""
    options = dict(storage_options or {})
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    elif uri.startswith("s3://") and "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
        # botocore reads AWS_ENDPOINT_URL itself; passing it explicitly also covers older botocore releases.
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open {uri.split('://')[0]}:// URIs: {e}") from None


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow view of an fsspec filesystem, for pyarrow.dataset and Ray Data readers/writers."""
    if fs.protocol in ("file", ("file", "local"), "local") or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """`write(file)` into a sibling temp object, then move it to `path`: readers never see half a file, and a
    failed write (a full disk, a vanished endpoint) leaves no file under the final name and no temp behind."""
    tmp = path + ".tmp"
    try:
        with fs.open(tmp, mode) as f:
            write(f)
        fs.mv(tmp, path)
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # the cleanup may fail for the same reason the write did; a rerun ignores *.tmp
            pass
        raise


def write_json(fs: fsspec.AbstractFileSystem, path: str, payload: Any) -> None:
    """JSON written atomically (`atomic_write`)."""
    atomic_write(fs, path, lambda f: json.dump(payload, f, indent=2, sort_keys=True, default=str), mode="w")


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; False if it does. Mode "xb" is atomic on local disks (O_EXCL)
    and on S3 (s3fs sends a conditional PUT, `If-None-Match: *`). Filesystems that do not know "xb" fall back
    to check-then-write, which two writers racing within one round trip can both pass."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "r") as f:
        return json.load(f)


def map_paths(read: Callable[[str], Any], paths: list[str], max_workers: int = 32) -> list[Any]:
    """`read(path)` for every path, in order, `max_workers` at a time: on object storage each read is a round
    trip of tens of milliseconds, so a driver reading 100,000 shard manifests one by one would wait an hour."""
    if len(paths) <= 1:
        return [read(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(max_workers, len(paths))) as pool:
        return list(pool.map(read, paths))


def read_jsons(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[Any]:
    """`read_json` of every path, in order, in parallel (`map_paths`)."""
    return map_paths(lambda p: read_json(fs, p), paths)
