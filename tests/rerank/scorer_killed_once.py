"""`python -m tests.rerank.scorer_killed_once ARGS`: the rerank command (`python -m jobs.rerank ARGS`) whose
scorers die once: the first scorer to receive a batch creates the file RERANK_FAULT_KILL_SCORER_ONCE names and
exits mid-batch (a real process exit, as an OOM kill would be); every later batch, on any actor, is scored.

The job's actors inherit its environment; run as `__main__`, the subclass travels to them by value.
"""

from __future__ import annotations

import functools
import os

from jobs.rerank import main
from pipeline.core.cli import run_main
from pipeline.rerank.plan import StageClasses
from pipeline.rerank.stages.score import ScoreStage

MARKER_ENV = "RERANK_FAULT_KILL_SCORER_ONCE"


class ScorerKilledOnce(ScoreStage):
    def __call__(self, batch):
        marker = os.environ[MARKER_ENV]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


if __name__ == "__main__":
    run_main(functools.partial(main, stages=StageClasses(score=ScorerKilledOnce)))
