"""Turn what libraries raise into one-line `PipelineError`s a user can act on.

A fault in a Ray worker reaches the driver wrapped several times (the UDF's exception inside Ray Data's
`UserCodeException` inside a `RayTaskError`, or an actor that died in its constructor); a filesystem
fault is an `OSError` from fsspec or a botocore error from s3fs. `explain` walks the whole chain and
names the first thing a user can fix: our own `PipelineError` raised in a worker, a full disk, a
permission problem, an object store that stopped answering.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator

from pipeline.core import errors
from pipeline.core.errors import InfrastructureError, OutputError, PipelineError

# An actor that raised in its constructor reaches the driver as Ray's ActorDiedError, whose only trace of
# the original exception is the worker's formatted traceback in its message: its last "Class: message" line.
_OWN_ERROR_LINE = re.compile(
    r"^(?:[\w.]+\.)?("
    + "|".join(
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, PipelineError)
    )
    + r"): (.+)$",
    re.MULTILINE,
)

RESUME = "rerun the same command once it is fixed: committed work is kept"

# Exception class names (no import needed) that mean "the storage endpoint did not answer".
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ServerTimeoutError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "ConnectionAbortedError",
    "NewConnectionError",
    "MaxRetryError",
    "ProxyConnectionError",
}
_TRACEBACK_LINE = re.compile(r"^([\w.]+): (.+)$", re.MULTILINE)
_NO_SPACE_FILE = re.compile(r"No space left on device: '([^']+)'")
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ETIMEDOUT,
}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps: `__cause__`, `__context__`, Ray's `.cause`, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]


def _ray_wrapper_class(cls: type) -> bool:
    return any(c.__name__ in ("RayError", "RayTaskError", "RayActorError") for c in cls.__mro__)


def _ray_wrapper(e: BaseException) -> bool:
    """Ray re-raises a worker's exception as a class deriving from both RayTaskError and the original."""
    return _ray_wrapper_class(type(e))


def _where(e: OSError) -> str:
    names = [n for n in (getattr(e, "filename", None), getattr(e, "filename2", None)) if n]
    return f" {names[0]}" if names else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def explain(exc: BaseException) -> PipelineError | None:
    """The `PipelineError` a user should see for `exc`, or None if nothing in its chain is recognised."""
    causes = list(chain(exc))
    for e in causes:  # our own message wins: it was written for the user where the fault happened
        if isinstance(e, PipelineError) and not _ray_wrapper(e):
            return e
    for e in (
        causes
    ):  # a PipelineError known only through Ray's wrapper class: its message, not Ray's traceback
        if isinstance(e, PipelineError):
            cls = next(
                c
                for c in type(e).__mro__
                if issubclass(c, PipelineError) and not _ray_wrapper_class(c)
            )
            return cls(_first_line(e))
    for e in causes:
        if _ray_wrapper(e) or type(e).__name__ in (
            "ActorDiedError",
            "ActorUnavailableError",
            "UserCodeException",
        ):
            found = _OWN_ERROR_LINE.findall(str(e))
            if found:
                name, message = found[-1]
                return getattr(errors, name)(message.strip())
            text = str(e)
            if "[Errno 28]" in text or "No space left on device" in text:
                named = _NO_SPACE_FILE.search(text)
                where = f"writing {named.group(1)}" if named else "(in a worker)"
                return InfrastructureError(
                    f"no space left on the device {where}; free space (or point --output at "
                    f"a larger volume) and {RESUME}"
                )
            # A worker's exception crosses to the driver pickled, which drops __cause__: the storage fault
            # under a failed write is only named in the worker's traceback text.
            unreachable = [
                m for m in _TRACEBACK_LINE.findall(text) if m[0].rsplit(".", 1)[-1] in _UNREACHABLE
            ]
            if unreachable:
                name, message = unreachable[-1]
                return InfrastructureError(
                    f"the storage endpoint stopped answering ({name.rsplit('.', 1)[-1]}: "
                    f"{message.strip()}); {RESUME}"
                )
    for e in causes:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return InfrastructureError(
                f"no space left on the device writing{_where(e)}; free space (or point "
                f"--output at a larger volume) and {RESUME}"
            )
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return OutputError(
                f"permission denied writing{_where(e)} ({e.strerror}); choose a writable location"
            )
        name = type(e).__name__
        if name in _UNREACHABLE or (isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS):
            return InfrastructureError(
                f"the storage endpoint stopped answering ({name}: {_first_line(e)}); {RESUME}"
            )
    return None
