"""What every contender takes and returns: the pairs in, one timed pass out.

Its own module, below the contenders and the exported-model runtimes (`exported.py`, `onnx_runtime.py`,
`openvino.py`), so that those import it without importing the contender table that loads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Pairs = Sequence[tuple[str, str]]  # (query, document) texts


@dataclass
class Scored:
    """One timed pass of a contender over a list of pairs."""

    logits: np.ndarray  # (n,) float32, input order
    seconds: float  # strings in -> logits out
    real_tokens: int  # tokens of the pairs themselves
    processed_tokens: int  # tokens that went through the Linear layers (padding included)
    dtype: str
    settings: dict = field(default_factory=dict)
