"""A user's own events and items as CSV or Parquet, mapped onto the canonical schema by config."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stratarec import schema
from stratarec.config import DataConfig
from stratarec.data.errors import DataSourceError
from stratarec.data.ingest import canonicalize

__all__ = ["load_generic"]


def load_generic(data_dir: Path, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``cfg.events_file`` and ``cfg.items_file`` and return canonical ``(events, items)``.

    Args:
        data_dir: Folder the file names are relative to (absolute file names are used as is).
        cfg: Data config: file names, ``columns`` (canonical name -> the file's column name)
            and ``timestamp_unit`` (``"s"``/``"ms"`` since the epoch, or ``"iso"`` strings).

    Returns:
        Canonical events and items; rows are neither dropped nor repaired.

    Raises:
        DataSourceError: A file is missing, has an unknown suffix, or lacks a mapped column
            (the message names the column and the file).
    """
    mapping = cfg.columns.model_dump()  # canonical name -> source column
    events = _read(Path(data_dir) / cfg.events_file, schema.EVENT_COLUMNS, mapping)
    items = _read(Path(data_dir) / cfg.items_file, schema.ITEM_COLUMNS, mapping)
    ts = events[schema.EVENT_TIMESTAMP]
    if cfg.timestamp_unit == "iso" and not pd.api.types.is_datetime64_any_dtype(ts.dtype):
        # CSV readers turn basic-format ISO text such as 20240101 into numbers, which would then
        # be read as epoch seconds; as text it is parsed as the ISO 8601 the config promises.
        events[schema.EVENT_TIMESTAMP] = ts.astype("string")
    return canonicalize(events, items, timestamp_unit=cfg.timestamp_unit)


def _read(path: Path, columns: tuple[str, ...], mapping: dict[str, str]) -> pd.DataFrame:
    """Read one file, check the mapped columns exist and rename them to canonical names."""
    if not path.is_file():
        raise DataSourceError(f"data file {path} does not exist (data.data_dir plus data.events_file/items_file)")
    source = {mapping[c]: c for c in columns}
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        df = pd.read_parquet(path)
    elif suffixes.endswith((".csv", ".csv.gz", ".tsv")):
        df = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",")
    else:
        raise DataSourceError(f"data file {path}: unknown format {path.suffix!r}; use .csv, .tsv or .parquet")
    missing = [(src, canon) for src, canon in source.items() if src not in df.columns]
    if missing:
        named = ", ".join(f"{src!r}" + (f" (for {canon})" if src != canon else "") for src, canon in missing)
        raise DataSourceError(
            f"data file {path} lacks column {named}; it has {list(df.columns)}. "
            "Map your column names with data.columns (e.g. data.columns.user_id=customer)"
        )
    return df[list(source)].rename(columns=source)
