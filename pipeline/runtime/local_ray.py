"""Starting Ray for a job: a fresh local node, tried again when a busy machine makes Ray's start-up time out.

Ray waits a fixed 30 s for a new node's raylet to register with its GCS, then raises "The current node timed
out during startup" and leaves the processes it had started running. On a loaded machine (a CI runner with two
test workers on two cores, a laptop compiling) 30 s is not always enough. A local start is therefore tried
`START_ATTEMPTS` times, each failed one's processes killed first; joining an existing cluster is tried once.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from collections.abc import Callable

from pipeline.core.errors import InfrastructureError
from pipeline.runtime.processes import kill_new_descendants, tree_pids

logger = logging.getLogger("rerank")

START_ATTEMPTS = 3
START_TIMED_OUT = "timed out during startup"  # Ray's own message (ray/_private/node.py)


def init_ray(address: str, init: Callable[..., object] | None = None, **kwargs) -> None:
    """`ray.init(address=address, **kwargs)`, again (up to `START_ATTEMPTS` in all) when `address` is "local"
    and Ray's node start-up timed out. `init` replaces `ray.init` (tests inject the time-out with it).
    The last time-out is an InfrastructureError saying what to do."""
    shutdown = None
    if init is None:
        import ray

        init, shutdown = ray.init, ray.shutdown
    attempts = START_ATTEMPTS if address == "local" else 1
    for attempt in range(1, attempts + 1):
        before = set(tree_pids(os.getpid()))
        try:
            init(address=address, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if START_TIMED_OUT not in str(e):
                raise
            # What the failed start left (gcs_server, raylet, their agents) runs under this process; what ran
            # here before it (another Ray, the caller's own children) is left alone.
            killed = kill_new_descendants(os.getpid(), before)
            if shutdown is not None:
                shutdown()  # whatever state the failed init set, so that the next one starts afresh
            logger.warning(
                "Ray's local node did not start within its 30 s (attempt %d of %d; %d left-over "
                "process(es) stopped)%s",
                attempt,
                attempts,
                len(killed),
                "; trying again" if attempt < attempts else "",
            )
    raise InfrastructureError(
        f"Ray could not start a local node: its raylet did not register within 30 s, {attempts} time(s); this "
        "machine is too busy or short of memory. Rerun when it is less loaded, or start Ray once with "
        "`ray start --head` and pass --set ray_address=auto"
    )


# -- the console: the job's own lines only -----------------------------------------------------------------

# Ray's C++ core writes its error-level lines to the process's stderr as well as to its log file in the session
# folder (python-core-driver-*.log); no setting of Ray's turns the console copy off alone. A line of that log
# starts with "[2026-12-07 14:39:51,976 E 10315 10315] core_worker.cc:2465: ".
RAY_CORE_LINE = re.compile(
    rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w./-]+\.(?:cc|h):\d+:"
)


class _CoreLineFilter:
    """File descriptor 2 through a pipe: every line but Ray's C++ log lines goes on to the real stderr."""

    def __init__(self) -> None:
        self.real = os.dup(2)
        read, self.write = os.pipe()
        os.dup2(self.write, 2)
        self.thread = threading.Thread(
            target=self._forward, args=(read,), name="stderr-without-ray-core", daemon=True
        )
        self.thread.start()

    def _forward(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self._emit(lines)
            self._emit([pending] if pending else [])

    def _emit(self, lines: list[bytes]) -> None:
        kept = b"".join(line + b"\n" for line in lines if not RAY_CORE_LINE.match(line))
        if kept:
            os.write(self.real, kept)

    def close(self) -> None:
        """Stderr back to the real one, and everything written before passed on (at exit: the `error:` line)."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real, 2)
        os.close(self.write)
        self.thread.join(timeout=5)


_core_filter: _CoreLineFilter | None = None


def _close_core_filter() -> None:
    global _core_filter
    if _core_filter is not None:
        _core_filter, filter_ = None, _core_filter
        filter_.close()


def quiet_ray_console(verbose: bool) -> Callable[[], None]:
    """Before `ray.init` in a job's own process: keeps what Ray prints for itself off the console (its session
    folder's logs keep everything); `verbose` (-v) leaves the console as Ray makes it. Returns what to call once
    Ray is started: it hides Ray's C++ log lines from stderr from then on.

    What it turns off: the task and actor failures Ray's error channel prints on the driver's stdout (a scorer
    that fails while loading is retried, and each try prints its whole traceback as "(raylet) Task ... failed"),
    the lines of the "ray" logger's own console handler (the token authentication notice), and the error-level
    lines of Ray's C++ core on stderr."""
    if verbose:
        return lambda: None
    try:
        import ray._private.worker as ray_worker
    except (
        ImportError
    ):  # a Ray that moved its private module: its error channel stays on the console
        ray_worker = None
    if ray_worker is not None:
        # Read by Ray's printer of worker logs and of its error channel; there is no public switch for the
        # latter (log_to_driver=False covers the workers' output only).
        ray_worker._worker_logs_enabled = False
    for handler in logging.getLogger("ray").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL + 1)
    # Registered before ray.init registers its shutdown, so that it runs after it (atexit is last-in first-out):
    # Ray's shutdown logs through the filter too.
    atexit.register(_close_core_filter)

    def after_start() -> None:
        global _core_filter
        # Only the process's real stderr: a caller that swapped it (a test capturing output) keeps its own; the
        # processes Ray started are already running and do not inherit the pipe.
        if _core_filter is None and sys.stderr is sys.__stderr__:
            _core_filter = _CoreLineFilter()

    return after_start
