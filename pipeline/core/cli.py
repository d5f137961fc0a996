"""What every job's command line shares: `--config`, `--set`, `--model`, `--dtype`, logging, one-line errors.

Whatever goes wrong ends in one `error: ...` line on stderr and an exit code (see pipeline/core/errors.py):
a bad argument is reported like a bad config value, library faults are translated by `faults.explain`,
and anything unrecognised is one line too, with its traceback only under `-v`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from pipeline.core import dtypes
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.faults import explain

DTYPES = dtypes.CHOICES  # --dtype's choices
DEFAULT_MODEL = "jinaai/jina-reranker-v2-base-multilingual"
INTERNAL_ERROR_EXIT = 4

# Our own loggers; every other library's logger stays at WARNING unless -vv.
OWN_LOGGERS = ("rerank", "pipeline", "jobs", "hard_negatives", "benchmark")


class JobArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are `ConfigError`s: the same one line as a bad config value."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def base_parser(
    prog: str,
    description: str,
    *,
    model_required: bool = True,
    formatter_class=argparse.HelpFormatter,
    set_example: str = "scorer.max_tokens_per_batch=8192",
    instruction_key: str | None = None,
) -> JobArgumentParser:
    """`set_example`: a key of this job's config for --set's help (the jobs that run a rerank step keep its
    settings under `rerank.`). `instruction_key`: the config key of a decoder's instruction (default: the
    rerank settings' tokenizer.instruction, under the prefix `set_example` has)."""
    instruction_key = (
        instruction_key or f"{set_example.partition('scorer.')[0]}tokenizer.instruction"
    )
    parser = JobArgumentParser(prog=prog, description=description, formatter_class=formatter_class)
    parser.add_argument(
        "--model",
        required=model_required,
        default=None,
        help="local checkpoint directory, Hugging Face hub id, or dummy:<architecture>"
        + ("" if model_required else f" (default: the config's model, {DEFAULT_MODEL})")
        + "; a decoder reranker (Qwen3-Reranker, bge-reranker-v2-gemma) reads pairs through its prompt "
        f"template, whose instruction the config key {instruction_key} sets",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="compute dtype (default auto: bf16 on CUDA; on CPU bf16 where a short GEMM probe finds it faster; "
        "int8: int8 Linear layers on CPU, only when asked for)",
    )
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config key, e.g. --set {set_example} (repeatable)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: this project's debug logging; -vv: every library's too but Ray's (credentials redacted)",
    )
    return parser


def ray_job_working_dir() -> str | None:
    """The working directory when this process is the driver of a `ray job submit` (Ray sets
    RAY_JOB_CONFIG_JSON_ENV_VAR there, and unpacks `--working-dir` under <session>/runtime_resources/), else None."""
    cwd = os.getcwd()
    # Not RAY_JOB_ID: Ray sets it in every worker process too, where a job started from a task is no submission.
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "/runtime_resources/" in cwd:
        return cwd
    return None


def check_job_location(uri: str | None, flag: str = "--output") -> None:
    """A relative local path given to a job run by `ray job submit` would land in Ray's temporary copy of the
    working directory, which Ray deletes with the session: refused before any work."""
    if not uri or "://" in uri or os.path.isabs(os.path.expanduser(uri)):
        return
    cwd = ray_job_working_dir()
    if cwd is not None:
        raise ConfigError(
            f"{flag} {uri} is a relative path and this job runs under `ray job submit`, whose working "
            f"directory is Ray's temporary copy of the project ({cwd}); give an absolute path on "
            "storage every node shares, or object storage (s3://...)"
        )


class RedactSecrets(logging.Filter):
    """Masks credentials in every log record: the values of the credential environment variables and of any
    secret passed in storage options, and the signature parts of signed requests (botocore's debug lines)."""

    PATTERNS = [
        (re.compile(r"(Credential=)[^/,\s'\"]+"), r"\1<redacted>"),
        (re.compile(r"(Signature=)[0-9a-fA-F]+"), r"\1<redacted>"),
        (
            re.compile(r"(Signature:\s*)[0-9a-fA-F]{64}"),
            r"\1<redacted>",
        ),  # botocore's "Signature:\n<hex>"
        (
            re.compile(
                r"((?:X-Amz-Security-Token|x-amz-security-token|Authorization|authorization)['\"]?\s*[:=]\s*['\"]?)"
                r"[^'\",}\s]+(?:[^'\",}]*)"
            ),
            r"\1<redacted>",
        ),
        (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{12,}\b"), "<redacted>"),
    ]
    ENV = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "HF_TOKEN",
        "GOOGLE_APPLICATION_CREDENTIALS",
    )
    extra_secrets: set[str] = set()

    @classmethod
    def add_secret(cls, value) -> None:
        if isinstance(value, str) and len(value) >= 4:
            cls.extra_secrets.add(value)

    def redact(self, text: str) -> str:
        for value in {os.environ.get(k) for k in self.ENV} | self.extra_secrets:
            if value and len(value) >= 4:
                text = text.replace(value, "<redacted>")
        for pattern, replacement in self.PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (like logging's last-resort handler), so a
    job run in-process by a caller that swaps stderr (a notebook, a test) never writes to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(verbose: int | bool = 0) -> None:
    """INFO for our loggers; -v: DEBUG for ours; -vv: DEBUG for every library. Other libraries stay at WARNING
    otherwise (botocore's debug lines alone would print request signatures dozens of times a second)."""
    verbose = int(verbose)
    handler = _CurrentStderr()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    )
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    # Ray's own debug lines describe its scheduler loop many times a second; its log files in the session
    # folder keep them. -vv is for the libraries that talk to storage and load models.
    logging.getLogger("ray").setLevel(logging.INFO if verbose >= 2 else logging.WARNING)
    # s3fs/aiohttp: a request cut off by a vanished endpoint is also logged by asyncio as "Task exception was never
    # retrieved" with its traceback; the job reports that fault itself in one line, so asyncio speaks only with -v.
    logging.getLogger("asyncio").setLevel(logging.ERROR if verbose >= 1 else logging.CRITICAL)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)


def _verbose(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else list(argv)
    return any(a in ("-v", "--verbose") or re.fullmatch(r"-v+", a) for a in args)


def run_main(
    main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
) -> None:
    """Run a job's main; every failure becomes one `error:` line on stderr and its exit code."""
    try:
        code = main(argv)
    except SystemExit:
        raise  # --help, or a job's own exit status
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except BaseException as e:  # noqa: BLE001 - the one place every failure is turned into one line
        error = e if isinstance(e, PipelineError) else explain(e)
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        if _verbose(argv):
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"error: unexpected {type(e).__name__}{': ' + first[:300] if first else ''} (a bug: please report "
            "it with the output of the same command run with -v; an unfinished output resumes on a rerun)",
            file=sys.stderr,
        )
        sys.exit(INTERNAL_ERROR_EXIT)
    sys.exit(code or 0)
