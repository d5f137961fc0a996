"""Worker-error unwrapping (`ray_runtime.worker_errors`): what a job's driver loop sees of a fault in a worker."""

from __future__ import annotations

import errno

import pytest

from pipeline.core.errors import InfrastructureError, OutputError
from pipeline.runtime.ray_runtime import worker_errors


def _batches(fault: BaseException, before: int = 2):
    yield from range(before)
    raise fault


def test_a_known_fault_becomes_its_one_line_error_after_the_batches_before_it():
    got = []
    with pytest.raises(InfrastructureError, match="no space left on the device") as raised:
        for batch in worker_errors(_batches(OSError(errno.ENOSPC, "No space left on device"))):
            got.append(batch)
    assert got == [0, 1]
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_own_errors_pass_unchanged_and_unknown_faults_keep_their_traceback():
    own = OutputError("the output is someone else's; choose another")
    with pytest.raises(OutputError) as raised:
        list(worker_errors(_batches(own)))
    assert raised.value is own
    with pytest.raises(ZeroDivisionError):  # a bug: not dressed up as a user's fault
        list(worker_errors(_batches(ZeroDivisionError("division by zero"))))


def test_the_check_runs_before_each_batch_and_stops_the_iteration():
    calls = []

    def check():
        calls.append(len(calls))
        if len(calls) == 3:
            raise OutputError("the lease was lost to another run")

    got = []
    with pytest.raises(OutputError, match="lease was lost"):
        for batch in worker_errors(iter(range(10)), check):
            got.append(batch)
    assert got == [0, 1] and calls == [0, 1, 2]
