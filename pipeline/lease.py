"""A single-writer lease on an output folder, so two runs never write one output at the same time.

The lease is `<output>/_lease.json`: who holds it (user, host, pid and the pid's start time), since when,
and a heartbeat the holder refreshes every `heartbeat_s`. It is taken by an exclusive create (`O_EXCL` on
a local disk, a conditional PUT on S3; see `storage.create_exclusive`), so of two runs started together
exactly one gets it. A second run refuses with one line naming the holder.

A holder that died without releasing it (kill -9, a lost node) leaves a stale lease, taken over:
- at once, when the holder ran on this machine and its process is gone (pid and start time checked);
- after `timeout_s` without a heartbeat otherwise (another machine, whose processes we cannot see).

Taking over is delete-then-create. Two runs taking over the same stale lease within one round trip can
both believe they won; each holder re-reads the lease at every heartbeat and stops with an error as soon
as it finds another run's id there, so such an overlap lasts one heartbeat at most. Clocks of the
machines involved are assumed to agree within `timeout_s`.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from pipeline.errors import OutputError
from pipeline.storage import create_exclusive, join

logger = logging.getLogger("rerank")

LEASE_FILE = "_lease.json"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (jiffies since boot, /proc/PID/stat field 22): tells a live holder
    from an unrelated process that reused its pid. None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return start is None or _process_start(pid) in (None, start)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class OutputLease:
    """`with OutputLease(fs, root, uri): ...` holds the lease on `root` for the duration of the block."""

    def __init__(self, fs, root: str, uri: str, heartbeat_s: float = 10.0, timeout_s: float = 120.0):
        self.fs, self.uri = fs, uri
        self.path = join(root, LEASE_FILE)
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self.run_id = uuid.uuid4().hex
        self.lost: str | None = None  # set by the heartbeat when another run holds the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = {
            "run_id": self.run_id, "user": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "started": _iso(time.time()),
        }

    # -- taking and giving back ------------------------------------------------------------------------

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps(self._record | {"heartbeat": now, "heartbeat_time": _iso(now)}, indent=2).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # unreadable: treated as stale (nobody writes a lease half-way: it is one PUT/O_EXCL)

    def _stale_because(self, holder: dict) -> str | None:
        if not holder:
            return "the lease file is unreadable"
        silent = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)),
                                                                     holder.get("pid_start")):
            return f"its process {holder.get('pid')} on this machine is gone"
        if silent > self.timeout_s:
            return f"no heartbeat for {silent:.0f} s"
        return None

    def acquire(self) -> "OutputLease":
        for _ in range(3):
            if create_exclusive(self.fs, self.path, self._payload()):
                self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder == {}:  # a local create is visible a moment before its bytes: look again
                time.sleep(1.0)
                holder = self._read()
            if holder is None:
                continue  # released between our create and our read: try again
            reason = self._stale_because(holder)
            if reason is None:
                silent = time.time() - float(holder.get("heartbeat", 0))
                raise OutputError(
                    f"{self.uri} is being written by another run ({holder.get('user')}@{holder.get('host')}, pid "
                    f"{holder.get('pid')}, started {holder.get('started')}, last heartbeat {silent:.0f} s ago); "
                    f"wait for it to finish or use another --output (a killed run's lease is taken over after "
                    f"{self.timeout_s:.0f} s without a heartbeat, at once on its own machine)")
            logger.warning("taking over the lease on %s from run %s (%s@%s, pid %s): %s", self.uri,
                           holder.get("run_id"), holder.get("user"), holder.get("host"), holder.get("pid"), reason)
            if self._read() == holder:  # delete only what we judged stale, not a lease taken meanwhile
                self.fs.rm(self.path)
        raise OutputError(f"could not take the lease on {self.uri}: other runs keep taking it; "
                          "make sure one run at a time writes this output")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
            self._thread = None
            try:
                if (self._read() or {}).get("run_id") == self.run_id:
                    self.fs.rm(self.path)
            except Exception as e:  # storage gone: the lease goes stale and the next run takes it over
                logger.warning("could not release the lease on %s: %s", self.uri, e)

    def check(self) -> None:
        """Raise if another run took the lease: continuing would mix two runs' files."""
        if self.lost:
            raise OutputError(self.lost)

    def beat(self) -> bool:
        """One heartbeat: refresh the lease, or note that another run holds it now (then False)."""
        holder = self._read() or {}
        if holder.get("run_id") != self.run_id:
            self.lost = (f"another run took over the lease on {self.uri} ({holder.get('user')}@{holder.get('host')}, "
                         f"pid {holder.get('pid')}); this run stopped so that the two do not mix their files")
            return False
        self.fs.pipe_file(self.path, self._payload())
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.beat():
                    return
            except Exception as e:  # a storage hiccup: the job's own reads and writes will report a lasting one
                logger.debug("lease heartbeat on %s failed: %s", self.uri, e)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
