"""Process trees from /proc: what a job (or a failed Ray start) left running under a process."""

from __future__ import annotations

import os
import signal


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants (a snapshot of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the process ended while we looked
        # The command name may hold spaces and parentheses: fields after the last ')' are safe to split.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack += children.get(pid, [])
    return pids


def kill_new_descendants(root: int, before: set[int]) -> list[int]:
    """SIGKILL every live descendant of `root` that is not in `before` (a `tree_pids` snapshot taken earlier):
    what was started since, and only that. Returns their pids."""
    killed = []
    for pid in tree_pids(root)[1:]:
        if pid in before:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass  # it ended on its own meanwhile
    return killed
