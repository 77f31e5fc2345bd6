"""Feast objects of the recommender: entities, file sources, feature views and feature services.

Built by a function rather than at import time, so the same definitions serve any feature
repository folder (a workspace, a test's tmp dir) with absolute source paths. ``repo.py``
beside this file is the thin module-level wrapper the ``feast`` CLI needs.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Array, Float32, Float64, Int64, String
from feast.value_type import ValueType

from stratarec.schema import (
    CREATED_TIMESTAMP,
    EVENT_TIMESTAMP,
    FEATURE_SERVICE,
    GENRES,
    ITEM_CATALOG_VIEW,
    ITEM_ENTITY,
    ITEM_ID,
    ITEM_POPULARITY,
    ITEM_TEXT_EMBEDDING,
    LAYER_COARSE,
    LAYER_FINE,
    LAYER_NAME,
    RELEASE_YEAR,
    TITLE,
    USER_ACTIVITY_VIEW,
    USER_ENTITY,
    USER_EVENT_COUNT,
    USER_GENRE_MIX,
    USER_ID,
    USER_LAST_EVENT_TS,
    USER_LAYER_VIEW,
    USER_MEAN_GAP_DAYS,
    USER_RECENT_ITEMS,
)

# Not in stratarec.schema yet (that file belongs to the lead): the item-side service name.
ITEM_FEATURE_SERVICE = "item_catalog_v1"

# Parquet files inside the data folder, one per feature view.
USER_ACTIVITY_FILE = "user_activity.parquet"
USER_LAYER_FILE = "user_interest_layer.parquet"
ITEM_CATALOG_FILE = "item_catalog.parquet"
SOURCE_FILES: dict[str, str] = {
    USER_ACTIVITY_VIEW: USER_ACTIVITY_FILE,
    USER_LAYER_VIEW: USER_LAYER_FILE,
    ITEM_CATALOG_VIEW: ITEM_CATALOG_FILE,
}
# The join key of each view's entity: materialization plans its chunks from the source's
# (join key, event_timestamp) columns without a registry round trip.
VIEW_JOIN_KEYS: dict[str, str] = {
    USER_ACTIVITY_VIEW: USER_ID,
    USER_LAYER_VIEW: USER_ID,
    ITEM_CATALOG_VIEW: ITEM_ID,
}

# ttl 0 means "never expires" in Feast: a user's last snapshot stays their state however
# long ago they were active (MovieLens ends in 1998); staleness is judged at serving time
# from last_event_ts and the freshness threshold instead.
NO_EXPIRY = timedelta(0)


def _source(data_dir: Path, view: str) -> FileSource:
    return FileSource(
        name=f"{view}_source",
        path=str(data_dir / SOURCE_FILES[view]),
        timestamp_field=EVENT_TIMESTAMP,
        created_timestamp_column=CREATED_TIMESTAMP,
    )


def build_definitions(data_dir: str) -> list:
    """Every Feast object of the repository, reading its Parquet sources from ``data_dir``.

    Args:
        data_dir: Folder holding user_activity.parquet, user_interest_layer.parquet and
            item_catalog.parquet; made absolute, so the registry never depends on the
            working directory of whoever applied it.

    Returns:
        [user, item, three FileSources, user_activity, user_interest_layer, item_catalog,
        recommender_v1, item_catalog_v1], ready for ``FeatureStore.apply``.
    """
    root = Path(data_dir).expanduser().resolve()
    user = Entity(name=USER_ENTITY, join_keys=[USER_ID], value_type=ValueType.INT64, description="A user of the recommender.")
    item = Entity(name=ITEM_ENTITY, join_keys=[ITEM_ID], value_type=ValueType.INT64, description="A recommendable item.")

    activity_source = _source(root, USER_ACTIVITY_VIEW)
    layer_source = _source(root, USER_LAYER_VIEW)
    catalog_source = _source(root, ITEM_CATALOG_VIEW)

    user_activity = FeatureView(
        name=USER_ACTIVITY_VIEW,
        entities=[user],
        ttl=NO_EXPIRY,
        online=True,
        source=activity_source,
        schema=[
            Field(name=USER_ID, dtype=Int64),
            Field(name=USER_EVENT_COUNT, dtype=Int64),
            Field(name=USER_LAST_EVENT_TS, dtype=Int64, description="Epoch seconds of the latest event."),
            Field(name=USER_MEAN_GAP_DAYS, dtype=Float64),
            Field(name=USER_GENRE_MIX, dtype=Array(Float32), description="Share of events per genre, sorted genre order."),
            Field(name=USER_RECENT_ITEMS, dtype=Array(Int64), description="Last N item ids, oldest first."),
        ],
        description="The user's state right after each of their events (one row per event).",
    )
    user_layer = FeatureView(
        name=USER_LAYER_VIEW,
        entities=[user],
        ttl=NO_EXPIRY,
        online=True,
        source=layer_source,
        schema=[
            Field(name=USER_ID, dtype=Int64),
            Field(name=LAYER_COARSE, dtype=Int64),
            Field(name=LAYER_FINE, dtype=Int64),
            Field(name=LAYER_NAME, dtype=String),
        ],
        description="Interest layer of each user, written when a model is released.",
    )
    item_catalog = FeatureView(
        name=ITEM_CATALOG_VIEW,
        entities=[item],
        ttl=NO_EXPIRY,
        online=True,
        source=catalog_source,
        schema=[
            Field(name=ITEM_ID, dtype=Int64),
            Field(name=TITLE, dtype=String),
            Field(name=GENRES, dtype=String),
            Field(name=RELEASE_YEAR, dtype=Int64, description="-1 when unknown."),
            Field(name=ITEM_POPULARITY, dtype=Int64),
            Field(name=ITEM_TEXT_EMBEDDING, dtype=Array(Float32), description="Unit-norm text embedding of title and genres."),
        ],
        description="Item attributes, popularity and text embedding.",
    )
    recommender = FeatureService(
        name=FEATURE_SERVICE,
        features=[user_activity, user_layer],
        description="User features read by training (historical) and serving (online).",
    )
    catalog_service = FeatureService(name=ITEM_FEATURE_SERVICE, features=[item_catalog], description="Item catalogue features.")
    return [
        user,
        item,
        activity_source,
        layer_source,
        catalog_source,
        user_activity,
        user_layer,
        item_catalog,
        recommender,
        catalog_service,
    ]
