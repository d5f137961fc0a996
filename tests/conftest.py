"""Fixtures shared by every test module: where the real data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the project (read-only real data; see its README)."""
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"real data not found at {SHARED_DATA}; set SHARED_DATA to the shared/data folder")
    return SHARED_DATA
