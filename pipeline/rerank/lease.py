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
machines involved are assumed to agree within `timeout_s`; a heartbeat further ahead than `CLOCK_SKEW_S`
(a holder whose clock runs ahead) is not believed: such a lease is judged by when its file was last
written, by the storage's clock, so it goes stale `timeout_s` after its holder stopped rewriting it.

A lease file that is not a well-formed lease (truncated, edited by hand, another program's file) names no
holder that could still be alive: it is taken over like a stale lease, and the log says what it held.
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
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import OutputError
from pipeline.core.storage import create_exclusive, join

logger = logging.getLogger("rerank")

LEASE_FILE = "_lease.json"
# How far ahead of this machine's clock a holder's heartbeat may be and still be believed (NTP keeps clocks
# within a fraction of a second; a few seconds cover a VM that just resumed).
CLOCK_SKEW_S = 5.0


class LeaseRecord(BaseModel):
    """`_lease.json`: who holds the output, and when it last said so (`heartbeat`, seconds since the epoch)."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    user: str
    host: str
    pid: int = Field(gt=0)
    pid_start: str | None = None  # /proc/PID/stat's start time; None where /proc is absent
    started: str
    heartbeat: Annotated[float, Field(allow_inf_nan=False)]


def _shown(raw: bytes, limit: int = 120) -> str:
    """What a file that is not a lease holds, for the log: its text's repr, cut to `limit` characters."""
    text = repr(raw.decode("utf-8", errors="replace"))
    return text if len(text) <= limit else text[:limit] + "..."


def _timestamp(value) -> float | None:
    """A filesystem's modification time (a number, a datetime or an ISO string, by filesystem) in epoch seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


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

    def __init__(
        self, fs, root: str, uri: str, heartbeat_s: float = 10.0, timeout_s: float = 120.0
    ):
        self.fs, self.uri = fs, uri
        self.path = join(root, LEASE_FILE)
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self.run_id = uuid.uuid4().hex
        self.lost: str | None = None  # set by the heartbeat when another run holds the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = {
            "run_id": self.run_id,
            "user": getpass.getuser(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": _iso(time.time()),
        }

    # -- taking and giving back ------------------------------------------------------------------------

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps(
            self._record | {"heartbeat": now, "heartbeat_time": _iso(now)}, indent=2
        ).encode()

    def _read(self) -> tuple[bytes, LeaseRecord | None] | None:
        """The lease file's bytes and the lease they hold (None: not a well-formed lease); None if there is none."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            return raw, LeaseRecord.model_validate_json(raw)
        except (ValidationError, UnicodeDecodeError):
            return raw, None

    def _modified(self) -> float | None:
        """When the lease file was last written, by the storage's clock (None if the filesystem does not say)."""
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None
        for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
            if info.get(key) is not None:
                return _timestamp(info[key])
        return None

    @staticmethod
    def _describe(raw: bytes, holder: LeaseRecord | None) -> str:
        if holder is None:
            return f"a file that is not a lease, holding {_shown(raw)}"
        return f"run {holder.run_id} ({holder.user}@{holder.host}, pid {holder.pid})"

    def _silence(self, holder: LeaseRecord) -> tuple[float, str]:
        """Seconds since the holder's last heartbeat, and a note when its clock is ahead of ours: then the
        heartbeat is not believed and the file's modification time stands for it."""
        now = time.time()
        ahead = holder.heartbeat - now
        if ahead <= CLOCK_SKEW_S:
            return max(0.0, now - holder.heartbeat), ""
        modified = self._modified()
        note = (
            f"its holder's clock is {ahead:.0f} s ahead of this machine's, so the lease is judged by when its "
            "file was last written"
        )
        if modified is None:  # nothing to judge by: the lease counts as fresh, the refusal says why
            return 0.0, note
        return max(0.0, now - modified), note

    def _stale_because(self, raw: bytes, holder: LeaseRecord | None) -> str | None:
        if holder is None:
            return "the lease file is not a well-formed lease"
        if holder.host == socket.gethostname() and not _alive(holder.pid, holder.pid_start):
            return f"its process {holder.pid} on this machine is gone"
        silent, note = self._silence(holder)
        if note:
            logger.warning("lease on %s: %s", self.uri, note)
        if silent > self.timeout_s:
            return f"no heartbeat for {silent:.0f} s" + (f" ({note})" if note else "")
        return None

    def acquire(self) -> OutputLease:
        for _ in range(3):
            if create_exclusive(self.fs, self.path, self._payload()):
                self._thread = threading.Thread(target=self._beat, name="output-lease", daemon=True)
                self._thread.start()
                return self
            held = self._read()
            if (
                held is not None and not held[0].strip()
            ):  # a local create is visible a moment before its bytes
                time.sleep(1.0)
                held = self._read()
            if held is None:
                continue  # released between our create and our read: try again
            raw, holder = held
            reason = self._stale_because(raw, holder)
            if reason is None:
                silent, note = self._silence(holder)
                raise OutputError(
                    f"{self.uri} is being written by another run ({holder.user}@{holder.host}, pid {holder.pid}, "
                    f"started {holder.started}, last heartbeat {silent:.0f} s ago"
                    + (f"; {note}" if note else "")
                    + "); wait for it to finish or use another --output (a killed "
                    f"run's lease is taken over after {self.timeout_s:.0f} s without a heartbeat, at once on its "
                    "own machine)"
                )
            logger.warning(
                "taking over the lease on %s from %s: %s",
                self.uri,
                self._describe(raw, holder),
                reason,
            )
            again = self._read()
            if (
                again is not None and again[0] == raw
            ):  # delete only what we judged stale, not a lease taken meanwhile
                self.fs.rm(self.path)
        raise OutputError(
            f"could not take the lease on {self.uri}: other runs keep taking it; "
            "make sure one run at a time writes this output"
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
            self._thread = None
            try:
                held = self._read()
                if held is not None and held[1] is not None and held[1].run_id == self.run_id:
                    self.fs.rm(self.path)
            except (
                Exception
            ) as e:  # storage gone: the lease goes stale and the next run takes it over
                logger.warning("could not release the lease on %s: %s", self.uri, e)

    def check(self) -> None:
        """Raise if another run took the lease: continuing would mix two runs' files."""
        if self.lost:
            raise OutputError(self.lost)

    def beat(self) -> bool:
        """One heartbeat: refresh the lease, or note that another run holds it now (then False)."""
        held = self._read()
        if held is None or held[1] is None or held[1].run_id != self.run_id:
            what = "removed it" if held is None else self._describe(*held)
            self.lost = (
                f"another run took over the lease on {self.uri} ({what}); this run stopped so that the "
                "two do not mix their files"
            )
            return False
        self.fs.pipe_file(self.path, self._payload())
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.beat():
                    return
            except (
                Exception
            ) as e:  # a storage hiccup: the job's own reads and writes will report a lasting one
                logger.debug("lease heartbeat on %s failed: %s", self.uri, e)

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
