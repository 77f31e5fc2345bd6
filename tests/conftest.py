"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR_ENV = "STRATAREC_DATA_DIR"
# The offline MovieLens copies live beside the project, never inside it (research-only licence).
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder holding ``ml-100k/``: $STRATAREC_DATA_DIR if set, else ../shared/data.

    Fails (rather than skips) when neither holds ml-100k: a silently skipped data test would
    hide that the suite no longer checks real data.
    """
    candidates = ([Path(os.environ[DATA_DIR_ENV]).expanduser()] if os.environ.get(DATA_DIR_ENV) else []) + [SHARED_DATA_DIR]
    for root in candidates:
        if (root / "ml-100k" / "u.data").is_file():
            return root
    pytest.fail(
        f"MovieLens 100K not found: looked for ml-100k/u.data under {', '.join(map(str, candidates))}. "
        f"Set {DATA_DIR_ENV} to the folder holding ml-100k/ (or run `stratarec data fetch ml-100k --dest <dir>`)."
    )
