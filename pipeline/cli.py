"""What every job's command line shares: `--config`, `--set`, `--model`, `--dtype`, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from pipeline.errors import PipelineError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def base_parser(prog: str, description: str, *, model_required: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=model_required, default=None,
                        help="local checkpoint directory, Hugging Face hub id, or dummy:<architecture>")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype (default auto: bf16 on CUDA and on CPUs with bf16 matrix units)")
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set scorer.max_tokens_per_batch=8192 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a job's main; a `PipelineError` becomes one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
