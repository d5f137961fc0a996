"""Starting Ray for a job: a fresh local node, tried again when a busy machine makes Ray's start-up time out.

Ray waits a fixed 30 s for a new node's raylet to register with its GCS, then raises "The current node timed
out during startup" and leaves the processes it had started running. On a loaded machine (a CI runner with two
test workers on two cores, a laptop compiling) 30 s is not always enough. A local start is therefore tried
`START_ATTEMPTS` times, each failed one's processes killed first; joining an existing cluster is tried once.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from pipeline.errors import InfrastructureError
from pipeline.processes import kill_new_descendants, tree_pids

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
            logger.warning("Ray's local node did not start within its 30 s (attempt %d of %d; %d left-over "
                           "process(es) stopped)%s", attempt, attempts, len(killed),
                           "; trying again" if attempt < attempts else "")
    raise InfrastructureError(
        f"Ray could not start a local node: its raylet did not register within 30 s, {attempts} time(s); this "
        "machine is too busy or short of memory. Rerun when it is less loaded, or start Ray once with "
        "`ray start --head` and pass --set ray_address=auto")
