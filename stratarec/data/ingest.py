"""Ingest: read the configured source and bring it to the canonical event and item tables.

``canonicalize`` fixes column order and dtypes only. It never drops, deduplicates or
clips rows: a null id, a rating of 7 or an unknown item must reach the validation step
intact, so that the run stops there with a report instead of training on quietly repaired
data. Values that cannot be parsed (a timestamp string like ``"yesterday"``) become nulls
for the same reason; ids that are not integers at all are a schema error and raise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from stratarec import schema
from stratarec.atomic import write_parquet_atomic
from stratarec.config import DataConfig
from stratarec.data.errors import DATA_HINT, DataSourceError

__all__ = ["canonicalize", "load_raw_tables", "read_table", "write_parquet_atomic"]

logger = logging.getLogger(__name__)

_INT_DTYPE = "Int64"  # nullable, so a null id survives until validation reports it
_TS_DTYPE = "datetime64[ns, UTC]"


def load_raw_tables(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load events and items from the configured source as canonical tables.

    Args:
        cfg: The data section of the run config. ``cfg.source`` picks the loader;
            ``cfg.min_rating``, when set, keeps only events rated at least that much.

    Returns:
        ``(events, items)`` with exactly :data:`schema.EVENT_COLUMNS` and
        :data:`schema.ITEM_COLUMNS`, in that order and with canonical dtypes.

    Raises:
        DataSourceError: ``data_dir`` is needed but unset, or the files are missing or malformed.
    """
    # The loaders import ``canonicalize`` from this module, so they are imported here rather
    # than at the top to keep the import graph acyclic (and ``import ingest`` cheap).
    if cfg.source == "synthetic":
        from stratarec.data.synthetic import generate_synthetic

        events, items = generate_synthetic(cfg.synthetic)
    else:
        if cfg.data_dir is None:
            raise DataSourceError(
                f"data.data_dir is not set, but source {cfg.source!r} reads files: pass --data-dir, set "
                f"STRATAREC_DATA_DIR, or set data.data_dir in the config ({DATA_HINT}). "
                "For a run without any files use data.source=synthetic."
            )
        data_dir = Path(cfg.data_dir).expanduser()
        if cfg.source == "movielens-100k":
            from stratarec.data.movielens import load_movielens_100k

            events, items = load_movielens_100k(data_dir)
        else:
            from stratarec.data.generic import load_generic

            events, items = load_generic(data_dir, cfg)
    events, items = canonicalize(events, items)
    if cfg.min_rating is not None:
        # Null ratings are kept: the filter must not hide rows that validation should reject.
        keep = events[schema.RATING].isna() | (events[schema.RATING] >= cfg.min_rating)
        logger.info("min_rating=%s keeps %d of %d events", cfg.min_rating, int(keep.sum()), len(events))
        events = events[keep].reset_index(drop=True)
    return events, items


def canonicalize(events: pd.DataFrame, items: pd.DataFrame, timestamp_unit: str = "s") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Select, order and type the canonical columns without dropping or repairing any row.

    Args:
        events: Event table holding at least the :data:`schema.EVENT_COLUMNS` (extra columns are dropped).
        items: Item table holding at least the :data:`schema.ITEM_COLUMNS`.
        timestamp_unit: How ``event_timestamp`` values are read: numbers are seconds
            (``"s"``) or milliseconds (``"ms"``) since the epoch, text is ISO 8601 (with
            ``"iso"`` all of it, even digits-only text). Datetime columns are converted to
            UTC; naive ones are taken as UTC.

    Returns:
        ``(events, items)``: ids and ``release_year`` ``Int64``, ``rating`` ``float64``,
        ``event_timestamp`` ``datetime64[ns, UTC]``, ``title`` and ``genres`` ``string``.

    Raises:
        DataSourceError: A canonical column is missing or an id column holds non-integers.
    """
    _require(events, schema.EVENT_COLUMNS, "events")
    _require(items, schema.ITEM_COLUMNS, "items")
    ev = pd.DataFrame(
        {
            schema.USER_ID: _to_int(events[schema.USER_ID], f"events.{schema.USER_ID}"),
            schema.ITEM_ID: _to_int(events[schema.ITEM_ID], f"events.{schema.ITEM_ID}"),
            schema.RATING: pd.to_numeric(events[schema.RATING], errors="coerce").astype("float64"),
            schema.EVENT_TIMESTAMP: _to_utc(events[schema.EVENT_TIMESTAMP], timestamp_unit),
        }
    ).reset_index(drop=True)
    it = pd.DataFrame(
        {
            schema.ITEM_ID: _to_int(items[schema.ITEM_ID], f"items.{schema.ITEM_ID}"),
            schema.TITLE: items[schema.TITLE].astype("string"),
            schema.GENRES: items[schema.GENRES].astype("string"),
            schema.RELEASE_YEAR: _to_int(items[schema.RELEASE_YEAR], f"items.{schema.RELEASE_YEAR}", coerce=True),
        }
    ).reset_index(drop=True)
    return ev, it


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`write_parquet_atomic` (or a ``.csv`` file).

    Args:
        path: Parquet file (any name, as KFP artifact paths have no suffix) or ``*.csv``.

    Returns:
        The table; Parquet keeps the canonical pandas dtypes.

    Raises:
        DataSourceError: The file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"table {path} does not exist")
    if path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
        return pd.read_csv(path)
    return pd.read_parquet(path)


def _require(df: pd.DataFrame, columns: tuple[str, ...], table: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataSourceError(f"{table} table lacks column(s) {missing}; it has {list(df.columns)}")


def _to_int(values: pd.Series, name: str, coerce: bool = False) -> pd.Series:
    """Cast to nullable Int64; nulls stay null, non-integers raise unless ``coerce``."""
    if isinstance(values.dtype, pd.Int64Dtype):
        return values
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() & values.notna()
    if bad.any() and not coerce:
        example = values[bad].iloc[0]
        raise DataSourceError(f"{name} must hold integer ids, found {example!r}; map the ids to integers before ingesting")
    try:
        return numeric.round().astype(_INT_DTYPE) if coerce else numeric.astype(_INT_DTYPE)
    except (TypeError, ValueError) as err:
        raise DataSourceError(f"{name} must hold integer ids: {err}") from err


def _to_utc(values: pd.Series, unit: str) -> pd.Series:
    """Convert to ``datetime64[ns, UTC]``; unparseable values become NaT for validation to report."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        out = values.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(values.dtype):
        out = values.dt.tz_localize("UTC")
    elif pd.api.types.is_numeric_dtype(values.dtype):
        out = _from_epoch(values, unit)
    elif unit == "iso":
        out = pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601")
    else:
        # Text or mixed objects with an epoch unit: numbers are epoch values, the rest ISO 8601.
        numeric = pd.to_numeric(values, errors="coerce")
        out = _from_epoch(numeric, unit).where(
            numeric.notna(), pd.to_datetime(values.where(numeric.isna()), utc=True, errors="coerce", format="ISO8601")
        )
    return out.astype(_TS_DTYPE)


def _from_epoch(values: pd.Series, unit: str) -> pd.Series:
    return pd.to_datetime(values, unit="ms" if unit == "ms" else "s", utc=True, errors="coerce")
