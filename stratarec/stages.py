"""Per-stage run records: status, seconds and a summary, written by every component.

Each stage writes ``<runs_dir>/<run_id>/stages/<stage>.json`` when it starts and when it
ends (or fails, with a one-line reason). The runner reads them to show progress and to
build ``summary.json``; on a cluster the same folder lives on the shared volume.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from stratarec.atomic import write_json_atomic
from stratarec.config import StrataConfig
from stratarec.registry import utc_now

STAGES = ("ingest", "validate", "features", "train", "layer", "evaluate", "package", "monitor")


def run_dir(cfg: StrataConfig) -> Path | None:
    """``<runs_dir>/<run_id>``, or None when the run has no id (library use)."""
    if not cfg.run_id:
        return None
    return Path(cfg.runs_dir).expanduser().resolve() / cfg.run_id


def setup_logging() -> None:
    """Component entry points log to stderr with timestamps (kfp.local streams it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


@contextlib.contextmanager
def stage_record(cfg: StrataConfig, stage: str) -> Iterator[dict]:
    """Record a stage's start, end, seconds and outcome; the body fills the yielded summary.

    A failure is recorded with the exception's one-line message, then re-raised so KFP
    marks the task failed and nothing downstream runs.
    """
    setup_logging()
    directory = run_dir(cfg)
    path = directory / "stages" / f"{stage}.json" if directory else None
    summary: dict = {}
    started = time.monotonic()
    record = {"stage": stage, "status": "running", "started_at": utc_now()}
    if path:
        write_json_atomic(path, record)
    try:
        yield summary
    except BaseException as exc:
        record.update(status="failed", seconds=round(time.monotonic() - started, 2), reason=_one_line(exc), summary=summary)
        record["traceback"] = traceback.format_exc(limit=5)
        if path:
            write_json_atomic(path, record)
        raise
    record.update(status="succeeded", seconds=round(time.monotonic() - started, 2), finished_at=utc_now(), summary=summary)
    if path:
        write_json_atomic(path, record)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
