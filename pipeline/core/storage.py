"""Local paths and object-storage URIs, resolved once through fsspec.

Credentials and endpoints come from the standard places: the AWS environment variables (including
`AWS_ENDPOINT_URL` for S3-compatible stores such as MinIO, read by botocore), the usual credential
files, or a job's `storage_options` config. They are passed to the filesystem and never logged.
"""

from __future__ import annotations

import inspect
import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ValidationError

from pipeline.core.errors import ConfigError, InputError, OutputError


def protocol_prefix(uri: str) -> str:
    """`s3://bucket/x` -> "s3://"; a plain path -> "". Put before a filesystem path to name it as a URI again."""
    return uri.split("://", 1)[0] + "://" if "://" in uri else ""


def absolute_uri(uri: str) -> str:
    """A local path made absolute (the driver's folder, not a Ray worker's); a URI with a protocol unchanged.
    What the driver hands to Ray workers must not depend on the folder each worker runs in."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def url_to_fs(
    uri: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """`s3://bucket/x` -> (s3fs filesystem, "bucket/x"); a plain path -> (local filesystem, absolute path)."""
    options = dict(storage_options or {})
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    elif (
        uri.startswith("s3://")
        and "endpoint_url" not in options
        and os.environ.get("AWS_ENDPOINT_URL")
    ):
        # botocore reads AWS_ENDPOINT_URL itself; passing it explicitly also covers older botocore releases.
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as e:
        raise InputError(f"cannot open {protocol_prefix(uri)} URIs: {e}") from None


# What every fsspec filesystem accepts besides its own arguments (AbstractFileSystem's caching keywords).
_BASE_OPTIONS = {
    "use_listings_cache",
    "listings_expiry_time",
    "max_paths",
    "skip_instance_cache",
    "asynchronous",
    "loop",
    "batch_size",
}


def _named_arguments(cls: type) -> set[str]:
    names: set[str] = set()
    for c in cls.__mro__:
        if "__init__" in vars(c):
            names |= {
                p.name
                for p in inspect.signature(c.__init__).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
            }
    return names


def _options_fault(protocol: str, options: dict) -> str | None:
    """Why the filesystem of `protocol` refuses `options` (None: it takes them). Filesystems that open a client
    (`connect`, e.g. s3fs) check their keywords there, without a network round trip; the others swallow unknown
    keywords silently, so those are checked against their signature."""
    cls = fsspec.get_filesystem_class(protocol)
    # s3fs hands keywords it does not name to its botocore session (`profile`...), which checks them in connect().
    session = protocol in ("s3", "s3a")
    if not session:
        unknown = sorted(set(options) - _named_arguments(cls) - _BASE_OPTIONS)
        if unknown:
            return f"not an argument of {cls.__module__}.{cls.__name__}"
    try:
        fs = cls(**options, skip_instance_cache=True)
        if session:
            fs.connect()
    except (
        Exception
    ) as e:  # whatever the library raises for a value it cannot use (TypeError, ProfileNotFound...)
        return f"{cls.__module__}.{cls.__name__} refuses it ({type(e).__name__}: {str(e).strip()[:200]})"
    return None


def check_storage_options(uris: list[str], storage_options: dict | None) -> None:
    """`storage_options` are arguments the filesystems of `uris` accept, or a `ConfigError` naming the key: checked
    before any work, where a bad value would otherwise surface as a library's TypeError deep in a read."""
    options = dict(storage_options or {})
    if not options:
        return
    protocols = sorted({protocol_prefix(u)[:-3] or "file" for u in uris if u})
    if set(protocols) - {"file", "local"}:
        # Options shared by a local path and object storage are meant for the latter; a local disk ignores them.
        protocols = [p for p in protocols if p not in ("file", "local")]
    for protocol in protocols:
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError):
            continue  # an unknown protocol is reported, with its reason, where the URI is opened
        if _options_fault(protocol, options) is None:
            continue
        # One key at a time, to name the culprit rather than the whole dict (whose values may be secrets).
        faults = {k: _options_fault(protocol, {k: v}) for k, v in options.items()}
        named = {k: why for k, why in faults.items() if why} or {
            ", ".join(sorted(options)): _options_fault(protocol, options)
        }
        key, why = next(iter(sorted(named.items())))
        raise ConfigError(
            f"config key `storage_options.{key}`: {why} (for {protocol}:// URIs); fix or remove it"
        )


def check_bucket(
    fs: fsspec.AbstractFileSystem, root: str, uri: str, create: bool, key: str
) -> None:
    """On object storage, the bucket of `root` exists, or is created when `create` (config key `key`): a typo in a
    bucket name must not make a new bucket on the account. Nothing to check on disks."""
    if not _object_store(fs):
        return
    bucket = root.strip("/").split("/")[0]
    if fs.exists(bucket):
        return
    if hasattr(fs, "call_s3"):
        # exists() is False as well for a bucket these credentials may write but not inspect: only S3's own
        # "no such bucket" is a missing bucket.
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
            return
        except FileNotFoundError:
            pass
        except Exception:  # no permission to look (403): the writes will tell
            return
    if not create:
        raise OutputError(
            f"the bucket {protocol_prefix(uri)}{bucket} of {uri} does not exist; check its name, create it, or "
            f"--set {key}=true to let the job create it"
        )
    fs.mkdir(bucket)


def _object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool(
        set(protocols) & {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
    )


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow view of an fsspec filesystem, for pyarrow.dataset and Ray Data readers/writers."""
    if fs.protocol in ("file", ("file", "local"), "local") or "file" in (
        fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    ):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def atomic_write(
    fs: fsspec.AbstractFileSystem, path: str, write: Callable[[Any], None], mode: str = "wb"
) -> None:
    """`write(file)` into a sibling temp object, then move it to `path`: readers never see half a file, and a
    failed write (a full disk, a vanished endpoint) leaves no file under the final name and no temp behind."""
    tmp = path + ".tmp"
    try:
        with fs.open(tmp, mode) as f:
            write(f)
        fs.mv(tmp, path)
    except BaseException as e:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except (
            Exception
        ):  # the cleanup may fail for the same reason the write did; a rerun ignores *.tmp
            pass
        named = with_filename(e, path)
        if named is not e:
            raise named from e
        raise


def write_json(fs: fsspec.AbstractFileSystem, path: str, payload: Any) -> None:
    """JSON written atomically (`atomic_write`)."""
    atomic_write(
        fs, path, lambda f: json.dump(payload, f, indent=2, sort_keys=True, default=str), mode="w"
    )


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; False if it does. Mode "xb" is atomic on local disks (O_EXCL)
    and on S3 (s3fs sends a conditional PUT, `If-None-Match: *`). Filesystems that do not know "xb" fall back
    to check-then-write, which two writers racing within one round trip can both pass.

    On a local disk the bytes are written to a temporary file first and hard-linked into place (`link` fails
    when `path` exists): a reader never sees the file empty or half written, as it could between an O_EXCL
    create and its write, where another run would take an empty lease for a broken one and take it over."""
    if isinstance(fs, LocalFileSystem):
        return _link_exclusive(path, data)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        named = with_filename(e, path)
        if named is e:
            raise
        raise named from e
    except (ValueError, NotImplementedError):
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def _link_exclusive(path: str, data: bytes) -> bool:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise with_filename(e, path) from e
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def with_filename(e: BaseException, path: str) -> BaseException:
    """`e`, or for an OSError that names no file (a write into an open file: a full disk) the same error naming
    `path`, so the one line a user reads says which file could not be written."""
    if isinstance(e, OSError) and e.errno is not None and not e.filename:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), path)
    return e


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "r") as f:
        return json.load(f)


M = TypeVar("M", bound=BaseModel)


def _validation_fault(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{'`' + where + '`: ' if where else ''}{first['msg']}{more}"


def parse_own_file(data: bytes | str, path: str, model: type[M], what: str, fix: str) -> M:
    """`data` (the bytes of `path`, a file this project wrote) as a `model`, or an `OutputError` naming the file,
    what is wrong with it and `fix`. `what` says what the file is ("the output's summary")."""
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            fault = "is not valid JSON"
        else:
            fault = f"is not a valid {what}: {_validation_fault(e)}"
        raise OutputError(f"{path} {fault}; {fix}") from None
    except UnicodeDecodeError:
        raise OutputError(f"{path} is not valid JSON (not UTF-8 text); {fix}") from None


def read_own_file(
    fs: fsspec.AbstractFileSystem,
    path: str,
    model: type[M],
    what: str,
    fix: str,
    protocol: str = "",
) -> M:
    """`parse_own_file` of the file at `path` (FileNotFoundError if there is none), named `protocol + path`."""
    return parse_own_file(fs.cat_file(path), protocol + path, model, what, fix)


def read_own_files(
    fs: fsspec.AbstractFileSystem,
    paths: list[str],
    model: type[M],
    what: str,
    fix: str,
    protocol: str = "",
) -> list[M]:
    """`read_own_file` of every path, in order, in parallel (`map_paths`)."""
    return map_paths(lambda p: read_own_file(fs, p, model, what, fix, protocol), paths)


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
