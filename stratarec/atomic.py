"""Atomic file writes: readers (or a retried KFP step) see the old file or the whole new one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write`` on a unique temporary file beside ``path``, then rename it over ``path``.

    The temporary file lives in the destination folder so the rename stays on one file
    system and is atomic; its name is unique so two writers never collide.

    Args:
        path: Destination file; its folder is created.
        write: Writes the content to the path it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, payload: object) -> Path:
    """Write indented JSON atomically; values JSON does not know are written with ``str``."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def write_parquet_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as Parquet atomically; the index is not stored."""
    return write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))
