"""A local Ray start that times out on a busy machine is tried again, its left-over processes stopped first;
the last time-out is one line saying what to do. Ray's own time-out is injected through `init`."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pipeline.core.errors import InfrastructureError
from pipeline.runtime.local_ray import START_ATTEMPTS, init_ray
from pipeline.runtime.processes import tree_pids

TIMED_OUT = (
    "The current node timed out during startup. This could happen because some of the raylet failed to "
    "startup or the GCS has become overloaded."
)


class FlakyStart:
    """Starts a process (as Ray starts its gcs_server and raylet), then times out `failures` times."""

    def __init__(self, failures: int):
        self.failures, self.calls, self.left_over = failures, [], []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            self.left_over.append(subprocess.Popen(["sleep", "120"]))
            raise Exception(TIMED_OUT)


def _gone(proc: subprocess.Popen) -> bool:
    for _ in range(50):
        if proc.poll() is not None:
            return True
        time.sleep(0.1)
    return False


def test_a_timed_out_local_start_is_tried_again_and_its_processes_stopped():
    start = FlakyStart(failures=START_ATTEMPTS - 1)
    init_ray("local", init=start, include_dashboard=False)
    assert len(start.calls) == START_ATTEMPTS
    assert all(call == {"address": "local", "include_dashboard": False} for call in start.calls)
    assert all(_gone(p) for p in start.left_over)


def test_the_last_time_out_is_one_line_saying_what_to_do():
    start = FlakyStart(failures=START_ATTEMPTS)
    with pytest.raises(InfrastructureError) as error:
        init_ray("local", init=start)
    assert len(start.calls) == START_ATTEMPTS
    message = str(error.value)
    assert (
        "\n" not in message
        and f"{START_ATTEMPTS} time(s)" in message
        and "ray start --head" in message
    )
    assert error.value.exit_code == 3
    assert all(_gone(p) for p in start.left_over)


def test_joining_a_cluster_is_tried_once_and_other_errors_pass_through():
    start = FlakyStart(failures=1)
    with pytest.raises(InfrastructureError):
        init_ray("auto", init=start)
    assert len(start.calls) == 1

    def refused(**kwargs):
        raise ConnectionError("could not connect to 10.0.0.1:6379")

    with pytest.raises(ConnectionError):
        init_ray("local", init=refused)


def test_processes_that_ran_before_the_start_are_left_alone():
    unrelated = subprocess.Popen(["sleep", "120"])  # another Ray, a caller's own child process
    try:
        start = FlakyStart(failures=1)
        init_ray("local", init=start)
        assert _gone(start.left_over[0])
        assert unrelated.poll() is None and unrelated.pid in tree_pids(os.getpid())
    finally:
        unrelated.kill()
        unrelated.wait()
