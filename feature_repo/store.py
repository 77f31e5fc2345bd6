"""Open, publish to and read from the Feast feature store of a workspace.

Two profiles, chosen by ``FeatureConfig.profile``:

* ``local``: SQLite online store (``online.db``) and file registry (``registry.db``) in the
  repository folder; Parquet offline store. Nothing to run.
* ``production``: Redis online store and a SQL registry on PostgreSQL; Parquet offline store.

How production runs are kept apart (Feast 0.67 offers neither a Redis key prefix nor a
registry schema option, checked in its source):

* Registry: every connection gets ``search_path=<registry_schema>`` through SQLAlchemy's
  ``connect_args``, so Feast's unqualified tables (``projects``, ``feature_views``, ...) are
  created and read inside that PostgreSQL schema. :func:`open_store` creates the schema.
* Redis: Feast's key is ``<serialized entity key><project name>``, i.e. the project is a key
  *suffix*; a distinct ``project`` gives disjoint keys, and Feast's own cleanup (and ours)
  deletes them with ``SCAN MATCH *<project>``.

The online store only ever needs each entity's latest row, so materialization runs with
Feast's ``pull_latest_features``: one row per user is written instead of one per event,
while the Parquet source keeps every snapshot for point-in-time training joins.

Materialization is incremental and resumable (:func:`materialize_resumable`). Each view's
source is cut into event-time chunks, materialized oldest first, and after each chunk
commits a watermark is written to ``materialization_watermark.json`` beside
``feature_store.yaml``. A rerun over the same source bytes and the same online store
starts at the first uncommitted chunk. Chunks in time order give the same final online
values as one window: each chunk writes every entity's latest row inside it, so the last
chunk an entity appears in leaves its overall latest row; redoing the interrupted chunk
rewrites the same rows (Redis even skips rows whose timestamp it already holds). While a
run is under way, Redis never serves an entity an older row than it held (Feast's Redis
writer drops rows not newer than the stored one); SQLite upserts without that check, so in
the local profile a reader can briefly see an older row until the chunk holding the
entity's latest row commits.

Why a JSON file rather than Feast's own record (Feast still records every chunk's interval
in its registry; the service's freshness check and the ``feast`` CLI read them):

* Feast's intervals say which event-time ranges were materialized, not from which data:
  they survive ``apply`` of a changed source, so after new data they would claim chunks
  are done that hold other rows. The watermark is bound to a sha256 of the source file, the chunk plan and the
  online store (a digest, no credentials), and is ignored when any of them differs.
* The local profile's file registry is rewritten in place (``open(path, "wb")``, checked in
  ``feast/infra/registry/file.py``): a kill mid-write truncates the whole registry. The
  watermark is written to a temporary file, fsynced and renamed over the old one, then the
  folder is fsynced: a reader sees the previous or the next watermark, never half of one.
* The watermark advances only after ``FeatureStore.materialize`` has returned (the online
  writes are done), so it can lag the data (that chunk is redone) but never lead it.
  Before trusting it, the newest committed row is read back from the online store; if it
  is missing (a flushed Redis, a deleted ``online.db``) the view starts over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from feast import FeatureStore, RepoConfig

from stratarec.atomic import write_parquet_atomic as _write_parquet_atomic
from stratarec.atomic import write_text_atomic as _write_text_atomic
from stratarec.config import FeatureConfig
from stratarec.feature_repo.definitions import (
    ITEM_CATALOG_FILE,
    ITEM_FEATURE_SERVICE,
    SOURCE_FILES,
    USER_ACTIVITY_FILE,
    USER_LAYER_FILE,
    VIEW_JOIN_KEYS,
    build_definitions,
)
from stratarec.features import (
    ITEM_CATALOG_COLUMNS,
    USER_ACTIVITY_COLUMNS,
    USER_LAYER_COLUMNS,
    empty_user_layers,
)
from stratarec.schema import (
    CREATED_TIMESTAMP,
    EVENT_TIMESTAMP,
    FEATURE_SERVICE,
    ITEM_CATALOG_VIEW,
    ITEM_ID,
    LAYER_COARSE,
    LAYER_FINE,
    LAYER_NAME,
    USER_ACTIVITY_VIEW,
    USER_ID,
    USER_LAYER_VIEW,
)

log = logging.getLogger(__name__)

DATA_DIR = "data"
FEATURE_STORE_YAML = "feature_store.yaml"
ONLINE_DB = "online.db"
REGISTRY_DB = "registry.db"
WATERMARK_FILE = "materialization_watermark.json"
WATERMARK_VERSION = 1
# Registry reads are cached this long; writes in the same process refresh the cache at once.
REGISTRY_CACHE_SECONDS = 60
_SQL_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def repo_config_dict(repo_dir: Path, cfg: FeatureConfig) -> dict[str, Any]:
    """The ``feature_store.yaml`` mapping of a repository folder for the configured profile.

    Args:
        repo_dir: The feature repository folder (absolute paths are derived from it).
        cfg: Feature config: profile, project, Redis and registry settings.

    Returns:
        A mapping accepted by ``feast.RepoConfig`` and by the ``feast`` CLI as YAML.

    Raises:
        ValueError: ``registry_schema`` is not a plain lower-case SQL identifier.
    """
    repo_dir = Path(repo_dir).expanduser().resolve()
    common: dict[str, Any] = {
        "project": cfg.project,
        "provider": "local",
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
        "materialization": {"pull_latest_features": True},
    }
    if cfg.profile == "local":
        return {
            **common,
            "registry": {"registry_type": "file", "path": str(repo_dir / REGISTRY_DB), "cache_ttl_seconds": REGISTRY_CACHE_SECONDS},
            "online_store": {"type": "sqlite", "path": str(repo_dir / ONLINE_DB)},
        }
    schema = _checked_schema(cfg.registry_schema)
    return {
        **common,
        "registry": {
            "registry_type": "sql",
            "path": cfg.registry_url,
            "cache_ttl_seconds": REGISTRY_CACHE_SECONDS,
            "sqlalchemy_config_kwargs": {
                "echo": False,
                "pool_pre_ping": True,
                # Feast's registry tables carry no schema; search_path puts them in ours.
                "connect_args": {"options": f"-csearch_path={schema}"},
            },
        },
        "online_store": {
            "type": "redis",
            "connection_string": cfg.redis_connection,
            # Feast treats a missing TTL as "keep forever"; 0 in our config means the same.
            "key_ttl_seconds": cfg.redis_key_ttl_seconds or None,
        },
    }


def open_store(repo_dir: Path, cfg: FeatureConfig) -> FeatureStore:
    """Open the feature store of ``repo_dir``, configured in code from ``cfg``.

    Also writes the equivalent ``feature_store.yaml`` and a copy of ``repo.py`` into
    ``repo_dir`` (when they differ), so ``feast -c <repo_dir> ...`` works on the same
    repository, ``feast apply`` included (without repo.py it would find no objects and plan
    to delete them all). A read-only ``repo_dir``, as a serving container may mount, only
    skips those files. In the production profile the registry's PostgreSQL schema is
    created if missing.

    Args:
        repo_dir: The feature repository folder (created if missing).
        cfg: Feature config.

    Returns:
        The ``FeatureStore``; objects are registered by :func:`publish_features`.
    """
    repo_dir = Path(repo_dir).expanduser().resolve()
    mapping = repo_config_dict(repo_dir, cfg)
    _write_cli_files(repo_dir, mapping, cfg.profile)
    if cfg.profile == "production":
        _ensure_registry_schema(cfg.registry_url, cfg.registry_schema)
    return FeatureStore(repo_path=str(repo_dir), config=RepoConfig(repo_path=repo_dir, **mapping))


def publish_features(
    repo_dir: Path,
    cfg: FeatureConfig,
    user_activity: pd.DataFrame,
    item_catalog: pd.DataFrame,
    *,
    on_chunk: Callable[[ChunkEvent], None] | None = None,
) -> dict:
    """Write the feature sources, register the definitions and load the online store.

    The Parquet sources (``repo_dir/data``) are replaced atomically, so a reader sees the
    old or the new file, never half of one. An empty layer source is written if none
    exists (the layer view needs a file before the first model is released). Each source's
    whole time range is materialized in chunks with a watermark after each
    (:func:`materialize_resumable`): rerun after a crash, with the same inputs, this
    resumes where the crashed run stopped and ends with the same online values.

    Args:
        repo_dir: The feature repository folder.
        cfg: Feature config (chunking: ``materialize_chunks``, ``materialize_chunk_hours``,
            ``materialize_resume``).
        user_activity: Rows from ``stratarec.features.compute_user_activity``.
        item_catalog: Rows from ``stratarec.features.compute_item_catalog``.
        on_chunk: Called before and after each chunk (progress, tests).

    Returns:
        watermark (ISO time of the newest materialized activity row), row counts, seconds,
        and the chunk accounting: chunks_total, chunks_skipped (committed by an earlier,
        interrupted run), chunks_materialized, resumed, watermark_file and
        materialization (per view: chunks, skipped, materialized, watermark, rows).
    """
    _require_columns(user_activity, USER_ACTIVITY_COLUMNS, USER_ACTIVITY_VIEW)
    _require_columns(item_catalog, ITEM_CATALOG_COLUMNS, ITEM_CATALOG_VIEW)
    if user_activity.empty or item_catalog.empty:
        raise ValueError("publish_features needs at least one user_activity row and one item_catalog row")
    repo_dir = Path(repo_dir).expanduser().resolve()
    data_dir = repo_dir / DATA_DIR
    t0 = time.perf_counter()
    log.info("writing feature sources to %s (%d activity rows, %d items)", data_dir, len(user_activity), len(item_catalog))
    _write_parquet_atomic(user_activity[list(USER_ACTIVITY_COLUMNS)], data_dir / USER_ACTIVITY_FILE)
    _write_parquet_atomic(item_catalog[list(ITEM_CATALOG_COLUMNS)], data_dir / ITEM_CATALOG_FILE)
    layer_path = data_dir / USER_LAYER_FILE
    with _layer_lock(data_dir):
        if not layer_path.exists():
            _write_parquet_atomic(empty_user_layers(), layer_path)
        layers = pd.read_parquet(layer_path, columns=[EVENT_TIMESTAMP])
    t1 = time.perf_counter()

    store = open_store(repo_dir, cfg)
    log.info("applying feature definitions (project %s, %s profile)", cfg.project, cfg.profile)
    store.apply(build_definitions(str(data_dir)))
    t2 = time.perf_counter()

    views = [USER_ACTIVITY_VIEW, ITEM_CATALOG_VIEW] + ([USER_LAYER_VIEW] if len(layers) else [])
    with _materialize_lock(repo_dir):
        reports = {view: materialize_resumable(store, repo_dir, cfg, view, on_chunk=on_chunk) for view in views}
    t3 = time.perf_counter()
    summary = {
        "watermark": reports[USER_ACTIVITY_VIEW]["watermark"],
        "activity_rows": len(user_activity),
        "catalog_rows": len(item_catalog),
        "layer_rows": len(layers),
        "online_users": int(user_activity[USER_ID].nunique()),
        "online_items": int(item_catalog[ITEM_ID].nunique()),
        "write_seconds": round(t1 - t0, 3),
        "apply_seconds": round(t2 - t1, 3),
        "materialize_seconds": round(t3 - t2, 3),
        "profile": cfg.profile,
        "project": cfg.project,
        "chunks_total": sum(r["chunks"] for r in reports.values()),
        "chunks_skipped": sum(r["skipped"] for r in reports.values()),
        "chunks_materialized": sum(r["materialized"] for r in reports.values()),
        "resumed": any(r["skipped"] for r in reports.values()),
        "watermark_file": str(repo_dir / WATERMARK_FILE),
        "materialization": reports,
    }
    log.info("published features: %s", {k: v for k, v in summary.items() if k != "materialization"})
    return summary


def publish_user_layers(
    repo_dir: Path, cfg: FeatureConfig, layers_df: pd.DataFrame, *, on_chunk: Callable[[ChunkEvent], None] | None = None
) -> dict:
    """Append user layer rows to the layer source and load them into the online store.

    Earlier rows are kept: a training cut-off before a release must still see the layers
    that were in force then, which is what the point-in-time join reads. Only the appended
    rows' time range is materialized (chunked and resumable like :func:`publish_features`).

    Args:
        repo_dir: The feature repository folder (:func:`publish_features` has run on it).
        cfg: Feature config.
        layers_df: user_id, event_timestamp, created_timestamp, layer_coarse, layer_fine, layer_name.
        on_chunk: Called before and after each chunk.

    Returns:
        rows (appended), total_rows (in the source), watermark (newest appended event time),
        materialization (chunks, skipped, materialized, watermark, rows).

    Raises:
        ValueError: Missing columns or no rows.
    """
    _require_columns(layers_df, USER_LAYER_COLUMNS, USER_LAYER_VIEW)
    if layers_df.empty:
        raise ValueError("publish_user_layers got no rows")
    repo_dir = Path(repo_dir).expanduser().resolve()
    data_dir = repo_dir / DATA_DIR
    path = data_dir / USER_LAYER_FILE
    new = _typed_layers(layers_df)
    # Read-modify-write: two releases appending at once must not drop each other's rows.
    with _layer_lock(data_dir):
        old = _typed_layers(pd.read_parquet(path)) if path.exists() else empty_user_layers()
        combined = pd.concat([old, new], ignore_index=True) if len(old) else new
        _write_parquet_atomic(combined, path)

    store = open_store(repo_dir, cfg)
    # Idempotent; it also registers the views if this repository was never published to.
    store.apply(build_definitions(str(data_dir)))
    window = _window(new[EVENT_TIMESTAMP])
    log.info("materializing %d layer rows over [%s, %s]", len(new), *window)
    with _materialize_lock(repo_dir):
        report = materialize_resumable(store, repo_dir, cfg, USER_LAYER_VIEW, window=window, on_chunk=on_chunk)
    return {"rows": len(new), "total_rows": len(combined), "watermark": report["watermark"], "materialization": report}


# -- incremental, resumable materialization ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One event-time range of a view's source, both ends inclusive (Feast's file store filters so)."""

    start: pd.Timestamp
    end: pd.Timestamp
    rows: int


@dataclasses.dataclass(frozen=True)
class ChunkEvent:
    """What :func:`materialize_resumable` reports to ``on_chunk`` around each chunk."""

    view: str
    index: int
    total: int
    chunk: Chunk
    phase: Literal["start", "committed"]


def plan_chunks(timestamps: pd.Series | pd.DatetimeIndex, chunks: int = 1, chunk_hours: float | None = None) -> list[Chunk]:
    """Cut event times into ordered, disjoint chunks that cover every row.

    Boundaries are the rows' own timestamps, never a rounded instant in between, so no row
    falls into a gap or into two chunks, whatever the timestamps' precision. Rows sharing a
    timestamp always share a chunk.

    Args:
        timestamps: Event times of the rows to materialize (naive values are taken as UTC).
        chunks: Number of chunks of about equal row counts (fewer if there are fewer
            distinct timestamps).
        chunk_hours: If set, one chunk per span of this many hours from the first row;
            spans without rows get no chunk. Overrides ``chunks``.

    Returns:
        Chunks, oldest first; empty when there are no timestamps.
    """
    ts = pd.to_datetime(pd.Series(timestamps), utc=True)
    if ts.empty:
        return []
    values, counts = np.unique(ts.to_numpy(dtype="datetime64[ns]").astype(np.int64), return_counts=True)
    cum = np.cumsum(counts)
    total = int(cum[-1])
    if chunk_hours is not None:
        span = int(round(chunk_hours * 3600 * 1e9))
        bucket = (values - values[0]) // max(span, 1)
        ends = np.flatnonzero(np.diff(bucket)).tolist() + [len(values) - 1]
    else:
        # The last distinct timestamp at which the running row count reaches j/n of the rows.
        targets = total * np.arange(1, max(int(chunks), 1) + 1) / max(int(chunks), 1)
        ends = sorted(set(np.minimum(np.searchsorted(cum, targets, side="left"), len(values) - 1).tolist()))
    out, first = [], 0
    for last in ends:
        rows = int(cum[last] - (cum[first - 1] if first else 0))
        out.append(Chunk(_ns_timestamp(values[first]), _ns_timestamp(values[last]), rows))
        first = last + 1
    return out


def read_watermark(repo_dir: Path) -> dict:
    """The materialization watermark file of a repository (empty when absent or unreadable).

    Args:
        repo_dir: The feature repository folder.

    Returns:
        ``{"version": 1, "views": {view: {"fingerprint", "chunks", "committed", "watermark", ...}}}``.
    """
    path = Path(repo_dir).expanduser().resolve() / WATERMARK_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"version": WATERMARK_VERSION, "views": {}}
    except (OSError, ValueError) as exc:
        # Renames make a torn file impossible; this is a hand edit or another tool. Starting
        # over is always correct, only slower.
        log.warning("ignoring unreadable watermark %s (%s): every chunk will be materialized", path, exc)
        return {"version": WATERMARK_VERSION, "views": {}}
    if not isinstance(state, dict) or state.get("version") != WATERMARK_VERSION or not isinstance(state.get("views"), dict):
        log.warning("ignoring watermark %s of an unknown format: every chunk will be materialized", path)
        return {"version": WATERMARK_VERSION, "views": {}}
    return state


def materialize_resumable(
    store: FeatureStore,
    repo_dir: Path,
    cfg: FeatureConfig,
    view: str,
    *,
    window: tuple[datetime, datetime] | None = None,
    on_chunk: Callable[[ChunkEvent], None] | None = None,
) -> dict:
    """Materialize one view's source chunk by chunk, recording a watermark after each chunk.

    The chunk plan comes from the source's event times (``cfg.materialize_chunks`` or
    ``cfg.materialize_chunk_hours``). The watermark entry of the view is bound to a
    fingerprint of the source file's bytes, the window, the plan and the online store; a
    rerun with the same fingerprint skips the committed chunks (after checking that the
    online store still holds the newest committed row), any other rerun starts over.
    Callers serialise runs on one repository with the repository's materialization lock
    (:func:`publish_features` and :func:`publish_user_layers` do).

    Args:
        store: The opened store; ``view`` is applied.
        repo_dir: The feature repository folder (source in ``data/``, watermark beside it).
        cfg: Feature config.
        view: Feature view name.
        window: Only rows with event times in [start, end] (both inclusive); default all.
        on_chunk: Called with a :class:`ChunkEvent` before and after each chunk.

    Returns:
        view, chunks, skipped, materialized, rows, watermark (ISO end of the last committed
        chunk, None if nothing to do), resumed_from (ISO start of the first chunk run after
        a resume, else None), seconds.
    """
    started = time.perf_counter()
    repo_dir = Path(repo_dir).expanduser().resolve()
    source = repo_dir / DATA_DIR / SOURCE_FILES[view]
    key = VIEW_JOIN_KEYS[view]
    frame = pd.read_parquet(source, columns=[key, EVENT_TIMESTAMP])
    ts = pd.to_datetime(frame[EVENT_TIMESTAMP], utc=True)
    if window is not None:
        lo, hi = (_utc(w) for w in window)
        keep = (ts >= lo) & (ts <= hi)
        frame, ts = frame[keep.to_numpy()], ts[keep]
    plan = plan_chunks(ts, cfg.materialize_chunks, cfg.materialize_chunk_hours)
    fingerprint = _sha256_text(
        json.dumps(
            {
                "view": view,
                "source_sha256": _sha256_file(source),
                "window": [_utc(w).isoformat() for w in window] if window is not None else None,
                "plan": [[c.start.isoformat(), c.end.isoformat(), c.rows] for c in plan],
                "online_store": _online_store_identity(repo_dir, cfg),
            },
            sort_keys=True,
        )
    )
    entry = read_watermark(repo_dir)["views"].get(view)
    committed = 0
    if not cfg.materialize_resume:
        reason = "resume disabled"
    elif not entry:
        reason = "no watermark"
    elif entry.get("fingerprint") != fingerprint:
        reason = "source, plan or online store changed since the watermark"
    else:
        committed = max(0, min(int(entry.get("committed", 0)), len(plan)))
        reason = f"watermark: {committed} of {len(plan)} chunks committed"
        if committed and not _online_holds(store, view, key, frame, ts, plan[committed - 1].end):
            log.warning("%s: the online store lacks the newest committed row (flushed?); ignoring the watermark", view)
            committed, reason = 0, "online store lost committed rows"
    skipped = committed
    log.info("materializing %s in %d chunks, %d already committed (%s)", view, len(plan), skipped, reason)

    def record(n_committed: int) -> None:
        _record_watermark(
            repo_dir,
            view,
            {
                "fingerprint": fingerprint,
                "source": f"{DATA_DIR}/{SOURCE_FILES[view]}",
                "online_store": {"type": "redis" if cfg.profile == "production" else "sqlite", "project": cfg.project},
                "chunks": [{"start": c.start.isoformat(), "end": c.end.isoformat(), "rows": c.rows} for c in plan],
                "committed": n_committed,
                "watermark": plan[n_committed - 1].end.isoformat() if n_committed else None,
            },
        )

    if plan and (not entry or entry.get("fingerprint") != fingerprint or int(entry.get("committed", 0)) != committed):
        record(committed)  # the plan is on disk before the first chunk, so a crash leaves a usable record
    for index in range(committed, len(plan)):
        chunk = plan[index]
        if on_chunk is not None:
            on_chunk(ChunkEvent(view, index, len(plan), chunk, "start"))
        log.info("materializing %s chunk %d/%d [%s, %s] (%d rows)", view, index + 1, len(plan), chunk.start, chunk.end, chunk.rows)
        with _fast_dask_tokens():
            store.materialize(start_date=chunk.start, end_date=chunk.end, feature_views=[view])
        record(index + 1)
        if on_chunk is not None:
            on_chunk(ChunkEvent(view, index, len(plan), chunk, "committed"))
    return {
        "view": view,
        "chunks": len(plan),
        "skipped": skipped,
        "materialized": len(plan) - skipped,
        "rows": int(len(ts)),
        "watermark": plan[-1].end.isoformat() if plan else None,
        "resumed_from": plan[skipped].start.isoformat() if 0 < skipped < len(plan) else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def training_frame(store: FeatureStore, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time user features of the ``recommender_v1`` service.

    Args:
        store: An opened store with the features published.
        entity_df: user_id and event_timestamp (the cut-off); other columns are passed through.

    Returns:
        ``entity_df`` (same rows, same order; user_id as int64 and event_timestamp as UTC)
        with the service's features added: for each row the latest snapshot at or before
        its event_timestamp, and missing values where there is none.

    Raises:
        ValueError: ``entity_df`` has no rows or lacks user_id / event_timestamp.
    """
    return _historical(store, entity_df, store.get_feature_service(FEATURE_SERVICE), USER_ID)


def item_frame(store: FeatureStore, item_ids: Iterable[int], as_of: pd.Timestamp | datetime) -> pd.DataFrame:
    """Item catalogue features (``item_catalog_v1``) as of a time, point in time correct.

    Args:
        store: An opened store with the features published.
        item_ids: Items to read, in the order wanted.
        as_of: Cut-off time (naive values are taken as UTC).

    Returns:
        item_id, event_timestamp and the catalogue features, one row per requested id.
    """
    ids = np.asarray(list(item_ids), dtype=np.int64)
    stamp = pd.Timestamp(as_of)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    entity = pd.DataFrame({ITEM_ID: ids, EVENT_TIMESTAMP: pd.Series([stamp] * len(ids), dtype="datetime64[ns, UTC]")})
    return _historical(store, entity, store.get_feature_service(ITEM_FEATURE_SERVICE), ITEM_ID)


def online_user_features(store: FeatureStore, user_ids: Iterable[int]) -> dict[int, dict]:
    """Latest online ``recommender_v1`` features per user.

    Args:
        store: An opened store with the features materialized.
        user_ids: Users to read.

    Returns:
        ``{user_id: {feature: value}}``; features of unknown users are ``None``.
    """
    return _online(store, FEATURE_SERVICE, USER_ID, user_ids)


def online_item_features(store: FeatureStore, item_ids: Iterable[int]) -> dict[int, dict]:
    """Latest online ``item_catalog_v1`` features per item.

    Args:
        store: An opened store with the features materialized.
        item_ids: Items to read.

    Returns:
        ``{item_id: {feature: value}}``; features of unknown items are ``None``.
    """
    return _online(store, ITEM_FEATURE_SERVICE, ITEM_ID, item_ids)


def _online(store: FeatureStore, service_name: str, key: str, ids: Iterable[int]) -> dict[int, dict]:
    keys = [int(i) for i in ids]
    if not keys:
        return {}
    service = _cached_feature_service(store, service_name)
    columns = store.get_online_features(features=service, entity_rows=[{key: k} for k in keys]).to_dict()
    names = [c for c in columns if c != key]
    return {k: {name: columns[name][row] for name in names} for row, k in enumerate(keys)}


# FeatureService objects per opened store: {name: (registry cache stamp, monotonic expiry, service)}.
_SERVICE_CACHE: weakref.WeakKeyDictionary[FeatureStore, dict[str, tuple[Any, float, Any]]] = weakref.WeakKeyDictionary()


def _cached_feature_service(store: FeatureStore, name: str) -> Any:
    """``store.get_feature_service(name, allow_cache=True)``, rebuilt only when Feast's registry cache is.

    Feast's cached registry holds protos, and ``get_feature_service`` rebuilds the Python
    object from them on every call (typeguard-checking every field): profiled on ML-100K with
    Redis, that was ~65% of a single-user online read. The object is kept until Feast
    reloads its registry cache (``refresh_registry`` or its TTL) and at most
    :data:`REGISTRY_CACHE_SECONDS`, so it is never staler than the cache reads already were.
    """
    stamp = getattr(store.registry, "cached_registry_proto_created", None)
    per_store = _SERVICE_CACHE.setdefault(store, {})
    hit = per_store.get(name)
    now = time.monotonic()
    if hit is not None and hit[0] == stamp and hit[1] > now:
        return hit[2]
    service = store.get_feature_service(name, allow_cache=True)
    # Read the stamp again: the call above may itself have refreshed the cache.
    per_store[name] = (getattr(store.registry, "cached_registry_proto_created", None), now + REGISTRY_CACHE_SECONDS, service)
    return service


def _historical(store: FeatureStore, entity_df: pd.DataFrame, service, key: str) -> pd.DataFrame:
    missing = [c for c in (key, EVENT_TIMESTAMP) if c not in entity_df.columns]
    if missing:
        raise ValueError(f"entity_df lacks columns {missing}")
    if entity_df.empty:
        raise ValueError("entity_df has no rows")
    entity = entity_df.reset_index(drop=True).copy()
    entity[key] = entity[key].to_numpy(dtype=np.int64)
    entity[EVENT_TIMESTAMP] = pd.to_datetime(entity[EVENT_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
    # Feast gets only the unique (key, cut-off) pairs, and the answer is joined back, because
    # its Dask join (a) collapses repeated pairs into one row and (b) drops an entity row
    # whose entity has feature rows, all of them after the cut-off, instead of returning
    # nulls. Pass-through columns never go through Feast, so it cannot reorder or retype them.
    # (b) also holds across views: one view whose rows all postdate the cut-off (the user
    # layers, published after the previous model was trained) would empty the whole answer.
    # So each view of the service is read on its own and joined back here.
    unique = entity[[key, EVENT_TIMESTAMP]].drop_duplicates(ignore_index=True)
    for projection in service.feature_view_projections:
        refs = [f"{projection.name_to_use()}:{f.name}" for f in projection.features]
        with _fast_dask_tokens():
            got = store.get_historical_features(entity_df=unique, features=refs).to_df()
        got[key] = got[key].to_numpy(dtype=np.int64)
        got[EVENT_TIMESTAMP] = pd.to_datetime(got[EVENT_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
        features = [c for c in got.columns if c not in (key, EVENT_TIMESTAMP)]
        entity = entity.merge(got[[key, EVENT_TIMESTAMP, *features]], on=[key, EVENT_TIMESTAMP], how="left", validate="many_to_one")
    return entity


@contextlib.contextmanager
def _fast_dask_tokens() -> Iterator[None]:
    """Give Dask random names for object arrays of arrays (Parquet list columns) while inside.

    Feast's file offline store runs on Dask, which names every persisted frame by hashing
    its contents; for list columns (an object array of numpy arrays) it pickles every
    row, several times per step. On ML-100K's 100k ``user_activity`` rows that hashing
    was 71 of 72 s of ``get_historical_features`` (cProfile), against 0.6 s with this.
    A random token is what Dask itself falls back to for objects it cannot hash; it only
    forgoes reuse of identical graphs, never merges different ones. The registration is
    Dask's documented extension point and is restored on exit.
    """
    from dask.base import normalize_token

    original = normalize_token.dispatch(np.ndarray)

    def tokenize_array(x: np.ndarray) -> object:
        if x.dtype.hasobject and x.size and isinstance(x.flat[0], np.ndarray):
            return ("stratarec-list-column", uuid.uuid4().hex)
        return original(x)

    normalize_token.register(np.ndarray, tokenize_array)
    try:
        yield
    finally:
        normalize_token.register(np.ndarray, original)


def _typed_layers(df: pd.DataFrame) -> pd.DataFrame:
    """Layer rows with the view's column types, whatever the caller's dtypes were."""
    return pd.DataFrame(
        {
            USER_ID: df[USER_ID].to_numpy(dtype=np.int64),
            EVENT_TIMESTAMP: pd.to_datetime(df[EVENT_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]").to_numpy(),
            CREATED_TIMESTAMP: pd.to_datetime(df[CREATED_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]").to_numpy(),
            LAYER_COARSE: df[LAYER_COARSE].to_numpy(dtype=np.int64),
            LAYER_FINE: df[LAYER_FINE].to_numpy(dtype=np.int64),
            LAYER_NAME: df[LAYER_NAME].astype("string").to_numpy(),
        },
        columns=list(USER_LAYER_COLUMNS),
    ).astype({EVENT_TIMESTAMP: "datetime64[ns, UTC]", CREATED_TIMESTAMP: "datetime64[ns, UTC]", LAYER_NAME: "string"})


def _window(timestamps: pd.Series) -> tuple[datetime, datetime]:
    """[first, last] of a timestamp column; Feast's file store filters both ends inclusively."""
    ts = pd.to_datetime(timestamps, utc=True)
    return ts.min().to_pydatetime(), ts.max().to_pydatetime()


def _require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} frame lacks columns {missing}")


def _checked_schema(schema: str) -> str:
    # The name is spliced into a connection option and a DDL statement, so allow no quoting tricks.
    if not _SQL_IDENTIFIER.match(schema):
        raise ValueError(f"registry_schema must match {_SQL_IDENTIFIER.pattern}, got {schema!r}")
    return schema


def _ensure_registry_schema(url: str, schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            # Look first: a reader's role may lack the CREATE privilege it never needs.
            found = conn.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": schema}).first()
            if found is None:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{_checked_schema(schema)}"'))
    finally:
        engine.dispose()


def _write_cli_files(repo_dir: Path, mapping: dict[str, Any], profile: str) -> None:
    """feature_store.yaml and repo.py for the feast CLI; skipped (with a warning) if read-only."""
    header = f"# Written by stratarec.feature_repo.store.open_store ({profile} profile); edit FeatureConfig, not this file.\n"
    files = {
        repo_dir / FEATURE_STORE_YAML: header + yaml.safe_dump(mapping, sort_keys=False),
        repo_dir / "repo.py": Path(__file__).with_name("repo.py").read_text(),
    }
    try:
        (repo_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)
        for path, content in files.items():
            if not path.exists() or path.read_text() != content:
                _write_text_atomic(path, content)
    except OSError as exc:
        log.warning("could not write the feast CLI files into %s (%s); the store itself is unaffected", repo_dir, exc)


@contextlib.contextmanager
def _layer_lock(data_dir: Path) -> Iterator[None]:
    """Exclusive lock (across processes on this machine) on the layer source."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".user_interest_layer.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _materialize_lock(repo_dir: Path) -> Iterator[None]:
    """Exclusive lock (across processes on this machine) on a repository's materialization.

    The kernel drops an flock when its holder dies, so a killed run never blocks its rerun.
    """
    repo_dir.mkdir(parents=True, exist_ok=True)
    with open(repo_dir / ".materialize.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _utc(value: datetime | pd.Timestamp) -> pd.Timestamp:
    """A timestamp in UTC; naive values are taken as UTC."""
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _ns_timestamp(value: int) -> pd.Timestamp:
    # pd.Timestamp is a datetime that keeps nanoseconds, so Feast filters on the exact value.
    return pd.Timestamp(int(value), unit="ns", tz="UTC")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _online_store_identity(repo_dir: Path, cfg: FeatureConfig) -> str:
    """A digest naming the online store and project (the Redis string may hold a password)."""
    where = cfg.redis_connection if cfg.profile == "production" else str(repo_dir / ONLINE_DB)
    return _sha256_text(json.dumps([cfg.profile, where, cfg.project]))


def _online_holds(store: FeatureStore, view: str, key: str, frame: pd.DataFrame, ts: pd.Series, until: pd.Timestamp) -> bool:
    """Whether the online store holds the newest source row at or before ``until`` (or a newer one for its entity).

    That row is the last one the committed chunks wrote, so its absence means the online
    store lost data the watermark counts as written.
    """
    upto = (ts <= until).to_numpy()
    if not upto.any():
        return True
    newest = int(np.flatnonzero(upto)[np.argmax(ts.to_numpy()[upto])])
    entity = int(frame[key].iloc[newest])
    feature = store.get_feature_view(view).features[0].name
    try:
        got = store.get_online_features(features=[f"{view}:{feature}"], entity_rows=[{key: entity}]).to_dict(include_event_timestamps=True)
    except Exception as exc:  # any backend error: do not trust the watermark
        log.warning("%s: reading back %s=%d failed (%s: %s)", view, key, entity, type(exc).__name__, exc)
        return False
    stamp = (got.get(f"{feature}__ts") or [0])[0] or 0
    return got[feature][0] is not None and stamp >= int(ts.iloc[newest].timestamp())


def _record_watermark(repo_dir: Path, view: str, entry: dict) -> None:
    """Replace one view's entry of the watermark file, durably (callers hold the materialization lock)."""
    state = read_watermark(repo_dir)
    state["views"][view] = {**entry, "updated_at": pd.Timestamp.now(tz="UTC").isoformat()}
    _write_json_durable(repo_dir / WATERMARK_FILE, state)


def _write_json_durable(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file, fsync it, rename it over ``path`` and fsync the folder.

    The rename alone is enough against a killed process (readers see the old or the new
    file); the fsyncs make the same hold across a machine crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
