"""User-facing errors: one line that says what went wrong and what to do.

Jobs catch `PipelineError` at the top and exit non-zero with its message, so a user sees one readable
line instead of a traceback. Anything else escaping is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Base class for errors caused by the user's input, config, checkpoint or environment."""


class ConfigError(PipelineError):
    """A config file or `--set` override is invalid (unknown key, bad value)."""


class CheckpointError(PipelineError):
    """A checkpoint cannot be found, recognised or loaded safely."""


class InputError(PipelineError):
    """The input table cannot be processed at all (missing column, wrong type, unreadable)."""
