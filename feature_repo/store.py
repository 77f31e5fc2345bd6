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
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

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
    USER_ACTIVITY_FILE,
    USER_LAYER_FILE,
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


def publish_features(repo_dir: Path, cfg: FeatureConfig, user_activity: pd.DataFrame, item_catalog: pd.DataFrame) -> dict:
    """Write the feature sources, register the definitions and load the online store.

    The Parquet sources (``repo_dir/data``) are replaced atomically, so a reader sees the
    old or the new file, never half of one. An empty layer source is written if none
    exists (the layer view needs a file before the first model is released). Materialization
    covers each source's whole time range and writes each entity's latest row.

    Args:
        repo_dir: The feature repository folder.
        cfg: Feature config.
        user_activity: Rows from ``stratarec.features.compute_user_activity``.
        item_catalog: Rows from ``stratarec.features.compute_item_catalog``.

    Returns:
        watermark (ISO time of the newest materialized activity row), row counts and seconds.
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

    windows = {
        USER_ACTIVITY_VIEW: _window(user_activity[EVENT_TIMESTAMP]),
        ITEM_CATALOG_VIEW: _window(item_catalog[EVENT_TIMESTAMP]),
    }
    if len(layers):
        windows[USER_LAYER_VIEW] = _window(layers[EVENT_TIMESTAMP])
    for view, (start, end) in windows.items():
        log.info("materializing %s over [%s, %s]", view, start, end)
        with _fast_dask_tokens():
            store.materialize(start_date=start, end_date=end, feature_views=[view])
    t3 = time.perf_counter()
    summary = {
        "watermark": windows[USER_ACTIVITY_VIEW][1].isoformat(),
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
    }
    log.info("published features: %s", summary)
    return summary


def publish_user_layers(repo_dir: Path, cfg: FeatureConfig, layers_df: pd.DataFrame) -> dict:
    """Append user layer rows to the layer source and load them into the online store.

    Earlier rows are kept: a training cut-off before a release must still see the layers
    that were in force then, which is what the point-in-time join reads.

    Args:
        repo_dir: The feature repository folder (:func:`publish_features` has run on it).
        cfg: Feature config.
        layers_df: user_id, event_timestamp, created_timestamp, layer_coarse, layer_fine, layer_name.

    Returns:
        rows (appended), total_rows (in the source), watermark (newest appended event time).

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
    start, end = _window(new[EVENT_TIMESTAMP])
    log.info("materializing %d layer rows over [%s, %s]", len(new), start, end)
    with _fast_dask_tokens():
        store.materialize(start_date=start, end_date=end, feature_views=[USER_LAYER_VIEW])
    return {"rows": len(new), "total_rows": len(combined), "watermark": end.isoformat()}


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
    # The cached registry is fine here: serving must not pay a registry read per request.
    service = store.get_feature_service(service_name, allow_cache=True)
    columns = store.get_online_features(features=service, entity_rows=[{key: k} for k in keys]).to_dict()
    names = [c for c in columns if c != key]
    return {k: {name: columns[name][row] for name in names} for row, k in enumerate(keys)}


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
