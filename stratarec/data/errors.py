"""Errors raised while locating or reading a data source."""

from __future__ import annotations

__all__ = ["DATA_HINT", "DataSourceError"]

# One wording everywhere, so every "data not found" message tells the user the same two fixes.
DATA_HINT = "run `stratarec data fetch ml-100k --dest <dir>` or set STRATAREC_DATA_DIR (or --data-dir) to the folder holding ml-100k/"


class DataSourceError(RuntimeError):
    """A data source is missing, unreadable or does not have the expected shape.

    The message always names the file (and the column, when one is at fault) and says
    what to do about it, because it is usually the first thing a new user sees.
    """
