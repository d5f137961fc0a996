"""User-facing errors: one line that says what went wrong and what to do.

Jobs catch `PipelineError` at the top (`pipeline.core.cli.run_main`) and exit with its `exit_code` and its
message, so a user sees one readable line instead of a traceback:

    2  bad input, config, checkpoint or output location: fix it and rerun
    3  an infrastructure fault (object store unreachable, disk full, a cluster that cannot run the job):
       fix it and rerun the same command; committed work is kept
    4  an unexpected error (a bug): one line, the traceback with `-v`

Exceptions raised by libraries (OSError from a filesystem, Ray's wrapped task errors) are translated
into these by `pipeline.core.faults.explain`.
"""


class PipelineError(Exception):
    """Base class for errors caused by the user's input, config, checkpoint or environment."""

    exit_code = 2


class ConfigError(PipelineError):
    """A config file, `--set` override or command-line argument is invalid (unknown key, bad value)."""


class CheckpointError(PipelineError):
    """A checkpoint cannot be found, recognised or loaded safely."""


class InputError(PipelineError):
    """The input table cannot be processed at all (missing column, wrong type, unreadable)."""


class OutputError(PipelineError):
    """The output location cannot be used: not writable, held by another run, or holding another run's result."""


class InfrastructureError(PipelineError):
    """Storage or compute failed under the job (unreachable endpoint, disk full); a rerun resumes."""

    exit_code = 3
